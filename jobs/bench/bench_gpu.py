"""The job per GPU: the encoder alone, compress's share of it, the decode modes, and the whole job, on one machine.

    python jobs/bench/bench_gpu.py --device cuda                    # the default and the paper's setting, on a GPU
    python jobs/bench/bench_gpu.py --device cpu --small             # a small setting on the CPU (the suite runs it)

Needs torch, transformers, pyarrow, numpy and PyAV (decord where its mode is asked); not Ray or LanceDB, so it runs
on a GPU machine that has only what its wheels carried. For each setting (default: DINOv2-S/14 at 224, 16 frames,
K = 32; paper: 378 x 378 = 27 x 27 cells, 32 frames, K = 16, which keeps 16 of 23,328 tokens):

1. encoder alone: frames/s at each --batch-frames (bf16 weights on CUDA, as the job loads them), the best reported;
   timed with torch.cuda.synchronize around each call.
2. compress's share: tokendyn.compress_batch on a batch of videos' tokens (on the encoder's device) against the
   encoder's time for the same videos.
3. decode: videos/s per core of each decode mode (exact, keyframes) on the decode corpus (pipeline.job.clip_encoding).
4. the whole job without Ray: the job's own stage classes, DecodeStage in a pool of --decoders processes and one
   EncodeCompressStage in this process, over the corpus repeated to --job-videos; the result rows are not written
   (the write path is measured by bench_writes.py). Reported: videos/s, the encoder's busy share of the wall time,
   and the bound min(decode capacity, encoder capacity) it is measured against, both from steps 1-3 on this
   machine: decode capacity = decoders x videos/s per core, encoder capacity = videos/s of encode + compress.

Results go to <workdir>/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tokendyn
from pipeline.job.clip_encoding import REALISTIC, SMALL, build_corpus
from pipeline.job.config import JobConfig
from pipeline.job.decode import decode_video
from pipeline.job.encoders import load_encoder
from pipeline.job.local_stages import run_stages


@dataclass(frozen=True)
class Setting:
    name: str
    encoder: str
    input_size: int
    frames: int
    k: int


SETTINGS = [Setting("default", "dinov2-small", 224, 16, 32), Setting("paper", "dinov2-small", 378, 32, 16)]
SMALL_SETTINGS = [Setting("default", "efficientnet-lite0", 64, 4, 4), Setting("paper", "efficientnet-lite0", 96, 8, 2)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_gpu", help="Corpus (kept between runs) and results.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu.")
    parser.add_argument("--small", action="store_true", help="Small encoder, sizes and corpus (seconds on a CPU).")
    parser.add_argument("--batch-frames", default="16,64,256,1024", help="Comma-separated encoder batch sizes.")
    parser.add_argument("--videos-per-batch", type=int, default=32, help="Videos per compress_batch / job batch.")
    parser.add_argument("--decoders", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="Decode processes of the whole-job run (default: the cores but one).")
    parser.add_argument("--job-videos", type=int, default=64, help="Videos through the whole-job run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each measurement (median taken).")
    args = parser.parse_args(argv)
    try:
        args.batch_frames = [int(size) for size in args.batch_frames.split(",")]
    except ValueError:
        parser.error("--batch-frames takes comma-separated integers")
    return args


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up, the device synchronised around each."""
    function()
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        function()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def encoder_and_compress(setting: Setting, args: argparse.Namespace) -> dict:
    """Steps 1 and 2: the encoder's frames/s per batch size, and compress_batch's time against the encoder's."""
    encoder = load_encoder(setting.encoder, device=args.device, input_size=setting.input_size)
    rng = np.random.default_rng(0)
    by_batch = {}
    for batch_frames in args.batch_frames:
        frames = torch.from_numpy(rng.integers(0, 256, (batch_frames, *encoder.input_size, 3), dtype=np.uint8))
        try:
            with torch.inference_mode():
                seconds = timed(lambda: encoder.encode(frames), args.device, args.repeats)
        except torch.OutOfMemoryError:
            break
        by_batch[batch_frames] = batch_frames / seconds
    best = max(by_batch, key=by_batch.get)
    videos = args.videos_per_batch
    frames = torch.from_numpy(rng.integers(0, 256, (videos * setting.frames, *encoder.input_size, 3), dtype=np.uint8))
    with torch.inference_mode():
        tokens = torch.cat([encoder.encode(chunk) for chunk in frames.split(best)])
        per_video = list(tokens.split(setting.frames))
        compress_s = timed(lambda: tokendyn.compress_batch(per_video, k=setting.k), args.device, args.repeats)
    encode_s = videos * setting.frames / by_batch[best]
    return {"grid": list(encoder.grid), "dim": encoder.dim, "dtype": str(encoder.dtype).removeprefix("torch."),
            "frames_per_s": by_batch, "best_batch_frames": best, "best_frames_per_s": by_batch[best],
            "encode_s_per_video": encode_s / videos, "compress_s_per_video": compress_s / videos,
            "compress_share_of_encode": compress_s / encode_s,
            "encoder_videos_per_s": videos / (encode_s + compress_s)}


