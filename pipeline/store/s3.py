"""S3 uris and the boto3 client: what the store (its lock's conditional writes) and the job's sources (listing and
reading videos, pipeline.job.sources) both need.

S3 access goes through boto3's standard credential chain; `endpoint_url` (or boto3's own AWS_ENDPOINT_URL
variable) points it at an S3-compatible store.
"""

from __future__ import annotations

import functools

import boto3

S3_SCHEME = "s3://"


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


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe, so one per process and endpoint is enough)."""
    return boto3.client("s3", endpoint_url=endpoint_url)
