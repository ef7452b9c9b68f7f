"""Clips of awkward frame sizes and pixel formats each become a row through the job, with --fps and its frame cap.

One job run (default encoder, Ray) over a manifest of tiny real clips: odd sizes (4:4:4 or grey, as 4:2:0 needs
even sizes), 1-pixel banners, 2x2, a 256x110 clip (its centre crop once failed in floating point) and 10-bit.
"""

from __future__ import annotations

import csv

import pytest

from pipeline.job.decode import sample_frame_indices
from pipeline.store.storage import OutputStore

# (height, width, pixel format) of each clip; all 24 frames at 12 fps.
CLIPS = [(110, 256, "yuv420p"), (33, 17, "yuv444p"), (2, 2, "yuv444p"), (1, 4000, "yuv444p"), (4000, 1, "yuv444p"),
         (7, 5, "gray"), (48, 64, "yuv420p10le")]
FPS, MAX_FRAMES = 12, 4  # 24 frames sampled at 12 fps would be 24: the cap thins them to 4


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory, make_synthetic_clip, run_job_on):
    folder = tmp_path_factory.mktemp("awkward")
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["video_id", "uri"])
        for height, width, pix_fmt in CLIPS:
            path = make_synthetic_clip("awkward", num_frames=24, fps=12, size=(height, width), pix_fmt=pix_fmt)
            writer.writerow([f"{height}x{width}-{pix_fmt}", str(path)])
    output = folder / "out"
    summary = run_job_on(manifest, output, "--fps", str(FPS), "--max-frames", str(MAX_FRAMES))
    return output, summary


def test_every_awkward_clip_becomes_a_row(awkward_run):
    output, summary = awkward_run
    assert (summary.ok, summary.failed) == (len(CLIPS), 0), summary.failed_by_stage
    rows = OutputStore(str(output)).read_videos().to_pylist()
    assert sorted(row["video_id"] for row in rows) == sorted(f"{h}x{w}-{p}" for h, w, p in CLIPS)
    capped = sample_frame_indices(24, fps=FPS, source_fps=12.0, max_frames=MAX_FRAMES)
    for row in rows:
        assert row["num_frames"] == MAX_FRAMES and row["frame_indices"] == capped, row["video_id"]
        assert row["fps"] == pytest.approx(12.0) and (row["grid_h"], row["grid_w"]) == (7, 7)
        assert len(row["dynamics"]) == MAX_FRAMES * 7 * 7  # one uint8 cluster id per frame and cell (K = 8)
