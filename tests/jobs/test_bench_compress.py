"""jobs/bench_compress.py's command line (the benchmark itself takes minutes; its parts are tested in tokendyn)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "bench_compress.py"


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--device", "--paper-scale", "--reference-rev", "--target-fidelity", "CUDA events"):
        assert option in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_a_device_is_a_clear_error():
    result = subprocess.run([sys.executable, str(JOB), "--device", "cuda"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "no CUDA device" in result.stderr
