"""jobs/bench/bench_gpu.py on the CPU with the small setting: every step measured, the job driven without Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from job_scripts import JOBS, load_job_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_small_run_measures_the_encoder_compress_decode_and_the_whole_job(tmp_path, capsys):
    script = load_job_script("bench/bench_gpu")
    results = script.run(script.parse_args([
        "--workdir", str(tmp_path), "--device", "cpu", "--small", "--batch-frames", "4,8", "--videos-per-batch",
        "2", "--job-videos", "4", "--repeats", "1", "--decoders", "1"]))
    assert set(results["settings"]) == {"default", "paper"}
    for measured in results["settings"].values():
        assert set(map(int, measured["frames_per_s"])) == {4, 8}
        assert measured["compress_share_of_encode"] > 0 and measured["encoder_videos_per_s"] > 0
        for sample in ("exact", "keyframes"):
            job = measured[sample]["job"]
            assert (job["videos"], job["failed"]) == (4, 0)
            assert 0 < job["encoder_busy_share"] <= 1 and job["driver"] == "process pool (no Ray)"
            assert measured[sample]["bound_videos_per_s"] > 0
    assert json.loads((tmp_path / "gpu.json").read_text())["device"] == "cpu"
    assert "| keyframes |" in capsys.readouterr().out


def test_the_job_stages_and_the_benchmark_need_no_ray():
    # A GPU machine may have torch, transformers, pyarrow and PyAV only: the stages must import without Ray.
    code = ("import sys; sys.modules['ray'] = None; import pipeline.job.stages; "
            f"sys.path.insert(0, {str(JOBS / 'bench')!r}); import bench_gpu")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
