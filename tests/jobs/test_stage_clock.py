"""The stage clock: stages report seconds and videos to one actor; the driver's watcher reads them as they come."""

from __future__ import annotations

import threading
import time

import ray

from pipeline.job.stage_clock import ClockWatcher, read_clock, report, start_clock


def test_reports_add_up_and_the_watcher_sees_encoded_videos_before_anything_is_committed(ray_local):
    clock = start_clock()
    seen, three = [], threading.Event()

    def on_encoded(videos: int) -> None:
        seen.append(videos)
        if videos >= 3:
            three.set()

    with ClockWatcher(clock, on_encoded, interval_s=0.05):
        report(clock, "decode", 0.5, 1)
        report(clock, "encode", 1.25, 3)
        report(None, "encode", 99.0, 99)  # no clock (a stage run outside a job): nothing is sent
        assert three.wait(timeout=30)
    totals = ray.get(clock.read.remote())
    assert totals["videos"] == {"decode": 1, "encode": 3, "compress": 0, "write": 0}
    assert totals["seconds"]["encode"] == 1.25 and totals["seconds"]["decode"] == 0.5
    assert seen[-1] == 3 and seen == sorted(seen)


def test_a_lost_clock_reads_as_none_and_reports_to_it_do_not_raise(ray_local):
    clock = start_clock()
    report(clock, "write", 0.1, 1)
    assert read_clock(clock)["videos"]["write"] == 1
    ray.kill(clock)  # takes effect asynchronously: a call made just after it may still be served
    deadline = time.monotonic() + 30
    while (totals := read_clock(clock, timeout_s=5)) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert totals is None
    report(clock, "write", 0.1, 1)  # a stage on a node that outlived the clock's
    assert read_clock(clock, timeout_s=5) is None
