"""The Parquet files of an output, the record of what is done: reading and writing video and error rows, and
removing rows of videos (each file replaced whole).

    videos/part-<run>-<seq>.parquet   one row per compressed video (schema.video_schema)
    errors/part-<run>-<seq>.parquet   one row per failure (schema.ERROR_SCHEMA)
    _staging/                         files being written (ignored by readers: the name starts with "_")

A file becomes visible in one step: it is written under _staging/, then moved into place (an S3 object appears
whole), so readers never see part of one.
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.store.filesystem import OutputRoot
from pipeline.store.schema import ERROR_SCHEMA, check_schema_version


def _created_at_by_id(table: pa.Table):
    """(video_id, created_at) pairs of a table's rows."""
    return zip(table.column("video_id").to_pylist(), table.column("created_at").to_pylist())


class ParquetFiles(OutputRoot):
    """The Parquet side of pipeline.store.storage.OutputStore. Files are named after the store's `run_id` and its
    counters `_seq` ({"videos": n, "errors": n}); writing checks the lease first (`_check_lease`, pipeline.store.lock).
    """

    run_id: str
    _seq: dict[str, int]
    _published: dict[str, str]  # staged file -> its published name, kept for a repeated commit

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

    def video_file_schemas(self) -> list[pa.Schema]:
        return [pq.read_schema(path, filesystem=self.fs) for path in self._parquet_files("videos")]

    # ---- writing ---------------------------------------------------------------------------------------------
    def _write_parquet(self, kind: str, table: pa.Table) -> str:
        """Write `table` as one new file under `kind`/, visible to readers only once complete."""
        self._check_lease()
        staged = f"{self._dir('_staging')}/{kind}-{uuid.uuid4().hex}.parquet"
        self.fs.create_dir(self._dir("_staging"), recursive=True)
        pq.write_table(table, staged, filesystem=self.fs)
        return self._publish_parquet(kind, staged)

    def _publish_parquet(self, kind: str, staged: str) -> str:
        """Move a complete file from _staging/ into `kind`/ under the next name of this run: one step. Repeated
        for the same file (a commit repeated after a fault), it keeps the name and moves what is still to move."""
        final = self._published.get(staged)
        if final is not None and self.fs.get_file_info(staged).type == pafs.FileType.NotFound:
            return final  # moved before the fault
        if final is None:
            final = self._published[staged] = f"{self._dir(kind)}/part-{self.run_id}-{self._seq[kind]:05d}.parquet"
            self._seq[kind] += 1
        self.fs.create_dir(self._dir(kind), recursive=True)
        self.fs.move(staged, final)
        return final

    def write_errors(self, table: pa.Table) -> None:
        if table.num_rows:
            self._write_parquet("errors", table.cast(ERROR_SCHEMA))

    # ---- removing rows ---------------------------------------------------------------------------------------
    def _remove_parquet_rows(self, video_ids: list[str], *, skip_files: list[str] = (),
                             only_file: str | None = None) -> int:
        """Rewrite the Parquet files holding rows of these videos without them (each file replaced whole)."""
        ids = pa.array(sorted(set(video_ids)), pa.string())
        if len(ids) == 0:
            return 0
        removed = 0
        for path in [only_file] if only_file else self._parquet_files("videos"):
            if path in skip_files:
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
