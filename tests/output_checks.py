"""What tests check on an output's bytes, local or on S3: the ids LanceDB holds, its data files no version refers
to, and the files left staged."""

from __future__ import annotations

import lance
import pyarrow.fs as pafs

from pipeline.store.storage import OutputStore


def lance_ids(store: OutputStore) -> list[str]:
    """The video ids of the LanceDB table's latest version, sorted, repeats kept ([] without a table)."""
    table = store.lance_table()
    if table is None:
        return []
    return sorted(table.search().select(["video_id"]).limit(None).to_arrow().column("video_id").to_pylist())


def lance_dataset(store: OutputStore, version: int | None = None):
    return lance.dataset(store._lance_uri, version=version, storage_options=store.lance_options)


def unreferenced_lance_files(store: OutputStore) -> set[str]:
    """Data files of the table that no version of it refers to."""
    referenced = {data_file.path for version in lance_dataset(store).versions()
                  for fragment in lance_dataset(store, version["version"]).get_fragments()
                  for data_file in fragment.metadata.files}
    data = pafs.FileSelector(f"{store._lance_dir}/data", allow_not_found=True)
    return {info.base_name for info in store.fs.get_file_info(data)} - referenced


def staged_files(store: OutputStore) -> list[str]:
    return [info.path for info in store.fs.get_file_info(pafs.FileSelector(store._dir("_staging"),
                                                                          allow_not_found=True))]
