"""Compress a video corpus into Token Dynamics tokens (token base + dynamics map), written to Parquet and LanceDB.

On a Ray cluster:   ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/compress_corpus.py ...
On one machine:     python jobs/compress_corpus.py --input videos/ --output out/   (starts a local Ray on 127.0.0.1)

Re-running with the same --output skips the videos it already holds; the output records the settings its rows were
made with (settings.json), and a run with other settings is refused (--rebuild starts the output over). Exit status:
0, or 1 when the share of failed videos exceeds --max-error-rate (the good ones are written either way), 2 on bad
arguments, a missing input, or an output that another job holds, that holds other settings, that another schema
version wrote, or that cannot be written (disk full, read-only; what was committed stays, and a rerun completes).
"""

from __future__ import annotations

import logging
import sys

from pipeline.job.config import JobConfig
from pipeline.job.console import driver_log_path, native_stderr_to
from pipeline.job.errors import OutputUnwritable
from pipeline.job.run import RunSummary, run_job
from pipeline.readers.search import nearest_to_video
from pipeline.store.schema import SchemaVersionError
from pipeline.store.storage import OutputLocked, OutputStore


def print_summary(s: RunSummary) -> None:
    d = s.as_dict()
    print(f"\nrun {s.run_id}: {s.input} -> {s.output}")
    print(f"  videos      {s.ok} ok, {s.failed} failed, {s.skipped} skipped (already done), {s.deferred} deferred"
          f"  [{s.listed} listed]")
    if s.failed_by_stage:
        print("  failures    " + ", ".join(f"{stage}: {n}" for stage, n in sorted(s.failed_by_stage.items())))
    if s.tokens_in:
        print(f"  tokens      {s.tokens_in:,} in -> {s.tokens_kept:,} kept ({d['token_ratio']:.2%})")
        print(f"  bytes       {s.stored_bytes:,} stored vs {s.raw_token_bytes:,} raw tokens ({d['byte_ratio']:.2%})")
    rate = f"{d['videos_per_s']:.2f} videos/s" if d["videos_per_s"] else "-"
    print(f"  time        {s.wall_s:.1f} s wall, {rate}")
    if s.stage_s:
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in s.stage_s.items())
        busy = f"; encoder busy {s.encoder_busy_share:.0%} of the wall time" if s.encoder_busy_share is not None else ""
        print(f"  stages      {stages} (worker seconds){busy}")


def print_neighbours(config: JobConfig) -> None:
    store = OutputStore(config.output, config.s3_endpoint_url)
    videos = store.read_videos(columns=["video_id", "uri"])
    if videos is None or videos.num_rows < 2:
        return
    first = videos.sort_by("uri").slice(0, 1).to_pylist()[0]
    print(f"\nnearest neighbours of {first['uri']} (cosine of pooled vectors):")
    for hit in nearest_to_video(store, first["video_id"], k=config.neighbours):
        print(f"  {hit['score']:.3f}  {hit['uri']}")


def main(argv: list[str] | None = None) -> int:
    config = JobConfig.from_args(argv, description=__doc__)
    if config.verbose:
        return run(config)
    with native_stderr_to(driver_log_path()):  # Ray's core worker logs to fd 2 (see pipeline.job.console)
        return run(config)


def run(config: JobConfig) -> int:
    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = run_job(config)
    except (FileNotFoundError, ValueError, OutputLocked, SchemaVersionError, OutputUnwritable) as error:
        # Problems with the input or the output as a whole; per-video problems never get here (error rows).
        print(f"error: {error}", file=sys.stderr)
        return 2

    print_summary(summary)
    if config.neighbours:
        print_neighbours(config)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
