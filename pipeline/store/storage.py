"""The job's output: Parquet files (the record of what is done) and a LanceDB table kept in step with them.

Layout under the output root (a local path or s3://bucket/prefix):

    videos/part-<run>-<seq>.parquet   one row per compressed video (schema.video_schema)
    errors/part-<run>-<seq>.parquet   one row per failure (schema.ERROR_SCHEMA)
    lancedb/videos.lance              the same video rows; `pooled` is the vector column, `base` a multivector
    lancedb/_video_id_digest.arrow    hashes of the video ids in LanceDB, for a resume's lookups (see below)
    settings.json                     the settings every video row was made with (pipeline.store.contract)
    run.json                          summary of the last run
    _staging/                         files being written or staged (ignored by readers: the name starts with "_")
    _lancedb_unsynced                 present from a run's start until it ends cleanly (see reconcile)
    _lock                             held by the running job (a lease it renews): a second job refuses to start
    _takeovers/                       one small marker per lock takeover (makes a takeover atomic; removed on release)

Exactly-once per video: a Parquet file becomes visible in one step (staged, then moved into videos/; an S3 object
appears whole), and the set of video_ids in videos/ is what counts as done. LanceDB is written after Parquet with
merge_insert on video_id, so repeating a write never duplicates a row; `reconcile()` copies into LanceDB whatever
a crash left only in Parquet. Rows that writers elsewhere staged are committed by the same rule, Parquet first
(`commit_staged`, pipeline.store.staging).

Flat with size: a commit looks its ids up in a scalar index on video_id and appends when they are all new (the
usual case; merge_insert otherwise); the fragments commits add are compacted as they pile up, into fragments of at
most COMPACTED_FRAGMENT_ROWS so that no compaction rewrites more than that; the vector index is trained once and
then extended; and a resume looks the listed ids up in the id digest (lancedb/_video_id_digest.arrow: sorted
hashes of the ids, rewritten at each compaction, plus a scan of the fragments added since) instead of reading
every id. The digest is only trusted while every fragment it covers is unchanged; otherwise the video_id index
answers and the next compaction makes a new digest.

`OutputStore` is the one object callers use. Each concern lives in its own module, as a part the store is made of:

    pipeline.store.filesystem    the root's filesystem (local or S3), paths, files created or replaced whole
    pipeline.store.parquet       the Parquet files: reading and writing rows, removing rows
    pipeline.store.lance_table   the LanceDB table: upserts, compaction, the vector index, reconcile
    pipeline.store.done_ids      done_ids for a resume: the id digest and the video_id index lookups
    pipeline.store.lock          the lock: a lease, renewed, taken over once its holder is gone
    pipeline.store.records       settings.json and run.json
    pipeline.store.staging       rows staged by writers anywhere (Parquet and Lance fragments), committed by one

This module adds what spans them: the store's state, and the commits that touch both Parquet and LanceDB.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.store.done_ids import DoneIds
from pipeline.store.filesystem import filesystem_for
from pipeline.store.lance_table import LanceTable, UNSYNCED_MARKER
from pipeline.store.lock import LEASE_S, LeaseLock
from pipeline.store.parquet import ParquetFiles
from pipeline.store.records import Records
from pipeline.store.staging import StagedWrites

# Callers (jobs, readers, benchmarks) import these from here.
from pipeline.store.lance_table import MIN_ROWS_FOR_VECTOR_INDEX, TABLE_NAME, _unindexed_fragments  # noqa: F401
from pipeline.store.lock import OutputLocked  # noqa: F401


@dataclass
class OutputStore(ParquetFiles, LanceTable, DoneIds, LeaseLock, Records, StagedWrites):
    """Reads and writes one output root. Cheap to create; nothing is written until asked."""

    root: str
    s3_endpoint_url: str | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    host: str = field(default_factory=socket.gethostname)
    lease_s: float = LEASE_S

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem_for(self.root, self.s3_endpoint_url)
        self._seq = {"videos": 0, "errors": 0}
        self._published: dict[str, str] = {}  # staged Parquet file -> its name in videos/ or errors/
        self._db = None
        self._holder: dict | None = None  # our lock's content while we hold it
        self._renewer: threading.Thread | None = None
        self._lease_lost = False
        self._in_step = False  # LanceDB known to hold exactly Parquet's video ids (set by reconcile)
        self._marked_unsynced = False
        self._lance_version: int | None = None  # the LanceDB table version commit_staged last committed or read
        self._lance_tried: set[str] = set()  # staged files whose LanceDB commit commit_staged has tried

    # ---- commits to both Parquet and LanceDB ----------------------------------------------------------------
    def write_videos(self, table: pa.Table, replace: bool = False) -> None:
        """Commit video rows: Parquet first (the record of what is done), then LanceDB.

        replace: the rows may supersede committed rows of the same videos (--overwrite); those are removed only
        after the new rows are committed, so a video always has a row. `reconcile` finishes what a crash between
        the steps leaves (two rows of a video in Parquet, or an old row in LanceDB).
        """
        if table.num_rows == 0:
            return
        if not self._marked_unsynced:
            self._set_unsynced_marker(True)
        committed = self._write_parquet("videos", table)
        if replace:
            self._remove_parquet_rows(table.column("video_id").to_pylist(), skip_files=[committed])
        self._upsert_lance(table)

    def remove_videos(self, video_ids: Iterable[str]) -> int:
        """Delete these videos from Parquet and LanceDB. Returns how many rows were removed."""
        ids = sorted(set(video_ids))
        removed = self._remove_parquet_rows(ids)
        if ids and self.lance_table() is not None:
            self._delete_from_lance(ids)
        return removed

    def start_over(self) -> None:
        """Delete everything the output holds except its lock (--rebuild). The recorded settings go last, so a crash
        part-way leaves them in force and a plain re-run is still refused."""
        for name in ("videos", "errors", "lancedb", "_staging"):
            if self.fs.get_file_info(self._dir(name)).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self._dir(name))
        for name in ("run.json", UNSYNCED_MARKER, self.SETTINGS_FILE):
            if self.fs.get_file_info(self._dir(name)).type != pafs.FileType.NotFound:
                self.fs.delete_file(self._dir(name))
        self._db, self._in_step, self._marked_unsynced, self._lance_version = None, False, False, None
