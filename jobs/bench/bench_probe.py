"""Motion probe: what do K tokens per video carry, and does one cluster of the dynamics map follow the object?

    python jobs/bench/bench_probe.py                                   # EfficientNet-Lite0 at 224, 500 clips, 3 seeds
    python jobs/bench/bench_probe.py --encoder dinov2-small            # the packaged DINOv2-S/14, 16 x 16 cells a frame
    python jobs/bench/bench_probe.py --encoder dinov2-small --object-scale 0.5 --variants token-dynamics
    python jobs/bench/bench_probe.py --encoder dinov2-small --suite turn   # turns and stops halfway (or --suite pan)

1. Clips from the motion benchmark's generator (jobs/bench/bench_motion.py: a coloured shape moves one of four ways or
   stays still over a textured background; --suite turn / pan / two for the harder suites), with each object's
   track.
2. Every clip through the job's own decode -> encode -> compress (pipeline.job.tokenizer.VideoTokenizer with the
   settings the job records for --encoder, --input-size, --frames, --k), and the baselines at the same budget from
   the same encoder tokens. The tokens are kept in --workdir (--reuse-tokens trains again on them).
3. Diagnosis (pipeline.readers.evaluation.tracking): per clip, does one cluster of the map follow the object
   (IoU >= 0.5 with its cells in most frames), and how far is that cluster's centre from the object's?
4. Probe (pipeline.readers.evaluation.probe): the same small reader (2-layer transformer, width 64) trained the same
   way on every representation, --seeds seeds; held-out accuracy on direction, colour and shape with a 95 %
   bootstrap interval over the held-out clips. Variants:
       token-dynamics       token base + map through tokendyn.CrossDynamicsAttention (track tokens)
       td-frames-only       the same with the per-frame cross-attention alone (the reader before track tokens)
       map-only             the map alone through CrossDynamicsAttention (base zeroed)
       map-trajectory-mlp   the map alone through a plain MLP over each cluster's track, max over clusters
       base-only            the token base alone (a set, no map)
       uniform-pool, tome, frame-pool   tokendyn.baselines at the same budget (ordered slots)
       full-tokens          every encoder token (pooled to at most 8 x 8 a frame, 128 principal components): the
                            upper bound, read frame by frame first (probe.FrameGridReader)

Chance: direction 0.20, colour 0.25, shape 0.33. Results also go to --workdir/probe-results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402,F401  before decord (see pipeline/job/decode.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_motion  # noqa: E402  (next to this script)
from pipeline.job.config import JobConfig  # noqa: E402
from pipeline.job.tokenizer import VideoTokenizer  # noqa: E402
from pipeline.readers.evaluation import tracking  # noqa: E402
from pipeline.readers.evaluation.probe import (FrameGridReader, ProbeData, ProbeReader,  # noqa: E402
                                               TrajectoryReader, accuracy_interval, train_probe)

ATTRIBUTES = bench_motion.ATTRIBUTES
# Full tokens are pooled to at most FULL_GRID cells a side and projected on the training tokens' first FULL_DIMS
# principal components, to keep the upper bound trainable on a CPU.
FULL_GRID, FULL_DIMS = 8, 128
# variant -> (representation, reader)
VARIANTS = {
    "token-dynamics": ("token-dynamics", "dynamics"),
    "td-frames-only": ("token-dynamics", "frames-only"),
    "map-only": ("map-only", "dynamics"),
    "map-trajectory-mlp": ("token-dynamics", "trajectory"),
    "base-only": ("token-dynamics", "set"),
    "uniform-pool": ("uniform-pool", "slots"),
    "tome": ("tome", "slots"),
    "frame-pool": ("frame-pool", "slots"),
    "full-tokens": ("full-tokens", "frame-grid"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_probe", help="Clips, tokens and results.")
    parser.add_argument("--clips", type=int, default=500, help="Synthetic clips in all.")
    parser.add_argument("--heldout", type=float, default=0.4, help="Fraction of the clips held out.")
    parser.add_argument("--clip-frames", type=int, default=32, help="Frames per generated clip.")
    parser.add_argument("--clip-size", type=int, default=96, help="Width and height of the generated clips.")
    parser.add_argument("--suite", default="basic", choices=bench_motion.SUITES,
                        help="Clips of the motion benchmark's suite (see bench_motion.py --help).")
    parser.add_argument("--object-scale", type=float, default=1.0, help="Object size against the generator's own.")
    parser.add_argument("--frames", type=int, default=16, help="Frames the job samples per clip.")
    parser.add_argument("--k", type=int, default=16, help="Token-base size, and every baseline's token budget.")
    parser.add_argument("--encoder", default="efficientnet-lite0", help="Vision encoder (as the job's --encoder).")
    parser.add_argument("--input-size", type=int, default=None, help="Encoder input size (as the job's).")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="Comma-separated variants to probe ('' for the diagnosis alone).")
    parser.add_argument("--seeds", type=int, default=3, help="Reader seeds per variant.")
    parser.add_argument("--steps", type=int, default=800, help="Training steps per reader.")
    parser.add_argument("--batch-size", type=int, default=32, help="Clips per training step.")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clips.")
    parser.add_argument("--reuse-tokens", action="store_true", help="Train on the tokens of an earlier run.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's).")
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.clips < 4 or not 0 < args.heldout < 1 or min(args.steps, args.k, args.frames, args.seeds) < 1:
        parser.error("need --clips >= 4, 0 < --heldout < 1 and positive --steps, --k, --frames, --seeds")
    return args


# ---------------------------------------------------------------------------------------------------------------
# 2. tokens of every representation


def job_settings(args) -> dict:
    """The settings the compression job records for these flags (the tokenizer makes the job's tokens from them)."""
    flags = ["--input", "unused", "--encoder", args.encoder, "--frames", str(args.frames), "--k", str(args.k)]
    return JobConfig.from_args(flags + (["--input-size", str(args.input_size)] if args.input_size else [])
                               ).output_settings()


def padded(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, D] rows -> float16 [N, length, D] zero-padded, mask [N, length]."""
    tokens = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=torch.float16)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = row.half(), True
    return tokens, mask


def tokenize_split(manifest: Path, tokenizer: VideoTokenizer, args) -> dict:
    """Every clip of a manifest -> each representation's tokens, the maps, labels, frame indices and timings."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    # Token Dynamics always (the diagnosis reads its map); the others when a variant reads them.
    wanted = {"token-dynamics"} | {VARIANTS[variant][0] for variant in args.variants} - {"map-only"}
    reps: dict[str, list] = {name: [] for name in wanted}
    maps, frame_indices, timing = [], [], {"decode_s": 0.0, "encode_s": 0.0, "compress_s": 0.0, "frames": 0}
    for count, row in enumerate(rows, 1):
        # VideoTokenizer.tokenize step by step, to keep the encoder tokens for the baselines.
        marks = [time.perf_counter()]
        clip = tokenizer.decode(row["uri"])
        marks.append(time.perf_counter())
        tokens = tokenizer.encode(clip.frames)
        marks.append(time.perf_counter())
        video = tokenizer.compress(tokens)
        marks.append(time.perf_counter())
        for name, (start, end) in zip(("decode_s", "encode_s", "compress_s"), zip(marks, marks[1:])):
            timing[name] += end - start
        timing["frames"] += len(clip.frames)
        reps["token-dynamics"].append(video.base.float().half().float())  # stored as float16
        maps.append(video.dynamics.short())
        frame_indices.append(list(clip.frame_indices))
        for name in wanted & set(bench_motion.BASELINES):
            reps[name].append(bench_motion.BASELINES[name](tokens, args.k)[0])
        if "full-tokens" in wanted:
            grid = tuple(min(side, FULL_GRID) for side in tokens.shape[1:3])
            full = F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
            reps["full-tokens"].append(full.reshape(-1, full.shape[-1]))  # frame by frame, row by row
        if count % 50 == 0:
            print(f"  {manifest.stem}: {count}/{len(rows)} clips", flush=True)
    split = {"video_ids": [row["video_id"] for row in rows], "maps": torch.stack(maps), "frame_indices": frame_indices,
             "labels": {name: torch.tensor([values.index(row[name]) for row in rows])
                        for name, values in ATTRIBUTES.items()}, "timing": timing,
             "grid": tuple(maps[0].shape[1:]), "dim": int(reps["token-dynamics"][0].shape[-1])}
    for name, tokens in reps.items():
        split[name] = padded(tokens, max(len(t) for t in tokens))
    return split


def project_full_tokens(splits: dict[str, dict]) -> None:
    """Full tokens of every split -> their first FULL_DIMS principal components on the training split (in place)."""
    if "full-tokens" not in splits["train"]:
        return
    tokens, mask = splits["train"]["full-tokens"]
    if tokens.shape[-1] <= FULL_DIMS:
        return
    rows = tokens[mask].float()
    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:20000]]
    mean = sample.mean(0)
    _, _, components = torch.pca_lowrank(sample - mean, q=FULL_DIMS, center=False, niter=4)
    for split in splits.values():
        tokens, mask = split["full-tokens"]
        split["full-tokens"] = (((tokens.float() - mean) @ components).half() * mask[..., None], mask)


