"""Output-path benchmark: what the driver pays per committed row, the bytes that reach it, and how the path scales
with writers. Both paths run side by side in one run, each on a fresh output root, on the same rows.

Rows are shaped like the paper's setting (--k 32 base vectors x --dim 1152 float16, a --frames 32 x --grid 27 x 27
uint8 dynamics map, a pooled float32 vector of --dim), random (so nothing compresses), in files of --rows-per-file.

    driver writes    today's path before workers wrote: every row reaches the driver (in the job, as the Arrow
                     batches of Ray Data's iter_batches), which writes it with OutputStore.write_videos (Parquet file,
                     LanceDB add, compaction when due)
    workers write    N writer processes stage their files (OutputStore.stage_videos: Parquet under _staging/ and
                     Lance fragments) and hand the driver a StagedVideos; the driver commits it
                     (OutputStore.commit_staged), and the table's upkeep (compaction, indexes) runs in another process
                     beside the commits, as the job's Ray task does
    commits alone    the same commits with nothing else running (every file staged first): the driver's own cost

Figures per path: the driver's time per file and per row (median, and the 10th-90th percentiles over the files;
the mean includes the compactions the driver path runs), the bytes reaching the driver per row and as a share of
the row's output bytes, and the end-to-end rows/s from the first file to the last commit (--writers N = 1, 2, 4;
for the commits alone, the rows committed per second of commits).

    python jobs/bench/bench_writes.py                          # 33 files of 256 rows per path (~25 MiB a file)
    python jobs/bench/bench_writes.py --files 8 --rows-per-file 64 --writers 1 2
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.store.schema import now_utc, video_schema
from pipeline.store.storage import OutputStore

OUTPUT_COLUMNS = ("base", "dynamics", "cluster_sizes", "pooled")  # what the job counts as a row's stored bytes


def paper_rows(args: argparse.Namespace, first_id: int, seed: int = 0) -> pa.Table:
    """--rows-per-file rows in the job's schema, numbered from first_id, with random tokens."""
    rng = np.random.default_rng(seed)
    n, k, dim = args.rows_per_file, args.k, args.dim
    ids = [f"video-{i:09d}" for i in range(first_id, first_id + n)]
    base = rng.standard_normal((n * k, dim)).astype(np.float16)
    cells = args.frames * args.grid * args.grid
    columns = {
        "video_id": pa.array(ids), "uri": pa.array([f"s3://corpus/{i}.mp4" for i in ids]),
        "num_frames": pa.array(np.full(n, args.frames, np.int32)),
        "grid_h": pa.array(np.full(n, args.grid, np.int32)), "grid_w": pa.array(np.full(n, args.grid, np.int32)),
        "encoder": pa.array(["synthetic"] * n), "dim": pa.array(np.full(n, dim, np.int32)),
        "k": pa.array(np.full(n, k, np.int32)),
        "base": pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                         pa.FixedSizeListArray.from_arrays(base.reshape(-1), dim)),
        "cluster_sizes": pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                                  pa.array(np.full(n * k, cells // k, np.int32))),
        "dynamics": pa.array([rng.integers(0, k, cells, dtype=np.uint8).tobytes() for _ in range(n)], pa.binary()),
        "dynamics_dtype": pa.array(["uint8"] * n),
        "pooled": pa.FixedSizeListArray.from_arrays(rng.standard_normal(n * dim).astype(np.float32), dim),
        "schema_version": pa.array(np.ones(n, np.int32)),
        "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
    }
    schema = video_schema(dim, "float16")
    return pa.Table.from_arrays([columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema],
                                schema=schema)


def renumbered(table: pa.Table, first_id: int) -> pa.Table:
    """The same rows under new video ids (so each file's rows are new videos, without making new tokens)."""
    ids = pa.array([f"video-{i:09d}" for i in range(first_id, first_id + table.num_rows)])
    return table.set_column(table.schema.get_field_index("video_id"), "video_id", ids)


def output_bytes_per_row(table: pa.Table) -> float:
    return sum(table.column(name).nbytes for name in OUTPUT_COLUMNS) / table.num_rows


def summary(path: str, writers: int | None, seconds: list[float], rows: int, driver_bytes: float,
            row_bytes: float, wall_s: float, files: int) -> dict:
    per_file = np.array(seconds) * 1000
    return {"path": path, "writers": writers, "files": files, "rows_per_file": rows,
            "driver_ms_per_file_p50": float(np.median(per_file)),
            "driver_ms_per_file_p10": float(np.percentile(per_file, 10)),
            "driver_ms_per_file_p90": float(np.percentile(per_file, 90)),
            "driver_ms_per_file_mean": float(per_file.mean()),
            "driver_us_per_row_p50": float(np.median(per_file)) * 1000 / rows,
            "driver_us_per_row_mean": float(per_file.mean()) * 1000 / rows,
            "driver_bytes_per_row": driver_bytes, "output_bytes_per_row": row_bytes,
            "driver_byte_share": driver_bytes / row_bytes, "rows_per_s": files * rows / wall_s}


# ---- the two paths ---------------------------------------------------------------------------------------------
def driver_writes(args: argparse.Namespace, root: Path) -> dict:
    store = OutputStore(str(root))
    store.reconcile()
    table = paper_rows(args, 0)
    seconds, started = [], time.perf_counter()
    for index in range(args.files):
        rows = renumbered(table, index * args.rows_per_file)
        began = time.perf_counter()
        store.write_videos(rows)
        seconds.append(time.perf_counter() - began)
    wall = time.perf_counter() - started
    return summary("driver writes", None, seconds, args.rows_per_file, rows.nbytes / rows.num_rows,
                   output_bytes_per_row(rows), wall, args.files)


_writer: dict = {}


def _start_writer(args: argparse.Namespace, root: str) -> None:
    _writer.update(store=OutputStore(root), table=paper_rows(args, 0))


def _stage(first_id: int):
    """One file of new rows, staged by this writer process."""
    return _writer["store"].stage_videos(renumbered(_writer["table"], first_id))


def _upkeep(root: str) -> None:
    OutputStore(root).compact_if_needed()


def workers_write(args: argparse.Namespace, root: Path, writers: int) -> dict:
    store = OutputStore(str(root))
    store.reconcile()
    context = get_context("spawn")  # fresh processes, as Ray's workers are: no copy of the driver's Lance runtime
    seconds, metadata_bytes = [], []
    with ProcessPoolExecutor(writers, context, initializer=_start_writer, initargs=(args, str(root))) as pool, \
            ProcessPoolExecutor(1, context) as upkeep_pool:
        list(pool.map(time.sleep, [0.5] * writers))  # every writer started (and its table made) before the clock
        started = time.perf_counter()
        pending = [pool.submit(_stage, index * args.rows_per_file) for index in range(args.files)]
        upkeep: Future | None = None
        for future in pending:
            staged = future.result()
            metadata_bytes.append(len(pickle.dumps(staged)))
            began = time.perf_counter()
            store.commit_staged([staged])
            seconds.append(time.perf_counter() - began)
            if upkeep is None or upkeep.done():
                if upkeep is not None:
                    upkeep.result()
                upkeep = upkeep_pool.submit(_upkeep, str(root))
        upkeep.result()
        wall = time.perf_counter() - started
    table = paper_rows(args, 0)
    return summary("workers write", writers, seconds, args.rows_per_file,
                   float(np.mean(metadata_bytes)) / args.rows_per_file, output_bytes_per_row(table), wall, args.files)


def commits_alone(args: argparse.Namespace, root: Path) -> dict:
    """The driver's commits with nothing else running: every file staged first (untimed), then committed."""
    store = OutputStore(str(root))
    store.reconcile()
    table = paper_rows(args, 0)
    staged = [store.stage_videos(renumbered(table, index * args.rows_per_file)) for index in range(args.files)]
    seconds = []
    for files in staged:
        began = time.perf_counter()
        store.commit_staged([files])
        seconds.append(time.perf_counter() - began)
    metadata = float(np.mean([len(pickle.dumps(files)) for files in staged])) / args.rows_per_file
    return summary("commits alone", None, seconds, args.rows_per_file, metadata, output_bytes_per_row(table),
                   sum(seconds), args.files)


# ---- the report ------------------------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    before = results[0]
    lines = ["| path | driver ms / file, p50 [p10, p90] | mean | driver µs / row, p50 | bytes to the driver / row "
             "(share of the row's output) | rows/s end to end |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        name = r["path"] + (f", {r['writers']} writer{'s' * (r['writers'] > 1)}" if r["writers"] else "")
        if r["path"] == "commits alone":
            name += " (files staged first)"
        lines.append(f"| {name} | {r['driver_ms_per_file_p50']:.1f} [{r['driver_ms_per_file_p10']:.1f}, "
                     f"{r['driver_ms_per_file_p90']:.1f}] | {r['driver_ms_per_file_mean']:.1f} | "
                     f"{r['driver_us_per_row_p50']:.1f} | {r['driver_bytes_per_row']:,.0f} "
                     f"({r['driver_byte_share']:.2%}) | {r['rows_per_s']:,.0f} |")
    after = [r for r in results if r["writers"]]
    if after:
        loaded = max(r["driver_us_per_row_p50"] for r in after)
        alone = results[-1]["driver_us_per_row_p50"]
        lines.append("")
        lines.append(f"driver cost per row, p50: {before['driver_us_per_row_p50']:.0f} µs -> {loaded:.1f} µs beside "
                     f"the writers ({before['driver_us_per_row_p50'] / loaded:.0f}x lower), {alone:.1f} µs alone; "
                     f"one driver commits 1e6 / {alone:.1f} = {1e6 / alone:,.0f} rows/s alone at "
                     f"{before['rows_per_file']} rows per commit")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=33,
                        help="Files written per path (33: the driver path's 32nd new fragment triggers a compaction).")
    parser.add_argument("--rows-per-file", type=int, default=256, help="Rows per file, as the job's --rows-per-file.")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4], help="Writer processes of the new path.")
    parser.add_argument("--k", type=int, default=32, help="Base vectors per row.")
    parser.add_argument("--dim", type=int, default=1152, help="Token width D.")
    parser.add_argument("--frames", type=int, default=32, help="Frames of the dynamics map.")
    parser.add_argument("--grid", type=int, default=27, help="Side of the dynamics map's grid.")
    parser.add_argument("--workdir", help="Write the output roots here instead of a temporary directory.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    return parser


def run_benchmark(args: argparse.Namespace, workdir: Path) -> list[dict]:
    results = []
    for name, measure in [("driver", lambda root: driver_writes(args, root)),
                          *[(f"workers-{n}", lambda root, n=n: workers_write(args, root, n)) for n in args.writers],
                          ("alone", lambda root: commits_alone(args, root))]:
        root = workdir / name
        shutil.rmtree(root, ignore_errors=True)
        results.append(measure(root))
        shutil.rmtree(root, ignore_errors=True)  # one path's files at a time on disk
        print(f"{results[-1]['path']} ({name}): {results[-1]['rows_per_s']:,.0f} rows/s", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.files < 1 or args.rows_per_file < 1 or min(args.writers) < 1:
        build_parser().error("--files, --rows-per-file and --writers must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        results = run_benchmark(args, Path(workdir))
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
