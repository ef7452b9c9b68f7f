"""EncodeCompressStage: one batched fit per encoder batch, identical to compressing each video alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

import tokendyn
from pipeline.config import JobConfig
from pipeline.errors import no_failure
from pipeline.stages import EncodeCompressStage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stage_for(encoder_dir, **overrides) -> EncodeCompressStage:
    values = dict(input="unused", output="unused", encoder=str(encoder_dir), frames=3, k=0, k_min=2, k_max=6,
                  k_rule="fidelity", target_fidelity=0.97, seed=3, base_dtype="float32")
    return EncodeCompressStage(JobConfig(**{**values, **overrides}))


def frame_rows(stage: EncodeCompressStage, count: int, num_frames: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    h, w = stage.encoder.input_size
    rows = []
    for i in range(count):
        frames = rng.integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8)
        rows.append({"video_id": f"v{i}", "uri": f"file:///v{i}.mp4", **no_failure(), "frames": frames.tobytes(),
                     "frames_shape": list(frames.shape), "frame_indices": list(range(num_frames)), "fps": 10.0,
                     "source_frames": num_frames})
    return rows


@pytest.mark.parametrize("k, k_rule", [(0, "fidelity"), (0, "elbow"), (5, "fidelity")])
def test_batch_rows_equal_compressing_each_video_alone(tiny_siglip_dir, k, k_rule):
    stage = stage_for(tiny_siglip_dir, k=k, k_rule=k_rule)
    rows = frame_rows(stage, 3)
    written = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert all(row["error_stage"] is None for row in written)
    # The same forward pass as the stage's (one batch), then each video compressed on its own.
    frames = np.concatenate([np.frombuffer(r["frames"], np.uint8).reshape(r["frames_shape"]) for r in rows])
    with torch.inference_mode():
        tokens = torch.split(stage.encoder.encode(frames), 3)
    c = stage.config
    for row, video_tokens in zip(written, tokens):
        alone = tokendyn.compress(video_tokens, None if c.adaptive else c.k, k_min=c.k_min, k_max=c.k_max,
                                  k_rule=c.k_rule, target_fidelity=c.target_fidelity, seed=c.seed)
        stored = alone.to_storage("float32")
        assert row["k"] == alone.k and row["dynamics"] == stored["dynamics"]
        np.testing.assert_array_equal(np.asarray(row["base"], dtype=np.float32), stored["base"])


def test_a_video_that_cannot_be_compressed_fails_alone(tiny_siglip_dir):
    stage = stage_for(tiny_siglip_dir)
    g = torch.Generator().manual_seed(1)
    tokens = {name: torch.randn(3, 4, 4, 32, generator=g) for name in ("a", "b", "c")}
    tokens["b"][1, 2, 3, 4] = float("nan")
    compressed = stage._compress(tokens)
    assert isinstance(compressed["b"], ValueError) and "NaN" in str(compressed["b"])
    for name in ("a", "c"):
        alone = tokendyn.compress(tokens[name], None, k_min=2, k_max=6, target_fidelity=0.97, seed=3)
        assert torch.equal(compressed[name].dynamics, alone.dynamics)
        assert torch.equal(compressed[name].base, alone.base)
