"""Failure policy, in one place.

A failure of one video never stops the job: the stage that failed turns it into an error record (video_id, uri,
stage, error type, message), which travels with the data and is written to the error files. Every failure is
also logged. Messages are redacted of credentials before they go anywhere.

A failure of the output's storage (a full disk, a read-only or vanished mount, an object store that still does not
answer once its clients' retries are spent) stops the job: no video could be written anyway. It becomes one
OutputUnwritable naming the output and the cause; what was committed before stays. Staging and commits that meet
an object store's fault are repeated (`repeat_on_store_faults`): its clients retry single requests, but not the
conditional writes a commit ends with, whose fate a dropped answer leaves unknown; the store's steps are safe to
repeat.
"""

from __future__ import annotations

import errno
import logging
import os
import re

# Re-exported: the object store's part of the policy sits with the S3 clients, which the readers share.
from pipeline.store.s3 import exception_chain, repeat_on_store_faults, store_unavailable  # noqa: F401

log = logging.getLogger("tokendyn.pipeline")

# Stages a video passes through; a failure records the one it failed in.
STAGES = ("read", "decode", "encode", "compress", "write")

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
# Exceptions that mean the input could not be read at all (missing, forbidden), whatever stage met them.
READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)
MAX_MESSAGE_CHARS = 2000

_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_SECRET_PATTERNS = [
    # key=value / "key": "value" forms of common credential names.
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|session_token|secret|password|token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    # Signed URL query parameters.
    re.compile(r"(?i)((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature)=)[^&\s]+"),
]


def redact(text: str) -> str:
    """`text` with credentials (from the environment or in well-known key=value forms) replaced by ***."""
    for name in _SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def failure(stage: str, exc: BaseException) -> dict:
    """The error columns for a video that failed in `stage` with `exc`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if isinstance(exc, READ_ERRORS):
        stage = "read"
    message = redact(str(exc) or repr(exc))[:MAX_MESSAGE_CHARS]
    error_type = getattr(exc, "type_name", type(exc).__name__)  # watchdog.ChildError keeps the original type
    return {"error_stage": stage, "error_type": error_type, "error_message": message}


def no_failure() -> dict:
    return dict.fromkeys(ERROR_COLUMNS)


def record_failure(row: dict, stage: str, exc: BaseException) -> dict:
    """Log a per-video failure and return `row` marked with it."""
    marked = {**row, **failure(stage, exc)}
    log.warning("video %s (%s) failed in %s: %s: %s", row.get("video_id"), redact(str(row.get("uri"))),
                stage, marked["error_type"], marked["error_message"])
    return marked


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one redacted line, for a command line's `error: ...` (decoders' messages can span
    lines)."""
    return " ".join(redact(str(exc) or type(exc).__name__).split())


# errno values that mean the output's storage, not one video, is at fault; and their text, since Lance and Ray
# pass OS errors on as messages ("No space left on device (os error 28)") without an errno.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENODEV, errno.ESTALE)
_STORAGE_FAULT = re.compile("|".join(re.escape(os.strerror(code)) for code in STORAGE_ERRNOS))


class OutputUnwritable(OSError):
    """The output cannot take more data (disk full, read-only, mount gone): the job stops, the committed stay."""


def storage_fault(exc: BaseException) -> str | None:
    """The storage fault behind `exc` (os.strerror's wording: "No space left on device", ...; "the object store
    does not answer (SlowDown)"), or None for any other failure."""
    for cause in exception_chain(exc):
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            return os.strerror(cause.errno)
        found = _STORAGE_FAULT.search(str(cause))
        if found:
            return found.group(0)
    unavailable = store_unavailable(exc)
    return None if unavailable is None else f"the object store does not answer ({unavailable})"
