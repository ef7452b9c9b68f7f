"""pipeline.job.tokenizer: one video -> its tokens from an output's settings record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokendyn
from pipeline.job.config import JobConfig
from pipeline.job.decode import decode_video
from pipeline.job.tokenizer import VideoTokenizer
from pipeline.store.contract import OutputContract


@pytest.mark.parametrize("flags, decode, compress", [
    (dict(frames=5, k=7, seed=2),
     dict(num_frames=5, fps=None, max_frames=None, decoder="decord", sample="exact"), dict(k=7, seed=2)),
    (dict(fps=2.0, max_frames=9, k=0, k_rule="elbow", decoder="pyav"),
     dict(num_frames=None, fps=2.0, max_frames=9, decoder="pyav", sample="exact"),
     dict(k=None, k_min=8, k_max=64, k_rule="elbow", seed=0)),
    (dict(k=0, k_min=3, k_max=12, target_fidelity=0.8, sample="keyframes"),
     dict(num_frames=16, fps=None, max_frames=None, decoder="decord", sample="keyframes"),
     dict(k=None, k_min=3, k_max=12, k_rule="fidelity", target_fidelity=0.8, seed=0)),
])
def test_settings_and_their_contract_give_the_same_steps(flags, decode, compress):
    settings = JobConfig(input="unused", **flags).output_settings()
    contract = OutputContract(settings=settings, encoder="efficientnet-lite0", layer=None, dim=1280)
    for tokenizer in (VideoTokenizer(settings), VideoTokenizer(contract)):
        assert tokenizer.decode_kwargs == decode
        assert tokenizer.compress_kwargs == compress
    assert VideoTokenizer(settings, decoder="pyav").decode_kwargs == {**decode, "decoder": "pyav"}


class _MeanColourEncoder:
    """A stand-in encoder: each frame's 2x2 quadrants as tokens [mean grey level / 255, row, column, 1]."""

    name, layer, input_size = "mean-colour", None, (32, 32)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        grey = frames.reshape(len(frames), 2, 16, 2, 16, 3).mean(axis=(2, 4, 5)) / 255.0  # [T, 2, 2]
        rows, cols = np.meshgrid([0.0, 1.0], [0.0, 1.0], indexing="ij")
        place = np.broadcast_to(np.stack([rows, cols, np.ones_like(rows)], -1), (*grey.shape, 3))
        return torch.from_numpy(np.concatenate([grey[..., None], place], -1).astype(np.float32))


def test_tokenize_is_decode_then_encode_then_compress(synthetic_clip):
    settings = JobConfig(input="unused", frames=6, k=3, seed=4, decoder="pyav").output_settings()
    tokenizer = VideoTokenizer(settings, encoder=_MeanColourEncoder())
    marks: dict[str, float] = {}
    clip, video = tokenizer.tokenize(str(synthetic_clip), marks)

    expected_clip = decode_video(str(synthetic_clip), num_frames=6, size=(32, 32), decoder="pyav")
    expected = tokendyn.compress(_MeanColourEncoder().encode(expected_clip.frames), k=3, seed=4)
    assert np.array_equal(clip.frames, expected_clip.frames)
    assert torch.equal(video.base, expected.base) and torch.equal(video.dynamics, expected.dynamics)
    assert marks["decode_s"] <= marks["encode_s"] <= marks["compress_s"]
    assert [v.k for v in tokenizer.compress_batch([tokenizer.encode(clip.frames)] * 2)] == [3, 3]
