"""The write path's Ray side: the write stage, which stages each file of result rows in the output from a worker
(pipeline.store.staging), and the table's upkeep task. Neither loads torch or an encoder, so they start fast.

After the write stage only a few hundred bytes per written file travel on, to the driver: where the rows are, what
they hold, and the error records of the batch's failed videos.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.job.config import JobConfig, Resources
from pipeline.job.errors import ERROR_COLUMNS, repeat_on_store_faults
from pipeline.job.stage_clock import report
from pipeline.store.staging import StagedVideos
from pipeline.store.storage import OutputStore

# What the write stage hands the driver per written file.
COUNT_COLUMNS = ("tokens_in", "tokens_kept", "raw_token_bytes", "stored_bytes")  # the run summary's, per file
ERROR_RECORD = pa.struct([pa.field(name, pa.string())
                          for name in ("video_id", "uri", "stage", "error_type", "message")])
STAGED_SCHEMA = pa.schema([
    pa.field("parquet", pa.string()),  # null when every video of the batch failed
    pa.field("fragments", pa.string()),
    pa.field("video_ids", pa.list_(pa.string())),
    pa.field("encoders", pa.string()),  # JSON of StagedVideos.encoders
    pa.field("schema", pa.binary()),
    *(pa.field(name, pa.int64()) for name in COUNT_COLUMNS),
    pa.field("errors", pa.list_(ERROR_RECORD)),
])


def output_counts(videos: pa.Table, base_dtype: str) -> dict[str, int]:
    """Tokens in and kept, and bytes of raw tokens and of what is stored, over these video rows (the summary's)."""
    cells = pc.multiply(pc.multiply(videos.column("num_frames"), videos.column("grid_h")), videos.column("grid_w"))
    itemsize = 2 if base_dtype == "float16" else 4
    return {"tokens_in": pc.sum(cells).as_py() or 0, "tokens_kept": pc.sum(videos.column("k")).as_py() or 0,
            "raw_token_bytes": (pc.sum(pc.multiply(cells, videos.column("dim"))).as_py() or 0) * itemsize,
            "stored_bytes": sum(videos.column(name).nbytes for name in ("base", "dynamics", "cluster_sizes", "pooled"))}


def staged_videos(row: dict) -> StagedVideos | None:
    """The driver's view of one row of the write stage's output (None when it staged no video)."""
    if row["parquet"] is None:
        return None
    return StagedVideos(parquet=row["parquet"], fragments=row["fragments"], video_ids=row["video_ids"],
                        encoders=json.loads(row["encoders"]), schema=row["schema"])


class WriteStage:
    """Stage a batch of result rows in the output (one Parquet file and its Lance fragments, not visible until the
    driver commits them) and hand on one small row naming them, with the batch's counts and error records."""

    def __init__(self, config: JobConfig, clock=None) -> None:
        """clock: the run's StageClock (pipeline.job.stage_clock), told each file's write seconds."""
        self.config = config
        self.clock = clock
        self.store = OutputStore(config.output, config.s3_endpoint_url)

    @staticmethod
    def resources(config: JobConfig) -> Resources:
        # Writing is mostly I/O; like the driver that used to write, it reserves no CPU, so it can never wait for
        # one that the decoders and encoders hold.
        return Resources(num_cpus=0.0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        failed = pc.is_valid(batch.column("error_stage"))
        videos = batch.filter(pc.invert(failed)).drop_columns(list(ERROR_COLUMNS))
        errors = batch.filter(failed).select(["video_id", "uri", *ERROR_COLUMNS]).rename_columns(
            ERROR_RECORD.names).to_pylist()
        row = {"parquet": None, "fragments": None, "video_ids": [], "encoders": "[]", "schema": None, "errors": errors,
               **dict.fromkeys(COUNT_COLUMNS, 0)}
        if videos.num_rows:
            staged = repeat_on_store_faults(self.store.stage_videos, videos)
            row.update(parquet=staged.parquet, fragments=staged.fragments, video_ids=staged.video_ids,
                       encoders=json.dumps(staged.encoders), schema=staged.schema,
                       **output_counts(videos, self.config.base_dtype))
        report(self.clock, "write", time.perf_counter() - started, videos.num_rows)
        return pa.Table.from_pylist([row], schema=STAGED_SCHEMA)


@ray.remote(num_cpus=0)  # mostly I/O, like the commits beside it; it must never wait for an encoder's CPU
def maintain_table(root: str, s3_endpoint_url: str | None, finish: bool = False) -> None:
    """The LanceDB table's upkeep: compaction and index updates when due; with `finish`, everything brought up to
    date and the vector index built (OutputStore.compact_if_needed, build_vector_index)."""
    store = OutputStore(root, s3_endpoint_url)
    if finish:
        store.build_vector_index()
    else:
        store.compact_if_needed()
