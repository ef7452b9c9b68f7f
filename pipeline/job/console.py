"""What the job prints: below --verbose, one progress bar and the summary, plus any warning or error.

Ray, Ray Data and Ray's core worker print lines that say nothing is wrong (cluster start-up, execution plans,
progress logs, a token-auth notice, and an ERROR line about actor constructor arguments that every Ray Data actor
pool triggers). `quiet_ray` keeps Ray's Python loggers to warnings; `native_stderr_to` sends what native code writes
to file descriptor 2 to a file. Ray's own logs stay in its session folder either way, and --verbose shows them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import ray

# Loggers whose warnings say nothing is wrong: Ray Data's progress module warns that its bars are off (the job draws
# its own); the token-auth notice comes with every local Ray.
_NOTICE_LOGGERS = ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup")


def quiet_ray(verbose: bool) -> None:
    """Below `verbose`, Ray and Ray Data log warnings and errors only and Ray Data draws no progress of its own."""
    if verbose:
        return
    # Ray Data sets its loggers up again when a dataset runs; the environment variable wins over its defaults.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def driver_log_path() -> str:
    """Where `native_stderr_to` puts this process's native log lines."""
    return os.path.join(tempfile.gettempdir(), f"tokendyn-driver-{os.getpid()}.log")


@contextlib.contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """While inside, what native code writes to file descriptor 2 goes to `path`, and Python's `sys.stderr` keeps
    the terminal. A `sys.stderr` that is not fd 2 (a test's captured stream) is left as it is."""
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        python_on_fd2 = False
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as log_file:
        os.dup2(log_file.fileno(), 2)
    python_stderr = sys.stderr
    if python_on_fd2:
        sys.stderr = open(os.dup(terminal), "w", buffering=1, encoding=python_stderr.encoding,  # noqa: SIM115
                          errors="backslashreplace")
    try:
        yield
    finally:
        if python_on_fd2:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(terminal, 2)
        os.close(terminal)
