"""The compression job, from a listing of videos to committed output and a run summary.

    list videos -> drop those the output already holds (resume) -> decode (CPU actors, time-limited)
    -> encode + compress (actor pool, one model each, GPU when asked) -> driver commits rows in files

The driver is the only writer, so every video row is committed exactly once (see pipeline.store.storage); Ray Data
streams batches to it with backpressure, so its memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from pipeline.job.config import JobConfig
from pipeline.job.console import quiet_ray
from pipeline.job.encoders import encoder_input_size
from pipeline.job.errors import ERROR_COLUMNS
from pipeline.job.sample_clips import write_sample_manifest
from pipeline.job.sources import Listing, list_input
from pipeline.job.stages import DecodeStage, EncodeCompressStage, check_extra_columns
from pipeline.store.contract import OutputContract, check_rows, check_run, contract_of_rows
from pipeline.store.schema import now_utc
from pipeline.store.storage import OutputStore

log = logging.getLogger("tokendyn.pipeline")

MAX_INPUT_BLOCKS = 10_000
# Decoded frames wait in the object store between decode and encode. Decoding usually outruns the encoder, and Ray
# Data's default budget (half the object store) lets them pile up in proportion to the corpus; a budget of a few
# encoder batches per actor keeps memory flat whatever the corpus size, without starving the encoder.
IN_FLIGHT_BATCHES = 4
MIN_OBJECT_STORE_BUDGET = 64 * 1024 * 1024
MIN_POOL_ACTORS = 1  # each actor pool's lower bound; --workers is the encoder pool's upper bound


@dataclass
class RunSummary:
    run_id: str
    input: str
    output: str
    encoder: str
    listed: int = 0
    skipped: int = 0  # already in the output
    deferred: int = 0  # beyond --limit
    ok: int = 0
    failed: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_kept: int = 0
    stored_bytes: int = 0
    raw_token_bytes: int = 0
    wall_s: float = 0.0
    exit_code: int = 0

    @property
    def attempted(self) -> int:
        return self.ok + self.failed

    def as_dict(self) -> dict:
        ratios = {
            "attempted": self.attempted,
            "token_ratio": self.tokens_kept / self.tokens_in if self.tokens_in else None,
            "byte_ratio": self.stored_bytes / self.raw_token_bytes if self.raw_token_bytes else None,
            "videos_per_s": self.attempted / self.wall_s if self.wall_s else None,
        }
        return {**asdict(self), **ratios}


def init_ray(config: JobConfig) -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set), else start a local Ray on loopback."""
    start_ray(num_cpus=config.num_cpus, verbose=config.verbose)


def start_ray(*, num_cpus: int | None = None, verbose: bool = False) -> None:
    """`init_ray` for any script: join RAY_ADDRESS's cluster, else a local Ray of num_cpus on loopback."""
    if ray.is_initialized():
        return
    quiet_ray(verbose)
    with warnings.catch_warnings():
        # Ray starts its daemons by fork + exec. LanceDB and Lance, already loaded to read the output, warn that
        # their runtimes are not fork-safe; the exec discards the child's copy unused.
        warnings.filterwarnings("ignore", message="(lancedb fork support is experimental|lance is not fork-safe)")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
            return
        # Local-only mode: GCS, raylet and dashboard bind 127.0.0.1 instead of the machine's external address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def decoded_video_bytes(config: JobConfig, input_size: tuple[int, int]) -> int:
    """The most bytes of uint8 RGB frames one decoded video holds: --frames of them, or up to --max-frames with
    --fps (the count then follows the clip's length)."""
    frames = config.max_frames if config.fps is not None else config.frames
    return frames * input_size[0] * input_size[1] * 3


