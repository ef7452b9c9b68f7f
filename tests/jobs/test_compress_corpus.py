"""End-to-end runs of the compression job on real and synthetic clips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from output_checks import lance_ids
from pipeline.job.sources import video_id_for
from pipeline.readers.search import nearest_to_video
from pipeline.store.contract import SettingsMismatch
from pipeline.store.schema import compressed_video_from_row
from pipeline.store.storage import OutputStore

REPO = Path(__file__).resolve().parents[2]
GOOD = ["bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "nested/grey.mp4"]


def test_every_good_video_written_once_and_the_corrupt_one_is_an_error_row(sample_output, job_input_dir):
    output, summary = sample_output
    store = OutputStore(str(output))
    good_ids = sorted(video_id_for(str(job_input_dir / name)) for name in GOOD)

    videos = store.read_videos()
    assert sorted(videos.column("video_id").to_pylist()) == good_ids
    assert lance_ids(store) == good_ids
    errors = store.read_errors().to_pylist()
    assert [(e["uri"], e["stage"]) for e in errors] == [(str(job_input_dir / "corrupt.mp4"), "decode")]
    assert errors[0]["message"]

    assert (summary.listed, summary.ok, summary.failed, summary.skipped) == (5, 4, 1, 0)
    assert summary.tokens_in == 4 * 8 * 7 * 7 and summary.tokens_kept == 4 * 8
    run = json.loads((output / "run.json").read_text())
    assert run["ok"] + run["failed"] + run["skipped"] + run["deferred"] == run["listed"] == 5


def test_the_summary_says_where_the_time_went(sample_output):
    output, summary = sample_output
    assert set(summary.stage_s) == {"decode", "encode", "compress", "write"}
    assert all(seconds > 0 for seconds in summary.stage_s.values()), summary.stage_s
    assert summary.stage_s["encode"] > summary.stage_s["compress"]  # EfficientNet-Lite0 on 8 frames vs a K=8 fit
    assert 0 < summary.encoder_busy_share <= 1
    assert json.loads((output / "run.json").read_text())["stage_s"] == summary.stage_s


def test_rows_hold_a_faithful_compression(sample_output):
    output, _ = sample_output
    rows = OutputStore(str(output)).read_videos().to_pylist()
    for row in rows:
        video = compressed_video_from_row(row)
        assert (row["num_frames"], row["grid_h"], row["grid_w"], row["dim"]) == (8, 7, 7, 1280)
        assert video.k == row["k"] == 8 and len(row["frame_indices"]) == 8
        assert int(video.sizes.sum()) == 8 * 7 * 7
        assert row["encoder"] == "efficientnet-lite0" and row["schema_version"] == 1
        np.testing.assert_allclose(video.pooled().numpy(), np.asarray(row["pooled"]), atol=1e-3)


def test_real_tokens_are_not_random_the_other_carphone_is_nearest(sample_output, job_input_dir):
    output, _ = sample_output
    store = OutputStore(str(output))
    pristine = video_id_for(str(job_input_dir / "carphone_pristine.mp4"))
    hits = nearest_to_video(store, pristine, k=3)
    assert hits[0]["uri"] == str(job_input_dir / "carphone_distorted.mp4")
    assert hits[0]["score"] > hits[1]["score"]


def test_rerun_skips_what_is_done_and_overwrite_redoes_it(tmp_path, run_job_on, job_input_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("carphone_pristine.mp4", "corrupt.mp4"):
        shutil.copy(job_input_dir / name, corpus / name)
    output = tmp_path / "out"

    first = run_job_on(corpus, output)
    files_after_first = sorted((output / "videos").glob("*.parquet"))
    second = run_job_on(corpus, output)
    assert (first.ok, first.failed) == (1, 1)
    assert (second.ok, second.skipped, second.failed) == (0, 1, 1)  # failures are retried, good videos are not
    assert sorted((output / "videos").glob("*.parquet")) == files_after_first

    third = run_job_on(corpus, output, "--overwrite")
    store = OutputStore(str(output))
    assert (third.ok, third.skipped) == (1, 0)
    assert store.read_videos().num_rows == 1 and len(lance_ids(store)) == 1


def test_limit_defers_the_rest_and_adaptive_k_stays_in_range(tmp_path, run_job_on, job_input_dir):
    output = tmp_path / "out"
    summary = run_job_on(job_input_dir, output, "--limit", "2", "--k", "0", "--k-min", "4", "--k-max", "12")
    assert summary.attempted == 2 and summary.deferred == 3
    ks = OutputStore(str(output)).read_videos(columns=["k"]).column("k").to_pylist()
    assert all(4 <= k <= 12 for k in ks)


def test_s3_in_and_out(tmp_path, run_job_on, job_input_dir, s3_client, s3_bucket, moto_s3_endpoint):
    for name in ("carphone_pristine.mp4", "corrupt.mp4"):
        s3_client.upload_file(str(job_input_dir / name), s3_bucket, f"in/{name}")
    output = f"s3://{s3_bucket}/out"
    summary = run_job_on(f"s3://{s3_bucket}/in/", output, "--s3-endpoint-url", moto_s3_endpoint)
    assert (summary.ok, summary.failed) == (1, 1)
    store = OutputStore(output, s3_endpoint_url=moto_s3_endpoint)
    assert store.done_ids() == {video_id_for(f"s3://{s3_bucket}/in/carphone_pristine.mp4")}
    assert len(lance_ids(store)) == 1
    assert store.read_run_summary()["ok"] == 1


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "compress_corpus.py"), "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--input", "--output", "--s3-endpoint-url", "--workers", "--gpus-per-worker", "--batch-size",
                 "--decoder", "--frames", "--fps", "--overwrite", "--max-error-rate", "--encoder", "--layer"):
        assert flag in result.stdout


def test_the_job_prints_a_progress_bar_the_summary_and_what_went_wrong_and_nothing_else(
        tmp_path, make_synthetic_clip, corrupt_video_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(make_synthetic_clip("tiny", num_frames=4, size=(32, 32)), corpus / "good.mp4")
    shutil.copy(corrupt_video_path, corpus / "bad.mp4")
    temp = Path(tempfile.mkdtemp(prefix="tdq-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": str(temp), "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "compress_corpus.py"), "--input", str(corpus), "--output",
             str(tmp_path / "out"), "--encoder", "efficientnet-lite0", "--frames", "2", "--k", "2",
             "--neighbours", "0"], env=env, capture_output=True, text=True, timeout=300)
        driver_logs = list(temp.glob("tokendyn-driver-*.log"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.lstrip().startswith("run ") and "1 ok, 1 failed" in result.stdout
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in lines if line.startswith("videos:")]
    assert bars and "2/2" in bars[-1]
    # Everything else comes from the decode worker that met the bad video (Ray prefixes its lines).
    others = [line for line in lines if not line.startswith("videos:")]
    assert others and all("(MapWorker(Map(DecodeStage))" in line for line in others), others
    assert any("failed in decode" in line for line in others)
    # Ray's native driver log went to a file, not to the terminal.
    assert driver_logs


def test_ray_job_submit_against_a_local_head(tmp_path, job_input_dir, free_port):
    """infra/ray_head.sh starts a loopback head; `ray job submit` runs the job on it; the head is stopped."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(job_input_dir / "carphone_distorted.mp4", corpus)
    ports = {name: str(free_port()) for name in ("RAY_HEAD_PORT", "RAY_DASHBOARD_PORT", "RAY_AGENT_PORT")}
    env = {**os.environ, **ports, "RAY_HEAD_STATE": str(tmp_path / "head"), "RAY_HEAD_CPUS": "2",
           "RAY": str(Path(sys.executable).with_name("ray")), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token",
           # The entry point's `python` is whatever the head finds first, as on a cluster image.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    head = [str(REPO / "infra" / "ray_head.sh")]
    subprocess.run([*head, "start"], env=env, check=True, timeout=180)
    try:
        output = tmp_path / "out"
        submit = subprocess.run(
            [env["RAY"], "job", "submit", "--address", f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}",
             "--working-dir", str(REPO), "--", "python", "jobs/compress_corpus.py", "--input", str(corpus),
             "--output", str(output), "--encoder", "efficientnet-lite0", "--frames", "4", "--k", "4",
             "--neighbours", "0"],
            env=env, capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "1 ok, 0 failed" in submit.stdout
        assert OutputStore(str(output)).done_ids() == {video_id_for(str(corpus / "carphone_distorted.mp4"))}
    finally:
        subprocess.run([*head, "stop"], env=env, check=True, timeout=120)
    assert not (tmp_path / "head" / "head.pid").exists()



def test_keyframe_sampling_stores_keyframes_and_records_the_setting(tmp_path, run_job_on):
    from pipeline.job.clip_encoding import ClipFormat, encode_clip, moving_texture

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    encode_clip(corpus / "gop7.mp4", moving_texture(40, 32, 48), ClipFormat(gop=7, bframes=2))
    output = tmp_path / "out"
    summary = run_job_on(corpus, output, "--frames", "4", "--k", "2", "--sample", "keyframes")
    assert summary.ok == 1
    row = OutputStore(str(output)).read_videos().to_pylist()[0]
    # Keyframes every 7 frames; the segment centres are 5, 15, 25 and 35.
    assert row["frame_indices"] == [7, 14, 28, 35]
    assert json.loads((output / "settings.json").read_text())["settings"]["sample"] == "keyframes"
    with pytest.raises(SettingsMismatch, match="sample"):
        run_job_on(corpus, output, "--frames", "4", "--k", "2")
