"""Where an output lives: the filesystem of a local path or an s3:// uri, LanceDB's options for it, and the
file-level steps the rest of the store builds on (`OutputRoot`): paths under the root, a file created only if it
does not exist yet, a file replaced whole in one step.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.store.s3 import S3_RETRIES


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_for(root: str, s3_endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// uri; S3 credentials come from the standard chain."""
    if is_s3(root):
        kwargs = S3_RETRIES.pyarrow_options()
        if s3_endpoint_url:
            parsed = urlparse(s3_endpoint_url)
            kwargs |= {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
        return pafs.S3FileSystem(**kwargs), root[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(_absolute(root))


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def lance_storage_options(root: str, s3_endpoint_url: str | None) -> dict[str, str] | None:
    """Lance's storage_options for a table under `root` (None for a local one)."""
    if not is_s3(root):
        return None
    options = S3_RETRIES.lance_options()
    if s3_endpoint_url:
        options |= {"aws_endpoint": s3_endpoint_url, "allow_http": str(s3_endpoint_url.startswith("http://")).lower()}
    return options


class OutputRoot:
    """Locations and whole-file writes under one output root (a part of pipeline.store.storage.OutputStore, which
    sets these attributes)."""

    root: str  # a local path or s3://bucket/prefix
    s3_endpoint_url: str | None
    fs: pafs.FileSystem  # with `path`: filesystem_for(root, s3_endpoint_url)
    path: str

    def _dir(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def lance_options(self) -> dict[str, str] | None:
        return lance_storage_options(self.root, self.s3_endpoint_url)

    @property
    def lancedb_uri(self) -> str:
        return f"{self.root.rstrip('/')}/lancedb" if is_s3(self.root) else str(_absolute(self.root) / "lancedb")

    def _create_exclusive(self, path: str, content: bytes) -> bool:
        """Create the file `path` only if it does not exist (O_EXCL locally, If-None-Match on S3)."""
        if not is_s3(self.root):
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(content)
            return True
        from botocore.exceptions import ClientError

        from pipeline.store.s3 import s3_client, split_s3_uri

        bucket, key = split_s3_uri(f"s3://{path}")
        try:
            s3_client(self.s3_endpoint_url).put_object(Bucket=bucket, Key=key, Body=content, IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _replace(self, path: str, content: bytes) -> None:
        """Write `path` whole in one step: readers see the old or the new content, never a part."""
        if is_s3(self.root):  # one PUT: an S3 object appears whole
            with self.fs.open_output_stream(path) as out:
                out.write(content)
            return
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as out:
            out.write(content)
        os.replace(temporary, path)
