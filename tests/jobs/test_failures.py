"""Failure handling of the compression job: a zoo of bad inputs, exit status, one writer per output, outputs of
another schema version.

One run of jobs/compress_corpus.py's main() over the zoo (in this process, on the test Ray) is shared by the tests
below; every input is generated here. The zoo is listed in a manifest, which also holds a missing file, a uri
given twice and an S3 object whose server never answers (the hanging decode).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.job.sources import video_id_for
from pipeline.store.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY, SchemaVersionError
from pipeline.store.storage import OutputStore
from job_scripts import load_job_script

REPO = Path(__file__).resolve().parents[2]
DECODE_TIMEOUT_S = 10
FLAGS = ["--encoder", "efficientnet-lite0", "--frames", "8", "--k", "8", "--batch-size", "2", "--neighbours", "0",
         "--rows-per-file", "4"]
MAX_ERROR_RATE = 0.25
HANGING_URI = "s3://stalled-bucket/hang.mp4"

# Zoo input -> None when it must be written, else (stage, error type, pattern the message must match).
EXPECTED = {
    "good.mp4": None,
    "good_small.mp4": None,
    "one_frame.mp4": None,  # the documented rule: its one frame is repeated --frames times
    "short_3_frames.mp4": None,  # fewer frames than --frames: frames repeat, in order
    "huge_3840x2160.mp4": None,  # decoded and resized within the normal limits
    "webm_named.mp4": None,  # the extension lies: the content decides
    "mkv_named.mp4": None,
    "zero_bytes.mp4": ("decode", "DecodeError", r"^empty file: "),
    "random_bytes.mp4": ("decode", "DecodeError", r"cannot open the video"),
    "truncated.mp4": ("decode", "DecodeError", r"cannot open the video"),
    "text.mp4": ("decode", "DecodeError", r"cannot open the video"),
    "audio_only.mp4": ("decode", "DecodeError", r"^the file has no video stream$"),
    "fifo.mp4": ("decode", "DecodeError", r"^not a regular file \(FIFO, socket or device\): "),
    "missing.mp4": ("read", "FileNotFoundError", r"^video not found: "),
    HANGING_URI: ("decode", "CallTimeout", rf"^decode_video did not finish within {DECODE_TIMEOUT_S} s$"),
}
UNREADABLE = "unreadable.mp4"  # chmod 000: an error row where permissions apply, written where they do not (root)


def load_compress_corpus():
    """jobs/compress_corpus.py as a module, so its main() runs here on the test Ray."""
    return load_job_script("compress_corpus")


def write_audio_only(path: Path) -> Path:
    """An AAC-only mp4: a valid container with no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def can_read(path: Path) -> bool:
    try:
        with open(path, "rb") as src:
            src.read(1)
        return True
    except PermissionError:
        return False


@dataclass
class Zoo:
    folder: Path
    manifest: Path
    uris: dict[str, str]  # zoo name -> canonical uri
    permissions_enforced: bool  # False when the tests run as root: a chmod 000 file stays readable


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, make_synthetic_clip) -> Zoo:
    folder = tmp_path_factory.mktemp("zoo")
    good = make_synthetic_clip("zoo_good", num_frames=24)
    shutil.copy(good, folder / "good.mp4")
    shutil.copy(make_synthetic_clip("zoo_small", num_frames=12, size=(32, 32)), folder / "good_small.mp4")
    shutil.copy(make_synthetic_clip("zoo_one", num_frames=1), folder / "one_frame.mp4")
    shutil.copy(make_synthetic_clip("zoo_short", num_frames=3), folder / "short_3_frames.mp4")
    shutil.copy(make_synthetic_clip("zoo_huge", num_frames=2, size=(2160, 3840)), folder / "huge_3840x2160.mp4")
    shutil.copy(make_synthetic_clip("zoo_webm", num_frames=6, container="webm"), folder / "webm_named.mp4")
    shutil.copy(make_synthetic_clip("zoo_mkv", num_frames=6, container="mkv"), folder / "mkv_named.mp4")
    (folder / "zero_bytes.mp4").write_bytes(b"")
    (folder / "random_bytes.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 8192, np.uint8).tobytes())
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    write_audio_only(folder / "audio_only.mp4")
    os.mkfifo(folder / "fifo.mp4")  # nobody ever writes to it: opening it for reading would block forever
    shutil.copy(good, folder / UNREADABLE)
    (folder / UNREADABLE).chmod(0)

    names = [*EXPECTED, UNREADABLE]
    uris = {name: name if name == HANGING_URI else str(folder / name) for name in names}
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["uri"])
        for name in names:
            writer.writerow([name])  # relative to the manifest's folder (the S3 uri is absolute)
        writer.writerow([str(folder / "good.mp4")])  # the same video again, by its absolute path
    return Zoo(folder, manifest, uris, permissions_enforced=not can_read(folder / UNREADABLE))