def tokenize(workdir: Path, args) -> dict[str, dict]:
    manifests = bench_motion.generate_clips(workdir, args)
    tokenizer = VideoTokenizer(job_settings(args))
    return {split: tokenize_split(manifests[split], tokenizer, args) for split in bench_motion.SPLITS}


# ---------------------------------------------------------------------------------------------------------------
# 3. diagnosis, 4. probe


def diagnose(splits: dict[str, dict], tracks: dict) -> dict:
    """tracking.follow_scores of every clip (all splits) -> tracking.summarise."""
    scores = []
    for split in splits.values():
        grid = split["grid"]
        for video_id, dynamics, frames in zip(split["video_ids"], split["maps"], split["frame_indices"]):
            track = tracks[video_id]
            masks = np.stack([bench_motion.object_mask(track, f) for f in frames])
            scale = np.array(grid) / track["size"]  # the clips are square: the decoder's crop is the whole frame
            centres = np.array([bench_motion.object_centre(track, f) for f in frames]) * scale
            scores.append(tracking.follow_scores(dynamics.numpy(), tracking.object_cells(masks, grid), centres))
    return tracking.summarise(scores)


READS_MAP = ("dynamics", "frames-only", "trajectory")


def probe_data(split: dict, representation: str, kind: str) -> ProbeData:
    """A split's tokens of one representation, with the map when the reader reads one."""
    tokens, mask = split["token-dynamics" if representation == "map-only" else representation]
    if representation == "map-only":
        tokens = torch.zeros_like(tokens)
    return ProbeData(tokens, mask, split["labels"], split["maps"] if kind in READS_MAP else None)


