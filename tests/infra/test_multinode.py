"""The job on a real multi-node Ray cluster, losing a worker node mid-run (see multinode_run.py for the set-up).

The cluster runs in a private network namespace (loopback only) and a private PID namespace, so nothing it starts
can reach the machine's network or outlive the test. Needs root (for the namespaces), as CI runs it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store.storage import OutputStore

HERE = Path(__file__).resolve().parent
VIDEOS = 40
JOB_FLAGS = ["--frames", "4", "--k", "4", "--batch-size", "2", "--rows-per-file", "2", "--neighbours", "0"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="needs root, unshare and ip for a private network namespace")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_synthetic_clip) -> Path:
    folder = tmp_path_factory.mktemp("multinode_corpus")
    clip = make_synthetic_clip("multinode", num_frames=24)
    for i in range(VIDEOS):
        shutil.copy(clip, folder / f"clip{i:03d}.mp4")
    return folder


def run_on_cluster(corpus: Path, output: Path, encoder: Path, kill_after: int) -> dict:
    """Start the cluster, run the job, SIGKILL the worker node's process group once `kill_after` videos are done."""
    namespace = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
    command = [*namespace, sys.executable, str(HERE / "multinode_run.py"), "--input", str(corpus), "--output",
               str(output), "--kill-after", str(kill_after), "--job-timeout", "100", "--",
               "--encoder", str(encoder), *JOB_FLAGS]
    # --kill-child: if this test is interrupted, the namespace's first process and with it every process in the
    # namespace is killed.
    result = subprocess.run(command, capture_output=True, text=True, timeout=160)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kill_after", [2, 30], ids=["early", "late"])
def test_losing_a_worker_node_slows_the_job_and_every_video_lands_once(tmp_path, corpus, tiny_siglip_dir,
                                                                       kill_after):
    output = tmp_path / "out"
    report = run_on_cluster(corpus, output, tiny_siglip_dir, kill_after)
    # The node died while work was left: decode actors (all on that node) were lost mid-run. Before elastic pools
    # the early case hung here: the encoders held every CPU left while the lost decode actors waited for one.
    assert report["committed_at_kill"] is not None and report["committed_at_kill"] < VIDEOS, report
    assert report["status"] == "SUCCEEDED", (report.get("ray_status"), report.get("logs_tail"))

    store = OutputStore(str(output))
    parquet_ids = store.read_videos(columns=["video_id"]).column("video_id").to_pylist()
    lance_ids = store.lance_table().search().select(["video_id"]).limit(None).to_arrow().column("video_id")
    assert len(parquet_ids) == len(set(parquet_ids)) == VIDEOS
    assert sorted(lance_ids.to_pylist()) == sorted(parquet_ids)
    assert store.read_errors().num_rows == 0
