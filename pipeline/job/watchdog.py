"""Run a function in a child process with a time limit that also stops native code stuck holding the GIL.

decord's `get_batch` can deadlock inside C++ on files that over-report their frame count; no thread-level timeout
can interrupt that. The child is long-lived (one start per worker, not per call) and is killed and replaced only
when a call overruns or the child dies, which also confines a crashing native decoder to the child.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from collections.abc import Callable
from typing import Any


class CallTimeout(TimeoutError):
    """The call did not finish within its time limit; the child process was killed."""


class ChildDied(RuntimeError):
    """The child process exited during the call (for example a segfault in native code)."""


class ChildError(RuntimeError):
    """An exception raised in the child that cannot be rebuilt in the parent; keeps its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return ChildError, (self.type_name, str(self))


def _transferable(exc: BaseException) -> BaseException:
    # Some exceptions (botocore's, for one) pickle but do not unpickle: send those as ChildError instead.
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return ChildError(type(exc).__name__, str(exc))


def _serve(conn) -> None:
    while True:
        request = conn.recv()
        if request is None:
            return
        fn, args, kwargs = request
        try:
            conn.send((True, fn(*args, **kwargs)))
        except Exception as exc:  # the parent re-raises it; the child keeps serving
            conn.send((False, _transferable(exc)))


class TimeLimitedRunner:
    """`runner.call(fn, *args, timeout_s=..., **kwargs)` runs `fn` in a child process and returns its result."""

    def __init__(self) -> None:
        self._context = mp.get_context("spawn")  # fork would copy the parent's threads and locks (Ray, torch)
        self._process = None
        self._conn = None

    def _start(self) -> None:
        parent_conn, child_conn = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(child_conn,), daemon=True)
        self._process.start()
        child_conn.close()
        self._conn = parent_conn

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()
        self._process = self._conn = None

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        if self._process is None or not self._process.is_alive():
            self._kill()
            self._start()
        self._conn.send((fn, args, kwargs))
        if not self._conn.poll(timeout_s):
            self._kill()
            raise CallTimeout(f"{getattr(fn, '__name__', fn)} did not finish within {timeout_s:g} s")
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            code = self._process.exitcode
            self._kill()
            raise ChildDied(f"worker process died (exit code {code})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=5)
        self._kill()
