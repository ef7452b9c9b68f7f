"""Crash and resume: kill -9 of the job's driver (local output, then S3 output on moto), of one encoder actor, and of
a writer or the driver between a write and its commit.

Users rely on: after any crash, re-running the same command finishes the work; every video is then present exactly
once in Parquet and in LanceDB; readers never see a partial file; and what was committed before the crash is kept
as it is (same files, same rows), never recomputed.

The driver runs jobs/compress_corpus.py as a subprocess (standalone: it starts its own Ray, in a private temp dir so
that its processes can be told apart), killed once its first Parquet file is committed; every Ray process it started
must then exit. Resumed runs and the encoder-actor kill run in this process on the test Ray.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import lance
import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
import psutil  # noqa: E402

from pipeline.job.config import JobConfig
from pipeline.job.run import run_job
from pipeline.job.sources import video_id_for
from pipeline.store.storage import OutputStore

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "jobs" / "compress_corpus.py"
# One video per batch and per file, so commits happen often and a kill lands between them.
FLAGS = ["--encoder", "efficientnet-lite0", "--frames", "4", "--k", "4", "--batch-size", "1", "--rows-per-file", "1",
         "--neighbours", "0"]
VIDEOS = 8  # per driver-kill run
ACTOR_KILL_VIDEOS = 12  # enough batches queued that the encoder is mid-batch when it is killed
START_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------------------------
# helpers


def make_corpus(folder: Path, clip: Path, count: int = VIDEOS) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"clip_{index:02d}.mp4" for index in range(count)]
    for path in paths:
        shutil.copy(clip, path)
    return paths


def job_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp,
           "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)  # standalone: the job starts its own Ray
    return env


def short_temp_dir() -> str:
    """A private Ray temp dir; short, because Ray's socket paths under it must stay below 108 bytes."""
    return tempfile.mkdtemp(prefix="tdray-", dir="/tmp")


