"""Fixtures for tests that run the compression job: an in-process local Ray, and one job output on real clips.

- ray_local        a local Ray (2 CPUs, loopback only) for the whole session; it starts after the moto S3 server
                   so its workers inherit that server's dummy credentials
- job_input_dir    a folder with three real clips (bikes, carphone pristine and distorted), a synthetic clip in a
                   subfolder and a corrupt .mp4
- sample_output    (root, first RunSummary) of the job over job_input_dir, shared read-only by tests
- run_job_on       function (input, output, *flags, on_batch=None) -> RunSummary running the job with the test
                   defaults; job_config (input, output, *flags) -> the JobConfig it runs; job_flags, those
                   defaults as command-line flags
- ten_clips        a folder of ten copies of the sample clips under their own names (ten videos, ten ids)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.job.config import JobConfig
from pipeline.job.run import RunSummary, run_job

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
TEST_FLAGS = ["--encoder", "efficientnet-lite0", "--frames", "8", "--k", "8", "--batch-size", "2", "--neighbours", "0"]


@pytest.fixture(scope="session")
def ray_local(moto_s3_endpoint):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def job_config(input: str, output: str, *flags: str) -> JobConfig:
    return JobConfig.from_args(["--input", str(input), "--output", str(output), *TEST_FLAGS, *flags])


@pytest.fixture(scope="session")
def run_job_on(ray_local):
    def run(input: str, output: str, *flags: str, on_batch=None) -> RunSummary:
        return run_job(job_config(input, output, *flags), on_batch=on_batch)

    return run


@pytest.fixture(scope="session")
def job_flags() -> list[str]:
    return list(TEST_FLAGS)


@pytest.fixture(name="job_config", scope="session")
def job_config_fixture():
    return job_config


@pytest.fixture(scope="session")
def ten_clips(tmp_path_factory, sample_clip_paths) -> Path:
    folder = tmp_path_factory.mktemp("ten_clips")
    clips = sorted(sample_clip_paths.values())
    for index in range(10):
        shutil.copy(clips[index % len(clips)], folder / f"clip-{index:02d}.mp4")
    return folder


@pytest.fixture(scope="session")
def job_input_dir(tmp_path_factory, sample_clip_paths, make_synthetic_clip, corrupt_video_path) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for stem in ("bikes", "carphone_pristine", "carphone_distorted"):
        shutil.copy(sample_clip_paths[stem], folder / f"{stem}.mp4")
    (folder / "nested").mkdir()
    shutil.copy(make_synthetic_clip("grey", num_frames=24), folder / "nested" / "grey.mp4")
    shutil.copy(corrupt_video_path, folder / "corrupt.mp4")
    (folder / "notes.txt").write_text("not a video")
    return folder


@pytest.fixture(scope="session")
def sample_output(tmp_path_factory, run_job_on, job_input_dir) -> tuple[Path, RunSummary]:
    output = tmp_path_factory.mktemp("job") / "out"
    return output, run_job_on(job_input_dir, output)
