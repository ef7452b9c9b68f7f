"""The small version of jobs/bench/bench_storage.py: committing a file, compactions included, costs the same in a
10k- and a 40k-row output."""

from __future__ import annotations

import pytest

from job_scripts import load_job_script

bench = load_job_script("bench/bench_storage")


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--sizes", "--dim", "--commits", "--listing", "--queries", "--max-ratio", "--workdir", "--reuse-fills",
                 "--json"):
        assert flag in text


def test_commit_time_does_not_grow_from_10k_to_40k_rows(tmp_path, capsys):
    # 33 commits: the 32nd new fragment triggers a compaction, which the mean includes.
    args = bench.build_parser().parse_args(["--sizes", "10000", "40000", "--commits", "33", "--queries", "10",
                                            "--repeats", "3"])
    small, large = bench.run_benchmark(args, tmp_path)

    # The goal of the benchmark proper (1.5x from 10k to 1M rows), on the median commit of 1,024 rows and on the
    # mean with the compaction (1.11-1.15x in three runs on a loaded 2-core machine).
    assert large["commit_p50_ms"] <= 1.5 * small["commit_p50_ms"], (small, large)
    assert large["commit_mean_ms"] <= 1.5 * small["commit_mean_ms"], (small, large)
    assert small["fragments_awaiting"] == large["fragments_awaiting"] == 1
    assert small["recall_at_10"] >= 0.9 and large["recall_at_10"] >= 0.9
    table = bench.format_table([small, large], args)
    assert "| commit of a 1024-row file, p50 (ms) |" in table and "largest / smallest" in table


def test_a_kept_fill_is_measured_again_without_being_made_again(tmp_path, monkeypatch):
    args = bench.build_parser().parse_args(["--sizes", "1000", "--commits", "2", "--queries", "2", "--repeats", "1",
                                            "--reuse-fills"])
    (first,) = bench.run_benchmark(args, tmp_path)
    writes = []
    original = bench.OutputStore.write_videos
    monkeypatch.setattr(bench.OutputStore, "write_videos",
                        lambda store, table, **kwargs: (writes.append(store.root), original(store, table, **kwargs)))
    (again,) = bench.run_benchmark(args, tmp_path)
    assert writes and all(root.endswith("rows-1000") for root in writes)  # the measured commits only
    assert again["fill_s"] == first["fill_s"] and again["recall_at_10"] == first["recall_at_10"]
    assert first["commit_p50_ms"] > 0 and again["commit_p50_ms"] > 0
