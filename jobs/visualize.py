"""Draw what Token Dynamics captured of one clip: its dynamics map over the sampled frames, one colour per cluster
(token-base row), and each cluster's trajectory (centre of mass of its cells over time).

    python jobs/visualize.py VIDEO [--frames 16] [--k 32 | --k adaptive] [--output-dir output/visualizations]
    python jobs/visualize.py --output-root OUT --video-id ID [--output-dir output/visualizations]

From a video file the clip is decoded, encoded and compressed here. From an output root the stored row is used
as it is (base + map), and its frames are decoded again from the row's uri at the stored frame indices.

Writes <name>_dynamics.png (every frame with the map and recent trajectory steps, all trajectories over the mean
frame, and each cluster's occupancy over time) and <name>_dynamics.gif (one GIF frame per sampled frame), and
prints their paths. Exit status: 0, or 2 on bad arguments or inputs (a video that is missing, unreadable or not
decodable is reported as one `error: ...` line).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.job.config import DEFAULT_ENCODER

# Pixels per grid cell when frames are decoded again for a stored row: only the aspect ratio must match the
# encoder's input (decode_video's centre crop), and 32 gives the usual 224 px for a 7x7 grid.
PIXELS_PER_CELL = 32


@dataclass
class ClipToDraw:
    name: str  # used in file names and the title
    frames: np.ndarray  # uint8 [T, h, w, 3]
    dynamics: np.ndarray  # [T, H, W] cluster ids
    k: int
    description: str  # one line for the title


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="a video file (local path or s3:// uri) to compress and draw")
    parser.add_argument("--output-root", help="a compress_corpus output (local or s3://) to read --video-id from")
    parser.add_argument("--video-id", help="the stored video to draw (with --output-root)")
    parser.add_argument("--output-dir", default="output/visualizations", help="where the PNG and GIF go")
    parser.add_argument("--frames", type=int, default=16, help="frames to sample from a video file (default 16)")
    parser.add_argument("--k", default="32", help="base size for a video file: an integer or 'adaptive' (default 32)")
    parser.add_argument("--k-min", type=int, default=8, help="adaptive K lower bound (default 8)")
    parser.add_argument("--k-max", type=int, default=64, help="adaptive K upper bound (default 64)")
    parser.add_argument("--k-rule", default="fidelity", choices=["fidelity", "elbow"],
                        help="adaptive K rule: the smallest K reaching --target-fidelity, or the elbow "
                             "(default fidelity)")
    parser.add_argument("--target-fidelity", type=float, default=0.9,
                        help="mean cosine of tokens to their base vector that adaptive K must reach (default 0.9)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder for a video file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// inputs and outputs")
    parser.add_argument("--columns", type=int, default=8, help="frames per row of the PNG (default 8)")
    parser.add_argument("--gif-scale", type=int, default=2, help="GIF frames are this many times the frame size")
    parser.add_argument("--gif-frame-ms", type=int, default=400, help="display time of each GIF frame")
    args = parser.parse_args(argv)
    if (args.video is None) == (args.output_root is None):
        parser.error("give either a VIDEO file or --output-root with --video-id")
    if args.output_root is not None and not args.video_id:
        parser.error("--output-root needs --video-id")
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    if args.k != "adaptive" and (not args.k.isdigit() or int(args.k) < 1):
        parser.error(f"--k must be a positive integer or 'adaptive', got {args.k!r}")
    if args.columns < 1 or args.gif_scale < 1 or args.gif_frame_ms < 1:
        parser.error("--columns, --gif-scale and --gif-frame-ms must be >= 1")
    return args


def safe_name(text: str) -> str:
    """A file-name stem from a video name or id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "video"