def elastic_pool(max_actors: int) -> ray.data.ActorPoolStrategy:
    """An actor pool that Ray Data grows up to `max_actors` while there is work and resources, and shrinks when idle.

    A fixed pool can hang a run after a node is lost: its actors keep their CPUs while the lost actors of the
    other stage wait forever for one. An elastic pool gives idle actors' resources back, so the run slows down.
    """
    return ray.data.ActorPoolStrategy(min_size=MIN_POOL_ACTORS, max_size=max(MIN_POOL_ACTORS, max_actors))


def build_dataset(todo: list[dict], config: JobConfig, extra_fields: list[pa.Field] = ()) -> ray.data.Dataset:
    """The Ray Data plan over the rows still to do; `extra_fields` types the columns the rows carry."""
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    encoder_cpus = math.ceil(config.workers * config.cpus_per_worker)
    decode_actors = max(1, cluster_cpus - encoder_cpus) if config.gpus_per_worker == 0 else max(1, cluster_cpus)
    blocks = max(1, min(MAX_INPUT_BLOCKS, math.ceil(len(todo) / config.batch_size)))

    decode = DecodeStage.resources(config)
    encode = EncodeCompressStage.resources(config)
    input_size = encoder_input_size(config.encoder, config.input_size)
    dataset = (
        ray.data.from_items(todo, override_num_blocks=blocks)
        .map(DecodeStage, fn_constructor_kwargs={"config": config, "input_size": input_size},
             compute=elastic_pool(decode_actors), num_cpus=decode.num_cpus)
        .map_batches(EncodeCompressStage, fn_constructor_kwargs={"config": config, "extra_fields": list(extra_fields)},
                     batch_size=config.batch_size, batch_format="pyarrow", compute=elastic_pool(config.workers),
                     num_cpus=encode.num_cpus, num_gpus=encode.num_gpus)
    )
    video_bytes = decoded_video_bytes(config, input_size)
    budget = max(MIN_OBJECT_STORE_BUDGET, IN_FLIGHT_BATCHES * config.workers * config.batch_size * video_bytes)
    options = dataset.context.execution_options  # this dataset's own copy of the DataContext
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=min(budget, options.resource_limits.object_store_memory))
    return dataset


class Committer:
    """Buffers result rows and commits them in files of `rows_per_file`, or sooner after `flush_interval_s`."""

    def __init__(self, store: OutputStore, config: JobConfig, summary: RunSummary,
                 contract: OutputContract | None) -> None:
        self.store, self.config, self.summary, self.contract = store, config, summary, contract
        self.videos: list[pa.Table] = []
        self.errors: list[pa.Table] = []
        self.last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        failed = pc.is_valid(batch.column("error_stage"))
        ok = batch.filter(pc.invert(failed)).drop_columns(list(ERROR_COLUMNS))
        errors = batch.filter(failed)
        if ok.num_rows:
            self.videos.append(ok)
        if errors.num_rows:
            self.errors.append(errors.select(["video_id", "uri", *ERROR_COLUMNS]).rename_columns(
                ["video_id", "uri", "stage", "error_type", "message"]))
        pending = sum(t.num_rows for t in self.videos) + sum(t.num_rows for t in self.errors)
        if pending >= self.config.rows_per_file or time.monotonic() - self.last_flush >= self.config.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        if self.videos:
            videos = pa.concat_tables(self.videos)
            self._record_contract(videos)
            self.store.write_videos(videos, replace=self.config.overwrite)
            self._count_videos(videos)
        if self.errors:
            errors = pa.concat_tables(self.errors)
            run_ids = pa.array([self.summary.run_id] * errors.num_rows, pa.string())
            created = pa.array([now_utc()] * errors.num_rows, pa.timestamp("us", tz="UTC"))
            self.store.write_errors(errors.append_column("run_id", run_ids).append_column("created_at", created))
            self._count_errors(errors)
        self.videos, self.errors = [], []
        self.last_flush = time.monotonic()

    def _record_contract(self, videos: pa.Table) -> None:
        """The output's first rows record its settings before they are committed; later rows must match them."""
        if self.contract is None:
            self.contract = contract_of_rows(self.config, videos)
            self.store.write_settings(self.contract.as_json(self.summary.run_id))
        check_rows(self.contract, videos, self.store.root)

    def _count_videos(self, videos: pa.Table) -> None:
        s = self.summary
        s.ok += videos.num_rows
        cells = pc.multiply(pc.multiply(videos.column("num_frames"), videos.column("grid_h")), videos.column("grid_w"))
        s.tokens_in += pc.sum(cells).as_py()
        s.tokens_kept += pc.sum(videos.column("k")).as_py()
        itemsize = 2 if self.config.base_dtype == "float16" else 4
        s.raw_token_bytes += pc.sum(pc.multiply(cells, videos.column("dim"))).as_py() * itemsize
        s.stored_bytes += sum(videos.column(name).nbytes for name in ("base", "dynamics", "cluster_sizes", "pooled"))

    def _count_errors(self, errors: pa.Table) -> None:
        self.summary.failed += errors.num_rows
        by_stage = Counter(self.summary.failed_by_stage)
        by_stage.update(errors.column("stage").to_pylist())
        self.summary.failed_by_stage = dict(by_stage)


