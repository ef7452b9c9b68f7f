"""Where a run's time goes, and how many videos the encoder has done: a small Ray actor that the stages report to.

Each decode call, each encoder batch (its forward pass and its batched fit apart) and each written file sends its
seconds and video count, fire-and-forget (`report`). The driver reads the totals (`read`) once a second for the
progress bar, which so counts videos as they are encoded rather than as their files are committed, and once at the
end for the run summary. Ray is imported only where an actor is started or read: the stages import this module,
and they also run without Ray (jobs/bench/bench_gpu.py drives them from a process pool).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

STAGES = ("decode", "encode", "compress", "write")


class StageClock:
    """Seconds and videos per stage; `start_clock` runs one as an actor."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.videos = dict.fromkeys(STAGES, 0)

    def report(self, stage: str, seconds: float, videos: int) -> None:
        self.seconds[stage] += seconds
        self.videos[stage] += videos

    def read(self) -> dict[str, dict[str, float]]:
        return {"seconds": dict(self.seconds), "videos": dict(self.videos)}


def start_clock():
    """A StageClock actor (reserving no CPU) for one run, on the driver's node: a worker node may be lost mid-run,
    and the clock with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(StageClock).options(scheduling_strategy=here).remote()


def read_clock(clock, timeout_s: float = 30.0) -> dict[str, dict[str, float]] | None:
    """The clock's totals, or None when it cannot be read (its node lost): the run's summary then has no times."""
    import ray

    try:
        return ray.get(clock.read.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        return None


def report(clock, stage: str, seconds: float, videos: int) -> None:
    """Send one measurement to `clock` (None: nothing is measured, as for stages run outside a job)."""
    if clock is not None:
        clock.report.remote(stage, seconds, videos)


class ClockWatcher:
    """Calls `on_encoded(videos through the encode stage)` about once a second from a thread, until stopped."""

    def __init__(self, clock, on_encoded: Callable[[int], None], interval_s: float = 1.0) -> None:
        self.clock, self.on_encoded, self.interval_s = clock, on_encoded, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stage-clock", daemon=True)

    def __enter__(self) -> ClockWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            totals = read_clock(self.clock, timeout_s=self.interval_s)
            if totals is not None:  # else a slow or lost clock: the bar waits for the next reading
                self.on_encoded(totals["videos"]["encode"])
