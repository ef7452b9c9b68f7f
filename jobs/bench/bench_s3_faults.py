"""The job against a misbehaving object store: the same run (input and output on S3) through a fault-injecting proxy
in front of moto (pipeline.testing.s3_faults), side by side with the proxy passing every request, over seeds.

    python jobs/bench/bench_s3_faults.py                       # 6 clips, 3 seeds, three stores (~10 min here)
    python jobs/bench/bench_s3_faults.py --seeds 1 --clips 4

Stores:
  well-behaved    every request forwarded
  flaky           25% of requests answered 503 SlowDown (8%) or 500 (6%), or reset before (5%) or after (6%) they
                  took effect
  flaky+stalls    the same, and 2% of requests stalled for --stall-s seconds (past every client's timeout)

Each run is the whole command a user types (`python jobs/compress_corpus.py ...`: start-up, listing, the run, the
shutdown), EfficientNet-Lite0, --rows-per-file 2. Per store: wall seconds, median and [min, max] over seeds; the
ratio to the well-behaved run of the same seed (paired, the stores' order rotating with the seed), median and
[min, max]; the faults met; and whether every run left every video once in Parquet and LanceDB and nothing
staged. Needs the test extras (moto). Results go to --results (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLAKY = dict(slowdown=0.08, error=0.06, reset_before=0.05, reset_after=0.06)
STORES = {"well-behaved": {}, "flaky": FLAKY, "flaky+stalls": {**FLAKY, "stall": 0.02}}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6, help="videos in the corpus (copies of the sample clips)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per store, each with its own fault draw")
    parser.add_argument("--stall-s", type=float, default=30.0, help="how long a stalled request is held")
    parser.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "bench_s3_faults.json")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload_corpus(client, bucket: str, clips: int) -> list[str]:
    from pipeline.job.sample_clips import sample_clip_paths

    sources = sorted(path for name, path in sample_clip_paths().items() if name != "bigbuckbunny")
    client.create_bucket(Bucket=bucket)
    keys = [f"in/clip-{index:02d}.mp4" for index in range(clips)]
    for index, key in enumerate(keys):
        client.upload_file(str(sources[index % len(sources)]), bucket, key)
    return keys


def run_job(input: str, output: str, endpoint: str) -> tuple[float, int]:
    """(wall seconds, exit code) of the job's command."""
    env = {**os.environ, **CREDENTIALS, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "compress_corpus.py"), "--input", input,
                           "--output", output, "--s3-endpoint-url", endpoint, "--encoder", "efficientnet-lite0",
                           "--frames", "8", "--k", "8", "--batch-size", "2", "--neighbours", "0",
                           "--rows-per-file", "2"], env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return time.monotonic() - started, done.returncode


def each_video_once(output: str, endpoint: str, clips: int) -> bool:
    """Every video once in Parquet, the same ids in LanceDB, nothing left staged (read past the proxy)."""
    import pyarrow.fs as pafs

    from pipeline.store.storage import OutputStore

    store = OutputStore(output, s3_endpoint_url=endpoint)
    parquet = sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist())
    lance = sorted(store.lance_table().to_arrow().column("video_id").to_pylist())
    staged = store.fs.get_file_info(pafs.FileSelector(f"{store.path}/_staging", allow_not_found=True))
    return len(parquet) == len(set(parquet)) == clips and parquet == lance and not staged


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def main() -> int:
    args = parse_args()
    os.environ.update(CREDENTIALS)
    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.testing.s3_faults import FaultPlan, FaultyS3Proxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    runs: dict[str, list[dict]] = {name: [] for name in STORES}
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        upload_corpus(client, "corpus", args.clips)
        names = list(STORES)
        for seed in range(args.seeds):
            for name in names[seed % len(names):] + names[:seed % len(names)]:
                output = f"s3://corpus/out-{name}-{seed}"
                plan = FaultPlan(**STORES[name], stall_s=args.stall_s, seed=seed)
                with FaultyS3Proxy(endpoint, plan) as proxy:
                    seconds, exit_code = run_job("s3://corpus/in/", output, proxy.endpoint)
                whole = exit_code == 0 and each_video_once(output, endpoint, args.clips)
                runs[name].append({"seed": seed, "seconds": round(seconds, 1), "exit_code": exit_code,
                                   "every_video_once": whole, "requests": dict(proxy.counts)})
                print(f"seed {seed}  {name:13s} {seconds:6.1f} s  exit {exit_code}  every video once: {whole}  "
                      f"{dict(proxy.counts)}", flush=True)
    finally:
        moto.stop()

    baseline = {run["seed"]: run["seconds"] for run in runs["well-behaved"]}
    summary = {}
    print(f"\n{'store':13s} {'seconds':>24s} {'x well-behaved':>24s}  every video once")
    for name, store_runs in runs.items():
        seconds = spread([run["seconds"] for run in store_runs])
        ratio = spread([run["seconds"] / baseline[run["seed"]] for run in store_runs])
        whole = all(run["every_video_once"] for run in store_runs)
        summary[name] = {"seconds": seconds, "ratio": ratio, "every_video_once": whole}
        print(f"{name:13s} {seconds['median']:8.1f} [{seconds['min']:.1f}, {seconds['max']:.1f}]"
              f"   {ratio['median']:8.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}]  {whole}")
    args.results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                        "runs": runs}, indent=1))
    print(f"\nresults: {args.results}")
    return 0 if all(entry["every_video_once"] for entry in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
