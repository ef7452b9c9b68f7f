"""Decoding at real video sizes: each decoder and mode side by side on a corpus made here, and the encoder beside it.

    python jobs/bench/bench_decode.py                    # the realistic corpus (built once into --workdir, ~5 min)
    python jobs/bench/bench_decode.py --corpus small     # a few small clips (seconds; what the suite runs)

The corpus is made from the real sample clip bigbuckbunny.mp4 (no download): its frames, scaled to 480p .. 4K, are
encoded once as a 10-second segment with the codec and GOP structure of each entry (H.264, HEVC, VP9, AV1; a
keyframe every 0.5 to 10 s; with and without B-frames), and that segment is repeated by copying packets up to the
entry's length (10 s to 10 min): decoding costs per frame what a real encode of that size does, without spending
an hour encoding.

Modes, all for the job's sampling (--frames frames at segment centres) and resized to --size as the job does:
  decord        decord.VideoReader(...).get_batch: the default decoder as it was (bare library call + resize)
  sequential    PyAV from the first frame on to the last wanted one: --decoder pyav as it was
  exact         pipeline.job.decode.decode_video as the job now calls it (default --decoder decord): seeking, same
                frames as a full decode
  keyframes     decode_video(sample="keyframes"): the keyframe nearest to each segment centre (--sample keyframes)

Per video and mode: CPU seconds (user + system of this process, all threads: what a core pays; the job runs one
decode per core), videos/s per core (1 / CPU seconds), wall seconds, and frames decoded per frame kept (decord's and
sequential's counted by their rules), and how far keyframe sampling moves the frames (mean seconds from the exact
frame). Each is the median of --repeats runs, with [min, max]. Then the encoder's own
videos/s per core (one torch thread, --frames frames at its input size), so the table says which side bounds a
worker. Results go to <workdir>/decode.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import av  # noqa: F401  (before decord, see pipeline.job.decode)
import decord
import numpy as np
import torch

from pipeline.job.clip_encoding import ENCODERS, REALISTIC, SMALL, build_corpus
from pipeline.job.decode import (decode_video, frames_to_decode, resize_frames, sample_frame_indices)
from pipeline.job.encoders import load_encoder

MODES = ("decord", "sequential", "exact", "keyframes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_decode", help="Corpus (kept between runs) and results.")
    parser.add_argument("--corpus", choices=["realistic", "small"], default="realistic", help="Which corpus.")
    parser.add_argument("--frames", type=int, default=16, help="Frames sampled per video, as the job's --frames.")
    parser.add_argument("--size", type=int, default=224, help="Side of the frames the encoder sees.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each video and mode.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, of {', '.join(MODES)}.")
    parser.add_argument("--sequential-max-minutes", type=float, default=3.0,
                        help="Videos longer than this skip the sequential mode (it decodes the whole stream).")
    parser.add_argument("--encoder", default="dinov2-small", help="Encoder timed beside the decoders ('' = none).")
    args = parser.parse_args(argv)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# the modes: each -> frames decoded


def _decord(path: Path, frames: int, size: tuple[int, int]) -> int:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    indices = sample_frame_indices(len(reader), num_frames=frames)
    resize_frames(reader.get_batch(sorted(set(indices))).asnumpy(), size)
    return frames_to_decode([int(k) for k in reader.get_key_indices()], sorted(set(indices)))


def _sequential(path: Path, frames: int, size: tuple[int, int]) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    wanted = set(sample_frame_indices(total, num_frames=frames))
    kept = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
            if position >= max(wanted):
                break
    resize_frames(np.stack(kept), size)
    return position + 1


def _exact(path: Path, frames: int, size: tuple[int, int]) -> int:
    return decode_video(path, num_frames=frames, size=size).frames_decoded


def _keyframes(path: Path, frames: int, size: tuple[int, int]) -> int:
    return decode_video(path, num_frames=frames, size=size, sample="keyframes").frames_decoded


def keyframe_offset_s(path: Path, frames: int) -> float:
    """Mean distance in seconds from each frame keyframe sampling takes to the frame exact sampling takes."""
    exact = decode_video(path, num_frames=frames, size=(8, 8))
    keyframes = decode_video(path, num_frames=frames, size=(8, 8), sample="keyframes")
    offsets = np.abs(np.asarray(keyframes.frame_indices) - np.asarray(exact.frame_indices))
    return float(offsets.mean() / exact.fps)


RUN_MODE = {"decord": _decord, "sequential": _sequential, "exact": _exact, "keyframes": _keyframes}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(function, repeats: int) -> dict:
    cpu, wall, decoded = [], [], 0
    for _ in range(repeats):
        started_cpu, started = _cpu_s(), time.perf_counter()
        decoded = function()
        cpu.append(_cpu_s() - started_cpu)
        wall.append(time.perf_counter() - started)
    median = statistics.median(cpu)
    return {"cpu_s": median, "cpu_s_range": [min(cpu), max(cpu)], "wall_s": statistics.median(wall),
            "videos_per_core_s": 1 / median if median else None, "frames_decoded": decoded}


def encoder_videos_per_core_s(name: str, frames: int, repeats: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = load_encoder(name)
        batch = np.random.default_rng(0).integers(0, 256, (frames, *encoder.input_size, 3), dtype=np.uint8)
        with torch.inference_mode():
            encoder.encode(batch)  # warm-up
            timing = measure(lambda: encoder.encode(batch) is None, repeats)
    finally:
        torch.set_num_threads(previous)
    timing.pop("frames_decoded")
    return {"encoder": name, **timing}


# ---------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    entries = [entry for entry in (REALISTIC if args.corpus == "realistic" else SMALL)
               if ENCODERS[entry.codec] in av.codecs_available]
    print(f"corpus ({args.corpus}) in {args.workdir}", flush=True)
    corpus = build_corpus(entries, Path(args.workdir) / f"corpus-{args.corpus}")
    size = (args.size, args.size)
    rows = []
    for entry, path in corpus.items():
        row = {**asdict(entry), "name": entry.name, "bytes": path.stat().st_size, "modes": {}}
        for mode in args.modes:
            if mode == "sequential" and entry.minutes > args.sequential_max_minutes:
                continue
            try:
                timing = measure(lambda: RUN_MODE[mode](path, args.frames, size), args.repeats)
            except Exception as error:  # decord cannot open AV1: the table says so
                row["modes"][mode] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                continue
            row["modes"][mode] = {**timing, "decoded_per_kept": timing["frames_decoded"] / args.frames}
        if "keyframes" in args.modes:
            row["keyframe_offset_s"] = keyframe_offset_s(path, args.frames)
        rows.append(row)
        print(f"  {entry.name}: " + ", ".join(f"{mode} {m['cpu_s']:.3f} s" for mode, m in row["modes"].items()
                                              if "cpu_s" in m), flush=True)
    results = {"corpus": args.corpus, "frames": args.frames, "size": args.size, "repeats": args.repeats,
               "videos": rows,
               "encoder": encoder_videos_per_core_s(args.encoder, args.frames, args.repeats) if args.encoder else None}
    Path(args.workdir, "decode.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: dict) -> str:
    modes = [mode for mode in MODES if any(mode in row["modes"] for row in results["videos"])]
    head = "| video | " + " | ".join(f"{mode}: videos/s/core (decoded/kept)" for mode in modes)
    head += " | exact vs decord | keyframes vs decord | keyframes: mean offset |"
    lines = [head, "|---|" + "---:|" * (len(modes) + 3)]
    for row in results["videos"]:
        cells = []
        for mode in modes:
            m = row["modes"].get(mode)
            cells.append("—" if m is None else "error" if "error" in m else
                         f"{m['videos_per_core_s']:.2f} [{1 / m['cpu_s_range'][1]:.2f}, {1 / m['cpu_s_range'][0]:.2f}]"
                         f" ({m['decoded_per_kept']:.1f})")
        ratios = []
        for mode in ("exact", "keyframes"):
            base, new = row["modes"].get("decord", {}), row["modes"].get(mode, {})
            ratios.append(f"{base['cpu_s'] / new['cpu_s']:.1f}x" if "cpu_s" in base and "cpu_s" in new else "—")
        offset = f"{row['keyframe_offset_s']:.2f} s" if "keyframe_offset_s" in row else "—"
        lines.append(f"| {row['name']} | " + " | ".join(cells + ratios + [offset]) + " |")
    encoder = results.get("encoder")
    if encoder:
        lines.append(f"\nencoder {encoder['encoder']} at {results['size']}, {results['frames']} frames, one thread: "
                     f"{encoder['videos_per_core_s']:.2f} videos/s per core")
    return "\n".join(lines)


if __name__ == "__main__":
    run(parse_args())
