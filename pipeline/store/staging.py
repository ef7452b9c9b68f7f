"""Video rows written anywhere, committed by one process: the path that lets every worker of a cluster write.

A writer (a worker of the job's write stage, on any node) stages a batch of video rows with `stage_videos`: a
Parquet file under _staging/ and Lance fragments in the table's data directory, neither of which any reader sees.
It hands the committer a `StagedVideos`, a few hundred bytes naming them. The committer (the job's driver) makes
them visible with `commit_staged`: each Parquet file moved into videos/ (the record of what is done, as for
`write_videos`), then one Lance commit appending every fragment of the flush. No row's bytes pass through it.

Files that were staged and never committed (a writer killed and retried, a driver killed before its commit) are
never read; `remove_orphans` deletes them when no writer can be running: at a run's start after a crash, and at
its end.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

import lance
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from lance.fragment import FragmentMetadata, write_fragments

from pipeline.store.filesystem import OutputRoot
from pipeline.store.lance_table import TABLE_NAME

# Removing orphans also removes Lance versions older than this, as LanceDB's own optimize() does, so that the
# manifests it reads stay bounded; a reader holding an older version for longer than this would lose its files.
KEEP_VERSIONS_FOR = timedelta(days=7)


@dataclass(frozen=True)
class StagedVideos:
    """Video rows a writer staged: where they are, and what the committer checks before making them visible."""

    parquet: str  # the staged Parquet file, a path in the output root's filesystem
    fragments: str  # the Lance fragments' metadata, JSON
    video_ids: list[str]
    encoders: list[dict]  # the distinct {"encoder", "encoder_layer", "dim"} of the rows (the settings contract)
    schema: bytes | None = None  # the rows' Arrow schema, serialised, when the table did not exist yet (it creates it)

    def encoder_table(self) -> pa.Table:
        """The encoders as rows, as pipeline.store.contract.check_rows reads them."""
        return pa.Table.from_pylist(self.encoders)


class StagedWrites(OutputRoot):
    """Staging, committing and cleaning up of pipeline.store.storage.OutputStore; commits go through its Parquet
    and LanceDB parts (`_publish_parquet`, `_remove_parquet_rows`, `lance_table`, `_delete_from_lance`, ...) and
    remember the table version they last committed in `_lance_version`, and the staged files whose LanceDB commit
    was tried in `_lance_tried`."""

    _lance_version: int | None
    _lance_tried: set[str]

    @property
    def _lance_uri(self) -> str:
        return f"{self.lancedb_uri}/{TABLE_NAME}.lance"

    @property
    def _lance_dir(self) -> str:
        return f"{self._dir('lancedb')}/{TABLE_NAME}.lance"

    # ---- a writer, anywhere ----------------------------------------------------------------------------------
    def stage_videos(self, table: pa.Table) -> StagedVideos:
        """Write video rows where no reader sees them yet: Lance fragments, then a Parquet file under _staging/."""
        fragments, created = self._write_fragments(table)
        staged = f"{self._dir('_staging')}/videos-{uuid.uuid4().hex}.parquet"
        self.fs.create_dir(self._dir("_staging"), recursive=True)
        pq.write_table(table, staged, filesystem=self.fs)
        encoders = table.select(["encoder", "encoder_layer", "dim"]).group_by(
            ["encoder", "encoder_layer", "dim"]).aggregate([]).to_pylist()
        return StagedVideos(parquet=staged, fragments=json.dumps([f.to_json() for f in fragments]),
                            video_ids=table.column("video_id").to_pylist(), encoders=encoders,
                            schema=table.schema.serialize().to_pybytes() if created else None)

    def _write_fragments(self, table: pa.Table) -> tuple[list[FragmentMetadata], bool]:
        """Lance fragments of `table`, and whether they were written for a table that does not exist yet (then
        its first commit creates it with their schema)."""
        options = self.lance_options
        if self.fs.get_file_info(f"{self._lance_dir}/_versions").type == pafs.FileType.NotFound:
            try:
                # "create": the table may not exist yet ("append" to a missing table logs a warning every time).
                return write_fragments(table, self._lance_uri, schema=table.schema, storage_options=options,
                                       mode="create"), True
            except OSError as error:
                if "already exists" not in str(error):
                    raise
        dataset = lance.dataset(self._lance_uri, storage_options=options)
        # Lance compares the names of list items too, which differ between writers (Parquet names them "element",
        # Arrow "item"): the rows take the table's own.
        return write_fragments(table.cast(dataset.schema), dataset, storage_options=options), False

    # ---- the committer ---------------------------------------------------------------------------------------
    def commit_staged(self, staged: list[StagedVideos], replace: bool = False) -> None:
        """Make staged rows visible: their Parquet files in videos/, then their fragments in one Lance commit.

        replace: as for `write_videos`, committed rows of the same videos are removed once the new ones are in.
        A crash between the steps leaves what `write_videos` would: `reconcile` copies into LanceDB what only
        Parquet holds, and `remove_orphans` deletes the fragments never committed. After an error the same call
        may be repeated: it does what the failed one left undone, and commits to LanceDB only if that commit did
        not land (a dropped answer leaves it unknown).
        """
        if not staged:
            return
        self._check_lease()
        if not self._marked_unsynced:
            self._set_unsynced_marker(True)
        committed = [self._publish_parquet("videos", s.parquet) for s in staged]
        ids = [video_id for s in staged for video_id in s.video_ids]
        if replace:
            self._remove_parquet_rows(ids, skip_files=committed)
        fragments = [FragmentMetadata.from_json(json.dumps(f)) for s in staged for f in json.loads(s.fragments)]
        repeated = any(s.parquet in self._lance_tried for s in staged)
        self._lance_tried.update(s.parquet for s in staged)
        if repeated and self._landed(fragments, None if replace else ids):
            return
        options = self.lance_options
        if replace or self._lance_version is None:
            table = self.lance_table()
            if table is None:
                # The rows' own schema: the Parquet file's names list items otherwise, and Lance compares names.
                schema = pa.ipc.read_schema(pa.py_buffer(next(s.schema for s in staged if s.schema is not None)))
                self._lance_version = lance.LanceDataset.commit(
                    self._lance_uri, lance.LanceOperation.Overwrite(schema, fragments), storage_options=options).version
                return
            if replace and self._lance_ids_in(table, ids):
                self._delete_from_lance(ids)
            self._lance_version = table.version
        # Based on the last version this store committed or read (opening the table would double a commit's cost):
        # Lance rebases an append over later commits, the table upkeep's compactions and index updates included.
        self._lance_version = lance.LanceDataset.commit(
            self._lance_uri, lance.LanceOperation.Append(fragments), read_version=self._lance_version,
            storage_options=options).version

    def _landed(self, fragments: list[FragmentMetadata], new_ids: list[str] | None) -> bool:
        """Whether a commit of `fragments` is in the table already: one of their data files is in its latest
        version, or (`new_ids`: ids it did not hold before) one of those ids, should compaction have rewritten
        the files since. Notes the version read."""
        table = self.lance_table()
        if table is None:
            return False
        dataset = table.to_lance()
        ours = {data.path for fragment in fragments for data in fragment.files}
        landed = any(data.path in ours for fragment in dataset.get_fragments() for data in fragment.metadata.files)
        landed = landed or bool(new_ids and self._lance_ids_in(table, new_ids))
        self._lance_version = dataset.version
        return landed

    def discard_staged(self, staged: StagedVideos) -> None:
        """Drop a staged Parquet file that will not be committed (its fragments go with `remove_orphans`)."""
        self.fs.delete_file(staged.parquet)

    # ---- cleaning up -----------------------------------------------------------------------------------------
    def remove_orphans(self) -> None:
        """Delete every staged file and every Lance file no version refers to. Only while no writer runs."""
        if self.fs.get_file_info(self._dir("_staging")).type != pafs.FileType.NotFound:
            self.fs.delete_dir_contents(self._dir("_staging"))
        table = self.lance_table()
        if table is not None:
            table.to_lance().cleanup_old_versions(older_than=KEEP_VERSIONS_FOR, delete_unverified=True)
        elif self.fs.get_file_info(self._lance_dir).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self._lance_dir)  # fragments, and no version: nothing in it was ever committed
