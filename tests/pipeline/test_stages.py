"""The decode stage and the object-store budget that depends on what it emits: the --fps frame cap."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import JobConfig
from pipeline.decode import sample_frame_indices
from pipeline.job import decoded_video_bytes
from pipeline.stages import DecodeStage


def test_decode_stage_caps_fps_sampling_at_max_frames(synthetic_clip, frame_index_of):
    # 24 frames at 12 fps sampled at 12 fps would be 24 frames; the cap thins them uniformly to 5.
    stage = DecodeStage(JobConfig(input="unused", fps=12.0, max_frames=5), input_size=(16, 16))
    try:
        row = stage({"video_id": "v", "uri": str(synthetic_clip)})
    finally:
        stage.runner.close()
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
