"""jobs/bench/bench_motion.py: the clips show what their captions say, and a small run of the whole benchmark (real job,
baselines, training, held-out evaluation) lowers the held-out loss and prints its table."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from job_scripts import load_job_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script():
    return load_job_script("bench/bench_motion")


def red_centres(path: Path) -> np.ndarray:
    """[T, 2] (y, x) of the red pixels in each frame (the background is greyish, never this saturated)."""
    return colour_centres(path, lambda f: (f[..., 0] > 170) & (f[..., 1] < 100) & (f[..., 2] < 100))


def colour_centres(path: Path, is_colour) -> np.ndarray:
    """[T, 2] (y, x) of the pixels `is_colour` ([H, W, 3] int -> [H, W] bool) picks in each frame."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24").astype(int) for frame in container.decode(video=0)]
    return np.array([np.argwhere(is_colour(f)).mean(0) for f in frames])


@pytest.mark.parametrize("direction", ["left", "right", "up", "down", "still"])
def test_a_generated_clip_moves_its_object_the_way_its_caption_says(tmp_path, direction):
    script = load_script()
    path = tmp_path / "clip.mp4"
    track = script.write_clip(path, "red", "circle", direction, frames=8, size=48, rng=np.random.default_rng(1))
    centres = red_centres(path)
    assert len(centres) == 8
    expected = np.array(script.DIRECTIONS[direction]) * 48 * 0.35
    assert np.all(np.abs(centres[-1] - centres[0] - expected) < 48 * 0.16), (direction, centres)
    assert np.abs(centres - [script.object_centre(track, t) for t in range(8)]).max() < 1.5


@pytest.mark.parametrize("first, then", [("left", "up"), ("down", "right"), ("right", "still")])
def test_a_turn_clip_moves_one_way_then_the_other_as_its_track_says(tmp_path, first, then):
    script = load_script()
    track = script.write_clip(tmp_path / "clip.mp4", "red", "circle", then, frames=9, size=48,
                              rng=np.random.default_rng(2), first=first)
    centres = red_centres(tmp_path / "clip.mp4")
    for (start, end), direction in (((0, 4), first), ((4, 8), then)):  # each half: travel 0.35-0.5 of 48, halved
        expected = np.array(script.DIRECTIONS[direction]) * 48 * 0.21
        assert np.all(np.abs(centres[end] - centres[start] - expected) < 48 * 0.08), (direction, centres)
    assert np.abs(centres - [script.object_centre(track, t) for t in range(9)]).max() < 1.5


@pytest.mark.parametrize("direction, pan", [("still", "right"), ("left", "left"), ("up", "right")])
def test_a_pan_clip_moves_the_object_on_screen_by_its_motion_less_the_camera_s(tmp_path, direction, pan):
    script = load_script()
    track = script.write_clip(tmp_path / "clip.mp4", "red", "circle", direction, frames=8, size=48,
                              rng=np.random.default_rng(3), pan=pan)
    centres = red_centres(tmp_path / "clip.mp4")
    camera = np.array(track["camera"])
    assert np.allclose(np.abs(camera).max(), 48 * 0.2, atol=48 * 0.05)
    scene = centres[-1] - centres[0] + camera  # where the object went in the scene
    expected = np.array(script.DIRECTIONS[direction]) * 48 * 0.3
    assert np.all(np.abs(scene - expected) < 48 * 0.07), (scene, expected)
    assert np.abs(centres - [script.object_centre(track, t) for t in range(8)]).max() < 1.5
    # The background moves against the camera too: the first frame's top-left block reappears shifted.
    with av.open(str(tmp_path / "clip.mp4")) as container:
        first, *_, last = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    shift = -np.round(camera).astype(int)
    y0, x0 = max(0, -shift[0]), max(0, -shift[1])
    block = first[y0 + 0: y0 + 8, x0: x0 + 8]
    assert np.abs(last[y0 + shift[0]: y0 + shift[0] + 8, x0 + shift[1]: x0 + shift[1] + 8] - block).mean() < 12


@pytest.mark.parametrize("direction, other", [("left", "up"), ("still", "right"), ("down", "still")])
def test_a_two_object_clip_moves_the_large_object_and_the_small_one_each_its_own_way(tmp_path, direction, other):
    script = load_script()
    track = script.write_clip(tmp_path / "clip.mp4", "red", "circle", direction, frames=8, size=64,
                              rng=np.random.default_rng(4), other=("blue", "square", other))
    red = red_centres(tmp_path / "clip.mp4")  # the large object is drawn over the small one: always whole
    blue = colour_centres(tmp_path / "clip.mp4", lambda f: (f[..., 2] > 170) & (f[..., 0] < 100) & (f[..., 1] < 140))
    for centres, way, object_track in ((red, direction, track), (blue, other, track["other"])):
        expected = np.array(script.DIRECTIONS[way]) * 64 * 0.35
        assert np.all(np.abs(centres[-1] - centres[0] - expected) < 64 * 0.16), (way, centres)
    assert np.abs(red - [script.object_centre(track, t) for t in range(8)]).max() < 1.5
    assert track["other"]["radius"] == pytest.approx(track["radius"] * script.OTHER_SCALE)