def start_job(args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(logs.with_suffix(".out"), "wb") as stdout, open(logs.with_suffix(".err"), "wb") as stderr:
        return subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def session_processes(driver_pid: int, ray_tmp: str) -> dict[int, tuple[psutil.Process, str]]:
    """The processes of the driver's Ray session, pid -> (process, name): the driver's descendants, and any process
    naming its private temp dir."""
    found = []
    try:
        found.extend(psutil.Process(driver_pid).children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter(["cmdline"]):
        if any(ray_tmp in part for part in process.info["cmdline"] or ()):
            found.append(process)
    named = {}
    for process in found:
        try:
            named[process.pid] = (process, process.name())
        except psutil.NoSuchProcess:
            pass
    named.pop(os.getpid(), None)
    return named


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Ray's per-node agents notice that the raylet is gone ("Raylet is dead! Exiting ...") but stay up (Ray 2.60); they
# hold no job state. Everything else of the session (GCS, raylet, workers, decode children) exits with the driver.
RAY_AGENTS_THAT_OUTLIVE_THE_RAYLET = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def kill_driver_when(proc: subprocess.Popen, ready, ray_tmp: str, logs: Path) -> list[str]:
    """Wait for `ready()`, kill -9 the driver, wait (30 s at most) for its Ray session's processes to exit, and
    return the names of those still running; they are then killed by PID (found from the session, never by name)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before the kill:\n"
                        + logs.with_suffix(".err").read_text()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the job committed nothing in time")
        time.sleep(0.02)
    before = session_processes(proc.pid, ray_tmp)
    os.kill(proc.pid, signal.SIGKILL)
    return stop_session(proc, before, ray_tmp)


def stop_session(proc: subprocess.Popen, before: dict, ray_tmp: str) -> list[str]:
    """After the driver was killed: wait (30 s at most) for its Ray session's processes (`before` and those found
    now) to exit and return the names of those still running; they are then killed by PID."""
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    processes = {**before, **session_processes(proc.pid, ray_tmp)}
    deadline = time.monotonic() + 30
    while True:  # until everything but Ray's agents has exited, or 30 s
        alive = [(process, name) for process, name in processes.values() if running(process)]
        if time.monotonic() > deadline or all(name in RAY_AGENTS_THAT_OUTLIVE_THE_RAYLET for _, name in alive):
            break
        time.sleep(0.2)
    for process, _ in alive:
        try:
            process.kill()  # by pid, so that the test leaves nothing behind even when it fails
        except psutil.NoSuchProcess:
            pass
    return sorted(name for _, name in alive)


def lance_ids(store: OutputStore) -> list[str]:
    table = store.lance_table()
    return [] if table is None else table.to_arrow().column("video_id").to_pylist()


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of the driver, local output


@dataclass
class LocalCrash:
    corpus: list[Path]
    output: Path
    survivors: list[str]
    files_after_kill: dict[str, tuple[int, int]]  # videos/ file name -> (size, mtime_ns)
    ids_after_kill: list[str]
    lance_ids_after_kill: list[str]


@pytest.fixture(scope="module")
def local_crash(tmp_path_factory, make_synthetic_clip) -> LocalCrash:
    root = tmp_path_factory.mktemp("driver_kill")
    corpus = make_corpus(root / "corpus", make_synthetic_clip("crash", num_frames=12))
    output = root / "out"
    ray_tmp = short_temp_dir()
    try:
        proc = start_job(["--input", str(root / "corpus"), "--output", str(output), *FLAGS, "--num-cpus", "2"],
                         job_env(ray_tmp), root / "logs" / "killed")
        survivors = kill_driver_when(proc, lambda: any((output / "videos").glob("*.parquet")), ray_tmp,
                                     root / "logs" / "killed")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    files = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (output / "videos").glob("*.parquet")}
    store = OutputStore(str(output))
    ids = store.read_videos(columns=["video_id"]).column("video_id").to_pylist()
    return LocalCrash(corpus, output, survivors, files, ids, lance_ids(store))


def test_killing_the_driver_leaves_only_whole_files_and_no_ray_process(local_crash):
    assert set(local_crash.survivors) <= RAY_AGENTS_THAT_OUTLIVE_THE_RAYLET, local_crash.survivors
    assert 1 <= len(local_crash.files_after_kill) < VIDEOS, "the kill should land mid-run"
    for name in local_crash.files_after_kill:  # every visible file is complete and readable
        assert pq.read_table(local_crash.output / "videos" / name).num_rows == 1
    assert len(local_crash.ids_after_kill) == len(set(local_crash.ids_after_kill)) == len(local_crash.files_after_kill)
    assert set(local_crash.lance_ids_after_kill) <= set(local_crash.ids_after_kill)  # LanceDB may lag Parquet
    assert (local_crash.output / "_lock").exists()  # left by the dead driver


def test_rerun_after_a_driver_kill_finishes_exactly_once_without_recomputing(ray_local, local_crash):
    output = local_crash.output
    summary = run_job(JobConfig.from_args(["--input", str(local_crash.corpus[0].parent), "--output", str(output),
                                           *FLAGS]))
    done_before = len(local_crash.ids_after_kill)
    assert (summary.listed, summary.skipped, summary.ok, summary.failed) == (VIDEOS, done_before,
                                                                            VIDEOS - done_before, 0)
    assert summary.exit_code == 0

    store = OutputStore(str(output))
    ids = store.read_videos(columns=["video_id"]).column("video_id").to_pylist()
    expected = sorted(video_id_for(str(path)) for path in local_crash.corpus)
    assert sorted(ids) == expected  # each video exactly once in Parquet...
    assert sorted(lance_ids(store)) == expected  # ...and in LanceDB (reconcile filled in what the crash left out)

    # What the killed run committed is untouched: same files, same bytes, not rewritten.
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (output / "videos").glob("*.parquet")}
    assert {name: after.get(name) for name in local_crash.files_after_kill} == local_crash.files_after_kill
    new_files = set(after) - set(local_crash.files_after_kill)
    new_ids = [pq.read_table(output / "videos" / name).column("video_id")[0].as_py() for name in new_files]
    assert not set(new_ids) & set(local_crash.ids_after_kill)
    assert not (output / "_lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# kill -9 of one encoder actor


def test_a_killed_encoder_actor_is_restarted_and_its_batch_retried(ray_local, tmp_path, make_synthetic_clip):
    from ray._private import state

    corpus = make_corpus(tmp_path / "corpus", make_synthetic_clip("crash_actor", num_frames=12), ACTOR_KILL_VIDEOS)
    killed: dict = {}

    def kill_the_encoder_mid_batch(rows: int) -> None:
        if killed:
            return
        actors = [a for a in state.actors().values()
                  if a["State"] == "ALIVE" and "EncodeCompressStage" in a["ActorClassName"]]
        assert len(actors) == 1, actors
        process = psutil.Process(actors[0]["Pid"])
        busy = 0.0
        for _ in range(50):  # wait until it is working on a batch
            busy = process.cpu_percent(interval=0.1)
            if busy > 20:
                break
        os.kill(process.pid, signal.SIGKILL)
        killed.update(actor_id=actors[0]["ActorID"], pid=process.pid, busy=busy)

    summary = run_job(JobConfig.from_args(["--input", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
                                           *FLAGS]), on_batch=kill_the_encoder_mid_batch)
    assert killed and killed["busy"] > 20, killed
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    assert state.actors()[killed["actor_id"]]["NumRestarts"] >= 1  # Ray restarted the actor...

    # ...retried the batch it was working on, and the run completed with every video exactly once.
    assert (summary.ok, summary.failed, summary.exit_code) == (ACTOR_KILL_VIDEOS, 0, 0)
    store = OutputStore(str(tmp_path / "out"))
    expected = sorted(video_id_for(str(path)) for path in corpus)
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == expected
    assert sorted(lance_ids(store)) == expected


# ---------------------------------------------------------------------------------------------------------------
# kill -9 between a write and its commit: of a writer, then of the driver (tests/jobs/faults injects the kill)

FAULTS = REPO / "tests" / "jobs" / "faults"
FAULT_VIDEOS = 6


def run_with_fault(fault: str, corpus: Path, output: Path, logs: Path) -> tuple[subprocess.Popen, dict, list[str]]:
    """Run the job standalone with `fault` injected, to its end or its kill; -> (process, the staged files the
    killed process left, the names of its Ray session's processes that outlived it)."""
    record = logs.parent / f"{logs.name}.fault.json"
    ray_tmp = short_temp_dir()
    env = job_env(ray_tmp, PYTHONPATH=os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
                  TD_FAULT=fault, TD_FAULT_RECORD=str(record))
    try:
        proc = start_job(["--input", str(corpus), "--output", str(output), *FLAGS, "--num-cpus", "2"], env, logs)
        try:
            proc.wait(timeout=START_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the job did not end in time")
        survivors = stop_session(proc, {}, ray_tmp) if proc.returncode == -signal.SIGKILL else []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert record.exists(), "the fault was not injected:\n" + logs.with_suffix(".err").read_text()[-3000:]
    return proc, json.loads(record.read_text()), survivors


def lance_data_files(output: Path) -> set[str]:
    return {path.name for path in (output / "lancedb" / "videos.lance" / "data").iterdir()}


def unreferenced_lance_files(output: Path) -> set[str]:
    """Data files of the LanceDB table that no version of it refers to."""
    uri = str(output / "lancedb" / "videos.lance")
    referenced = {data_file.path for version in lance.dataset(uri).versions()
                  for fragment in lance.dataset(uri, version=version["version"]).get_fragments()
                  for data_file in fragment.metadata.files}
    return lance_data_files(output) - referenced


def assert_each_video_once_and_no_orphan(output: Path, corpus: list[Path], left: dict) -> None:
    store = OutputStore(str(output))
    expected = sorted(video_id_for(str(path)) for path in corpus)
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == expected
    assert sorted(lance_ids(store)) == expected
    assert not any(Path(path).exists() for path in left["parquet"])
    assert not set(left["fragments"]) & lance_data_files(output)
    assert unreferenced_lance_files(output) == set()
    assert not list((output / "_staging").iterdir())


def test_a_writer_killed_after_staging_its_files_is_retried_and_they_are_never_committed(tmp_path,
                                                                                         make_synthetic_clip):
    corpus = make_corpus(tmp_path / "corpus", make_synthetic_clip("crash_writer", num_frames=12), FAULT_VIDEOS)
    output = tmp_path / "out"
    proc, left, _ = run_with_fault("writer-after-staging", tmp_path / "corpus", output, tmp_path / "logs" / "run")
    assert proc.returncode == 0, (tmp_path / "logs" / "run.err").read_text()[-3000:]
    assert len(left["parquet"]) == 1 and left["fragments"]  # what the killed writer had staged...
    assert_each_video_once_and_no_orphan(output, corpus, left)  # ...was removed, and its videos written again


def test_a_driver_killed_with_rows_staged_leaves_them_to_the_rerun(ray_local, tmp_path, make_synthetic_clip):
    corpus = make_corpus(tmp_path / "corpus", make_synthetic_clip("crash_commit", num_frames=12), FAULT_VIDEOS)
    output = tmp_path / "out"
    proc, left, survivors = run_with_fault("driver-before-commit-3", tmp_path / "corpus", output,
                                           tmp_path / "logs" / "killed")
    assert proc.returncode == -signal.SIGKILL
    assert set(survivors) <= RAY_AGENTS_THAT_OUTLIVE_THE_RAYLET, survivors
    committed = OutputStore(str(output)).read_videos(columns=["video_id"]).column("video_id").to_pylist()
    assert len(committed) == 2  # two commits of one video each before the kill...
    assert all(Path(path).exists() for path in left["parquet"])  # ...and the third one's files staged, not visible
    assert set(left["fragments"]) <= unreferenced_lance_files(output)

    summary = run_job(JobConfig.from_args(["--input", str(tmp_path / "corpus"), "--output", str(output), *FLAGS]))
    assert (summary.skipped, summary.ok, summary.failed, summary.exit_code) == (2, FAULT_VIDEOS - 2, 0, 0)
    assert_each_video_once_and_no_orphan(output, corpus, left)


# ---------------------------------------------------------------------------------------------------------------
# S3 end to end on moto: listing, output on S3, kill -9 and resume, a missing key, no credential anywhere


@dataclass
class S3Crash:
    bucket: str
    output: str
    uris: list[str]
    missing_uri: str
    secret: str
    survivors: list[str]
    objects_after_kill: dict[str, tuple[str, object]]  # key -> (ETag, LastModified) under out/videos/
    resumed_exit_code: int
    logs: list[Path]  # stdout/stderr of both runs, and every file of their Ray sessions


def list_objects(s3_client, bucket: str, prefix: str, suffix: str = "") -> dict[str, dict]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item for page in pages for item in page.get("Contents", []) if item["Key"].endswith(suffix)}


@pytest.fixture(scope="module")
def s3_crash(tmp_path_factory, make_synthetic_clip, moto_s3_endpoint, s3_client) -> S3Crash:
    root = tmp_path_factory.mktemp("s3_driver_kill")
    bucket = f"crash-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    clip = make_synthetic_clip("crash", num_frames=12)
    uris = []
    for index in range(VIDEOS):
        s3_client.upload_file(str(clip), bucket, f"in/videos/clip_{index:02d}.mp4")
        uris.append(f"s3://{bucket}/in/videos/clip_{index:02d}.mp4")
    missing = f"s3://{bucket}/in/videos/missing.mp4"
    manifest = io.StringIO()
    writer = csv.writer(manifest)
    writer.writerow(["uri"])
    writer.writerows([[uri.split("/in/", 1)[1]] for uri in uris] + [["videos/missing.mp4"]])  # relative to it
    s3_client.put_object(Bucket=bucket, Key="in/manifest.csv", Body=manifest.getvalue().encode())

    secret = f"TDSECRET{uuid.uuid4().hex}"  # moto accepts any credentials; this one must never be written
    output = f"s3://{bucket}/out"
    common = ["--output", output, "--s3-endpoint-url", moto_s3_endpoint, *FLAGS, "--num-cpus", "2"]
    credentials = {"AWS_ACCESS_KEY_ID": "TDKEYID", "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": ""}
    logs: list[Path] = []
    ray_tmps = [short_temp_dir(), short_temp_dir()]
    try:
        # First run: the input is the S3 prefix, listed; killed once one video is committed.
        env = job_env(ray_tmps[0], **credentials)
        env.pop("AWS_SESSION_TOKEN")
        proc = start_job(["--input", f"s3://{bucket}/in/videos/", *common], env, root / "logs" / "killed")
        committed = lambda: bool(list_objects(s3_client, bucket, "out/videos/", ".parquet"))  # noqa: E731
        survivors = kill_driver_when(proc, committed, ray_tmps[0], root / "logs" / "killed")
        after_kill = {key: (item["ETag"], item["LastModified"])
                      for key, item in list_objects(s3_client, bucket, "out/videos/", ".parquet").items()}

        # Second run: the same videos through a manifest that also names a missing key; it runs to the end.
        env = job_env(ray_tmps[1], **credentials)
        env.pop("AWS_SESSION_TOKEN")
        proc = start_job(["--input", f"s3://{bucket}/in/manifest.csv", *common], env, root / "logs" / "resumed")
        proc.wait(timeout=420)
        for ray_tmp, name in zip(ray_tmps, ("killed", "resumed")):
            copied = root / "ray_sessions" / name
            shutil.copytree(ray_tmp, copied, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("sockets", "*.sock"))
            logs.extend(p for p in copied.rglob("*") if p.is_file() and not p.is_symlink())
        logs.extend(sorted((root / "logs").glob("*")))
    finally:
        for ray_tmp in ray_tmps:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return S3Crash(bucket, output, uris, missing, secret, survivors, after_kill, proc.returncode, logs)


def test_s3_driver_kill_and_resume_exactly_once(s3_crash, moto_s3_endpoint, s3_client):
    assert set(s3_crash.survivors) <= RAY_AGENTS_THAT_OUTLIVE_THE_RAYLET, s3_crash.survivors
    assert 1 <= len(s3_crash.objects_after_kill) < VIDEOS
    resumed_err = next(p for p in s3_crash.logs if p.name == "resumed.err").read_text()
    assert s3_crash.resumed_exit_code == 0, resumed_err[-3000:]  # one failure is below --max-error-rate 1.0
    assert "taking over the lock of run" in resumed_err and "its process is gone" in resumed_err
    assert "fork support is experimental" not in resumed_err and "not fork-safe" not in resumed_err  # init_ray

    store = OutputStore(s3_crash.output, s3_endpoint_url=moto_s3_endpoint)
    expected = sorted(video_id_for(uri) for uri in s3_crash.uris)
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == expected
    assert sorted(lance_ids(store)) == expected

    # Objects committed before the kill are the same objects afterwards; nothing was recomputed.
    now = list_objects(s3_client, s3_crash.bucket, "out/videos/", ".parquet")
    assert {key: (now[key]["ETag"], now[key]["LastModified"]) for key in s3_crash.objects_after_kill} == \
        s3_crash.objects_after_kill
    run = store.read_run_summary()
    done_before = len(s3_crash.objects_after_kill)
    assert (run["listed"], run["skipped"], run["ok"], run["failed"]) == (VIDEOS + 1, done_before,
                                                                         VIDEOS - done_before, 1)
    assert not list_objects(s3_client, s3_crash.bucket, "out/_lock")


def test_s3_missing_key_is_a_read_error_row(s3_crash, moto_s3_endpoint):
    errors = OutputStore(s3_crash.output, s3_endpoint_url=moto_s3_endpoint).read_errors().to_pylist()
    assert [(e["uri"], e["stage"], e["error_type"], e["message"]) for e in errors] == [
        (s3_crash.missing_uri, "read", "FileNotFoundError", f"no such S3 object: {s3_crash.missing_uri}")]


def test_the_secret_key_appears_in_no_output_and_no_log(s3_crash, s3_client):
    secret = s3_crash.secret.encode()
    objects = list_objects(s3_client, s3_crash.bucket, "out/")
    assert any(key.startswith("out/lancedb/") for key in objects) and "out/run.json" in objects
    assert any(key.startswith("out/errors/") for key in objects)
    leaks = [key for key in objects
             if secret in s3_client.get_object(Bucket=s3_crash.bucket, Key=key)["Body"].read()]
    assert leaks == []
    assert len(s3_crash.logs) > 10  # the job's stdout/stderr and its Ray sessions' logs
    assert [str(p) for p in s3_crash.logs if secret in p.read_bytes()] == []