def clip_from_video_file(args: argparse.Namespace) -> ClipToDraw:
    from pipeline.job.config import JobConfig
    from pipeline.job.tokenizer import VideoTokenizer

    k = None if args.k == "adaptive" else int(args.k)
    # The settings a job with these flags would record for its output: the video is tokenized as the job would.
    settings = JobConfig(input=args.video, encoder=args.encoder, decoder=args.decoder, frames=args.frames,
                         k=k or 0, k_min=args.k_min, k_max=args.k_max, k_rule=args.k_rule,
                         target_fidelity=args.target_fidelity).output_settings()
    tokenizer = VideoTokenizer(settings, device=args.device, s3_endpoint_url=args.s3_endpoint_url)
    clip, video = tokenizer.tokenize(args.video)
    encoder = tokenizer.encoder
    mode = "adaptive K" if k is None else "fixed K"
    name = Path(str(args.video).rstrip("/")).stem
    return ClipToDraw(name, clip.frames, video.dynamics.cpu().numpy(), int(video.base.shape[0]),
                      f"{name}: {len(clip.frames)} frames x {encoder.grid[0]}x{encoder.grid[1]} cells -> "
                      f"K = {video.base.shape[0]} ({mode}), {args.encoder}")


def stored_row(output_root: str, video_id: str, s3_endpoint_url: str | None) -> dict:
    import pyarrow.compute as pc

    from pipeline.store.storage import OutputStore

    table = OutputStore(output_root, s3_endpoint_url).read_videos(filter=pc.field("video_id") == video_id)
    if table is None:
        raise LookupError(f"{output_root} holds no videos")
    if table.num_rows == 0:
        raise LookupError(f"video_id {video_id!r} is not in {output_root}")
    return table.slice(0, 1).to_pylist()[0]


def frames_at(uri: str, indices: list[int], size: tuple[int, int], decoder: str,
              s3_endpoint_url: str | None) -> np.ndarray:
    """The frames of `uri` at these source indices, resized like the pipeline does (shorter side + centre crop)."""
    from pipeline.job import decode

    # A row written with num_frames=T has the indices decode_video samples again for T; check rather than assume.
    clip = decode.decode_video(uri, num_frames=len(indices), size=size, decoder=decoder,
                               s3_endpoint_url=s3_endpoint_url)
    if list(clip.frame_indices) == list(indices):
        return clip.frames
    # Rows sampled another way (e.g. by fps): read exactly the stored indices.
    return decode.decode_frames(uri, indices, size=size, decoder=decoder, s3_endpoint_url=s3_endpoint_url)


def clip_from_output(args: argparse.Namespace) -> ClipToDraw:
    from pipeline.store.schema import compressed_video_from_row

    row = stored_row(args.output_root, args.video_id, args.s3_endpoint_url)
    video = compressed_video_from_row(row)
    dynamics = video.dynamics.cpu().numpy()
    size = (row["grid_h"] * PIXELS_PER_CELL, row["grid_w"] * PIXELS_PER_CELL)
    frames = frames_at(row["uri"], row["frame_indices"], size, args.decoder, args.s3_endpoint_url)
    name = Path(row["uri"]).stem
    return ClipToDraw(safe_name(args.video_id), frames, dynamics, int(row["k"]),
                      f"{name} ({args.video_id}): {row['num_frames']} frames x {row['grid_h']}x{row['grid_w']} "
                      f"cells -> K = {row['k']}, {row['encoder']}")


def draw(clip: ClipToDraw, output_dir: Path, columns: int, gif_scale: int, gif_frame_ms: int) -> tuple[Path, Path]:
    from pipeline.readers.overlay import cluster_colours, write_gif, write_sheet

    output_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_name(clip.name)
    png, gif = output_dir / f"{stem}_dynamics.png", output_dir / f"{stem}_dynamics.gif"
    colours = cluster_colours(clip.k)  # the same colour for a cluster in both pictures
    write_sheet(clip.frames, clip.dynamics, png, title=clip.description, columns=columns, colours=colours)
    write_gif(clip.frames, clip.dynamics, gif, colours=colours, scale=gif_scale, frame_ms=gif_frame_ms)
    return png, gif


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so that --help and argument errors answer without loading torch.
    from pipeline.job.decode import DecodeError
    from pipeline.job.errors import one_line
    from pipeline.store.schema import SchemaVersionError

    try:
        clip = clip_from_video_file(args) if args.video is not None else clip_from_output(args)
    except (OSError, LookupError, ValueError, DecodeError, SchemaVersionError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    png, gif = draw(clip, Path(args.output_dir), args.columns, args.gif_scale, args.gif_frame_ms)
    print(f"{clip.description}\nwrote {png}\nwrote {gif}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
