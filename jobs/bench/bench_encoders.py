"""Encoders side by side on the same clips: cost, size, and whether one cluster of the map follows the object.

    python jobs/bench/bench_encoders.py                       # efficientnet-lite0 and dinov2-small at 224 and 448
    python jobs/bench/bench_encoders.py --configs dinov2-small@224,dinov2-small@448 --object-scales 1,0.5

For every encoder@input-size and object scale, jobs/bench/bench_probe.py's clips (the same seed gives the same
clips at a given object scale) go through the job's decode -> encode -> compress, and the table gives: token grid,
tokens per frame, encode time per frame, compress time per clip and its share of encode + compress, stored bytes
per video (float16 base + uint8 map), and the diagnosis of pipeline.readers.evaluation.tracking (the fraction of
clips in which one cluster follows the object, mean best IoU, median centre error in cells). The motion probe itself is
bench_probe.py's (minutes per encoder); its table is in docs/motion.md next to this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench_probe  # (next to this script)

DEFAULT_CONFIGS = "efficientnet-lite0@224,efficientnet-lite0@448,dinov2-small@224,dinov2-small@448"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_encoders", help="Clips, tokens and results.")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="Comma-separated encoder@input-size.")
    parser.add_argument("--object-scales", default="1,0.5", help="Comma-separated object sizes (1 = the generator's).")
    parser.add_argument("--clips", type=int, default=60, help="Clips per object scale.")
    parser.add_argument("--frames", type=int, default=16, help="Frames the job samples per clip.")
    parser.add_argument("--k", type=int, default=16, help="Token-base size.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's).")
    args = parser.parse_args(argv)
    try:
        args.configs = [(name, int(size)) for name, size in (item.rsplit("@", 1) for item in args.configs.split(","))]
        args.object_scales = [float(scale) for scale in args.object_scales.split(",")]
    except ValueError:
        parser.error("--configs takes encoder@size items (e.g. dinov2-small@448), --object-scales numbers")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for scale in args.object_scales:
        for encoder, size in args.configs:
            probe_args = bench_probe.parse_args([
                "--workdir", str(Path(args.workdir) / f"objects-{scale:g}" / f"{encoder}-{size}"),
                "--clips", str(args.clips), "--frames", str(args.frames), "--k", str(args.k), "--encoder", encoder,
                "--input-size", str(size), "--object-scale", str(scale), "--variants", "",
                *(["--threads", str(args.threads)] if args.threads else [])])
            print(f"== {encoder} at {size}, objects x{scale:g}", flush=True)
            results = bench_probe.run(probe_args)
            timing, setting = results["timing"], results["setting"]
            rows.append({"encoder": encoder, "input_size": size, "object_scale": scale, "grid": setting["grid"],
                         "encode_ms_per_frame": 1000 * timing["encode_s"] / timing["frames"],
                         "compress_ms_per_clip": 1000 * timing["compress_s"] / timing["clips"],
                         "compress_share": timing["compress_s"] / (timing["encode_s"] + timing["compress_s"]),
                         "bytes_per_video": setting["bytes_per_video"], **results["diagnosis"]})
    print_table(rows)
    (Path(args.workdir) / "encoders.json").write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| encoder | input | grid | object | encode ms/frame | compress ms/clip (share) | bytes/video | "
          "cluster follows the object | mean IoU | centre error (cells) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['input_size']} | {r['grid'][0]}×{r['grid'][1]} | ×{r['object_scale']:g} | "
              f"{r['encode_ms_per_frame']:.0f} | {r['compress_ms_per_clip']:.0f} ({100 * r['compress_share']:.0f} %) | "
              f"{r['bytes_per_video']:,} | {100 * r['follows']:.0f} % of {r['clips']} | {r['iou']:.2f} | "
              f"{r['centre_error']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
