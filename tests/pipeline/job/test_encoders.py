"""Encoders: the offline EfficientNet-Lite0 default on real frames, and tiny transformers towers loaded from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.job.decode import decode_video
from pipeline.job.encoders import Encoder, encoder_input_size, load_encoder

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (real ImageNet weights)


@pytest.fixture(scope="module")
def efficientnet():
    return load_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def real_frames_224(sample_clip_paths) -> dict[str, np.ndarray]:
    """2 frames of each real clip, as the pipeline decodes them."""
    return {name: decode_video(path, num_frames=2, size=(224, 224)).frames for name, path in sample_clip_paths.items()}


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    return unit @ unit.T


def test_default_encoder_shapes_and_attributes(efficientnet, real_frames_224):
    assert isinstance(efficientnet, Encoder)
    assert (efficientnet.name, efficientnet.layer, efficientnet.dim) == ("efficientnet-lite0", None, 1280)
    assert efficientnet.grid == (7, 7) and efficientnet.input_size == (224, 224)
    assert efficientnet.device == torch.device("cpu") and efficientnet.dtype == torch.float32
    tokens = efficientnet.encode(real_frames_224["bikes"])
    assert tokens.shape == (2, 7, 7, 1280) and tokens.dtype == torch.float32 and tokens.device.type == "cpu"
    assert torch.isfinite(tokens).all()
    # Patch tokens differ across the grid (a spatial map, not one broadcast vector).
    assert tokens[0].reshape(49, -1).std(dim=0).mean() > 0.05


def test_default_encoder_tokens_are_meaningful_on_real_clips(efficientnet, real_frames_224):
    """Retrieval: a clip's mirrored frames find the clip itself, by a wide margin over every other clip."""
    names = list(real_frames_224)
    frames = np.concatenate([real_frames_224[name] for name in names])  # one batch across videos
    mirrored = np.ascontiguousarray(frames[:, :, ::-1])

    def clip_vectors(batch: np.ndarray) -> torch.Tensor:
        pooled = efficientnet.encode(batch).mean(dim=(1, 2))  # [clips * 2, 1280]
        return torch.nn.functional.normalize(pooled.reshape(len(names), 2, -1).mean(dim=1), dim=-1)

    similarity = clip_vectors(mirrored) @ clip_vectors(frames).T  # queries x keys
    assert similarity.argmax(dim=1).tolist() == list(range(len(names)))
    others = similarity.masked_fill(torch.eye(len(names), dtype=torch.bool), -1.0)
    # Random or badly normalised features put every clip near cosine 1 (measured ~0.99 for random weights);
    # real ones separate scenes (measured: >= 0.97 for the mirror, <= 0.6 across clips).
    assert (similarity.diagonal() - others.max(dim=1).values).min() > 0.25


