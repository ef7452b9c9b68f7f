"""The small version of jobs/bench_storage.py: committing a file costs the same in a 10k- and a 40k-row output."""

from __future__ import annotations

import pytest

from job_scripts import load_job_script

bench = load_job_script("bench_storage")


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--sizes", "--dim", "--commits", "--listing", "--queries", "--max-ratio", "--workdir", "--json"):
        assert flag in text


def test_commit_time_does_not_grow_from_10k_to_40k_rows(tmp_path, capsys):
    args = bench.build_parser().parse_args(["--sizes", "10000", "40000", "--commits", "12", "--queries", "10",
                                            "--repeats", "3"])
    small, large = bench.run_benchmark(args, tmp_path)

    # The goal of the benchmark proper (1.5x from 10k to 1M rows), on the median commit of 1,024 rows.
    assert large["commit_p50_ms"] <= 1.5 * small["commit_p50_ms"], (small, large)
    assert small["recall_at_10"] >= 0.9 and large["recall_at_10"] >= 0.9
    table = bench.format_table([small, large], args)
    assert "| commit of a 1024-row file, p50 (ms) |" in table and "largest / smallest" in table