def decode_per_core(paths: list[Path], setting: Setting, sample: str, repeats: int) -> float:
    """Step 3: videos/s per core of one decode mode (process CPU seconds, median over the runs)."""
    size = (setting.input_size, setting.input_size)
    runs = []
    for _ in range(repeats):
        started = time.process_time()
        for path in paths:
            decode_video(path, num_frames=setting.frames, size=size, sample=sample, num_threads=1)
        runs.append(time.process_time() - started)
    return len(paths) / statistics.median(runs)


def whole_job(paths: list[Path], setting: Setting, args: argparse.Namespace, sample: str) -> dict:
    """Step 4: the job's stages driven by pipeline.job.local_stages (DecodeStage in a process pool feeding one
    EncodeCompressStage)."""
    config = JobConfig(input="unused", encoder=setting.encoder, input_size=setting.input_size, frames=setting.frames,
                       k=setting.k, sample=sample, device=args.device, decode_timeout_s=None,
                       batch_size=args.videos_per_batch)
    rows = [{"video_id": f"v{i}", "uri": str(paths[i % len(paths)])} for i in range(args.job_videos)]
    *_, totals = run_stages(rows, config, args.decoders, warm_up=args.decoders)
    return {"videos": totals.videos, "failed": totals.failed, "wall_s": totals.wall_s,
            "videos_per_s": totals.videos_per_s, "encoder_busy_share": totals.encoder_busy_share,
            "decoders": args.decoders, "driver": "process pool (no Ray)"}


def run(args: argparse.Namespace) -> dict:
    entries = SMALL if args.small else [e for e in REALISTIC if e.codec == "h264" and e.height >= 720]
    corpus = list(build_corpus(entries, Path(args.workdir) / ("corpus-small" if args.small else "corpus")).values())
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "cores": os.cpu_count(), "settings": {}}
    for setting in SMALL_SETTINGS if args.small else SETTINGS:
        print(f"== {setting.name}: {setting.encoder} at {setting.input_size}, {setting.frames} frames, "
              f"K = {setting.k}", flush=True)
        measured = {"setting": setting.__dict__, **encoder_and_compress(setting, args)}
        for sample in ("exact", "keyframes"):
            per_core = decode_per_core(corpus, setting, sample, args.repeats)
            job = whole_job(corpus, setting, args, sample)
            bound = min(args.decoders * per_core, measured["encoder_videos_per_s"])
            measured[sample] = {"decode_videos_per_core_s": per_core, "decode_capacity": args.decoders * per_core,
                                "bound_videos_per_s": bound, "job": job,
                                "job_share_of_bound": job["videos_per_s"] / bound}
        results["settings"][setting.name] = measured
        print(table(measured), flush=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    Path(args.workdir, "gpu.json").write_text(json.dumps(results, indent=1))
    return results


def table(measured: dict) -> str:
    lines = [f"encoder: {measured['best_frames_per_s']:.0f} frames/s at batch {measured['best_batch_frames']} "
             f"({measured['dtype']}); compress {measured['compress_share_of_encode']:.1%} of the encoder's time; "
             f"encode + compress {measured['encoder_videos_per_s']:.2f} videos/s",
             "| sampling | decode videos/s per core | decode capacity | bound | job videos/s | of bound | "
             "encoder busy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for sample in ("exact", "keyframes"):
        m = measured[sample]
        lines.append(f"| {sample} | {m['decode_videos_per_core_s']:.2f} | {m['decode_capacity']:.2f} | "
                     f"{m['bound_videos_per_s']:.2f} | {m['job']['videos_per_s']:.2f} | "
                     f"{m['job_share_of_bound']:.0%} | {m['job']['encoder_busy_share']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(parse_args())
