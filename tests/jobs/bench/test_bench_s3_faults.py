import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BENCH = ROOT / "jobs" / "bench" / "bench_s3_faults.py"


def test_help_names_the_stores_and_every_flag():
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    for text in ("well-behaved", "flaky+stalls", "--clips", "--seeds", "--stall-s", "--results"):
        assert text in result.stdout
