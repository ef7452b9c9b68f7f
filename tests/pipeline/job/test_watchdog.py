import os
import time

import pytest

from pipeline.job.watchdog import CallTimeout, ChildDied, TimeLimitedRunner


def _stuck_in_native_code(seconds):
    # PyDLL keeps the GIL held during the C call, as decord's deadlock does.
    import ctypes
    ctypes.PyDLL(None).sleep(seconds)


def _crash():
    os._exit(11)


def _fail():
    raise ValueError("bad video")


@pytest.fixture
def runner():
    r = TimeLimitedRunner()
    yield r
    r.close()


def test_result_and_exceptions_come_back(runner):
    assert runner.call(divmod, 7, 3, timeout_s=30) == (2, 1)
    with pytest.raises(ValueError, match="bad video"):
        runner.call(_fail, timeout_s=30)
    assert runner.call(pow, 2, 5, timeout_s=30) == 32  # the child keeps serving after an exception


def test_stuck_native_call_is_killed_and_runner_recovers(runner):
    runner.call(pow, 2, 2, timeout_s=30)  # start the child first, so the limit below times only the call
    pid = runner._process.pid
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        runner.call(_stuck_in_native_code, 60, timeout_s=1)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert runner.call(pow, 3, 2, timeout_s=30) == 9


def test_child_crash_becomes_an_exception(runner):
    with pytest.raises(ChildDied, match="exit code 11"):
        runner.call(_crash, timeout_s=30)
    assert runner.call(pow, 2, 3, timeout_s=30) == 8


class _NotRebuildable(Exception):
    def __init__(self, code, operation):
        super().__init__(f"{code} during {operation}")


def _raise_not_rebuildable():
    raise _NotRebuildable("NoSuchKey", "GetObject")


def test_exception_that_cannot_be_rebuilt_keeps_type_and_message(runner):
    from pipeline.job.errors import failure
    from pipeline.job.watchdog import ChildError

    with pytest.raises(ChildError) as info:
        runner.call(_raise_not_rebuildable, timeout_s=30)
    assert failure("decode", info.value)["error_type"] == "_NotRebuildable"
    assert "NoSuchKey during GetObject" in str(info.value)
