"""The Ray stages outside Ray: the decode stage's --fps frame cap and the object-store budget that depends on it;
EncodeCompressStage's one batched fit per encoder batch, identical to compressing each video alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

import tokendyn
from pipeline.job.config import JobConfig
from pipeline.job.decode import sample_frame_indices
from pipeline.job.errors import no_failure
from pipeline.job.run import decoded_video_bytes
from pipeline.job.stages import DecodeStage, EncodeCompressStage


def test_decode_stage_caps_fps_sampling_at_max_frames(synthetic_clip, frame_index_of):
    # 24 frames at 12 fps sampled at 12 fps would be 24 frames; the cap thins them uniformly to 5.
    stage = DecodeStage(JobConfig(input="unused", fps=12.0, max_frames=5), input_size=(16, 16))
    try:
        row = stage({"video_id": "v", "uri": str(synthetic_clip)})
    finally:
        stage.close()
    assert row["error_stage"] is None, row["error_message"]
    expected = sample_frame_indices(24, fps=12.0, source_fps=12.0, max_frames=5)
    assert row["frame_indices"] == expected and len(expected) == 5 and expected[-1] > 18
    assert row["frames_shape"] == [5, 16, 16, 3] and row["fps"] == pytest.approx(12.0)
    frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
    assert [frame_index_of(frame) for frame in frames] == expected


@pytest.mark.parametrize("flags, frames", [
    (dict(frames=16), 16),
    (dict(frames=16, fps=1.0), 256),  # the default cap, not --frames
    (dict(frames=16, fps=1.0, max_frames=1000), 1000),
])
def test_object_store_budget_counts_the_frames_a_video_can_have(flags, frames):
    config = JobConfig(input="unused", **flags)
    assert decoded_video_bytes(config, (224, 224)) == frames * 224 * 224 * 3


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


@pytest.mark.usefixtures("one_torch_thread")
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


@pytest.mark.usefixtures("one_torch_thread")
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
