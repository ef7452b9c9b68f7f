"""The compression job, from a listing of videos to committed output and a run summary.

    list videos -> drop those the output already holds (resume) -> decode (CPU actors, time-limited)
    -> encode + compress (actor pool, one model each, GPU when asked) -> write (actor pool: stages Parquet files
    and Lance fragments in the output) -> the driver commits what was staged

Workers write every byte of the rows; the driver receives a few hundred bytes per file and is the only one that
commits, so every video row is committed exactly once (see pipeline.store.staging) and adding machines adds
writers. Ray Data streams to it with backpressure, so its memory stays bounded whatever the corpus size. The
LanceDB table's upkeep (compaction, indexes) runs as a Ray task beside the commits, never in the driver.
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
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from pipeline.job.config import JobConfig
from pipeline.job.console import quiet_ray
from pipeline.job.encoders import encoder_input_size
from pipeline.job.errors import OutputUnwritable, one_line, repeat_on_store_faults, storage_fault, store_unavailable
from pipeline.job.sample_clips import write_sample_manifest
from pipeline.job.sources import Listing, list_input
from pipeline.job.stage_clock import ClockWatcher, read_clock, start_clock
from pipeline.job.stages import DecodeStage, EncodeCompressStage, check_extra_columns
from pipeline.job.writing import COUNT_COLUMNS, WriteStage, maintain_table, staged_videos
from pipeline.store.contract import OutputContract, check_rows, check_run, contract_of_rows
from pipeline.store.schema import now_utc
from pipeline.store.staging import StagedVideos
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
    # Worker seconds in each stage (summed over actors) and the share of the pipeline's wall time the encoder actors
    # were busy (encode + compress seconds / (wall seconds x --workers)): what bounds the run.
    stage_s: dict[str, float] = field(default_factory=dict)
    encoder_busy_share: float | None = None
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


def build_dataset(todo: list[dict], config: JobConfig, extra_fields: list[pa.Field] = (), clock=None
                  ) -> ray.data.Dataset:
    """The Ray Data plan over the rows still to do; `extra_fields` types the columns the rows carry; the stages
    report their seconds to `clock` (a StageClock), when given."""
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    encoder_cpus = math.ceil(config.workers * config.cpus_per_worker)
    decode_actors = max(1, cluster_cpus - encoder_cpus) if config.gpus_per_worker == 0 else max(1, cluster_cpus)
    blocks = max(1, min(MAX_INPUT_BLOCKS, math.ceil(len(todo) / config.batch_size)))

    decode = DecodeStage.resources(config)
    encode = EncodeCompressStage.resources(config)
    input_size = encoder_input_size(config.encoder, config.input_size)
    dataset = (
        ray.data.from_items(todo, override_num_blocks=blocks)
        .map(DecodeStage, fn_constructor_kwargs={"config": config, "input_size": input_size, "clock": clock},
             compute=elastic_pool(decode_actors), num_cpus=decode.num_cpus)
        .map_batches(EncodeCompressStage,
                     fn_constructor_kwargs={"config": config, "extra_fields": list(extra_fields), "clock": clock},
                     batch_size=config.batch_size, batch_format="pyarrow", compute=elastic_pool(config.workers),
                     num_cpus=encode.num_cpus, num_gpus=encode.num_gpus)
        .map_batches(WriteStage, fn_constructor_kwargs={"config": config, "clock": clock},
                     batch_size=config.rows_per_file,
                     batch_format="pyarrow", compute=elastic_pool(config.writers or config.workers),
                     num_cpus=WriteStage.resources(config).num_cpus)
    )
    video_bytes = decoded_video_bytes(config, input_size)
    budget = max(MIN_OBJECT_STORE_BUDGET, IN_FLIGHT_BATCHES * config.workers * config.batch_size * video_bytes)
    options = dataset.context.execution_options  # this dataset's own copy of the DataContext
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=min(budget, options.resource_limits.object_store_memory))
    return dataset


class Committer:
    """Commits what the write stage staged, in flushes of `rows_per_file` videos or sooner after
    `flush_interval_s`, and keeps one table upkeep task (`maintain_table`) running beside the commits."""

    def __init__(self, store: OutputStore, config: JobConfig, summary: RunSummary,
                 contract: OutputContract | None) -> None:
        self.store, self.config, self.summary, self.contract = store, config, summary, contract
        self.staged: list[tuple[StagedVideos, dict]] = []  # (staged rows, the write stage's row: their counts)
        self.errors: list[dict] = []
        self.committed: set[str] = set()  # video ids this run committed, or is committing in this flush
        self.last_flush = time.monotonic()
        self.upkeep: ray.ObjectRef | None = None

    def add(self, batch: pa.Table) -> int:
        """Take one batch of the write stage's output; returns the videos it accounts for."""
        videos = 0
        for row in batch.to_pylist():
            staged = staged_videos(row)
            if staged is not None:
                self.staged.append((staged, row))
            self.errors.extend(row["errors"])
            videos += len(row["video_ids"]) + len(row["errors"])
        pending = sum(len(staged.video_ids) for staged, _ in self.staged) + len(self.errors)
        if pending >= self.config.rows_per_file or time.monotonic() - self.last_flush >= self.config.flush_interval_s:
            self.flush()
        return videos

    def flush(self) -> None:
        fresh = []
        for staged, counts in self.staged:
            if self._not_committed_yet(staged):
                fresh.append((staged, counts))
                self.committed.update(staged.video_ids)  # claimed now: a repeat later in this flush is caught too
        if fresh:
            for staged, _ in fresh:
                self._record_contract(staged.encoder_table())
            if self.config.overwrite:
                self._wait_for_upkeep()  # its compaction and our removal of replaced rows would touch one fragment
            repeat_on_store_faults(self.store.commit_staged, [staged for staged, _ in fresh],
                                   replace=self.config.overwrite)
            for staged, counts in fresh:
                self._count_videos(len(staged.video_ids), counts)
            self._start_upkeep()
        if self.errors:
            errors = pa.Table.from_pylist(self.errors)
            run_ids = pa.array([self.summary.run_id] * errors.num_rows, pa.string())
            created = pa.array([now_utc()] * errors.num_rows, pa.timestamp("us", tz="UTC"))
            repeat_on_store_faults(self.store.write_errors,
                                   errors.append_column("run_id", run_ids).append_column("created_at", created))
            self._count_errors(errors)
        self.staged, self.errors = [], []
        self.last_flush = time.monotonic()

    def finish(self) -> None:
        """Commit what is pending, then bring the table up to date (compaction, indexes) and wait for it."""
        self.flush()
        self._wait_for_upkeep()
        self._upkeep_done(maintain_table.remote(self.store.root, self.store.s3_endpoint_url, finish=True))

    def _upkeep_done(self, upkeep: ray.ObjectRef) -> None:
        """Wait for an upkeep task. One the object store's faults failed is left to the next (the next run's, at
        the end): compaction and indexes speed reads up, the rows are committed without them."""
        try:
            ray.get(upkeep)
        except Exception as error:
            fault = store_unavailable(error)
            if fault is None:
                raise
            log.warning("the table's upkeep met the object store's fault (%s); the next upkeep does it", fault)

    def abandon_upkeep(self) -> None:
        """Stop the upkeep task of a failed run (it is safe to kill: Lance commits whole or not at all), so that
        its own failure does not print after the run's error."""
        if self.upkeep is not None:
            ray.cancel(self.upkeep, force=True)
            try:
                ray.get(self.upkeep, timeout=10)  # its error is taken here, so Ray does not print it as unhandled
            except Exception:
                pass
            self.upkeep = None

    def _not_committed_yet(self, staged: StagedVideos) -> bool:
        """Whether `staged` is to be committed as it is. A write repeated after its videos were committed (a
        retried or reconstructed task) is never committed again: its other videos, if any, go in through the
        driver, and its files are left to remove_orphans."""
        repeated = self.committed.intersection(staged.video_ids)
        if not repeated:
            return True
        rows = pq.read_table(staged.parquet, filesystem=self.store.fs)
        rows = rows.filter(pc.invert(pc.is_in(rows.column("video_id"), pa.array(sorted(repeated), pa.string()))))
        self.store.discard_staged(staged)
        if rows.num_rows:
            self._wait_for_upkeep()  # write_videos does the table's upkeep itself: two at once conflict in Lance
            self.store.write_videos(rows, replace=self.config.overwrite)
            self.committed.update(rows.column("video_id").to_pylist())
            self._count_videos(rows.num_rows, {})
        log.warning("a write of %d video(s) already committed was repeated; committed once", len(repeated))
        return False

    def _start_upkeep(self) -> None:
        if self.upkeep is not None:
            ready, _ = ray.wait([self.upkeep], timeout=0)
            if not ready:
                return
            self._upkeep_done(self.upkeep)
        self.upkeep = maintain_table.remote(self.store.root, self.store.s3_endpoint_url)

    def _wait_for_upkeep(self) -> None:
        if self.upkeep is not None:
            self._upkeep_done(self.upkeep)
            self.upkeep = None

    def _record_contract(self, encoders: pa.Table) -> None:
        """The output's first rows record its settings before they are committed; later rows must match them."""
        if self.contract is None:
            self.contract = contract_of_rows(self.config, encoders)
            self.store.write_settings(self.contract.as_json(self.summary.run_id))
        check_rows(self.contract, encoders, self.store.root)

    def _count_videos(self, videos: int, counts: dict) -> None:
        s = self.summary
        s.ok += videos
        for name in COUNT_COLUMNS:
            setattr(s, name, getattr(s, name) + counts.get(name, 0))

    def _count_errors(self, errors: pa.Table) -> None:
        self.summary.failed += errors.num_rows
        by_stage = Counter(self.summary.failed_by_stage)
        by_stage.update(errors.column("stage").to_pylist())
        self.summary.failed_by_stage = dict(by_stage)


