"""Peak memory of the compression job against corpus size: memory must not grow with the number of videos.

For each corpus size (default 1,000 and 4,000 short synthetic videos: 32x32, 8 frames) the job runs in a fresh
process, standalone (its own local Ray), with the default encoder on 2 sampled frames per video (--one-process:
all sizes in turn in this process, on one Ray). A sampler thread in the driver records, every --interval seconds:

  driver        RSS of the driver (listing, planning, the committer that writes Parquet and LanceDB)
  workers       summed RSS of Ray's worker processes (decode and encoder actors, their decode child processes)
  object store  bytes held in Ray's shared-memory object store, plus bytes spilled to disk

and the peak of each is printed per size. Ray Data streams batches with backpressure and the driver commits them
as they arrive, so the peaks must agree within --tolerance (15%) between the smallest and the largest corpus;
the exit status is 1 when they do not.

    python jobs/bench/bench_memory.py                          # 1,000 and 4,000 videos
    python jobs/bench/bench_memory.py --videos 40 160 --one-process --encoder DIR   # the small version the tests run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


MiB = 1024 * 1024
DISTINCT_CLIPS = 16  # the corpus hard-links these under as many names as needed: each name is one video
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, nargs="+", default=[1000, 4000], help="Corpus sizes to compare.")
    parser.add_argument("--frames", type=int, default=2, help="Frames sampled per video.")
    parser.add_argument("--k", type=int, default=8, help="Token-base size.")
    parser.add_argument("--encoder", default="efficientnet-lite0", help="Encoder name, hub id or directory.")
    parser.add_argument("--batch-size", type=int, default=16, help="Videos per encoder forward pass.")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the job's local Ray.")
    parser.add_argument("--interval", type=float, default=0.2, help="Seconds between memory samples.")
    parser.add_argument("--tolerance", type=float, default=0.15, help="Largest allowed relative difference of peaks.")
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--workdir", help="Folder for the corpus and outputs (default: a temporary one, removed).")
    parser.add_argument("--one-process", action="store_true",
                        help="Run every size in this process on one Ray, smallest first (quicker; a later run starts "
                             "from the memory the earlier ones left, so growth shows all the more).")
    # One measured run, in its own process (used by the parent).
    parser.add_argument("--run-manifest", help=argparse.SUPPRESS)
    parser.add_argument("--run-output", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# the corpus


def write_clip(path: Path, seed: int, num_frames: int = 8, size: int = 32) -> None:
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_corpus(folder: Path, count: int) -> list[Path]:
    """`count` videos: DISTINCT_CLIPS tiny clips, each hard-linked under many names."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for seed in range(DISTINCT_CLIPS):
        clips.append(folder / f"base_{seed:02d}.mp4")
        write_clip(clips[-1], seed)
    videos = []
    for index in range(count):
        path = folder / f"video_{index:05d}.mp4"
        os.link(clips[index % DISTINCT_CLIPS], path)
        videos.append(path)
    return videos


def write_manifest(path: Path, videos: list[Path]) -> Path:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["uri"])
        writer.writerows([[str(video)] for video in videos])
    return path


# ---------------------------------------------------------------------------------------------------------------
# one measured run (child process)


class Sampler(threading.Thread):
    """Peaks of driver RSS, summed worker RSS and object-store bytes, sampled every `interval` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil  # shipped with Ray

        import ray

        self.psutil, self.interval = psutil, interval
        self.gcs_address = ray.get_runtime_context().gcs_address  # this job's Ray, not another one on the host
        self.driver = psutil.Process()
        self.peaks = {"driver": 0, "workers": 0, "largest_worker": 0, "object_store": 0, "spilled": 0}
        self.by_process: dict[str, int] = {}  # peak RSS per worker process title (e.g. ray::MapWorker(...))
        self.samples = 0
        self._halt = threading.Event()

    def _workers(self) -> list:
        """Ray's worker processes (children of the raylet, Ray's agents aside) and their own children."""
        workers = []
        for child in self.driver.children():
            if child.name() != "raylet":
                continue
            for worker in child.children():
                if worker.name() not in RAY_AGENTS:
                    workers.append(worker)
                    workers.extend(worker.children(recursive=True))
        return workers

    def wait_for_earlier_actors_to_exit(self, timeout_s: float = 60.0) -> None:
        """In one process, an earlier run's stage actors exit only after that run returns: a run measured while
        they linger would count them too."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not any(process.name().startswith("ray::MapWorker") for process in self._workers()):
                    return
            except self.psutil.Error:  # a process ended while listed: look again
                pass
            time.sleep(0.2)

    def _object_store(self) -> tuple[int, int]:
        from ray._private import internal_api

        stats = internal_api.get_memory_info_reply(internal_api.get_state_from_address(self.gcs_address)).store_stats
        return stats.object_store_bytes_used, stats.spilled_bytes_total

    def sample(self) -> None:
        peaks = self.peaks
        peaks["driver"] = max(peaks["driver"], self.driver.memory_info().rss)
        rss = []
        for process in self._workers():
            try:
                rss.append(process.memory_info().rss)
                name = process.name()
            except self.psutil.Error:  # ended between listing and reading
                continue
            name = re.match(r"ray::[^.(]*(\(.*\))?|.*", name).group(0)  # the actor, without the method it runs
            self.by_process[name] = max(self.by_process.get(name, 0), rss[-1])
        peaks["workers"] = max(peaks["workers"], sum(rss))
        peaks["largest_worker"] = max([peaks["largest_worker"], *rss])
        used, spilled = self._object_store()
        peaks["object_store"] = max(peaks["object_store"], used)
        peaks["spilled"] = max(peaks["spilled"], spilled)
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as error:  # Ray starting or stopping: skip this sample
                print(f"sample skipped: {error}", file=sys.stderr)
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        self.sample()
        return {**self.peaks, "samples": self.samples, "by_process": self.by_process}


