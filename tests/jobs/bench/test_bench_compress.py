"""jobs/bench/bench_compress.py's command line (the benchmark itself takes minutes; its parts are tested in
tokendyn)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
JOB = ROOT / "jobs" / "bench" / "bench_compress.py"


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--device", "--paper-scale", "--reference-rev", "--target-fidelity", "CUDA events"):
        assert option in result.stdout

