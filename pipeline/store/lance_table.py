"""The LanceDB table of an output, kept in step with its Parquet files: upserts, compaction, the vector index, and
`reconcile`, which brings the table back in step after a crash.

    lancedb/videos.lance              the video rows of videos/; `pooled` is the vector column, `base` a multivector
    _lancedb_unsynced                 present from a run's start until it ends cleanly (see reconcile)

Rows are written with merge_insert on video_id (or appended when their ids are all new), so repeating a write never
duplicates a row. The fragments commits add are compacted as they pile up, into fragments of at most
COMPACTED_FRAGMENT_ROWS so that no compaction rewrites more than that; the vector index is trained once and then
extended. Each compaction rewrites the id digest (pipeline.store.done_ids).
"""

from __future__ import annotations

import logging
import math

import lancedb
from lancedb.index import BTree, IvfRq
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.store.filesystem import OutputRoot
from pipeline.store.parquet import _created_at_by_id
from pipeline.store.schema import check_schema_version

log = logging.getLogger("tokendyn.pipeline")

TABLE_NAME = "videos"
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
# the full vectors (SearchParams) keeps recall@10 near 1; 1-bit codes needed 10 * k (docs/scaling.md).
VECTOR_INDEX_BITS = 4
# During a run, new rows join the vector index as deltas of at least this many rows per partition (see
# compact_if_needed); searches scan the rows not in it yet.
VECTOR_DELTA_ROWS_PER_PARTITION = 128
VECTOR_INDEX_PREFIX = "pooled_ivf_rq"  # the index's name ends with the partition count it was trained with
ID_INDEX_NAME = "video_id_idx"
# Present while a run may have left LanceDB out of step with Parquet (from its start until it ends cleanly).
UNSYNCED_MARKER = "_lancedb_unsynced"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _trained_partitions(index_name: str) -> int | None:
    """Partition count recorded in the vector index's name (None for an index this code did not name)."""
    suffix = index_name.removeprefix(VECTOR_INDEX_PREFIX)
    return int(suffix) if index_name.startswith(VECTOR_INDEX_PREFIX) and suffix.isdigit() else None


def _vector_delta_rows(index_name: str) -> int:
    """How many new rows compactions let wait before they join this vector index as a delta."""
    return max(COMPACTED_FRAGMENT_ROWS // 2, VECTOR_DELTA_ROWS_PER_PARTITION * (_trained_partitions(index_name) or 0))


def _unindexed_fragments(dataset) -> list:
    """The fragments of a lance dataset that its video_id index does not cover (all of them when it has none)."""
    covered = {fragment_id for index in dataset.describe_indices() if index.name == ID_INDEX_NAME
               for segment in index.segments for fragment_id in segment.fragment_ids}
    return [fragment for fragment in dataset.get_fragments() if fragment.fragment_id not in covered]


class LanceTable(OutputRoot):
    """The LanceDB side of pipeline.store.storage.OutputStore. It keeps the connection in `_db`, whether LanceDB is
    known to hold exactly Parquet's video ids in `_in_step` (set by reconcile) and whether this run has marked the
    output unsynced in `_marked_unsynced`; it reads Parquet through pipeline.store.parquet and looks ids up and keeps
    the id digest through pipeline.store.done_ids (`_lance_ids_in`, `_read_id_digest`, `_write_id_digest`,
    `_digest_state`, `_id_digest_covering`), and removes staged files never committed through
    pipeline.store.staging (`remove_orphans`).
    """

    run_id: str
    _db: lancedb.DBConnection | None
    _in_step: bool
    _marked_unsynced: bool

    def lance_table(self):
        """The LanceDB table, or None when nothing was committed to it yet.

        A crash inside the table's first commit leaves data files but no version: LanceDB lists that table yet
        cannot open it. It holds nothing Parquet lacks, so it counts as absent and the next write creates it. A
        reader whose open fails while a running job makes that first version finds the version there afterwards,
        and opens the table again.
        """
        db = self._lance_db()
        if TABLE_NAME not in db.list_tables().tables:
            return None
        try:
            table = db.open_table(TABLE_NAME)
        except ValueError:
            versions = pafs.FileSelector(f"{self._dir('lancedb')}/{TABLE_NAME}.lance/_versions", allow_not_found=True)
            if not any(info.path.endswith(".manifest") for info in self.fs.get_file_info(versions)):
                return None
            table = db.open_table(TABLE_NAME)  # its first version landed since: raises only if that is unreadable
        check_schema_version(table.schema, self.lancedb_uri)
        return table

    def _lance_db(self):
        if self._db is None:
            self._db = lancedb.connect(self.lancedb_uri,
                                       storage_options=self.lance_options)
        return self._db

    # ---- writing ---------------------------------------------------------------------------------------------
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
        self.compact_if_needed(lance)

    def _delete_from_lance(self, video_ids: list[str]) -> None:
        self.lance_table().delete(f"video_id IN ({', '.join(_quote(v) for v in video_ids)})")

    # ---- compaction and the indexes --------------------------------------------------------------------------
    def compact_if_needed(self, lance=None, force: bool = False) -> bool:
        """Merge the fragments the indexes do not cover yet and bring the indexes up to date, once enough have
        piled up (`force`: whenever there are any). Returns whether it compacted. The video_id index is created
        first if the table has none yet.

        Each step is bounded: compaction merges only fragments smaller than COMPACTED_FRAGMENT_ROWS, the video_id
        index takes in the new rows, the vector index gets them as a delta (assigned to the trained partitions;
        `build_vector_index` merges the deltas or retrains) once enough are waiting, and the id digest has their
        hashes merged in. Needs the `lance` package (pylance): LanceDB's own optimize() offers no fragment size
        below 1M rows.
        """
        lance = self.lance_table() if lance is None else lance
        if lance is None:
            return False
        if not any(index.name == ID_INDEX_NAME for index in lance.list_indices()):
            lance.create_index("video_id", config=BTree(), name=ID_INDEX_NAME)
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

    # ---- in step with Parquet --------------------------------------------------------------------------------
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
        self.remove_orphans()  # what the run that did not end cleanly staged and never committed
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

    def finish_run(self) -> None:
        """Delete what this run staged and did not commit (a retried writer's files), and record that LanceDB and
        Parquet agree (the run ended cleanly), so the next `reconcile` can skip its check."""
        self.remove_orphans()
        self._set_unsynced_marker(False)