def test_captions_of_the_harder_suites_name_the_direction_asked():
    script = load_script()
    assert script.attribute_values(script.caption_of("red", "circle", "up", first="left")) == {
        "direction": "up", "colour": "red", "shape": "circle"}
    assert script.attribute_values(script.caption_of("red", "circle", "still", first="left"))["direction"] == "still"
    assert script.attribute_values(script.caption_of("blue", "square", "down", pan="left")) == {
        "direction": "down", "colour": "blue", "shape": "square"}
    assert script.attribute_values(script.caption_of("blue", "square", "still", pan="up"))["direction"] == "still"
    two = script.caption_of("red", "circle", "still", other=("blue", "square", "down"))
    assert two == "a red circle stays still and a small blue square moves down"
    assert script.attribute_values(two) == {"direction": "still", "colour": "red", "shape": "circle"}
    assert script.question_of("shape", "two") == "What shape is the large object?"


def test_captions_name_one_value_of_each_attribute():
    script = load_script()
    assert script.attribute_values(script.caption_of("blue", "triangle", "still")) == {
        "direction": "still", "colour": "blue", "shape": "triangle"}
    assert script.attribute_values("a red or blue thing moves") == {"direction": None, "colour": None, "shape": None}


def test_a_small_benchmark_run_lowers_the_held_out_loss(tmp_path, ray_local, tiny_llm_dir, capsys):
    script = load_script()
    args = script.parse_args(["--workdir", str(tmp_path), "--clips", "10", "--heldout", "0.3", "--clip-frames", "8",
                              "--clip-size", "64", "--frames", "4", "--k", "4", "--steps", "12", "--eval-every", "5", "--batch-size", "4",
                              "--llm", str(tiny_llm_dir), "--llm-train", "full", "--raw-steps", "0",
                              "--variants", "token-dynamics,frame-pool", "--video-width", "16", "--video-heads", "2"])
    results = script.run(args)
    scores = results["variants"]["token-dynamics"]
    assert scores["heldout_loss"] < scores["untrained"]["heldout_loss"]
    # The curve: training resumed from its checkpoint at steps 5 and 10, to 12; the last point is the final model.
    assert [step for step, _ in scores["heldout_curve"]] == [5, 10, 12]
    assert scores["heldout_curve"][-1][1] == pytest.approx(scores["heldout_loss"])
    low, high = scores["direction_interval"]
    assert low <= scores["direction_acc"] <= high
    assert set(results["variants"]) == {"token-dynamics", "frame-pool"}
    for variant in results["variants"].values():
        assert all(0 <= variant[f"{name}_acc"] <= 1 for name in ("direction", "colour", "shape"))
    out = capsys.readouterr().out
    assert "Held-out accuracy" in out and "frame-pool" in out
    assert json.loads((tmp_path / "results.json").read_text())["variants"]["frame-pool"]["heldout_loss"] > 0


def test_the_qa_task_trains_on_questions_and_scores_multiple_choice(tmp_path, ray_local, tiny_llm_dir, capsys):
    """In two runs, as on a GPU machine: the caches are built first (nothing trains), then trained and scored."""
    script = load_script()
    flags = ["--workdir", str(tmp_path), "--clips", "8", "--heldout", "0.25", "--clip-frames", "8",
             "--clip-size", "64", "--frames", "4", "--k", "4", "--steps", "6", "--batch-size", "4",
             "--llm", str(tiny_llm_dir), "--llm-train", "full", "--raw-steps", "0", "--task", "qa",
             "--variants", "token-dynamics", "--video-width", "16", "--video-heads", "2", "--max-new-tokens", "3"]
    built = script.run(script.parse_args([*flags, "--caches-only"]))
    assert sorted(path.name for path in built["caches"].iterdir()) == sorted(["token-dynamics", *script.BASELINES])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()
    results = script.run(script.parse_args([*flags, "--reuse-caches"]))
    manifest = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert manifest[0]["questions"][0] == "Which way does the object move?"
    assert manifest[0]["answers"] == [manifest[0][name] for name in ("direction", "colour", "shape")]
    scores = results["variants"]["token-dynamics"]
    assert scores["heldout_loss"] < scores["untrained"]["heldout_loss"]
    for attribute in ("direction", "colour", "shape"):
        for score in ("likelihood", "mean-likelihood", "exact-match"):
            accuracy, low, high = scores[f"{attribute}_{score}"]
            assert 0 <= low <= accuracy <= high <= 1
    assert "multiple-choice accuracy" in capsys.readouterr().out