def run_job(config: JobConfig, on_batch: Callable[[int], None] | None = None) -> RunSummary:
    """Run the job to completion; `on_batch(rows)` is called after each result batch is handed to the writer."""
    started = time.monotonic()
    source = str(write_sample_manifest(Path(tempfile.mkdtemp()))) if config.sample_clips else config.input
    store = OutputStore(config.output, config.s3_endpoint_url)
    summary = RunSummary(run_id=store.run_id, input=source, output=config.output, encoder=config.encoder)

    listing = list_input(source, s3_endpoint_url=config.s3_endpoint_url)
    check_extra_columns(listing.extra_fields)
    listed = listing.rows
    summary.listed = len(listed)
    if not config.rebuild:
        check_run(store, config)  # refuses other settings before anything is touched, the lock included
    store.acquire_lock(break_lock=config.break_lock)
    try:
        if config.rebuild:
            store.start_over()
        # Again under the lock: another job may have recorded settings since the check above.
        contract = check_run(store, config)
        if contract is not None and contract.adopted:
            store.write_settings(contract.as_json(store.run_id))
        _run_locked(config, store, listing, summary, contract, on_batch)
        summary.wall_s = time.monotonic() - started
        if summary.attempted and summary.failed / summary.attempted > config.max_error_rate:
            summary.exit_code = 1
        store.write_run_summary({"config": asdict(config), **summary.as_dict()})
    finally:
        store.release_lock()
    return summary


def _run_locked(config: JobConfig, store: OutputStore, listing: Listing, summary: RunSummary,
                contract: OutputContract | None, on_batch: Callable[[int], None] | None) -> None:
    listed = listing.rows
    store.reconcile()
    # --overwrite recomputes done videos too; a video's old row is replaced only once its new row is committed.
    done = set() if config.overwrite else store.done_ids(row["video_id"] for row in listed)
    todo = [row for row in listed if row["video_id"] not in done]
    summary.skipped = len(listed) - len(todo)
    if config.limit is not None:
        summary.deferred = max(0, len(todo) - config.limit)
        todo = todo[: config.limit]
    log.info("%d listed, %d already in the output, %d to do", summary.listed, summary.skipped, len(todo))

    if todo:
        init_ray(config)  # only now: a refused or finished run never starts a cluster
        committer = Committer(store, config, summary, contract)
        dataset = build_dataset(todo, config, listing.extra_fields)
        with tqdm(total=len(todo), unit="video", desc="videos", dynamic_ncols=True, mininterval=1.0) as progress:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                committer.add(batch)
                progress.update(batch.num_rows)
                if on_batch is not None:
                    on_batch(batch.num_rows)
        committer.flush()
        store.build_vector_index()
    store.finish_run()
