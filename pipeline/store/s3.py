"""S3 uris, the boto3 client, and how every S3 client of the pipeline retries: what the store (its lock's conditional
writes, Parquet through pyarrow, the table through Lance) and the job's sources (listing and reading videos,
pipeline.job.sources) all need.

S3 access goes through boto3's standard credential chain; `endpoint_url` (or boto3's own AWS_ENDPOINT_URL
variable) points it at an S3-compatible store.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from dataclasses import dataclass

import boto3
from botocore.config import Config

S3_SCHEME = "s3://"
log = logging.getLogger("tokendyn.pipeline")


def is_s3_uri(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b.mp4' -> ('bucket', 'a/b.mp4'). The key may be empty."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// uri: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 uri has no bucket: {uri!r}")
    return bucket, key


@dataclass(frozen=True)
class S3Retries:
    """Retries and timeouts of the three S3 clients (boto3, pyarrow, Lance), each through its library's own retry
    strategy.

    Stores throttle (503 SlowDown), fail (500) and drop or stall connections at scale. The libraries' defaults
    give up after 3 (pyarrow) or 5 (boto3) attempts, which a store failing a quarter of its requests defeats within
    a few hundred requests, and wait a stalled request out for 60 s (boto3) or 30 s (Lance): through a
    fault-injecting proxy (docs/failures.md) they lost videos or ended the job. `attempts` counts the first try;
    AWS_MAX_ATTEMPTS, the AWS SDKs' own variable, sets it for all three.
    A stalled request is given up and retried after `read_timeout_s` without a byte (boto3; pyarrow's SDK on
    Linux keeps its own 3 s) or `request_timeout_s` in all (Lance has no idle timeout): long enough for a healthy
    store's first byte, or one multipart part, a few times over.
    """

    attempts: int = 10
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    request_timeout_s: float = 5.0

    def boto3_config(self) -> Config:
        # "standard": exponential backoff with jitter, 5xx, throttling and connection errors retried.
        return Config(retries={"mode": "standard", "max_attempts": self.attempts},
                      connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s)

    def pyarrow_options(self) -> dict:
        import pyarrow.fs as pafs

        return {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.attempts),
                "connect_timeout": self.connect_timeout_s, "request_timeout": self.read_timeout_s}

    def lance_options(self) -> dict[str, str]:
        return {"client_max_retries": str(self.attempts), "connect_timeout": f"{self.connect_timeout_s:g}s",
                "timeout": f"{self.request_timeout_s:g}s"}


S3_RETRIES = S3Retries(attempts=int(os.environ.get("AWS_MAX_ATTEMPTS", S3Retries.attempts)))


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe, so one per process and endpoint is enough)."""
    return boto3.client("s3", endpoint_url=endpoint_url, config=S3_RETRIES.boto3_config())


# How the S3 clients word a store that throttles, fails or drops the connection, once their retries are spent:
# boto3 (its exceptions reach the driver as text: they do not unpickle), pyarrow (the AWS SDK over curl) and Lance.
_STORE_UNAVAILABLE = re.compile(
    r"Slow_?Down|Service[ _]?Unavailable|Internal_?(?:Error|Failure)|Internal Server Error|Throttling"
    r"|Request_?Timeout|Network_?Connection|HTTP status 5\d\d|status(?: code)?:? 5\d\d"
    r"|error sending request|Connection was closed before|Connection reset|Could not connect to the endpoint"
    r"|(?:Read|Connect) timeout on endpoint|curlCode: (?:7|28|52|55|56)\b|Timeout was reached|operation timed out",
    re.IGNORECASE)


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and its chain of causes (a Ray task error carries the worker's)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def store_unavailable(exc: BaseException) -> str | None:
    """The object store's fault behind `exc` ("SlowDown", "error sending request", ...), or None."""
    for cause in exception_chain(exc):
        found = _STORE_UNAVAILABLE.search(str(cause))
        if found:
            return found.group(0)
    return None


# Seconds between repeats of a step that the object store's faults failed after its clients' own retries (which
# wait out about a minute of outage): a few, for the conditional writes that the clients do not retry.
STORE_FAULT_REPEAT_DELAYS_S = (1, 2, 4)
T = TypeVar("T")


def repeat_on_store_faults(step: Callable[..., T], *args, **kwargs) -> T:
    """step(*args, **kwargs), repeated after STORE_FAULT_REPEAT_DELAYS_S while it fails for the object store's
    faults; any other error, or the last, is raised. Only for steps that are safe to repeat."""
    for delay in STORE_FAULT_REPEAT_DELAYS_S:
        try:
            return step(*args, **kwargs)
        except Exception as error:
            fault = store_unavailable(error)
            if fault is None:
                raise
            log.warning("%s met the object store's fault (%s); repeating it in %d s",
                        getattr(step, "__qualname__", "a write"), fault, delay)
            time.sleep(delay)
    return step(*args, **kwargs)
