"""Run the compression job on a multi-node Ray cluster and SIGKILL a worker node mid-run; print what happened.

Runs inside a private network namespace whose only interface is loopback (the test starts it under
`unshare --net --pid --fork --mount-proc --kill-child`), so Ray's multi-node mode cannot reach or expose anything
else, and every process started here dies with the namespace. Steps: bring `lo` up, start a head and one worker
node with infra/ray_head.sh, submit the job with the job API, kill the worker node's process group once
`--kill-after` videos are committed, wait for the job, print one JSON line: status, videos committed at the kill,
seconds taken.

The head offers GPUs that the worker node does not (Ray only counts them; the encoder still runs on the CPU), and
the job asks one per encoder actor: the encoders live on the head and hold its CPUs, so decoding runs on the worker
node. That placement makes the loss deterministic: every decode actor dies with the node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
RAY_HEAD_SH = REPO / "infra" / "ray_head.sh"
GCS_PORT, DASHBOARD_PORT, HEAD_AGENT_PORT, WORKER_AGENT_PORT = 6379, 8265, 52365, 52366
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def committed_videos(output: Path) -> int:
    return sum(pq.read_metadata(path).num_rows for path in (output / "videos").glob("*.parquet"))


def node_env(state: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HOME": str(home), "RAY_HEAD_STATE": str(state), "RAY_HEAD_IP": "127.0.0.1",
           "RAY": str(Path(sys.executable).with_name("ray")), "PYTHONPATH": str(REPO),
           # A lost node is declared dead after ~2 s instead of Ray's default ~15 s.
           "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
           "RAY_health_check_failure_threshold": "4"}
    return {**env, **extra}


def kill_group(pid_file: Path) -> None:
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--kill-after", type=int, required=True, help="Committed videos before the kill.")
    parser.add_argument("--job-timeout", type=float, default=90.0)
    parser.add_argument("job_flags", nargs=argparse.REMAINDER, help="More flags for jobs/compress_corpus.py.")
    args = parser.parse_args()

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="tdmn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    state, home = work / "state", work / "home"
    home.mkdir(parents=True)
    common = f"--object-store-memory 200000000 --temp-dir {work / 'ray'}"
    started = time.monotonic()
    result = {"status": None, "committed_at_kill": None}
    try:
        subprocess.run([str(RAY_HEAD_SH), "start"], check=True, env=node_env(
            state, home, RAY_HEAD_CPUS="2", RAY_NODE_ARGS=f"--num-gpus 2 {common}"))
        subprocess.run([str(RAY_HEAD_SH), "join", f"127.0.0.1:{GCS_PORT}"], check=True, env=node_env(
            state, home, RAY_HEAD_CPUS="2", RAY_AGENT_PORT=str(WORKER_AGENT_PORT), RAY_NODE_ARGS=common))
        result["startup_s"] = round(time.monotonic() - started, 1)

        os.environ.update(HOME=str(home), RAY_AUTH_MODE="token")
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{DASHBOARD_PORT}")
        entrypoint = " ".join([sys.executable, str(REPO / "jobs" / "compress_corpus.py"), "--input", args.input,
                               "--output", args.output, "--workers", "2", "--gpus-per-worker", "1",
                               "--cpus-per-worker", "1", *[f for f in args.job_flags if f != "--"]])
        job_id = client.submit_job(entrypoint=entrypoint)
        deadline = time.monotonic() + args.job_timeout
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL:
                break
            if result["committed_at_kill"] is None and committed_videos(Path(args.output)) >= args.kill_after:
                result["committed_at_kill"] = committed_videos(Path(args.output))
                kill_group(state / "worker.pid")
            time.sleep(0.2)
        else:
            status = "HUNG"
            # What the cluster held while stuck, for the test's failure message.
            result["ray_status"] = subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "status", "--address", f"127.0.0.1:{GCS_PORT}"],
                capture_output=True, text=True, env=node_env(state, home, RAY_AUTH_MODE="token")).stdout[-3000:]
            client.stop_job(job_id)
        result["status"] = status
        result["logs_tail"] = client.get_job_logs(job_id)[-8000:]
    finally:
        result["wall_s"] = round(time.monotonic() - started, 1)
        for node in ("worker", "head"):
            kill_group(state / f"{node}.pid")
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
