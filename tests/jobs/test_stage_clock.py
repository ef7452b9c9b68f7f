"""The stage clock: stages report seconds and videos to one actor; the driver's watcher reads them as they come."""

from __future__ import annotations

import threading

import ray

from pipeline.job.stage_clock import ClockWatcher, report, start_clock


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
