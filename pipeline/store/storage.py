"""The job's output: Parquet files (the record of what is done) and a LanceDB table kept in step with them.

Layout under the output root (a local path or s3://bucket/prefix):

    videos/part-<run>-<seq>.parquet   one row per compressed video (schema.video_schema)
    errors/part-<run>-<seq>.parquet   one row per failure (schema.ERROR_SCHEMA)
    lancedb/videos.lance              the same video rows; `pooled` is the vector column, `base` a multivector
    lancedb/_video_id_digest.arrow    hashes of the video ids in LanceDB, for a resume's lookups (see below)
    settings.json                     the settings every video row was made with (pipeline.store.contract)
    run.json                          summary of the last run
    _staging/                         files being written (ignored by readers: the name starts with "_")
    _lancedb_unsynced                 present from a run's start until it ends cleanly (see reconcile)
    _lock                             held by the running job (a lease it renews): a second job refuses to start
    _takeovers/                       one small marker per lock takeover (makes a takeover atomic; removed on release)

Exactly-once per video: a Parquet file becomes visible in one step (staged, then moved into videos/; an S3 object
appears whole), and the set of video_ids in videos/ is what counts as done. LanceDB is written after Parquet with
merge_insert on video_id, so repeating a write never duplicates a row; `reconcile()` copies into LanceDB whatever
a crash left only in Parquet.

Flat with size: a commit looks its ids up in a scalar index on video_id and appends when they are all new (the
usual case; merge_insert otherwise); the fragments commits add are compacted as they pile up, into fragments of at
most COMPACTED_FRAGMENT_ROWS so that no compaction rewrites more than that; the vector index is trained once and
then extended; and a resume looks the listed ids up in the id digest (lancedb/_video_id_digest.arrow: sorted
hashes of the ids, rewritten at each compaction, plus a scan of the fragments added since) instead of reading
every id. The digest is only trusted while every fragment it covers is unchanged; otherwise the video_id index
answers and the next compaction makes a new digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import lancedb
from lancedb.index import BTree, IvfRq
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.store.schema import ERROR_SCHEMA, check_schema_version

log = logging.getLogger("tokendyn.pipeline")

TABLE_NAME = "videos"
# The lock is a lease: the running job renews it every LEASE_S / RENEWALS_PER_LEASE seconds, and a job on any host
# may take over a lease not renewed for LEASE_S (host clocks must agree to well within that).
LEASE_S = 300.0
RENEWALS_PER_LEASE = 5
# IVF partitions need enough rows to train on; below this an exact scan is fast anyway.
MIN_ROWS_FOR_VECTOR_INDEX = 5000
# Each LanceDB commit adds a fragment (data file) that the indexes do not cover yet. Once this many such fragments
# (or COMPACTED_FRAGMENT_ROWS rows in them) pile up they are merged and the indexes take in their rows, so id
# lookups (the index, plus a scan of the rows it does not cover yet) and searches cost the same at any table size.
COMPACT_AT_NEW_FRAGMENTS = 32
# Compaction merges small fragments into fragments of up to this many rows and leaves larger ones alone, so no
# compaction rewrites more than about this many rows (plus the new ones) whatever the size of the table.
# (LanceDB's own optimize() targets 1M rows: below that, every compaction rewrote the growing last fragment.)
COMPACTED_FRAGMENT_ROWS = 65_536
# The IVF index has sqrt(rows) partitions but none of more than MAX_ROWS_PER_PARTITION rows on average (from 250k
# rows on), so the fixed number of partitions a query visits scans about the same number of rows at any size.
# (More partitions at small sizes lost members of small clusters split across partitions.) It is trained once,
# then new rows join its existing partitions; it is retrained only once the table has outgrown the partitions it
# was trained with by RETRAIN_AT_PARTITION_GROWTH. Training samples TRAINING_ROWS_PER_PARTITION rows per
# partition (Lance's default, 256, is four times the training work).
MAX_ROWS_PER_PARTITION = 500
RETRAIN_AT_PARTITION_GROWTH = 2
TRAINING_ROWS_PER_PARTITION = 64
# Bits per dimension of the index's RaBitQ codes: 4 bits rank well enough that re-scoring 5 * k candidates with
# the full vectors (SearchParams) keeps recall@10 near 1; 1-bit codes needed 10 * k (README, Scaling the output
# store).
VECTOR_INDEX_BITS = 4
# During a run, new rows join the vector index as deltas of at least this many rows per partition (see
# compact_if_needed); searches scan the rows not in it yet.
VECTOR_DELTA_ROWS_PER_PARTITION = 128
VECTOR_INDEX_PREFIX = "pooled_ivf_rq"  # the index's name ends with the partition count it was trained with
ID_INDEX_NAME = "video_id_idx"
# Present while a run may have left LanceDB out of step with Parquet (from its start until it ends cleanly).
UNSYNCED_MARKER = "_lancedb_unsynced"
# Listed ids are looked up in LanceDB's video_id index in chunks of this many; a listing this large relative to
# the table (LOOKUP_FRACTION) reads the id column whole instead.
ID_LOOKUP_CHUNK = 2048
LOOKUP_FRACTION = 0.25
# The id digest (lancedb/_video_id_digest.arrow): a sorted 128-bit hash of every video_id in the LanceDB fragments
# it names, rewritten after each compaction. A resume looks its listing up there (a binary search per id, whatever
# the size of the table) and scans only the fragments added since; see _digest_ids_among.
ID_DIGEST_FILE = "_video_id_digest.arrow"
ID_HASH_BYTES = 16


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_for(root: str, s3_endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// uri; S3 credentials come from the standard chain."""
    if is_s3(root):
        kwargs = {}
        if s3_endpoint_url:
            parsed = urlparse(s3_endpoint_url)
            kwargs = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
        return pafs.S3FileSystem(**kwargs), root[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(_absolute(root))


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def lance_storage_options(s3_endpoint_url: str | None) -> dict[str, str]:
    if not s3_endpoint_url:
        return {}
    return {"aws_endpoint": s3_endpoint_url, "allow_http": str(s3_endpoint_url.startswith("http://")).lower()}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _trained_partitions(index_name: str) -> int | None:
    """Partition count recorded in the vector index's name (None for an index this code did not name)."""
    suffix = index_name.removeprefix(VECTOR_INDEX_PREFIX)
    return int(suffix) if index_name.startswith(VECTOR_INDEX_PREFIX) and suffix.isdigit() else None


class OutputLocked(RuntimeError):
    """Another job is writing to this output."""


def _lease_key(holder: dict) -> str:
    """Names one lease of one holder: a takeover claims this name, so each lease is taken over at most once."""
    return hashlib.sha1(json.dumps(holder, sort_keys=True).encode()).hexdigest()


def _created_at_by_id(table: pa.Table):
    """(video_id, created_at) pairs of a table's rows."""
    return zip(table.column("video_id").to_pylist(), table.column("created_at").to_pylist())


def _vector_delta_rows(index_name: str) -> int:
    """How many new rows compactions let wait before they join this vector index as a delta."""
    return max(COMPACTED_FRAGMENT_ROWS // 2, VECTOR_DELTA_ROWS_PER_PARTITION * (_trained_partitions(index_name) or 0))


def _unindexed_fragments(dataset) -> list:
    """The fragments of a lance dataset that its video_id index does not cover (all of them when it has none)."""
    covered = {fragment_id for index in dataset.describe_indices() if index.name == ID_INDEX_NAME
               for segment in index.segments for fragment_id in segment.fragment_ids}
    return [fragment for fragment in dataset.get_fragments() if fragment.fragment_id not in covered]


Hashes = tuple[np.ndarray, np.ndarray]  # ([n] uint64, [n] uint64): the halves of n 128-bit hashes, by first half


def _id_hashes(video_ids: list[str], sort: bool = True) -> Hashes:
    """128-bit hashes of video ids, sorted by their first half (else in the order of the ids).

    At 128 bits two of a billion ids collide with a probability of about 1e-21."""
    digests = b"".join(hashlib.blake2b(video_id.encode(), digest_size=ID_HASH_BYTES).digest() for video_id in video_ids)
    halves = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    order = np.argsort(halves[:, 0], kind="stable") if sort else slice(None)
    return np.ascontiguousarray(halves[order, 0]), np.ascontiguousarray(halves[order, 1])


def _merge_hashes(hashes: Hashes, added: Hashes) -> Hashes:
    at = np.searchsorted(hashes[0], added[0])
    return np.insert(hashes[0], at, added[0]), np.insert(hashes[1], at, added[1])


def _hashes_held(hashes: Hashes, wanted: Hashes) -> np.ndarray:
    """[m] bool: which of `wanted` are in `hashes` (binary searches on the first halves)."""
    (first, second), (wanted_first, wanted_second) = hashes, wanted
    left, right = np.searchsorted(first, wanted_first, "left"), np.searchsorted(first, wanted_first, "right")
    held = np.zeros(len(wanted_first), dtype=bool)
    one = right - left == 1  # the usual case; several share a first half with a probability of ~n^2 / 2^65
    held[one] = second[left[one]] == wanted_second[one]
    for i in np.flatnonzero(right - left > 1):
        held[i] = bool((second[left[i]:right[i]] == wanted_second[i]).any())
    return held


def _fragment_ids(dataset, fragments: list) -> list[str]:
    """The video ids held by these fragments of a lance dataset (deleted rows left out)."""
    return dataset.scanner(columns=["video_id"], fragments=fragments).to_table().column("video_id").to_pylist()


def _fragment_key(fragment) -> str:
    """Names a lance fragment for good: its id and its first data file (a new table reuses ids, not file names)."""
    return f"{fragment.fragment_id}:{fragment.metadata.files[0].path}"


def _deletion_state(fragment) -> list | None:
    deletion = fragment.metadata.deletion_file
    return None if deletion is None else [deletion.id, deletion.read_version, deletion.num_deleted_rows]


def _utc(epoch_s) -> str:
    return "?" if epoch_s is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch_s)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OutputStore:
    """Reads and writes one output root. Cheap to create; nothing is written until asked."""

    root: str
    s3_endpoint_url: str | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    host: str = field(default_factory=socket.gethostname)
    lease_s: float = LEASE_S

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem_for(self.root, self.s3_endpoint_url)
        self._seq = {"videos": 0, "errors": 0}
        self._db = None
        self._holder: dict | None = None  # our lock's content while we hold it
        self._renewer: threading.Thread | None = None
        self._lease_lost = False
        self._in_step = False  # LanceDB known to hold exactly Parquet's video ids (set by reconcile)
        self._marked_unsynced = False

    # ---- locations -------------------------------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def lancedb_uri(self) -> str:
        return f"{self.root.rstrip('/')}/lancedb" if is_s3(self.root) else str(_absolute(self.root) / "lancedb")

    def _parquet_files(self, name: str) -> list[str]:
        selector = pafs.FileSelector(self._dir(name), allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.path.endswith(".parquet"))

    # ---- reading ---------------------------------------------------------------------------------------------
    def read_videos(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table | None:
        """All committed video rows (None when there are none yet)."""
        files = self._parquet_files("videos")
        if not files:
            return None
        check_schema_version(pq.read_schema(files[0], filesystem=self.fs), f"{self.root}/videos")
        dataset = pads.dataset(files, filesystem=self.fs, format="parquet")
        return dataset.to_table(columns=columns, filter=filter)

    def read_errors(self) -> pa.Table:
        files = self._parquet_files("errors")
        if not files:
            return ERROR_SCHEMA.empty_table()
        return pads.dataset(files, filesystem=self.fs, format="parquet", schema=ERROR_SCHEMA).to_table()

    def done_ids(self, among: Iterable[str] | None = None) -> set[str]:
        """Ids of the committed videos (only those in `among`, when given).

        With `among`, after `reconcile()` has brought LanceDB in step with Parquet, the ids are looked up in
        LanceDB's video_id index: the cost follows the listing, not the size of the output.
        """
        if among is not None and self._in_step:
            return self._lance_ids_among(set(among))
        table = self.read_videos(columns=["video_id"])
        done = set() if table is None else set(table.column("video_id").to_pylist())
        return done if among is None else done & set(among)

    def _lance_ids_among(self, wanted: set[str]) -> set[str]:
        lance = self.lance_table()
        if lance is None or not wanted:
            return set()
        found = self._digest_ids_among(lance, wanted)
        if found is not None:
            return found
        if len(wanted) > LOOKUP_FRACTION * lance.count_rows():
            return self._lance_ids(lance) & wanted
        return self._lance_ids_in(lance, wanted)

    # ---- the id digest ---------------------------------------------------------------------------------------
    @property
    def _digest_path(self) -> str:
        return f"{self._dir('lancedb')}/{ID_DIGEST_FILE}"

    def _read_id_digest(self) -> tuple[Hashes, dict] | None:
        """(sorted id hashes, {fragment: deletion state} they cover), or None when there is no digest."""
        try:
            if is_s3(self.root):
                with self.fs.open_input_file(self._digest_path) as src:
                    table = pa.ipc.open_file(src).read_all()
            else:  # mapped, not read: a lookup touches only the pages its binary searches land on
                table = pa.ipc.open_file(pa.memory_map(self._digest_path)).read_all()
        except FileNotFoundError:
            return None
        covered = json.loads(table.schema.metadata[b"fragments"])
        halves = []
        for name in ("hash_first", "hash_second"):
            column = table.column(name)
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # (one: written whole)
            halves.append(np.frombuffer(column.buffers()[1], dtype=np.uint64, count=len(column)))
        return (halves[0], halves[1]), covered

    def _write_id_digest(self, hashes: Hashes, dataset) -> None:
        """Record `hashes` as the digest of every fragment of `dataset`, whole in one step."""
        covered = {_fragment_key(fragment): _deletion_state(fragment) for fragment in dataset.get_fragments()}
        table = pa.table({"hash_first": hashes[0], "hash_second": hashes[1]})
        table = table.replace_schema_metadata({"fragments": json.dumps(covered)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self._replace(self._digest_path, sink.getvalue().to_pybytes())

    @staticmethod
    def _digest_state(dataset, digest) -> list | None:
        """The fragments of `dataset` the digest does not cover yet, or None when the digest no longer holds: a
        fragment it covers is gone or lost rows since (a compaction it did not see, a delete, a replacement)."""
        if digest is None:
            return None
        fragments = {_fragment_key(fragment): fragment for fragment in dataset.get_fragments()}
        _, covered = digest
        if any(key not in fragments or _deletion_state(fragments[key]) != state for key, state in covered.items()):
            return None
        return [fragment for key, fragment in fragments.items() if key not in covered]

    def _digest_ids_among(self, lance, wanted: set[str]) -> set[str] | None:
        """Which of `wanted` the table holds, from the id digest and a scan of the fragments added since it was
        written; None when there is no digest that still holds (the caller then asks the video_id index)."""
        digest = self._read_id_digest()
        dataset = lance.to_lance()
        newer = self._digest_state(dataset, digest)
        if newer is None:
            return None
        ordered = list(wanted)
        held = _hashes_held(digest[0], _id_hashes(ordered, sort=False))
        found = {video_id for video_id, is_held in zip(ordered, held.tolist()) if is_held}
        if newer:
            found.update(wanted.intersection(_fragment_ids(dataset, newer)))
        return found

    def _id_digest_covering(self, dataset, or_none: bool = False) -> Hashes | None:
        """Hashes of every id `dataset` holds: the digest's, with those of the fragments added since merged
        in. Without a digest that still holds they are made from every id (once after a delete, a crash or an
        output from before digests), or with `or_none` None is returned instead."""
        digest = self._read_id_digest()
        newer = self._digest_state(dataset, digest)
        if newer is None:
            return None if or_none else _id_hashes(_fragment_ids(dataset, dataset.get_fragments()))
        return _merge_hashes(digest[0], _id_hashes(_fragment_ids(dataset, newer))) if newer else digest[0]

    @staticmethod
    def _lance_ids_in(lance, wanted: Iterable[str]) -> set[str]:
        """Which of these ids the table holds: index lookups, plus a scan of the id column of unindexed rows."""
        ordered, found = sorted(set(wanted)), set()
        for start in range(0, len(ordered), ID_LOOKUP_CHUNK):
            chunk = ", ".join(_quote(v) for v in ordered[start:start + ID_LOOKUP_CHUNK])
            rows = lance.search().where(f"video_id IN ({chunk})").select(["video_id"]).limit(None).to_arrow()
            found.update(rows.column("video_id").to_pylist())
        return found

    @staticmethod
    def _lance_ids(lance) -> set[str]:
        return set(lance.search().select(["video_id"]).limit(None).to_arrow().column("video_id").to_pylist())

    def lance_table(self):
        """The LanceDB table, or None when nothing was committed to it yet.

        A crash inside the table's first commit leaves data files but no version: LanceDB lists that table yet
        cannot open it. It holds nothing Parquet lacks, so it counts as absent and the next write creates it.
        """
        db = self._lance_db()
        if TABLE_NAME not in db.list_tables().tables:
            return None
        try:
            table = db.open_table(TABLE_NAME)
        except ValueError:
            versions = pafs.FileSelector(f"{self._dir('lancedb')}/{TABLE_NAME}.lance/_versions", allow_not_found=True)
            if any(info.path.endswith(".manifest") for info in self.fs.get_file_info(versions)):
                raise
            return None
        check_schema_version(table.schema, self.lancedb_uri)
        return table

    def _lance_db(self):
        if self._db is None:
            self._db = lancedb.connect(self.lancedb_uri,
                                       storage_options=lance_storage_options(self.s3_endpoint_url) or None)
        return self._db

    # ---- writing ---------------------------------------------------------------------------------------------
    def _write_parquet(self, kind: str, table: pa.Table) -> str:
        """Write `table` as one new file under `kind`/, visible to readers only once complete."""
        self._check_lease()
        name = f"part-{self.run_id}-{self._seq[kind]:05d}.parquet"
        self._seq[kind] += 1
        staged = f"{self._dir('_staging')}/{kind}-{name}"
        final = f"{self._dir(kind)}/{name}"
        self.fs.create_dir(self._dir("_staging"), recursive=True)
        self.fs.create_dir(self._dir(kind), recursive=True)
        pq.write_table(table, staged, filesystem=self.fs)
        self.fs.move(staged, final)
        return final

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
            self._remove_parquet_rows(table.column("video_id").to_pylist(), skip_file=committed)
        self._upsert_lance(table)

    def write_errors(self, table: pa.Table) -> None:
        if table.num_rows:
            self._write_parquet("errors", table.cast(ERROR_SCHEMA))

    def _upsert_lance(self, table: pa.Table) -> None:
        lance = self.lance_table()
        if lance is None:  # (not `or`: a table without rows is falsy, as after a crash between creating and adding)
            lance = self._lance_db().create_table(TABLE_NAME, schema=table.schema, exist_ok=True)
        ids = table.column("video_id").to_pylist()
        if self._lance_ids_in(lance, ids):  # a repeated write (crash, --overwrite): replace those rows
            lance.merge_insert("video_id").when_matched_update_all().when_not_matched_insert_all().execute(table)
        else:
            # The usual case, new ids only. merge_insert would read every row the video_id index does not cover yet.
            lance.add(table)
        if not any(index.name == ID_INDEX_NAME for index in lance.list_indices()):
            lance.create_index("video_id", config=BTree(), name=ID_INDEX_NAME)
        self.compact_if_needed(lance)

    def compact_if_needed(self, lance=None, force: bool = False) -> bool:
        """Merge the fragments the indexes do not cover yet and bring the indexes up to date, once enough have
        piled up (`force`: whenever there are any). Returns whether it compacted.

        Each step is bounded: compaction merges only fragments smaller than COMPACTED_FRAGMENT_ROWS, the video_id
        index takes in the new rows, the vector index gets them as a delta (assigned to the trained partitions;
        `build_vector_index` merges the deltas or retrains) once enough are waiting, and the id digest has their
        hashes merged in. Needs the `lance` package (pylance): LanceDB's own optimize() offers no fragment size
        below 1M rows.
        """
        lance = self.lance_table() if lance is None else lance
        if lance is None:
            return False
        dataset = lance.to_lance()
        pending = _unindexed_fragments(dataset)
        if not pending or not force and (len(pending) < COMPACT_AT_NEW_FRAGMENTS and
                                         sum(f.metadata.physical_rows for f in pending) < COMPACTED_FRAGMENT_ROWS):
            if force and self._digest_state(dataset, self._read_id_digest()) != []:
                self._write_id_digest(self._id_digest_covering(dataset), dataset)  # none yet, or a stale one
            return False
        hashes = self._id_digest_covering(dataset, or_none=True)
        dataset.optimize.compact_files(target_rows_per_fragment=COMPACTED_FRAGMENT_ROWS)
        lance.checkout_latest()
        names = [index.name for index in lance.list_indices()]
        if ID_INDEX_NAME in names:
            lance.to_lance().optimize.optimize_indices(index_names=[ID_INDEX_NAME])
            lance.checkout_latest()
        # The vector index gets the new rows as a delta once there are enough of them: writing a delta costs about
        # as much per partition as per thousand rows, so it waits for more rows the more partitions there are.
        vector = [name for name in names if name != ID_INDEX_NAME and
                  lance.index_stats(name).num_unindexed_rows >= _vector_delta_rows(name)]
        if vector:
            lance.to_lance().optimize.optimize_indices(index_names=vector, num_indices_to_merge=0)
            lance.checkout_latest()
        dataset = lance.to_lance()
        self._write_id_digest(self._id_digest_covering(dataset) if hashes is None else hashes, dataset)
        return True

    def _set_unsynced_marker(self, present: bool) -> None:
        marker = f"{self.path}/{UNSYNCED_MARKER}"
        self._marked_unsynced = present
        if present:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(marker) as out:
                out.write(self.run_id.encode())
        elif self.fs.get_file_info(marker).type != pafs.FileType.NotFound:
            self.fs.delete_file(marker)

    def reconcile(self) -> int:
        """Bring LanceDB in step with the committed Parquet rows at the start of a run; returns the rows copied.

        Only a run that did not end cleanly (`finish_run` not reached) can have left them apart; otherwise, or for
        an output written before the marker existed once its video_id index exists, this costs one file lookup
        whatever the size of the output. After a crash: a video with two Parquet rows (a crash during a
        replacement) keeps its newest; LanceDB gets every row it lacks or holds in an older version, and loses
        rows Parquet no longer has.
        """
        marker = self.fs.get_file_info(f"{self.path}/{UNSYNCED_MARKER}")
        lance = self.lance_table()
        known_in_step = marker.type == pafs.FileType.NotFound and (
            any(index.name == ID_INDEX_NAME for index in lance.list_indices()) if lance is not None
            else not self._parquet_files("videos"))
        self._set_unsynced_marker(True)
        if known_in_step:
            self._in_step = True
            return 0
        latest = self._drop_superseded_rows()
        in_lance = {} if lance is None else dict(_created_at_by_id(
            lance.search().select(["video_id", "created_at"]).limit(None).to_arrow()))
        stale = sorted(video_id for video_id, created in latest.items() if in_lance.get(video_id) != created)
        if stale:
            self._upsert_lance(self.read_videos(filter=pc.field("video_id").isin(stale)))
            log.info("reconciled %d video(s) from Parquet into LanceDB", len(stale))
        extra = sorted(set(in_lance) - set(latest))
        if extra:
            self._delete_from_lance(extra)
            log.info("dropped %d video(s) from LanceDB that Parquet no longer holds", len(extra))
        self._in_step = True
        return len(stale)

    def _drop_superseded_rows(self) -> dict:
        """Keep one Parquet row per video (the newest, by created_at then file name); -> {video_id: created_at}."""
        latest: dict[str, tuple] = {}  # video_id -> (created_at, file)
        superseded: dict[str, list[str]] = {}  # file -> video_ids whose row there is older than another
        for path in self._parquet_files("videos"):
            rows = pq.read_table(path, columns=["video_id", "created_at"], filesystem=self.fs)
            for video_id, created in _created_at_by_id(rows):
                if video_id in latest:
                    older = min(latest[video_id], (created, path))
                    superseded.setdefault(older[1], []).append(video_id)
                latest[video_id] = max(latest.get(video_id, (created, path)), (created, path))
        for path, video_ids in superseded.items():
            self._remove_parquet_rows(video_ids, only_file=path)
        return {video_id: created for video_id, (created, _) in latest.items()}

    def finish_run(self) -> None:
        """Record that LanceDB and Parquet agree (the run ended cleanly), so the next `reconcile` can skip its check."""
        self._set_unsynced_marker(False)

    def remove_videos(self, video_ids: Iterable[str]) -> int:
        """Delete these videos from Parquet and LanceDB. Returns how many rows were removed."""
        ids = sorted(set(video_ids))
        removed = self._remove_parquet_rows(ids)
        if ids and self.lance_table() is not None:
            self._delete_from_lance(ids)
        return removed

    def _remove_parquet_rows(self, video_ids: list[str], *, skip_file: str | None = None,
                             only_file: str | None = None) -> int:
        """Rewrite the Parquet files holding rows of these videos without them (each file replaced whole)."""
        ids = pa.array(sorted(set(video_ids)), pa.string())
        if len(ids) == 0:
            return 0
        removed = 0
        for path in [only_file] if only_file else self._parquet_files("videos"):
            if path == skip_file:
                continue
            table = pq.read_table(path, filesystem=self.fs)
            kept = table.filter(pc.invert(pc.is_in(table.column("video_id"), value_set=ids)))
            if kept.num_rows == table.num_rows:
                continue
            removed += table.num_rows - kept.num_rows
            if kept.num_rows:
                staged = f"{self._dir('_staging')}/rewrite-{uuid.uuid4().hex}.parquet"
                self.fs.create_dir(self._dir("_staging"), recursive=True)
                pq.write_table(kept, staged, filesystem=self.fs)
                self.fs.move(staged, path)
            else:
                self.fs.delete_file(path)
        return removed

    def _delete_from_lance(self, video_ids: list[str]) -> None:
        self.lance_table().delete(f"video_id IN ({', '.join(_quote(v) for v in video_ids)})")

    def build_vector_index(self, min_rows: int = MIN_ROWS_FOR_VECTOR_INDEX) -> bool:
        """Bring the ANN index on `pooled` up to date once the table is large enough. Returns whether one exists.

        The index is trained once; later calls add the new rows to its partitions (merging the deltas that
        compactions added during the run), and retrain only when the table has grown RETRAIN_AT_PARTITION_GROWTH
        times past the partitions it was trained with. Everything not compacted yet is compacted first and the
        video_id index takes in its rows, so the next run's lookups need no scan.
        """
        lance = self.lance_table()
        if lance is None:
            return False
        self.compact_if_needed(lance, force=True)
        rows = lance.count_rows()
        built = rows >= min_rows
        if built:
            partitions = max(1, int(math.sqrt(rows)), rows // MAX_ROWS_PER_PARTITION)
            current = [index for index in lance.list_indices() if index.columns == ["pooled"]]
            trained = _trained_partitions(current[0].name) if current else None
            if trained is None or partitions >= RETRAIN_AT_PARTITION_GROWTH * trained:
                for index in current:
                    lance.drop_index(index.name)
                # 4-bit codes are 8x smaller than float32 vectors.
                config = IvfRq(distance_type="cosine", num_partitions=partitions, num_bits=VECTOR_INDEX_BITS,
                               sample_rate=max(1, min(TRAINING_ROWS_PER_PARTITION, rows // partitions)))
                lance.create_index("pooled", config=config, name=f"{VECTOR_INDEX_PREFIX}{partitions}")
        for index in lance.list_indices():
            stats = lance.index_stats(index.name)
            if index.name != ID_INDEX_NAME and (stats.num_indices > 1 or stats.num_unindexed_rows):
                # The deltas that compactions added (and any rows not in the index) become one index again.
                lance.to_lance().optimize.optimize_indices(index_names=[index.name],
                                                           num_indices_to_merge=stats.num_indices)
                lance.checkout_latest()
        return built

    # ---- one writer at a time -------------------------------------------------------------------------------
    @property
    def _lock_path(self) -> str:
        return f"{self.path}/_lock"

    def acquire_lock(self, break_lock: bool = False) -> None:
        """Take the output's lock (a lease this store then renews in a background thread), or raise OutputLocked
        naming the job that holds it.

        A lock is taken over when its holder is known to be gone: a dead process on this host, or a lease not
        renewed for `lease_s` (from any host); otherwise only when asked (`break_lock`). A takeover is claimed by
        creating `_takeovers/<holder's lease>` if absent, so of several jobs that judge the same lock stale
        exactly one replaces it.
        """
        holder = {"run_id": self.run_id, "host": self.host, "pid": os.getpid(), "token": uuid.uuid4().hex,
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "expires_at": time.time() + self.lease_s}
        content = json.dumps(holder).encode()
        for _ in range(3):  # the holder may release between our attempts
            if self._create_exclusive(self._lock_path, content):
                return self._start_lease(holder)
            current = self._read_lock()
            if not current:
                continue
            reason = self._takeover_reason(current, break_lock)
            if reason is None:
                break
            claim = f"{self.path}/_takeovers/{_lease_key(current)}"
            # Only the one job that creates the claim may replace this lock; the others read the new holder. The
            # lock is read once more in case its holder released it meanwhile and a new job created it.
            if self._create_exclusive(claim, content) and self._read_lock() == current:
                log.warning("taking over the lock of run %s (%s)", current.get("run_id"), reason)
                self._replace(self._lock_path, content)
                return self._start_lease(holder)
            current = self._read_lock() or current
            break
        raise OutputLocked(
            f"{self.root} is being written by run {current.get('run_id')} (pid {current.get('pid')} on "
            f"{current.get('host')}, since {current.get('started_at')}, lease until "
            f"{_utc(current.get('expires_at'))}). Wait for it to finish or for its lease to expire; if that job is "
            "dead, re-run with --break-lock.")

    def _takeover_reason(self, current: dict, break_lock: bool) -> str | None:
        """Why the lock `current` may be taken over, or None when its holder may still be running."""
        if current.get("host") == self.host and not _process_alive(int(current.get("pid", -1))):
            return "its process is gone"
        expires_at = current.get("expires_at")
        if expires_at is not None and float(expires_at) < time.time():
            return f"its lease expired at {_utc(expires_at)}"
        return "--break-lock" if break_lock else None

    def _start_lease(self, holder: dict) -> None:
        self._holder, self._lease_lost = holder, False
        self._stop_renewing = threading.Event()
        self._renewer = threading.Thread(target=self._renew_lease, args=(self._stop_renewing,), daemon=True,
                                         name="tokendyn-lease")
        self._renewer.start()

    def _renew_lease(self, stop: threading.Event) -> None:
        """Push the lease's expiry forward every lease_s / RENEWALS_PER_LEASE until stopped or taken over."""
        while not stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            if self._read_lock().get("token") != self._holder["token"]:
                self._lease_lost = True
                log.error("the lock of %s was taken over by another job; this run writes nothing more", self.root)
                return
            self._holder["expires_at"] = time.time() + self.lease_s
            try:
                self._replace(self._lock_path, json.dumps(self._holder).encode())
            except OSError as error:  # a storage hiccup: the next renewal tries again, well before expiry
                log.warning("could not renew the lease on %s: %s", self.root, error)

    def stop_lease(self) -> None:
        """Stop renewing the lease (the lock itself stays until released or expired)."""
        if self._renewer is not None:
            self._stop_renewing.set()
            self._renewer.join()
            self._renewer = None

    def _check_lease(self) -> None:
        if self._lease_lost:
            raise OutputLocked(f"this job's lock on {self.root} was taken over (its lease was not renewed within "
                               f"{self.lease_s:.0f} s); stopped before writing more")

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

        from pipeline.job.sources import s3_client, split_s3_uri

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

    def _read_lock(self) -> dict:
        try:
            with self.fs.open_input_stream(self._lock_path) as src:
                return json.loads(src.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def release_lock(self) -> None:
        self.stop_lease()
        if self._holder is not None and self._read_lock().get("token") == self._holder["token"]:
            # Takeover claims matter only while a takeover is contended; a late contender re-reads the lock anyway.
            claims = f"{self.path}/_takeovers"
            if self.fs.get_file_info(claims).type != pafs.FileType.NotFound:
                self.fs.delete_dir(claims)
            self.fs.delete_file(self._lock_path)
        self._holder = None

    # ---- the settings contract (see pipeline.store.contract) -----------------------------------------------------
    SETTINGS_FILE = "settings.json"

    def read_settings(self) -> dict | None:
        return self._read_json(self.SETTINGS_FILE)

    def write_settings(self, settings: dict) -> None:
        """Record the output's settings, whole in one step."""
        self.fs.create_dir(self.path, recursive=True)
        self._replace(f"{self.path}/{self.SETTINGS_FILE}", json.dumps(settings, indent=2).encode())

    def video_file_schemas(self) -> list[pa.Schema]:
        return [pq.read_schema(path, filesystem=self.fs) for path in self._parquet_files("videos")]

    def start_over(self) -> None:
        """Delete everything the output holds except its lock (--rebuild). The recorded settings go last, so a crash
        part-way leaves them in force and a plain re-run is still refused."""
        for name in ("videos", "errors", "lancedb", "_staging"):
            if self.fs.get_file_info(self._dir(name)).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self._dir(name))
        for name in ("run.json", UNSYNCED_MARKER, self.SETTINGS_FILE):
            if self.fs.get_file_info(self._dir(name)).type != pafs.FileType.NotFound:
                self.fs.delete_file(self._dir(name))
        self._db, self._in_step, self._marked_unsynced = None, False, False

    def write_run_summary(self, summary: dict) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/run.json") as out:
            out.write(json.dumps(summary, indent=2, default=str).encode())

    def read_run_summary(self) -> dict | None:
        return self._read_json("run.json")

    def _read_json(self, name: str) -> dict | None:
        """A JSON file at the output root; None when absent."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as src:
                return json.loads(src.read())
        except FileNotFoundError:
            return None
