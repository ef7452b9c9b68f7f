"""Where videos come from: a local folder, an S3 prefix, or a manifest file.

Every source yields rows `{"video_id": str, "uri": str, **extra}`, sorted by video_id. `uri` is canonical:
an absolute local path or `s3://bucket/key`. `video_id` is stable across runs: taken from the manifest when it
has one, else derived from the canonical uri, so re-listing the same corpus gives the same ids (resume relies
on that).

S3 access goes through boto3's standard credential chain; `s3_endpoint_url` (or boto3's own
AWS_ENDPOINT_URL variable) points it at an S3-compatible store.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from botocore.exceptions import ClientError

# The S3 uri and client helpers live in the store, which needs them too (its lock).
from pipeline.store.s3 import S3_SCHEME, is_s3_uri, s3_client, split_s3_uri

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv"}
)
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".csv", ".jsonl", ".ndjson", ".parquet"})

S3_LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 call (the S3 maximum)
FILE_SCHEME = "file://"


# ---------------------------------------------------------------------------------------------------------------
# uris and ids


def canonical_uri(uri: str) -> str:
    """The one spelling of a video's location that ids are derived from.

    Local paths become absolute and normalised (`file://` prefixes dropped); symlinks are not resolved, so a
    path keeps its id even if the link target moves. S3 uris are kept as they are: keys are opaque strings.
    """
    uri = str(uri).strip()
    if not uri:
        raise ValueError("empty uri")
    if is_s3_uri(uri):
        split_s3_uri(uri)  # validates the bucket part
        return uri
    if "://" in uri and not uri.startswith(FILE_SCHEME):
        raise ValueError(f"unsupported uri scheme (local paths and s3:// only): {uri!r}")
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    return os.path.abspath(os.path.expanduser(uri))


def video_id_for(uri: str) -> str:
    """Stable id of a video: the first 20 hex digits of sha1(canonical uri)."""
    return hashlib.sha1(canonical_uri(uri).encode("utf-8")).hexdigest()[:20]


def has_video_extension(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _is_manifest(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# S3


def _is_missing_error(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code", "") in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def _list_s3_videos(uri: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    """Video objects under an S3 prefix, which is treated as a folder (a trailing '/' is implied)."""
    bucket, prefix = split_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    paginator = s3_client(endpoint_url).get_paginator("list_objects_v2")
    try:
        keys = [
            item["Key"]
            for page in paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": S3_LIST_PAGE_SIZE}
            )
            for item in page.get("Contents", [])
            if has_video_extension(item["Key"])
        ]
    except ClientError as error:
        if _is_missing_error(error):
            raise FileNotFoundError(f"no such S3 bucket: {uri}") from error
        raise
    return [_row(f"{S3_SCHEME}{bucket}/{key}") for key in keys]


def read_bytes(uri: str, *, s3_endpoint_url: str | None = None) -> bytes:
    """The whole content of a local file or an S3 object. FileNotFoundError if it does not exist."""
    if not is_s3_uri(uri):
        return Path(canonical_uri(uri)).read_bytes()
    bucket, key = split_s3_uri(uri)
    try:
        return s3_client(s3_endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _is_missing_error(error):
            raise FileNotFoundError(f"no such S3 object: {uri}") from error
        raise


# ---------------------------------------------------------------------------------------------------------------
# local folders


def _list_local_videos(folder: Path) -> list[dict[str, Any]]:
    """Video files anywhere under `folder`, by extension (case-insensitive)."""
    rows = []
    for directory, _, files in os.walk(folder):
        rows.extend(_row(os.path.join(directory, name)) for name in files if has_video_extension(name))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# manifests


def _read_manifest_table(path: str, s3_endpoint_url: str | None):
    """A manifest as a pyarrow Table; CSV, JSON lines or Parquet, chosen by extension."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    source = io.BytesIO(read_bytes(path, s3_endpoint_url=s3_endpoint_url)) if is_s3_uri(path) else path
    extension = posixpath.splitext(path)[1].lower()
    if extension == ".csv":
        return pyarrow.csv.read_csv(source)
    if extension in {".jsonl", ".ndjson"}:
        return pyarrow.json.read_json(source)
    return pyarrow.parquet.read_table(source)


def _resolve_manifest_uri(uri: str, manifest: str) -> str:
    """Absolute uris stay; relative ones are taken relative to the manifest's folder (local or S3)."""
    uri = uri.strip()
    if is_s3_uri(uri) or "://" in uri or os.path.isabs(os.path.expanduser(uri)):
        return canonical_uri(uri)
    if is_s3_uri(manifest):
        bucket, key = split_s3_uri(manifest)
        return canonical_uri(f"{S3_SCHEME}{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), uri))}")
    return canonical_uri(os.path.join(os.path.dirname(canonical_uri(manifest)), uri))


