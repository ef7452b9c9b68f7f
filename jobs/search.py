"""Similarity search over a compression job's output (the LanceDB table "videos" under --output).

Query by a video file (compressed with the encoder settings the table records), by a stored video_id, or by text
(SigLIP/CLIP encoders only). Examples:

    python jobs/search.py --output out/ --video clip.mp4 --k 5
    python jobs/search.py --output out/ --video-id 3f2a... --mode maxsim --json
    python jobs/search.py --output s3://bucket/out --s3-endpoint-url http://127.0.0.1:9000 --text "a dog" --k 10
    python jobs/search.py --output out/ --build-index

Modes: ann (pooled vectors through the IVF index; an exact scan when the table has none), exact (brute-force
cosine scan), maxsim (ANN candidates re-ranked by MaxSim over the token bases), maxsim-exact (MaxSim over every
row; slow on large tables). Text search compares the text tower's embedding with pooled vectors taken from a
hidden layer of the vision tower: only meaningful when that layer is the projected output.

Exit status: 0; 1 when the query cannot be answered (the message says why); 2 on bad arguments or a query video
that cannot be read or decoded (missing, corrupt, not a video), reported as one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.job.decode import DecodeError
from pipeline.job.errors import one_line
from pipeline.readers.search import MODES, Hit, SearchError, SearchParams, VideoSearch
from pipeline.store.storage import MIN_ROWS_FOR_VECTOR_INDEX, OutputStore

DEFAULTS = SearchParams()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Output root of the compression job, local or s3://.")
    parser.add_argument("--s3-endpoint-url", help="Endpoint of an S3-compatible store (MinIO, moto, ...).")

    query = parser.add_argument_group("query (give one; none with --build-index only builds the index)")
    exclusive = query.add_mutually_exclusive_group()
    exclusive.add_argument("--video", metavar="FILE", help="A video file (local path or s3:// uri).")
    exclusive.add_argument("--video-id", metavar="ID", help="A video_id stored in the table.")
    exclusive.add_argument("--text", help="A text, embedded by the text tower of the table's encoder.")
    query.add_argument("--exclude-self", action="store_true", help="With --video-id: leave the video itself out.")

    results = parser.add_argument_group("results")
    results.add_argument("--k", type=int, default=10, help="Number of results (default: 10).")
    results.add_argument("--mode", choices=MODES, default="ann", help="Search mode (default: ann).")
    results.add_argument("--json", action="store_true", help="Print a JSON list of {video_id, uri, score}.")

    index = parser.add_argument_group("index")
    index.add_argument("--build-index", action="store_true", help="Build or rebuild the vector index first.")
    index.add_argument("--index-min-rows", type=int, default=MIN_ROWS_FOR_VECTOR_INDEX,
                       help=f"Skip the index below this many rows (default: {MIN_ROWS_FOR_VECTOR_INDEX}).")
    index.add_argument("--nprobes", type=int, default=DEFAULTS.nprobes,
                       help=f"IVF partitions visited per query (default: {DEFAULTS.nprobes}).")
    index.add_argument("--refine-factor", type=int, default=DEFAULTS.refine_factor,
                       help=f"Re-score refine-factor x k ANN candidates exactly; 0 = off "
                            f"(default: {DEFAULTS.refine_factor}).")
    index.add_argument("--candidates", type=int, default=DEFAULTS.candidates,
                       help=f"ANN candidates re-ranked in maxsim mode (default: {DEFAULTS.candidates}).")

    video = parser.add_argument_group(
        "query video settings (default: what the table records; a value that differs from it is an error)")
    video.add_argument("--encoder", help="Encoder the table should have been built with.")
    video.add_argument("--layer", type=int, help="Hidden layer of that encoder.")
    video.add_argument("--frames", type=int, help="Frames sampled per video.")
    video.add_argument("--fps", type=float, help="Frame sampling rate.")
    video.add_argument("--base-k", type=int, help="Token-base size K (0 = adaptive).")
    video.add_argument("--decoder", choices=["decord", "pyav"], help="Decoder for the query video.")
    video.add_argument("--device", default="cpu", help="Encoder device for the query video (default: cpu).")
    return parser


def run_query(search: VideoSearch, args: argparse.Namespace) -> list[Hit]:
    if args.video_id is not None:
        return search.by_video_id(args.video_id, args.k, args.mode, include_self=not args.exclude_self)
    if args.text is not None:
        return search.by_text(args.text, args.k, args.mode)
    return search.by_video(args.video, args.k, args.mode, encoder=args.encoder, layer=args.layer,
                           frames=args.frames, fps=args.fps, base_k=args.base_k, decoder=args.decoder,
                           device=args.device)


def format_table(hits: list[Hit]) -> str:
    if not hits:
        return "no results"
    lines = [f"{'rank':>4}  {'score':>8}  {'video_id':<22}  uri"]
    lines += [f"{rank:>4}  {hit.score:>8.4f}  {hit.video_id:<22}  {hit.uri}" for rank, hit in enumerate(hits, 1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    has_query = any(value is not None for value in (args.video, args.video_id, args.text))
    if not has_query and not args.build_index:
        parser.error("give one of --video, --video-id or --text (or --build-index)")
    if args.k < 1:
        parser.error("--k must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    params = SearchParams(nprobes=args.nprobes, refine_factor=args.refine_factor or None, candidates=args.candidates)
    search = VideoSearch(OutputStore(args.output, args.s3_endpoint_url), params)
    try:
        if args.build_index:
            built = search.build_index(min_rows=args.index_min_rows)
            rows = search.table.count_rows()
            print(f"vector index {'built' if built else 'not built'} on {rows} rows"
                  + ("" if built else f" (fewer than --index-min-rows {args.index_min_rows}: exact scans are "
                                      "used and fast at this size)"), file=sys.stderr)
        if not has_query:
            return 0
        hits = run_query(search, args)
    except (DecodeError, OSError) as error:  # the query video: missing, unreadable, a directory, not a video
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except SearchError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    print(json.dumps([hit.as_dict() for hit in hits], indent=2) if args.json else format_table(hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
