"""jobs/visualize.py and pipeline.readers.overlay: the dynamics map over a real clip, from a file and from an output.

The pictures are checked for what a person needs to see: the right size, not blank, many colours, the clusters'
own colours present, one GIF frame per sampled frame.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.readers import overlay
from bad_inputs import assert_one_line_error, bad_query_videos
from job_scripts import load_job_script

JOB = Path(__file__).resolve().parents[2] / "jobs" / "visualize.py"


@pytest.fixture(scope="module")
def visualize():
    return load_job_script("visualize")


def colours_present(image: np.ndarray, colours: np.ndarray, tolerance: int = 6) -> int:
    """How many of `colours` [K, 3] occur (within tolerance per channel) somewhere in `image` [h, w, 3]."""
    pixels = np.unique(image.reshape(-1, 3), axis=0).astype(int)
    return sum(bool((np.abs(pixels - colour).max(axis=1) <= tolerance).any()) for colour in colours.astype(int))


# ---------------------------------------------------------------------------------------------------------------
# drawing helpers, against hand-computed answers


def test_centres_of_mass_by_hand():
    dynamics = np.array([[[0, 0, 1],
                          [0, 2, 1]],
                         [[1, 1, 1],
                          [1, 1, 0]]])
    centres = overlay.centres_of_mass(dynamics, k=4)
    assert centres.shape == (2, 4, 2)
    # frame 0, cluster 0: cells (0,0), (0,1), (1,0) -> rows 0.5, 0.5, 1.5; cols 0.5, 1.5, 0.5
    assert centres[0, 0] == pytest.approx([2.5 / 3, 2.5 / 3])
    assert centres[0, 1] == pytest.approx([1.0, 2.5])
    assert centres[0, 2] == pytest.approx([1.5, 1.5])
    assert np.isnan(centres[1, 2]).all() and np.isnan(centres[:, 3]).all()  # absent clusters
    assert centres[1, 0] == pytest.approx([1.5, 2.5])
    assert overlay.moving_clusters(centres).tolist() == [0, 1]


def test_cluster_colours_are_distinct():
    colours = overlay.cluster_colours(64).astype(int)
    gaps = np.abs(colours[:, None] - colours[None]).sum(axis=-1) + np.eye(64, dtype=int) * 999
    assert gaps.min() > 10


def test_overlay_paints_each_cell_in_its_cluster_colour():
    frames = np.zeros((1, 20, 30, 3), dtype=np.uint8)
    dynamics = np.array([[[0, 1, 1], [2, 2, 0]]])
    colours = overlay.cluster_colours(3)
    painted = overlay.overlay_frames(frames, dynamics, colours, alpha=1.0)[0]
    # Cell (1, 1) spans rows 10..19, columns 10..19; away from borders it is exactly cluster 2's colour.
    assert painted[15, 15].tolist() == colours[2].tolist()
    assert painted[5, 5].tolist() == colours[0].tolist()
    assert painted[10, 15].tolist() != colours[2].tolist()  # a border between clusters 1 and 2 is darkened


def test_overlay_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="frames but the dynamics map has"):
        overlay.overlay_frames(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        overlay.overlay_frames(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2), np.int64))


# ---------------------------------------------------------------------------------------------------------------
# the job on a real clip


def check_pictures(png: Path, gif: Path, frames: int, k: int, frame_size: int = 224) -> None:
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape[0] >= 500 and picture.shape[1] >= 1000
    assert picture.std() > 30  # not blank
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 1000  # frames, blended overlays, lines
    # The trajectories are drawn in the clusters' own colours.
    assert colours_present(picture, overlay.cluster_colours(k)) >= min(k, 5)
    with Image.open(gif) as animation:
        assert animation.n_frames == frames
        assert animation.size == (2 * frame_size, 2 * frame_size)
        first = np.asarray(animation.convert("RGB"))
        animation.seek(frames - 1)
        last = np.asarray(animation.convert("RGB"))
    assert np.abs(first.astype(int) - last).mean() > 5  # the animation moves


def test_visualize_a_video_file(visualize, sample_clip_paths, tmp_path, capsys):
    code = visualize.main([str(sample_clip_paths["bikes"]), "--frames", "6", "--k", "8", "--output-dir",
                           str(tmp_path)])
    assert code == 0
    png, gif = tmp_path / "bikes_dynamics.png", tmp_path / "bikes_dynamics.gif"
    assert f"wrote {png}" in capsys.readouterr().out
    check_pictures(png, gif, frames=6, k=8)


def test_visualize_a_stored_video(visualize, sample_clip_paths, tmp_path):
    import pyarrow as pa

    import tokendyn
    from pipeline.job.decode import decode_video
    from pipeline.job.encoders import load_encoder
    from pipeline.store.schema import now_utc, video_row, video_schema
    from pipeline.store.storage import OutputStore

    uri = str(sample_clip_paths["carphone_pristine"])
    encoder = load_encoder("efficientnet-lite0")
    clip = decode_video(uri, num_frames=5, size=encoder.input_size)
    video = tokendyn.compress(encoder.encode(clip.frames), k=6)
    row = {"video_id": "carphone-1", "uri": uri, **video_row(
        video, frame_indices=clip.frame_indices, fps=clip.fps, source_frames=clip.source_frames,
        encoder=encoder.name, encoder_layer=None, base_dtype="float16", created_at=now_utc())}
    root = tmp_path / "output"
    OutputStore(str(root)).write_videos(pa.Table.from_pylist([row], schema=video_schema(encoder.dim)))

    args = visualize.parse_args(["--output-root", str(root), "--video-id", "carphone-1"])
    drawn = visualize.clip_from_output(args)
    assert np.array_equal(drawn.dynamics, video.dynamics.numpy())  # the stored map, not a new compression
    assert np.array_equal(drawn.frames, clip.frames)  # the frames it was computed from
    assert drawn.k == video.base.shape[0]

    out = tmp_path / "pictures"
    code = visualize.main(["--output-root", str(root), "--video-id", "carphone-1", "--output-dir", str(out)])
    assert code == 0
    check_pictures(out / "carphone-1_dynamics.png", out / "carphone-1_dynamics.gif", frames=5, k=drawn.k)


def test_frames_at_reads_indices_that_uniform_sampling_would_not_give(visualize, sample_clip_paths):
    from pipeline.job.decode import decode_video

    uri = str(sample_clip_paths["carphone_pristine"])
    every_frame = decode_video(uri, num_frames=None, fps=1000.0, size=(64, 64))
    indices = [3, 4, 50, 7]
    frames = visualize.frames_at(uri, indices, (64, 64), "decord", None)
    assert np.array_equal(frames, every_frame.frames[indices])


def test_bad_inputs_are_clear_errors(visualize, tmp_path, capsys):
    assert visualize.main([str(tmp_path / "missing.mp4"), "--output-dir", str(tmp_path)]) == 2
    assert "video not found" in capsys.readouterr().err
    empty_root = tmp_path / "empty-output"
    empty_root.mkdir()
    assert visualize.main(["--output-root", str(empty_root), "--video-id", "x", "--output-dir", str(tmp_path)]) == 2
    assert "holds no videos" in capsys.readouterr().err
    for argv in ([], ["a.mp4", "--output-root", "x"], ["--output-root", "x"], ["a.mp4", "--k", "zero"]):
        with pytest.raises(SystemExit) as exit_info:
            visualize.parse_args(argv)
        assert exit_info.value.code == 2


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--output-root", "--video-id", "--output-dir", "--frames", "--k"):
        assert option in result.stdout


@pytest.mark.parametrize("name", ["missing", "corrupt", "text", "empty", "directory"])
def test_a_bad_video_is_a_one_line_error_with_exit_2(visualize, tmp_path, capsys, name):
    video = bad_query_videos(tmp_path / "videos")[name]
    assert visualize.main([str(video), "--frames", "2", "--k", "2", "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err)