def _manifest_fields(table: pa.Table) -> list[pa.Field]:
    """Arrow fields of a manifest's extra columns, typed from the whole manifest; a column empty everywhere is
    typed string (an Arrow `null` column could not take a value later)."""
    return [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f.with_nullable(True)
            for f in table.schema if f.name not in ("uri", "video_id")]


def _manifest_rows(manifest: str, s3_endpoint_url: str | None) -> Listing:
    """Rows of a manifest: uri resolved, video_id kept or derived, extra columns carried; repeated uris once."""
    table = _read_manifest_table(manifest, s3_endpoint_url)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {manifest} has no 'uri' column (columns: {table.column_names})")
    rows: dict[str, dict[str, Any]] = {}
    for line, record in enumerate(table.to_pylist(), start=1):
        if record["uri"] is None or not str(record["uri"]).strip():
            raise ValueError(f"manifest {manifest}, row {line}: empty uri")
        uri = _resolve_manifest_uri(str(record["uri"]), manifest)
        if uri in rows:
            continue
        given_id = record.get("video_id")
        video_id = str(given_id) if given_id not in (None, "") else video_id_for(uri)
        rows[uri] = {**record, "video_id": video_id, "uri": uri}
    _check_unique_ids(rows.values(), manifest)
    return Listing(list(rows.values()), _manifest_fields(table))


def _check_unique_ids(rows, source: str) -> None:
    seen: dict[str, str] = {}
    for row in rows:
        other = seen.setdefault(row["video_id"], row["uri"])
        if other != row["uri"]:
            raise ValueError(f"{source}: video_id {row['video_id']!r} is given to two uris: {other} and {row['uri']}")


# ---------------------------------------------------------------------------------------------------------------
# entry point


def _row(uri: str) -> dict[str, Any]:
    uri = canonical_uri(uri)
    return {"video_id": video_id_for(uri), "uri": uri}


@dataclass
class Listing:
    """The videos of an input and the Arrow types of the extra columns their rows carry (from a manifest)."""

    rows: list[dict[str, Any]]
    extra_fields: list[pa.Field] = field(default_factory=list)


def list_videos(input: str, *, s3_endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """All videos of an input, as rows {"video_id", "uri", **extra manifest columns}, sorted by video_id.
    See `list_input`, which also gives the extra columns' Arrow types."""
    return list_input(input, s3_endpoint_url=s3_endpoint_url).rows


def list_input(input: str, *, s3_endpoint_url: str | None = None) -> Listing:
    """All videos of an input, as rows {"video_id", "uri", **extra manifest columns}, sorted by video_id, with the
    extra columns' Arrow types taken once from the whole manifest (so a column empty in some rows keeps its type).

    `input` is one of:
      - a local folder: every file with a video extension under it, recursively;
      - `s3://bucket/prefix`: every object with a video extension under that prefix (taken as a folder);
      - a manifest (.csv, .jsonl/.ndjson, .parquet; local or s3://) with a `uri` column, an optional `video_id`
        column and any other columns, which are carried into the rows. Relative uris resolve against the
        manifest's folder; a uri listed twice is kept once (first row wins). Listed files are not opened here:
        a missing one fails later, in decoding, as that video's error.
      - a single video file (local or s3://).
    Missing inputs raise FileNotFoundError; a manifest without `uri` raises ValueError.
    """
    input = str(input)
    if is_s3_uri(input):
        listing = _list_s3_input(input, s3_endpoint_url)
    else:
        listing = _list_local_input(input, s3_endpoint_url)
    listing.rows.sort(key=lambda row: row["video_id"])
    return listing


def _list_s3_input(input: str, s3_endpoint_url: str | None) -> Listing:
    if _is_manifest(input):
        return _manifest_rows(input, s3_endpoint_url)
    if has_video_extension(input):
        return Listing([_row(input)])
    return Listing(_list_s3_videos(input, s3_endpoint_url))


def _list_local_input(input: str, s3_endpoint_url: str | None) -> Listing:
    path = Path(canonical_uri(input))
    if not path.exists():
        raise FileNotFoundError(f"input not found: {input}")
    if path.is_dir():
        return Listing(_list_local_videos(path))
    if _is_manifest(path.name):
        return _manifest_rows(str(path), s3_endpoint_url)
    if has_video_extension(path.name):
        return Listing([_row(str(path))])
    raise ValueError(
        f"input {input} is neither a folder, a manifest ({sorted(MANIFEST_EXTENSIONS)}) nor a video "
        f"({sorted(VIDEO_EXTENSIONS)})"
    )
