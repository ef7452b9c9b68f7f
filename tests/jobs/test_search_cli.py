"""jobs/search.py and jobs/bench/bench_search.py: flags, output formats, exit codes, and search on the job's output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.job.sources import video_id_for
from pipeline.store.storage import OutputStore
from bad_inputs import assert_one_line_error, bad_query_videos
from job_scripts import load_job_script

REPO = Path(__file__).resolve().parents[2]


search_cli = load_job_script("search")
bench = load_job_script("bench/bench_search")


def synthetic_output(root: Path, videos: int, encoder: str = "synthetic") -> OutputStore:
    """An output root whose LanceDB table holds `videos` synthetic rows (ids synthetic-0000000, ...)."""
    rng = np.random.default_rng(0)
    centres = bench._unit(rng.standard_normal((4, 16), dtype=np.float32))
    store = OutputStore(str(root))
    bench.write_corpus_table(store, bench.synthetic_corpus(rng, centres, videos, base_k=3), encoder=encoder)
    return store


@pytest.mark.parametrize("script", [search_cli, bench])
def test_help_describes_every_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ["--output", "--video", "--video-id", "--text", "--k", "--mode", "--json", "--build-index"] \
        if script is search_cli else ["--videos", "--dim", "--queries", "--nprobes", "--refine-factor"]
    for flag in flags:
        assert flag in text


def test_json_output_parses_as_a_list_of_hits(tmp_path):
    synthetic_output(tmp_path / "out", 50)
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "search.py"), "--output", str(tmp_path / "out"),
         "--video-id", "synthetic-0000003", "--k", "5", "--mode", "exact", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)
    assert len(hits) == 5 and all(set(hit) == {"video_id", "uri", "score"} for hit in hits)
    assert hits[0]["video_id"] == "synthetic-0000003" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)


def test_human_readable_table_and_exclude_self(tmp_path, capsys):
    synthetic_output(tmp_path / "out", 30)
    code = search_cli.main(["--output", str(tmp_path / "out"), "--video-id", "synthetic-0000001", "--k", "3",
                            "--mode", "maxsim", "--exclude-self"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split() == ["rank", "score", "video_id", "uri"] and len(lines) == 4
    assert all("synthetic-0000001" not in line for line in lines[1:])


def test_build_index_builds_only_on_large_enough_tables(tmp_path, capsys):
    store = synthetic_output(tmp_path / "out", 400)
    assert search_cli.main(["--output", str(tmp_path / "out"), "--build-index", "--index-min-rows", "1000"]) == 0
    assert "not built on 400 rows" in capsys.readouterr().err
    assert search_cli.main(["--output", str(tmp_path / "out"), "--build-index", "--index-min-rows", "100",
                            "--video-id", "synthetic-0000000", "--json"]) == 0
    captured = capsys.readouterr()
    assert "vector index built on 400 rows" in captured.err
    assert json.loads(captured.out)[0]["video_id"] == "synthetic-0000000"
    # The vector index, and the video_id index that every compaction of the job's tables keeps.
    assert sorted(index.columns for index in store.lance_table().list_indices()) == [["pooled"], ["video_id"]]


def test_unanswerable_queries_exit_1_with_the_reason(tmp_path, capsys):
    synthetic_output(tmp_path / "out", 10, encoder="efficientnet-lite0")
    assert search_cli.main(["--output", str(tmp_path / "out"), "--text", "a dog"]) == 1
    assert "efficientnet-lite0 is an image-only encoder with no text tower" in capsys.readouterr().err
    assert search_cli.main(["--output", str(tmp_path / "out"), "--video-id", "missing"]) == 1
    assert "'missing' is not in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        search_cli.main(["--output", str(tmp_path / "out")])
    assert exit_.value.code == 2


def test_tiny_benchmark_reaches_the_recall_target(capsys):
    # The 100k-video figures in the README come from the defaults; this checks the same code path at 2k.
    assert bench.main(["--videos", "2000", "--queries", "10", "--exact-maxsim-queries", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_search = {row["search"].split(" (")[0]: row for row in report["results"]}
    assert by_search["pooled exact"]["recall_at_k"] == 1.0
    assert by_search["pooled ANN"]["recall_at_k"] >= 0.95
    assert by_search["MaxSim re-rank of 100 ANN candidates"]["recall_at_k"] >= 0.95
    assert by_search["MaxSim exact"]["recall_at_k"] == 1.0 and by_search["MaxSim exact"]["queries"] == 2


# ---------------------------------------------------------------------------------------------------------------
# on the real job output (tests/jobs/conftest.py: efficientnet-lite0, 8 frames, K=8, via Ray)


def test_a_clip_queried_by_its_own_file_returns_itself_first(sample_output, job_input_dir, capsys):
    output, _ = sample_output
    for name, mode in (("bikes.mp4", "exact"), ("carphone_pristine.mp4", "maxsim")):
        path = job_input_dir / name
        assert search_cli.main(["--output", str(output), "--video", str(path), "--k", "3", "--mode", mode,
                                "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert hits[0]["video_id"] == video_id_for(str(path)), (name, mode)
        assert hits[0]["score"] == pytest.approx(1.0 if mode == "exact" else 8.0, abs=1e-2)
    # The other carphone clip is the nearest one that is not the query itself.
    assert hits[1]["uri"] == str(job_input_dir / "carphone_distorted.mp4")


def test_query_settings_that_differ_from_the_job_output_are_refused(sample_output, job_input_dir, capsys):
    output, _ = sample_output
    args = ["--output", str(output), "--video", str(job_input_dir / "bikes.mp4")]
    assert search_cli.main([*args, "--frames", "16", "--base-k", "0"]) == 1
    assert "frames=16 (table: 8), k=0 (table: 8)" in capsys.readouterr().err
    assert search_cli.main([*args, "--layer", "3"]) == 1
    assert "layer=3 (table: None)" in capsys.readouterr().err
    assert search_cli.main(["--output", str(output), "--text", "a bike"]) == 1
    assert "no text tower" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# query videos that cannot be used, and awkward ones that can


@pytest.fixture(scope="module")
def efficientnet_shaped_output(tmp_path_factory) -> Path:
    """An output whose table looks like the default encoder's (1280-dim rows, K=3), so a query video gets as far as
    decoding."""
    root = tmp_path_factory.mktemp("search") / "out"
    rng = np.random.default_rng(0)
    centres = bench._unit(rng.standard_normal((4, 1280), dtype=np.float32))
    bench.write_corpus_table(OutputStore(str(root)), bench.synthetic_corpus(rng, centres, 12, base_k=3),
                             encoder="efficientnet-lite0")
    return root


@pytest.mark.parametrize("name", ["missing", "corrupt", "text", "empty", "directory"])
def test_a_bad_query_video_is_a_one_line_error_with_exit_2(efficientnet_shaped_output, tmp_path, capsys, name):
    video = bad_query_videos(tmp_path)[name]
    code = search_cli.main(["--output", str(efficientnet_shaped_output), "--video", str(video)])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_a_query_video_of_an_awkward_size_is_answered(efficientnet_shaped_output, make_synthetic_clip, capsys):
    # 256x110 frames once failed in the centre crop with a traceback.
    video = make_synthetic_clip("banner", num_frames=6, size=(110, 256))
    code = search_cli.main(["--output", str(efficientnet_shaped_output), "--video", str(video), "--k", "3",
                            "--json"])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)) == 3