@pytest.fixture(scope="module")
def stalled_s3_endpoint():
    """An S3 endpoint that accepts connections and never answers: a read from it hangs inside the decode call."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # connections wait in the backlog; nothing is ever accepted or sent
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@dataclass
class ZooRun:
    output: Path
    exit_code: int
    stdout: str
    second_job_exit_code: int | None
    second_job_stderr: str


@pytest.fixture(scope="module")
def zoo_run(ray_local, zoo, tmp_path_factory, stalled_s3_endpoint) -> ZooRun:
    entry = load_compress_corpus()
    output = tmp_path_factory.mktemp("zoo_out") / "out"
    argv = ["--input", str(zoo.manifest), "--output", str(output), *FLAGS,
            "--decode-timeout-s", str(DECODE_TIMEOUT_S), "--max-error-rate", str(MAX_ERROR_RATE),
            "--s3-endpoint-url", stalled_s3_endpoint]
    second: dict = {}

    def start_a_second_job_on_the_same_output(rows: int) -> None:
        if second:
            return
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            second["code"] = entry.main(argv)
        second["stderr"] = stderr.getvalue()

    run_job = entry.run_job
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(entry, "run_job", lambda config: run_job(config, on_batch=start_a_second_job_on_the_same_output))
        code = entry.main(argv)
    return ZooRun(output, code, stdout.getvalue(), second.get("code"), second.get("stderr", ""))


def expected_outcome(name: str, zoo: Zoo):
    if name == UNREADABLE:
        return ("read", "PermissionError", r"Permission denied") if zoo.permissions_enforced else None
    return EXPECTED[name]


def test_each_zoo_input_is_written_or_an_error_row_with_its_stage_and_reason(zoo, zoo_run):
    store = OutputStore(str(zoo_run.output))
    written = store.read_videos(columns=["video_id", "uri"]).to_pylist()
    error_rows = store.read_errors().to_pylist()
    errors = {row["uri"]: row for row in error_rows}
    written_uris = [row["uri"] for row in written]

    for name, uri in zoo.uris.items():
        outcome = expected_outcome(name, zoo)
        if outcome is None:
            assert uri in written_uris and uri not in errors, f"{name} should be written: {errors.get(uri)}"
            continue
        stage, error_type, pattern = outcome
        assert uri not in written_uris, f"{name} should have failed"
        error = errors[uri]
        assert (error["stage"], error["error_type"]) == (stage, error_type), (name, error)
        assert re.search(pattern, error["message"]), (name, error["message"])
        assert error["video_id"] == video_id_for(uri) and error["run_id"] and error["created_at"]
    # Nothing else was written, and nothing twice (the duplicated uri included).
    assert len(written_uris) == len(set(written_uris))
    assert set(written_uris) | set(errors) == set(zoo.uris.values())
    assert len(error_rows) == len(errors) == sum(1 for name in zoo.uris if expected_outcome(name, zoo) is not None)


def test_short_clips_repeat_frames_and_other_containers_decode(zoo, zoo_run):
    rows = {row["uri"]: row for row in OutputStore(str(zoo_run.output)).read_videos().to_pylist()}
    one = rows[zoo.uris["one_frame.mp4"]]
    assert one["frame_indices"] == [0] * 8 and one["source_frames"] == 1 and one["num_frames"] == 8
    short = rows[zoo.uris["short_3_frames.mp4"]]
    assert short["frame_indices"] == [0, 0, 0, 1, 1, 2, 2, 2] and short["source_frames"] == 3
    huge = rows[zoo.uris["huge_3840x2160.mp4"]]
    assert huge["frame_indices"] == [0, 0, 0, 0, 1, 1, 1, 1] and (huge["grid_h"], huge["grid_w"]) == (7, 7)
    for name in ("webm_named.mp4", "mkv_named.mp4"):
        assert rows[zoo.uris[name]]["source_frames"] == 6


def test_every_listed_video_is_counted_and_the_error_rate_sets_the_exit_status(zoo, zoo_run):
    store = OutputStore(str(zoo_run.output))
    failed = sum(1 for name in zoo.uris if expected_outcome(name, zoo) is not None)
    ok = len(zoo.uris) - failed
    run = store.read_run_summary()
    assert run["listed"] == len(zoo.uris)  # the uri given twice is listed once
    assert (run["ok"], run["failed"], run["skipped"], run["deferred"]) == (ok, failed, 0, 0)
    assert run["ok"] + run["failed"] + run["skipped"] + run["deferred"] == run["listed"]
    assert sum(run["failed_by_stage"].values()) == failed
    assert run["failed_by_stage"]["read"] == (2 if zoo.permissions_enforced else 1)

    # More than --max-error-rate of the attempted videos failed: exit status 1, the good videos written anyway.
    assert failed / (ok + failed) > MAX_ERROR_RATE
    assert zoo_run.exit_code == 1 and run["exit_code"] == 1
    assert f"{ok} ok, {failed} failed, 0 skipped" in zoo_run.stdout
    parquet_ids = store.read_videos(columns=["video_id"]).column("video_id").to_pylist()
    lance = store.lance_table().to_arrow().column("video_id").to_pylist()
    assert len(parquet_ids) == ok and sorted(lance) == sorted(parquet_ids)


def test_a_second_job_on_the_same_output_refuses_with_a_clear_message(zoo_run):
    assert zoo_run.second_job_exit_code == 2
    message = zoo_run.second_job_stderr
    assert message.startswith(f"error: {zoo_run.output} is being written by run ") and "--break-lock" in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "Traceback" not in message
    assert not (zoo_run.output / "_lock").exists()  # released when the first job finished


# Run as root, a child drops the capabilities that let root read any file (from its bounding set, which exec
# turns into its effective set), then runs the decode: chmod 000 is enforced for it.
DROP_ROOT_READ_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit("cannot drop capability %d: %s" % (capability, os.strerror(ctypes.get_errno())))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
DECODE_AND_REPORT = """
import json, sys
from pipeline.job.decode import decode_video
from pipeline.job.errors import failure
try:
    decode_video(sys.argv[1], num_frames=2)
    print(json.dumps(None))
