"""Faults injected into a job started with this folder on PYTHONPATH (every Python process of its local Ray
inherits the driver's environment, so the write stage's workers load it too). TD_FAULT names the fault, and
TD_FAULT_RECORD a file that records it, created once (so a retried task or a rerun proceeds normally):

    writer-after-staging    the first write stage call to stage rows kills its own process (SIGKILL) once its Parquet
                            file and Lance fragments are written, before it hands them on
    driver-before-commit-N  the driver kills itself (SIGKILL) as it is about to commit for the N-th time, with the
                            rows of that commit staged

The record holds the staged files the killed process left ({"parquet": [...], "fragments": [...]}).
"""

import importlib.abc
import importlib.util
import json
import os
import signal
import sys

FAULT = os.environ.get("TD_FAULT", "")
RECORD = os.environ.get("TD_FAULT_RECORD", "")
TARGET = "pipeline.store.staging"


def _die_leaving(staged: list) -> None:
    """Record the files of `staged` (StagedVideos) once, then SIGKILL this process; nothing when recorded already."""
    try:
        fd = os.open(RECORD, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    files = {"parquet": [s.parquet for s in staged],
             "fragments": [f["files"][0]["path"] for s in staged for f in json.loads(s.fragments)]}
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(files))
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(module) -> None:
    writes = module.StagedWrites
    if FAULT == "writer-after-staging":
        stage = writes.stage_videos

        def stage_videos(self, table):
            staged = stage(self, table)
            _die_leaving([staged])
            return staged

        writes.stage_videos = stage_videos
    elif FAULT.startswith("driver-before-commit-"):
        commit, at, calls = writes.commit_staged, int(FAULT.rsplit("-", 1)[1]), []

        def commit_staged(self, staged, replace=False):
            calls.append(1)
            if len(calls) == at:
                _die_leaving(staged)
            return commit(self, staged, replace=replace)

        writes.commit_staged = commit_staged


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT and RECORD:
    sys.meta_path.insert(0, _PatchOnImport())