def new_reader(kind: str, data: ProbeData, split: dict, k: int) -> torch.nn.Module:
    classes = {name: len(values) for name, values in ATTRIBUTES.items()}
    dim, length = data.tokens.shape[-1], data.tokens.shape[1]
    if kind == "trajectory":
        return TrajectoryReader(k, classes)
    if kind == "frame-grid":
        cells = math.prod(min(side, FULL_GRID) for side in split["grid"])
        return FrameGridReader(dim, classes, frames=length // cells, cells=cells)
    options = {"dynamics": {"dynamics": 16}, "frames-only": {"dynamics": 0}, "set": {},
               "slots": {"positions": length}}[kind]
    return ProbeReader(dim, classes, **options)


def run_probe(splits: dict[str, dict], args) -> dict:
    results = {}
    for variant in args.variants:
        representation, kind = VARIANTS[variant]
        train, heldout = (probe_data(splits[split], representation, kind) for split in bench_motion.SPLITS)
        started = time.perf_counter()
        correct = {name: [] for name in ATTRIBUTES}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            reader = new_reader(kind, train, splits["train"], args.k)
            predicted = train_probe(reader, train, heldout, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    seed=seed)
            for name in ATTRIBUTES:
                correct[name].append(predicted[name] == heldout.labels[name].numpy())
        results[variant] = {name: accuracy_interval(np.stack(values)) for name, values in correct.items()}
        results[variant]["train_s"] = time.perf_counter() - started
        print(f"  {variant:20s} " + "  ".join(f"{name} {results[variant][name][0]:.2f}" for name in ATTRIBUTES) +
              f"  ({results[variant]['train_s']:.0f} s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------


def print_tables(results: dict, args) -> None:
    setting = results["setting"]
    print(f"\nEncoder {setting['encoder']} at {setting['input_size']}: {setting['grid'][0]} x {setting['grid'][1]} "
          f"cells a frame, {args.frames} frames, K = {args.k}; {setting['train']} training clips, "
          f"{setting['heldout']} held out, {args.seeds} seeds")
    timing = results["timing"]
    print(f"encode {1000 * timing['encode_s'] / timing['frames']:.1f} ms/frame, compress "
          f"{1000 * timing['compress_s'] / timing['clips']:.1f} ms/clip "
          f"({100 * timing['compress_s'] / (timing['encode_s'] + timing['compress_s']):.0f} % of encode + compress)")
    d = results["diagnosis"]
    print(f"Diagnosis: one cluster follows the object (IoU >= {tracking.FOLLOW_IOU} in most frames) in "
          f"{100 * d['follows']:.0f} % of {d['clips']} clips; mean best IoU {d['iou']:.2f}, median centre error "
          f"{d['centre_error']:.2f} cells")
    if not results["probe"]:
        return
    print(f"\n{'held-out accuracy (95 % interval)':34s} " + " ".join(f"{name:>18s}" for name in ATTRIBUTES))
    for variant, scores in results["probe"].items():
        print(f"{variant:34s} " + " ".join(f"{scores[name][0]:6.2f} [{scores[name][1]:.2f}, {scores[name][2]:.2f}]"
                                           for name in ATTRIBUTES))
    print(f"{'chance':34s} " + " ".join(f"{1 / len(values):6.2f}{'':12s}" for values in ATTRIBUTES.values()))


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_file = workdir / f"tokens-{args.encoder.replace('/', '_')}-{args.input_size or 'native'}.pt"
    if args.reuse_tokens and tokens_file.exists():
        splits = torch.load(tokens_file, weights_only=True)  # tensors and plain data: nothing in it runs
        missing = {VARIANTS[variant][0] for variant in args.variants} - {"map-only"} - set(splits["train"])
        if missing:
            raise SystemExit(f"error: {tokens_file} holds no {sorted(missing)} tokens; run without --reuse-tokens")
    else:
        splits = tokenize(workdir, args)
        torch.save(splits, tokens_file)
    project_full_tokens(splits)
    train, heldout = (splits[split] for split in bench_motion.SPLITS)
    timing = {name: train["timing"][name] + heldout["timing"][name] for name in train["timing"]}
    timing["clips"] = len(train["video_ids"]) + len(heldout["video_ids"])
    grid = train["grid"]
    results = {"setting": {"encoder": args.encoder, "input_size": args.input_size or "native", "grid": grid,
                           "train": len(train["video_ids"]), "heldout": len(heldout["video_ids"]),
                           "bytes_per_video": args.k * train["dim"] * 2 + args.frames * grid[0] * grid[1]},
               "timing": timing,
               "diagnosis": diagnose(splits, json.loads((workdir / "tracks.json").read_text())),
               "probe": {}}
    results["probe"] = run_probe(splits, args)
    print_tables(results, args)
    (workdir / "probe-results.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