def test_encoder_rejects_frames_of_the_wrong_shape_or_dtype(efficientnet):
    with pytest.raises(ValueError, match="224"):
        efficientnet.encode(np.zeros((2, 112, 112, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        efficientnet.encode(np.zeros((2, 224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="layer"):
        load_encoder("efficientnet-lite0", layer=3)
    with pytest.raises(ValueError, match="dtype"):
        load_encoder("efficientnet-lite0", dtype="int8")


# ---------------------------------------------------------------------------------------------------------------
# transformers vision towers (tiny, random weights, saved to disk)


@pytest.fixture(scope="module")
def frames_64(sample_clip_paths) -> np.ndarray:
    return np.concatenate(
        [decode_video(sample_clip_paths[name], num_frames=2, size=(64, 64)).frames for name in ("bikes", "carphone_pristine")]
    )


def reference_hidden_states(model_dir, model_class, processor_class, frames) -> tuple[torch.Tensor, ...]:
    """What the model itself returns, preprocessed by its own image processor."""
    model = model_class.from_pretrained(model_dir).eval()
    pixels = processor_class.from_pretrained(model_dir)(images=list(frames), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


def test_tiny_siglip_loads_from_a_directory_with_the_right_grid_and_layers(tiny_siglip_dir, frames_64):
    from transformers import SiglipImageProcessorPil, SiglipVisionModel

    reference = reference_hidden_states(tiny_siglip_dir, SiglipVisionModel, SiglipImageProcessorPil, frames_64)
    encoder = load_encoder(str(tiny_siglip_dir))
    assert (encoder.grid, encoder.dim, encoder.input_size) == ((4, 4), 32, (64, 64))
    assert encoder.layer == 1  # default -2 of hidden states [embeddings, block 1, block 2]

    tokens = encoder.encode(frames_64)
    assert tokens.shape == (4, 4, 4, 32) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, reference[-2].reshape(4, 4, 4, 32), rtol=1e-4, atol=1e-4)  # no CLS in SigLIP

    for layer, expected in ((-1, reference[2]), (0, reference[0]), (2, reference[2])):
        chosen = load_encoder(str(tiny_siglip_dir), layer=layer)
        torch.testing.assert_close(chosen.encode(frames_64), expected.reshape(4, 4, 4, 32), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reference[1], reference[2])  # layers differ, so the choice above is observable
    with pytest.raises(ValueError, match="out of range"):
        load_encoder(str(tiny_siglip_dir), layer=3)


def test_two_tower_siglip_checkpoint_loads_only_its_vision_tower(tmp_path, tiny_vision_config, frames_64):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    two_tower = SiglipModel(SiglipConfig(text_config=text, vision_config=tiny_vision_config)).eval()
    two_tower.save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp_path)

    encoder = load_encoder(str(tmp_path))

    assert not any(name.startswith("text") for name, _ in encoder.model.named_parameters())
    pixels = SiglipImageProcessorPil.from_pretrained(tmp_path)(images=list(frames_64), return_tensors="pt")
    with torch.inference_mode():
        hidden = two_tower.vision_model(pixel_values=pixels["pixel_values"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(encoder.encode(frames_64), hidden[-2].reshape(4, 4, 4, 32), rtol=1e-4, atol=1e-4)


def test_tiny_clip_drops_the_cls_token(tiny_clip_dir, frames_64):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    reference = reference_hidden_states(tiny_clip_dir, CLIPVisionModel, CLIPImageProcessorPil, frames_64)
    encoder = load_encoder(str(tiny_clip_dir))
    assert (encoder.grid, encoder.dim, encoder.input_size, encoder.layer) == ((4, 4), 32, (64, 64), 1)
    assert reference[-2].shape[1] == 17  # CLS + 16 patches
    torch.testing.assert_close(
        encoder.encode(frames_64), reference[-2][:, 1:].reshape(4, 4, 4, 32), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("registers", [0, 4])
def test_tiny_dinov2_drops_cls_and_register_tokens(tmp_path, tiny_dinov2_dir, tiny_vision_config, frames_64, registers):
    from transformers import (
        AutoModel,
        BitImageProcessorPil,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    model_dir = tiny_dinov2_dir
    if registers:
        model_dir = tmp_path / "dinov2_registers"
        config = Dinov2WithRegistersConfig(**tiny_vision_config, num_register_tokens=registers)
        Dinov2WithRegistersModel(config).save_pretrained(model_dir)
        BitImageProcessorPil.from_pretrained(tiny_dinov2_dir).save_pretrained(model_dir)

    reference = reference_hidden_states(model_dir, AutoModel, BitImageProcessorPil, frames_64)
    encoder = load_encoder(str(model_dir), layer=-1)
    assert (encoder.grid, encoder.dim, encoder.layer) == ((4, 4), 32, 2)
    assert reference[-1].shape[1] == 1 + registers + 16
    torch.testing.assert_close(
        encoder.encode(frames_64), reference[-1][:, 1 + registers :].reshape(4, 4, 4, 32), rtol=1e-4, atol=1e-4
    )


def test_input_size_is_known_without_loading_weights(tiny_siglip_dir, tiny_clip_dir, tmp_path):
    assert encoder_input_size() == encoder_input_size("efficientnet-lite0") == (224, 224)
    assert encoder_input_size(str(tiny_siglip_dir)) == (64, 64)
    # The crop size wins over the resize target when the processor crops.
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 80}, crop_size={"height": 48, "width": 64}).save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    assert encoder_input_size(str(tmp_path)) == (48, 64)
    assert load_encoder(str(tmp_path)).input_size == (48, 64)


def test_frames_of_several_videos_share_one_batch_without_changing_tokens(tiny_siglip_dir, frames_64):
    encoder = load_encoder(str(tiny_siglip_dir))
    together = encoder.encode(frames_64)  # frames of two videos in one call
    torch.testing.assert_close(encoder.encode(frames_64[2:]), together[2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder.encode(torch.from_numpy(frames_64)), together)


def test_tiny_tower_in_reduced_precision_still_returns_float32(tiny_siglip_dir, frames_64):
    encoder = load_encoder(str(tiny_siglip_dir), dtype="bfloat16")
    assert encoder.dtype == torch.bfloat16 and next(encoder.model.parameters()).dtype == torch.bfloat16
    full = load_encoder(str(tiny_siglip_dir)).encode(frames_64)
    reduced = encoder.encode(frames_64)
    assert reduced.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(reduced.flatten(0, 2), full.flatten(0, 2)).min() > 0.98


def test_checkpoint_without_image_processor_is_a_clear_error(tmp_path, tiny_vision_config):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**tiny_vision_config)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_encoder(str(tmp_path))


@CUDA
@pytest.mark.parametrize("name", ["efficientnet-lite0", "tiny_siglip"])
def test_cuda_encoders_run_in_half_precision_and_match_cpu(name, tiny_siglip_dir, real_frames_224, frames_64):
    model_name, frames = ("efficientnet-lite0", real_frames_224["bikes"]) if name == "efficientnet-lite0" else (
        str(tiny_siglip_dir), frames_64)
    on_gpu = load_encoder(model_name, device="cuda")
    assert on_gpu.dtype in (torch.bfloat16, torch.float16)
    tokens = on_gpu.encode(frames)
    assert tokens.device.type == "cuda" and tokens.dtype == torch.float32
    reference = load_encoder(model_name).encode(frames)
    cosine = torch.nn.functional.cosine_similarity(tokens.cpu().flatten(0, 2), reference.flatten(0, 2))
    assert cosine.mean() > 0.98


# ---------------------------------------------------------------------------------------------------------------
# input size: a finer token grid from the same weights


def test_efficientnet_at_448_gives_a_14_by_14_grid_of_the_same_features(efficientnet, sample_clip_paths):
    wide = load_encoder("efficientnet-lite0", input_size=448)
    assert (wide.input_size, wide.grid) == ((448, 448), (14, 14))
    assert encoder_input_size(input_size=448) == (448, 448)
    frames = decode_video(sample_clip_paths["bikes"], num_frames=1, size=(448, 448)).frames
    fine = wide.encode(frames)
    assert fine.shape == (1, 14, 14, 1280)
    # The same weights on the same places: each 2 x 2 block of the fine grid, pooled, is far closer to the coarse
    # cell of the half-size frame at the same place than to the other cells (measured: 0.46-0.47 against 0.17).
    small = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
                                                       size=(224, 224), mode="area").round().byte()
                       .permute(0, 2, 3, 1))
    coarse = efficientnet.encode(small)[0].reshape(49, -1)
    pooled = fine[0].reshape(7, 2, 7, 2, -1).mean((1, 3)).reshape(49, -1)
    similarity = cosine_matrix(torch.cat([pooled, coarse]))[:49, 49:]
    same_place = similarity.diag().mean()
    assert same_place > 2 * (similarity.sum() - similarity.diag().sum()) / (49 * 48), similarity


@pytest.mark.parametrize("size", [100, 0, 16])
def test_an_input_size_off_the_stride_is_refused(size):
    with pytest.raises(ValueError, match="multiple"):
        load_encoder("efficientnet-lite0", input_size=size)


@pytest.mark.parametrize("fixture", ["tiny_siglip_dir", "tiny_clip_dir", "tiny_dinov2_dir"])
def test_transformers_towers_interpolate_their_positions_to_another_input_size(request, fixture):
    path = str(request.getfixturevalue(fixture))
    native = load_encoder(path)
    wide = load_encoder(path, input_size=2 * native.input_size[0])
    assert wide.grid == (2 * native.grid[0], 2 * native.grid[1])
    frames = np.random.default_rng(0).integers(0, 256, (2, *wide.input_size, 3), dtype=np.uint8)
    tokens = wide.encode(frames)
    assert tokens.shape == (2, *wide.grid, native.dim) and torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="multiple"):
        load_encoder(path, input_size=native.input_size[0] + 3)
