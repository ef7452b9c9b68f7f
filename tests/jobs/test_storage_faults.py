"""The output's own storage fails mid-run: a disk that fills up, a mount made read-only. The job stops with one
clear error naming the output and the cause, keeps every video committed before, and the rerun completes once
the storage is back, with every video there once.

The output lives on a small tmpfs mounted inside the test, which needs root (mount); elsewhere the tests are
skipped with that reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.job.errors import OutputUnwritable
from pipeline.store.storage import OutputStore
from job_scripts import load_job_script

VIDEOS = 10  # the ten_clips fixture's
FLAGS = ["--rows-per-file", "1"]  # a commit per video or two: the fault lands between commits


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (a finished output of the ten clips takes about 1.3 MB); `grow()` frees it up."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=400k", "tmpfs", str(where))
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(error, 'stderr', None) or error}); needs root")
    yield where
    subprocess.run(["umount", "--lazy", str(where)], check=False)


def ids_in(output: Path) -> tuple[list[str], list[str]]:
    """The video ids in Parquet and in LanceDB."""
    store = OutputStore(str(output))
    parquet = store.read_videos(columns=["video_id"])
    table = store.lance_table()
    lance = [] if table is None else table.to_arrow().column("video_id").to_pylist()
    return [] if parquet is None else parquet.column("video_id").to_pylist(), lance


def assert_complete_after_a_rerun(run_job_on, ten_clips: Path, output: Path, committed: list[str],
                                  *flags: str) -> None:
    summary = run_job_on(ten_clips, output, *FLAGS, *flags)
    assert summary.ok == VIDEOS - len(set(committed)), summary
    parquet, lance = ids_in(output)
    assert len(parquet) == len(set(parquet)) == VIDEOS and sorted(lance) == sorted(parquet)
    assert set(committed) <= set(parquet)
    assert not list((output / "_staging").iterdir())  # nothing the failed run staged is left behind


def test_a_disk_that_fills_up_stops_the_job_with_its_cause_and_the_rerun_completes(small_disk, run_job_on,
                                                                                    job_config, ten_clips, capsys):
    output = small_disk / "out"
    job = load_job_script("compress_corpus")
    assert job.run(job_config(ten_clips, output, *FLAGS)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith(f"error: the output {output} cannot be written: No space left on device"), error
    assert "Traceback" not in error and "make room" in error
    committed, _ = ids_in(output)
    assert 0 < len(committed) < VIDEOS and len(committed) == len(set(committed))  # it stopped part-way; kept those
    assert not (output / "_lock").exists()  # released: the rerun needs no --break-lock

    mount("-o", "remount,size=16m", str(small_disk))
    assert_complete_after_a_rerun(run_job_on, ten_clips, output, committed)


def test_an_output_made_read_only_mid_run_stops_the_job_and_the_rerun_completes(small_disk, run_job_on, ten_clips):
    mount("-o", "remount,size=16m", str(small_disk))
    output = small_disk / "out"
    batches = []

    def read_only_after_the_first_commit(videos: int) -> None:
        batches.append(videos)
        if len(batches) == 1:
            mount("-o", "remount,ro", str(small_disk))

    with pytest.raises(OutputUnwritable, match=f"the output {output} cannot be written: Read-only file system"):
        run_job_on(ten_clips, output, *FLAGS, on_batch=read_only_after_the_first_commit)
    committed, _ = ids_in(output)
    assert 0 < len(committed) < VIDEOS and len(committed) == len(set(committed))

    mount("-o", "remount,rw", str(small_disk))
    # The lock could not be deleted from the read-only output, and its holder (this test's process) is alive: a
    # rerun from a new process takes over a dead holder's lock by itself; here --break-lock says so.
    assert_complete_after_a_rerun(run_job_on, ten_clips, output, committed, "--break-lock")
