"""jobs/bench/bench_probe.py: a small run on real generated clips and the real encoder prints the diagnosis and the
probe table, writes its results, and trains again on the kept tokens."""

from __future__ import annotations

import json

import pytest

from job_scripts import load_job_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_small_probe_run_prints_its_tables_and_reuses_its_tokens(tmp_path, capsys):
    script = load_job_script("bench/bench_probe")
    flags = ["--workdir", str(tmp_path), "--clips", "12", "--heldout", "0.5", "--clip-frames", "8", "--clip-size",
             "64", "--frames", "4", "--k", "4", "--steps", "3", "--seeds", "2",
             "--variants", "token-dynamics,map-trajectory-mlp,uniform-pool,full-tokens"]
    results = script.run(script.parse_args(flags))
    out = capsys.readouterr().out
    assert "Diagnosis: one cluster follows the object" in out and "held-out accuracy" in out
    assert set(results["probe"]) == {"token-dynamics", "map-trajectory-mlp", "uniform-pool", "full-tokens"}
    for scores in results["probe"].values():
        for attribute in ("direction", "colour", "shape"):
            mean, low, high = scores[attribute]
            assert 0 <= low <= mean <= high <= 1
    assert results["setting"]["grid"] == (7, 7) and results["setting"]["heldout"] == 6
    assert results["diagnosis"]["clips"] == 12 and 0 <= results["diagnosis"]["follows"] <= 1
    saved = json.loads((tmp_path / "probe-results.json").read_text())
    assert saved["diagnosis"] == results["diagnosis"]

    (tokens_file,) = tmp_path.glob("tokens-*.pt")
    written = tokens_file.stat().st_mtime_ns
    again = script.run(script.parse_args([*flags, "--reuse-tokens", "--variants", "base-only"]))
    assert set(again["probe"]) == {"base-only"} and again["diagnosis"] == results["diagnosis"]
    assert tokens_file.stat().st_mtime_ns == written  # no clip was tokenised again


def test_unknown_variants_are_refused():
    script = load_job_script("bench/bench_probe")
    with pytest.raises(SystemExit):
        script.parse_args(["--variants", "token-dynamics,nope"])
    assert script.parse_args(["--variants", ""]).variants == []