except Exception as exc:
    print(json.dumps(failure("decode", exc)))
"""


def test_an_unreadable_file_is_a_read_error_where_permissions_apply(tmp_path, make_synthetic_clip):
    """The zoo run shows the case of the user the tests run as; this checks the enforced case in a child process
    (without root's read-anything capabilities when the tests run as root)."""
    clip = tmp_path / "unreadable.mp4"
    shutil.copy(make_synthetic_clip("zoo_good", num_frames=24), clip)
    clip.chmod(0)
    command = [sys.executable, "-c", DECODE_AND_REPORT, str(clip)]
    if os.geteuid() == 0:
        command = [sys.executable, "-c", DROP_ROOT_READ_OVERRIDE, *command[1:]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error is not None, "the child could read a chmod 000 file"
    assert (error["error_stage"], error["error_type"]) == ("read", "PermissionError")
    assert error["error_message"] == f"[Errno 13] Permission denied: '{clip}'"


def test_an_output_of_another_schema_version_gives_a_clear_message(zoo, zoo_run, tmp_path, capsys):
    entry = load_compress_corpus()
    source = sorted((zoo_run.output / "videos").glob("*.parquet"))[0]
    table = pq.read_table(source)
    other = table.replace_schema_metadata({**table.schema.metadata, SCHEMA_VERSION_KEY: b"2"})

    old = tmp_path / "old"
    (old / "videos").mkdir(parents=True)
    pq.write_table(other, old / "videos" / "part-old-00000.parquet")
    with pytest.raises(SchemaVersionError, match=r"holds schema version 2, this pipeline reads and writes version"):
        OutputStore(str(old)).read_videos()

    code = entry.main(["--input", zoo.uris["good.mp4"], "--output", str(old), *FLAGS])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == (
        f"error: {old}/videos holds schema version 2, this pipeline reads and writes version {SCHEMA_VERSION}. "
        "Write to a new --output, or convert the old output first.")
    assert "Traceback" not in captured.out + captured.err
    assert not (old / "_lock").exists()

    # The LanceDB table is checked the same way.
    import lancedb

    lance_only = tmp_path / "lance_only"
    lancedb.connect(str(lance_only / "lancedb")).create_table("videos", data=other)
    with pytest.raises(SchemaVersionError, match="holds schema version 2"):
        OutputStore(str(lance_only)).lance_table()