def run_job(config: JobConfig, on_batch: Callable[[int], None] | None = None) -> RunSummary:
    """Run the job to completion; `on_batch(videos)` is called after each batch of written files reaches the
    driver."""
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
    except BaseException as error:
        _release_lock_after(store, error)
        fault = storage_fault(error)
        if fault is None:
            raise
        remedy = ("rerun once it answers" if fault.startswith("the object store") else
                  "make room (or make the output writable) and rerun")
        raise OutputUnwritable(f"the output {config.output} cannot be written: {fault}. The {summary.ok} videos "
                               f"committed in this run and all committed before are kept; {remedy} to complete "
                               "it") from error
    store.release_lock()
    return summary


def _release_lock_after(store: OutputStore, error: BaseException) -> None:
    """Release the lock on the way out of a failed run, without hiding why it failed: on a full or read-only
    output the release can fail too (the lease then expires on its own)."""
    try:
        store.release_lock()
    except Exception as release_error:
        log.warning("the output's lock was not released (%s: %s) after the run failed with %s; its lease expires "
                    "on its own", type(release_error).__name__, one_line(release_error), type(error).__name__)


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
        clock = start_clock()
        dataset = build_dataset(todo, config, listing.extra_fields, clock)
        started, committed = time.monotonic(), 0
        try:
            with tqdm(total=len(todo), unit="video", desc="videos", dynamic_ncols=True, mininterval=1.0) as progress, \
                    ClockWatcher(clock, lambda encoded: _advance(progress, encoded)):
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    videos = committer.add(batch)
                    committed += videos
                    progress.set_postfix_str(f"{committed} committed", refresh=False)
                    _advance(progress, committed)  # a committed video was encoded, whatever the clock says yet
                    if on_batch is not None:
                        on_batch(videos)
            committer.finish()
        except BaseException:
            committer.abandon_upkeep()
            raise
        _record_stage_times(summary, read_clock(clock), time.monotonic() - started, config.workers)
    store.finish_run()


def _advance(progress: tqdm, encoded: int) -> None:
    """Move the bar on to `encoded` videos (never back; a retried batch is counted again, so never past the total)."""
    encoded = min(encoded, progress.total)
    if encoded > progress.n:
        progress.update(encoded - progress.n)


def _record_stage_times(summary: RunSummary, clock: dict | None, wall_s: float, encoder_actors: int) -> None:
    if clock is None:
        log.warning("the stage clock was lost with its node: the summary gives no stage times")
        return
    summary.stage_s = {stage: round(seconds, 3) for stage, seconds in clock["seconds"].items()}
    busy = clock["seconds"]["encode"] + clock["seconds"]["compress"]
    summary.encoder_busy_share = min(1.0, busy / (wall_s * encoder_actors)) if wall_s > 0 else None
