"""jobs/evaluate.py on the real sample clips (few frames and segments, to stay fast) and its command line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from bad_inputs import assert_one_line_error, bad_query_videos
from job_scripts import load_job_script

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "evaluate.py"
FRAMES, SEGMENTS, KS = 4, 3, (8, 16)
GRID_CELLS = FRAMES * 7 * 7  # EfficientNet-Lite0: 7x7 tokens per frame


@pytest.fixture(scope="module")
def evaluate_job():
    return load_job_script("evaluate")


@pytest.fixture(scope="module")
def evaluation_on_sample_clips(evaluate_job, tmp_path_factory):
    """(output dir, printed text, JSON report) of one run over the four sample clips."""
    output = tmp_path_factory.mktemp("evaluation")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = evaluate_job.main(["--frames", str(FRAMES), "--segments", str(SEGMENTS), "--ks",
                                  ",".join(map(str, KS)), "--k-max", "16", "--threads", "1", "--encoder",
                                  "efficientnet-lite0", "--output-dir", str(output), "--quiet"])
    assert code == 0
    return output, printed.getvalue(), json.loads((output / "evaluation.json").read_text())


def results_by_label(report: dict) -> dict[str, dict]:
    return {result["label"]: result for result in report["results"]}


def test_prints_the_table_and_writes_the_files(evaluation_on_sample_clips):
    output, printed, report = evaluation_on_sample_clips
    table = (output / "evaluation.md").read_text()
    assert table in printed
    labels = ["full"] + [f"{method}@{budget}" for budget in (*KS, "adaptive")
                         for method in ("token_dynamics", "uniform_pool", "tome_merge")]
    assert [r["label"] for r in report["results"]] == labels
    for label in labels:
        assert f"| {label} |" in table
    assert report["gallery_size"] == 4 * SEGMENTS and report["queries"] == 4 * 4 * SEGMENTS
    assert report["grid"] == [FRAMES, 7, 7] and report["dim"] == 1280


def test_writes_a_plot(evaluation_on_sample_clips):
    output, _, _ = evaluation_on_sample_clips
    plot = np.asarray(Image.open(output / "evaluation.png").convert("RGB"))
    assert plot.shape[0] >= 300 and plot.shape[1] >= 1000
    assert plot.std() > 10
    # The three method colours (matplotlib's tab:red, tab:blue, tab:green) are drawn.
    for colour in ((214, 39, 40), (31, 119, 180), (44, 160, 44)):
        assert (np.abs(plot.reshape(-1, 3).astype(int) - colour).max(axis=1) <= 8).sum() > 50


def test_token_dynamics_reconstructs_better_than_both_baselines_at_equal_budget(evaluation_on_sample_clips):
    _, printed, report = evaluation_on_sample_clips
    by_label = results_by_label(report)
    for budget in (*KS, "adaptive"):
        ours = by_label[f"token_dynamics@{budget}"]
        for baseline in ("uniform_pool", "tome_merge"):
            theirs = by_label[f"{baseline}@{budget}"]
            # Equal budget (uniform pooling's bins must factor over the grid, so it may keep a few fewer).
            assert theirs["tokens_kept"] <= ours["tokens_kept"]
            if baseline == "tome_merge":
                assert theirs["tokens_kept"] == pytest.approx(ours["tokens_kept"])
            assert ours["rel_mse"] < theirs["rel_mse"], (budget, baseline, ours["rel_mse"], theirs["rel_mse"])
            assert ours["mean_cosine"] > theirs["mean_cosine"]
    assert all(report["reconstruction_wins"].values())
    assert "than both baselines at equal budget: K=8: yes, K=16: yes, K=adaptive: yes" in printed


def test_fidelity_and_budgets_are_consistent(evaluation_on_sample_clips):
    _, _, report = evaluation_on_sample_clips
    by_label = results_by_label(report)
    full = by_label["full"]
    assert full["rel_mse"] == pytest.approx(0.0, abs=1e-6) and full["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert full["tokens_kept"] == GRID_CELLS and full["bytes_per_video"] == GRID_CELLS * 1280 * 2
    for k in KS:
        ours = by_label[f"token_dynamics@{k}"]
        assert ours["tokens_kept"] == k and ours["token_ratio"] == pytest.approx(k / GRID_CELLS)
        assert ours["bytes_per_video"] == k * 1280 * 2 + 1280 * 4 + k * 4 + GRID_CELLS
        # The size-weighted mean of the base is the mean of the normalised tokens: pooling loses nothing.
        assert ours["pooled_cosine"] > 0.9999
    # More tokens, better reconstruction.
    assert by_label["token_dynamics@16"]["rel_mse"] < by_label["token_dynamics@8"]["rel_mse"]
    adaptive = by_label["token_dynamics@adaptive"]["tokens_kept"]
    assert 8 <= adaptive <= 16


def test_retrieval_scores(evaluation_on_sample_clips):
    _, _, report = evaluation_on_sample_clips
    by_label = results_by_label(report)
    chance_at_5 = 5 / report["gallery_size"]
    for result in report["results"]:
        for kind in ("pooled", "maxsim"):
            at_1, at_5 = result["recall"][kind]["1"], result["recall"][kind]["5"]
            assert 0.0 <= at_1 <= at_5 <= 1.0
    # With all tokens, altered copies are found far above chance.
    assert by_label["full"]["recall"]["maxsim"]["5"] > max(0.8, chance_at_5)
    assert by_label["full"]["recall"]["pooled"]["5"] > max(0.8, chance_at_5)
    # Token Dynamics' pooled vector equals the full one, so pooled retrieval gives the same answers.
    for k in KS:
        ours = by_label[f"token_dynamics@{k}"]["recall"]["pooled"]
        assert ours == pytest.approx(by_label["full"]["recall"]["pooled"])


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--output-dir", "--frames", "--ks", "--segments"):
        assert option in result.stdout


def test_bad_inputs_are_clear_errors(evaluate_job, tmp_path, capsys):
    assert evaluate_job.main([str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    assert "input not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_job.main([str(empty), "--output-dir", str(tmp_path)]) == 2
    assert "no video files" in capsys.readouterr().err
    assert evaluate_job.main(["--frames", "0", "--output-dir", str(tmp_path)]) == 2
    assert "frames must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate_job.parse_args(["--ks", "8,x"])
    assert exit_info.value.code == 2


def test_an_undecodable_file_is_skipped_and_named(evaluate_job, sample_clip_paths, corrupt_video_path, tmp_path,
                                                  capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for stem in ("carphone_pristine", "bikes"):
        (folder / f"{stem}.mp4").symlink_to(sample_clip_paths[stem])
    (folder / "broken.mp4").symlink_to(corrupt_video_path)
    code = evaluate_job.main([str(folder), "--frames", "2", "--segments", "2", "--ks", "4", "--no-adaptive",
                              "--threads", "1", "--quiet", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["clips"] == ["bikes", "carphone_pristine"] and report["gallery_size"] == 4
    assert len(report["skipped"]) == 1 and report["skipped"][0].startswith("broken: ")
    assert "Skipped (could not be decoded): broken: " in capsys.readouterr().out


@pytest.mark.parametrize("name", ["missing", "corrupt", "text", "empty", "directory"])
def test_a_bad_input_video_is_a_one_line_error_with_exit_2(evaluate_job, tmp_path, capsys, name):
    video = bad_query_videos(tmp_path / "videos")[name]
    code = evaluate_job.main([str(video), "--frames", "2", "--segments", "2", "--ks", "4", "--no-adaptive", "--quiet",
                              "--output-dir", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert_one_line_error(error)
    assert name in error  # the line names the file, or the input, that could not be used
