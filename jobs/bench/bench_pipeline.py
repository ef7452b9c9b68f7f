"""Throughput of the Ray pipeline against the same work in a plain loop, measured side by side in one run.

Rows of the table (all on the same corpus, same encoder and settings):
  decode decord / decode PyAV     videos/s of each decoder alone
  encoder forward only            frames already decoded; the ceiling for any pipeline
  plain loop                      decode + encode + compress, one process, one video after another
  Ray pipeline (end to end)       jobs/compress_corpus.py's run_job, actor start-up and writing included

Ratios printed: pipeline / plain loop (goal >= 0.9 on the CPU, where decode and encode share cores) and
pipeline / encoder-only (goal >= 0.9 with a GPU, where decode overlaps encode). The corpus is the real sample clips,
repeated under distinct names to the requested count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.job.config import JobConfig
from pipeline.job.decode import decode_video
from pipeline.job.encoders import load_encoder
from pipeline.job.run import init_ray, run_job
from pipeline.job.sample_clips import sample_clip_paths
from pipeline.job.tokenizer import VideoTokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--videos", type=int, default=24, help="Corpus size (sample clips repeated).")
parser.add_argument("--frames", type=int, default=16, help="Frames per video.")
parser.add_argument("--k", type=int, default=32, help="Token-base size.")
parser.add_argument("--encoder", default="efficientnet-lite0", help="Encoder name, hub id or directory.")
parser.add_argument("--device", default="cpu", help="Device of the plain loop and encoder-only rows.")
parser.add_argument("--workers", type=int, default=1, help="Encoder actors of the pipeline.")
parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per encoder actor.")
parser.add_argument("--batch-size", type=int, default=4, help="Videos per encoder forward pass.")
args = parser.parse_args()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# The corpus: sample clips linked under distinct names, so each one is a distinct video to the job.
work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
corpus = work / "corpus"
corpus.mkdir()
clips = sorted(sample_clip_paths().values())
for index in range(args.videos):
    (corpus / f"{index:04d}-{clips[index % len(clips)].name}").symlink_to(clips[index % len(clips)])
videos = sorted(corpus.iterdir())
print(f"corpus: {len(videos)} videos ({', '.join(c.name for c in clips)} repeated), {args.frames} frames each")

encoder = load_encoder(args.encoder, device=args.device)
size = encoder.input_size

# Decoders alone.
decode_rates = {}
decoded = []
for decoder in ("decord", "pyav"):
    started = time.perf_counter()
    clips_out = [decode_video(str(v), num_frames=args.frames, size=size, decoder=decoder) for v in videos]
    decode_rates[decoder] = rate(len(videos), time.perf_counter() - started)
    decoded = decoded or [c.frames for c in clips_out]

# Encoder forward alone, on frames already decoded, batch_size videos per forward.
started = time.perf_counter()
for start in range(0, len(decoded), args.batch_size):
    encoder.encode(np.concatenate(decoded[start:start + args.batch_size]))
encoder_rate = rate(len(decoded), time.perf_counter() - started)

# Plain loop: what one process does without Ray, with the job's settings.
config = JobConfig.from_args([
    "--input", str(corpus), "--output", str(work / "out"), "--frames", str(args.frames), "--k", str(args.k),
    "--encoder", args.encoder, "--workers", str(args.workers), "--gpus-per-worker", str(args.gpus_per_worker),
    "--batch-size", str(args.batch_size), "--rows-per-file", str(args.batch_size), "--neighbours", "0"])
tokenizer = VideoTokenizer(config.output_settings(), device=args.device, encoder=encoder)
started = time.perf_counter()
for video in videos:
    tokenizer.tokenize(str(video))
plain_rate = rate(len(videos), time.perf_counter() - started)
del encoder, tokenizer

# The Ray pipeline, same work, written to a fresh output.
init_ray(config)
summary = run_job(config)
assert summary.ok == len(videos), f"pipeline wrote {summary.ok} of {len(videos)} videos"
pipeline_rate = rate(summary.ok, summary.wall_s)

print(f"\n{'measure':<34}{'videos/s':>10}{'ratio':>10}")
print(f"{'decode decord':<34}{decode_rates['decord']:>10.2f}{'':>10}")
print(f"{'decode PyAV':<34}{decode_rates['pyav']:>10.2f}{decode_rates['pyav'] / decode_rates['decord']:>9.2f}x"
      "  (PyAV / decord)")
print(f"{'encoder forward only':<34}{encoder_rate:>10.2f}{'':>10}")
print(f"{'plain loop (decode+encode+compress)':<34}{plain_rate:>10.2f}{'':>10}")
print(f"{'Ray pipeline, end to end':<34}{pipeline_rate:>10.2f}{pipeline_rate / plain_rate:>9.2f}x  (/ plain loop)")
print(f"{'':<34}{'':>10}{pipeline_rate / encoder_rate:>9.2f}x  (/ encoder only)")
print(f"\ntorch threads in the plain loop: {torch.get_num_threads()}; cores: {os.cpu_count()}")
