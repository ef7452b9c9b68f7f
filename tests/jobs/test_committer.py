"""The driver's side of the write path (pipeline.job.run.Committer) over the write stage's real output: a write
repeated after its videos were committed (a retried or reconstructed task) is committed once, and the summary
counts every video once."""

from __future__ import annotations

import argparse

import pyarrow as pa

from job_scripts import load_job_script
from pipeline.job.config import JobConfig
from pipeline.job.errors import ERROR_COLUMNS
from pipeline.job.run import Committer, RunSummary
from pipeline.job.writing import WriteStage
from pipeline.store.storage import OutputStore

bench = load_job_script("bench/bench_writes")
SHAPE = argparse.Namespace(rows_per_file=1, k=4, dim=8, frames=2, grid=3)


def results(ids: list[str], failed: tuple[str, ...] = ()) -> pa.Table:
    """What the encode stage hands the write stage: video rows, with the error columns (set for `failed`)."""
    rows = pa.concat_tables([bench.renumbered(bench.paper_rows(SHAPE, 0), 0) for _ in ids])
    rows = rows.set_column(0, "video_id", pa.array(ids))
    for name in ERROR_COLUMNS:
        rows = rows.append_column(name, pa.array(["decode" if v in failed else None for v in ids], pa.string()))
    return rows


def test_a_repeated_write_is_committed_once_and_counted_once(ray_local, tmp_path):
    config = JobConfig.from_args(["--input", "unused", "--output", str(tmp_path / "out"), "--rows-per-file", "1"])
    store = OutputStore(config.output)
    store.acquire_lock()
    store.reconcile()
    summary = RunSummary(run_id=store.run_id, input="unused", output=config.output, encoder="synthetic")
    committer = Committer(store, config, summary, contract=None)
    write = WriteStage(config)

    assert committer.add(write(results(["a", "b"]))) == 2
    assert committer.add(write(results(["a", "b"]))) == 2  # the same task again: nothing new
    assert committer.add(write(results(["b", "c", "x"], failed=("x",)))) == 3  # "b" again, "c" new, "x" failed
    committer.finish()
    store.finish_run()
    store.release_lock()

    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == ["a", "b", "c"]
    lance = store.lance_table().to_arrow()
    assert sorted(lance.column("video_id").to_pylist()) == ["a", "b", "c"]
    assert store.read_errors().column("video_id").to_pylist() == ["x"]
    assert (summary.ok, summary.failed, summary.failed_by_stage) == (3, 1, {"decode": 1})
    assert not list((tmp_path / "out" / "_staging").iterdir())


def test_a_write_repeated_within_one_flush_is_committed_once(ray_local, tmp_path):
    config = JobConfig.from_args(["--input", "unused", "--output", str(tmp_path / "out"), "--rows-per-file", "10"])
    store = OutputStore(config.output)
    store.acquire_lock()
    store.reconcile()
    summary = RunSummary(run_id=store.run_id, input="unused", output=config.output, encoder="synthetic")
    committer = Committer(store, config, summary, contract=None)
    write = WriteStage(config)
    for ids in (["a", "b"], ["a", "b"], ["b", "c"]):  # fewer than 10 videos: all three wait for the same flush
        committer.add(write(results(ids)))
    committer.finish()
    store.finish_run()
    store.release_lock()
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == ["a", "b", "c"]
    assert sorted(store.lance_table().to_arrow().column("video_id").to_pylist()) == ["a", "b", "c"]
    assert summary.ok == 3