def measure(manifest: str, output: str, args: argparse.Namespace) -> dict:
    """Run the job over `manifest` (starting a local Ray unless one runs here) and return its memory peaks."""
    from pipeline.job.config import JobConfig
    from pipeline.job.run import init_ray, run_job

    config = JobConfig.from_args([
        "--input", manifest, "--output", output, "--frames", str(args.frames), "--k", str(args.k),
        "--encoder", args.encoder, "--batch-size", str(args.batch_size), "--num-cpus", str(args.num_cpus),
        "--neighbours", "0"])
    init_ray(config)
    sampler = Sampler(args.interval)
    sampler.wait_for_earlier_actors_to_exit()
    sampler.start()
    summary = run_job(config)
    peaks = sampler.stop()
    return {"videos": summary.listed, "ok": summary.ok, "failed": summary.failed,
            "wall_s": round(summary.wall_s, 1), **peaks}


# ---------------------------------------------------------------------------------------------------------------
# the comparison (parent process)


def run_size(videos: list[Path], workdir: Path, args: argparse.Namespace) -> dict:
    size = len(videos)
    manifest = write_manifest(workdir / f"manifest_{size}.csv", videos)
    if args.one_process:
        return measure(str(manifest), str(workdir / f"out_{size}"), args)
    command = [sys.executable, __file__, "--run-manifest", str(manifest), "--run-output", str(workdir / f"out_{size}"),
               "--frames", str(args.frames), "--k", str(args.k), "--encoder", args.encoder,
               "--batch-size", str(args.batch_size), "--num-cpus", str(args.num_cpus),
               "--interval", str(args.interval)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-5000:])
        raise SystemExit(f"the run over {size} videos failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_manifest:
        print(json.dumps(measure(args.run_manifest, args.run_output, args)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sizes = sorted(set(args.videos))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        videos = make_corpus(workdir / "corpus", sizes[-1])
        print(f"{len(sizes)} runs, {', '.join(map(str, sizes))} videos (32x32, 8 frames; {args.frames} sampled), "
              f"encoder {args.encoder}, batch {args.batch_size}, {args.num_cpus} CPUs")
        runs = []
        for size in sizes:
            runs.append(run_size(videos[:size], workdir, args))
            r = runs[-1]
            print(f"  {size:6d} videos  {r['wall_s']:7.1f} s  ({r['ok']} ok, {r['failed']} failed)  "
                  f"driver {r['driver'] / MiB:7.1f} MiB  workers {r['workers'] / MiB:7.1f} MiB "
                  f"(largest {r['largest_worker'] / MiB:.1f})  object store {r['object_store'] / MiB:7.1f} MiB "
                  f"(spilled {r['spilled'] / MiB:.1f})", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    smallest, largest = runs[0], runs[-1]
    ratios = {key: largest[key] / smallest[key] if smallest[key] else float("nan")
              for key in ("driver", "workers", "object_store")}
    bounded = all(abs(ratios[key] - 1.0) <= args.tolerance for key in ("driver", "workers"))
    print(f"peak ratio {largest['videos']} / {smallest['videos']} videos: driver {ratios['driver']:.3f}, "
          f"workers {ratios['workers']:.3f}, object store {ratios['object_store']:.3f} -> "
          + ("bounded" if bounded else "NOT bounded") + f" (RSS peaks within {args.tolerance:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "ratios": ratios, "bounded": bounded}, indent=2))
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())
