"""Which videos an output already holds, for a resume: `done_ids`, the id digest it reads, and the lookups in
LanceDB's video_id index it falls back on.

    lancedb/_video_id_digest.arrow    sorted 128-bit hashes of the video ids in LanceDB, and the fragments they cover

A resume looks the listed ids up in the id digest (a binary search per id, whatever the size of the table, plus a
scan of the fragments added since it was written) instead of reading every id. The digest is rewritten at each
compaction (pipeline.store.lance_table) and only trusted while every fragment it covers is unchanged; otherwise the
video_id index answers and the next compaction makes a new digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from pipeline.store.filesystem import OutputRoot, is_s3
from pipeline.store.lance_table import _quote

# Listed ids are looked up in LanceDB's video_id index in chunks of this many; a listing this large relative to
# the table (LOOKUP_FRACTION) reads the id column whole instead.
ID_LOOKUP_CHUNK = 2048
LOOKUP_FRACTION = 0.25
# The id digest (lancedb/_video_id_digest.arrow): a sorted 128-bit hash of every video_id in the LanceDB fragments
# it names, rewritten after each compaction. A resume looks its listing up there (a binary search per id, whatever
# the size of the table) and scans only the fragments added since; see _digest_ids_among.
ID_DIGEST_FILE = "_video_id_digest.arrow"
ID_HASH_BYTES = 16

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


class DoneIds(OutputRoot):
    """The resume lookups of pipeline.store.storage.OutputStore. They read Parquet (`read_videos`,
    pipeline.store.parquet) until `reconcile` has set `_in_step`, and LanceDB (`lance_table`,
    pipeline.store.lance_table) after; the digest is written whole in one step (`_replace`).
    """

    _in_step: bool

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

    # ---- the video_id index ----------------------------------------------------------------------------------
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
