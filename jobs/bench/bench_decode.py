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
sequential's counted by their rules). Each is the median of --repeats runs, with [min, max]. Then the encoder's own
videos/s per core (one torch thread, --frames frames at its input size), so the table says which side bounds a
worker. Results go to <workdir>/decode.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import av  # noqa: F401  (before decord, see pipeline.job.decode)
import decord
import numpy as np
import torch
from PIL import Image

from pipeline.job.clip_encoding import ENCODERS, ClipFormat, encode_clip, repeat_clip
from pipeline.job.decode import (decode_video, frames_to_decode, resize_frames, sample_frame_indices)
from pipeline.job.encoders import load_encoder
from pipeline.job.sample_clips import sample_clip_paths

SEGMENT_S = 10
MODES = ("decord", "sequential", "exact", "keyframes")


@dataclass(frozen=True)
class Entry:
    """One corpus video: `height`p (16:9), `minutes` long, a keyframe every `gop_s` seconds."""

    codec: str
    height: int
    minutes: float
    gop_s: float
    bframes: int

    @property
    def name(self) -> str:
        length = f"{self.minutes:g}min" if self.minutes >= 1 else f"{round(self.minutes * 60)}s"
        return f"{self.codec}-{self.height}p-{length}-gop{self.gop_s:.2g}s-b{self.bframes}"

    @property
    def container(self) -> str:
        return "webm" if self.codec == "vp9" else "mp4"


REALISTIC = [
    Entry("h264", 480, 1 / 6, 0.5, 3),
    Entry("h264", 720, 3, 2, 3),
    Entry("h264", 720, 10, 10, 0),
    Entry("h264", 1080, 40 / 60, 250 / 30, 3),
    Entry("h264", 1080, 10, 2, 3),
    Entry("h264", 1080, 10, 0.5, 0),
    Entry("h264", 2160, 1, 2, 3),
    Entry("hevc", 1080, 3, 2, 3),
    Entry("vp9", 720, 1, 5, 0),
    Entry("av1", 1080, 1, 2, 0),
]
SMALL = [Entry("h264", 144, 1 / 3, 1, 3), Entry("h264", 144, 1 / 3, 10, 0), Entry("vp9", 144, 1 / 6, 2, 0)]


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
# the corpus


def source_frames(height: int) -> list[np.ndarray]:
    """The sample clip's frames (1280 x 720), scaled to 16:9 at `height` (even sizes)."""
    width = (height * 16 // 9) // 2 * 2
    with av.open(str(sample_clip_paths()["bigbuckbunny"])) as container:
        return [np.asarray(frame.to_image().resize((width, height), Image.Resampling.BILINEAR))
                for frame in container.decode(video=0)]


def build_corpus(entries: list[Entry], folder: Path, fps: int = 30) -> dict[Entry, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, by_height = {}, {}
    for entry in entries:
        path = folder / f"{entry.name}.{entry.container}"
        if not path.exists():
            if entry.height not in by_height:
                by_height[entry.height] = source_frames(entry.height)
            frames = by_height[entry.height]
            segment_frames = min(SEGMENT_S * fps, max(1, round(entry.minutes * 60 * fps)))
            gop = max(1, round(entry.gop_s * fps))
            fmt = ClipFormat(codec=entry.codec, fps=fps, gop=gop, bframes=entry.bframes,
                             preset="veryfast" if entry.codec == "h264" else "ultrafast")
            print(f"  encoding {path.name}", flush=True)
            segment = folder / f"_segment.{entry.container}"
            encode_clip(segment, (frames[i % len(frames)] for i in range(segment_frames)), fmt)
            repeat_clip(segment, path, max(1, round(entry.minutes * 60 * fps / segment_frames)))
            segment.unlink()
        paths[entry] = path
    return paths


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
    head += " | exact vs decord | keyframes vs decord |"
    lines = [head, "|---|" + "---:|" * (len(modes) + 2)]
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
        lines.append(f"| {row['name']} | " + " | ".join(cells + ratios) + " |")
    encoder = results.get("encoder")
    if encoder:
        lines.append(f"\nencoder {encoder['encoder']} at {results['size']}, {results['frames']} frames, one thread: "
                     f"{encoder['videos_per_core_s']:.2f} videos/s per core")
    return "\n".join(lines)


if __name__ == "__main__":
    run(parse_args())
