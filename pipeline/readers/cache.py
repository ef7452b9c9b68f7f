"""Cached video tokens as training data: a torch Dataset, a padding collate function and a Ray Data reader.

Each item is one video of the compression job's output (Parquet files or the LanceDB table, local or s3://):

    base           float32 [K, D]      the token base
    dynamics       int64   [T, H, W]   cluster id of every frame-grid cell
    cluster_sizes  int64   [K]
    video_id, uri, caption (any manifest column), num_frames, k, encoder, ...   plain Python values

`collate_videos` pads K to the longest video of the batch and returns `base_mask` [B, K] (True = real row);
dynamics maps of different shapes (e.g. frames sampled by --fps) are padded with -1, the "no cluster" id.

Sharding for distributed training (`shard_positions`): the rows are put in storage order (Parquet: file name,
row group, row; LanceDB: row id), rows without the required text (the caption) are left out, and rank r of W takes
the r-th of W contiguous runs of equal length, so the ranks agree without talking to each other and every rank
runs the same number of steps (unequal shards make DDP ranks wait forever at the last all-reduce). As in torch's
DistributedSampler, drop_last=False pads the list by wrapping around to its start (up to W - 1 videos are seen
twice per epoch) and drop_last=True leaves up to W - 1 videos out. Each rank reads the light columns of every
row (the index) but the heavy ones only of the row groups that hold its run (LanceDB: only its rows).
Shards are fixed for a run; each rank shuffles inside its own. Inside a rank, DataLoader workers split the shard
through the sampler as usual. A rank holds its shard's compressed rows in memory as Arrow (about K*D*2 bytes per
video with a float16 base); for corpora larger than that, stream them with `ray_dataset` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from pipeline.store.s3 import repeat_on_store_faults
from pipeline.store.contract import OutputContract, read_contract
from pipeline.store.schema import SCHEMA_VERSION, SchemaVersionError, check_schema_version, compressed_video_from_row
from pipeline.store.storage import OutputStore
from tokendyn import CompressedVideo

SOURCES = ("parquet", "lancedb")
TENSOR_KEYS = ("base", "dynamics", "cluster_sizes")
# Columns `compressed_video_from_row` needs; they are read whatever metadata columns are asked for.
TOKEN_COLUMNS = ("k", "dim", "num_frames", "grid_h", "grid_w", "base", "cluster_sizes", "dynamics", "pooled")
# Large per-video columns that are not handed out as metadata.
HEAVY_COLUMNS = ("base", "cluster_sizes", "dynamics", "pooled")
PAD_CELL = -1  # dynamics value of padded cells: tokendyn.CrossDynamicsAttention counts them in no cluster


class EmptyCacheError(FileNotFoundError):
    """The output root holds no compressed videos (wrong path, or the job has not written any yet)."""


class MissingColumnError(KeyError):
    """The cache has no column of that name (e.g. no caption column: compress from a manifest that has one)."""

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------------------------
# reading the rows of one shard


def shard_positions(count: int, rank: int, world_size: int, *, drop_last: bool = False) -> list[int]:
    """Positions in [0, count) that rank `rank` of `world_size` reads: one contiguous run, the same length on
    every rank, as torch's DistributedSampler makes them.

    drop_last=False pads: the list is extended by wrapping around to its start until it divides evenly, so up to
    world_size - 1 videos are seen twice per epoch. drop_last=True drops the up to world_size - 1 last ones.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    per_rank = count // world_size if drop_last or count == 0 else -(-count // world_size)
    return [position % count for position in range(rank * per_rank, (rank + 1) * per_rank)]


def shard_video_ids(video_ids: Sequence[str], rank: int, world_size: int, *, drop_last: bool = False) -> list[str]:
    """The ids rank `rank` reads when the order is by video id (`shard_positions` over the sorted ids)."""
    ordered = sorted(video_ids)
    return [ordered[position] for position in shard_positions(len(ordered), rank, world_size, drop_last=drop_last)]


def _default_rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise those of an initialised torch.distributed group; otherwise a single rank."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise ValueError("give both rank and world_size, or neither")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_row_versions(versions: pa.ChunkedArray, where: str) -> None:
    """Every row must carry this pipeline's schema version (the file metadata is checked by OutputStore)."""
    found = set(pc.unique(versions).to_pylist())
    if found != {SCHEMA_VERSION}:
        raise SchemaVersionError(
            f"{where} holds rows of schema version(s) {sorted(found, key=str)}; this pipeline reads version "
            f"{SCHEMA_VERSION}. Recompress into a new output root.")


def _columns_to_read(schema: pa.Schema, metadata_columns: Sequence[str] | None) -> list[str]:
    light = [name for name in schema.names if name not in HEAVY_COLUMNS]
    wanted = light if metadata_columns is None else ["video_id", "uri", *metadata_columns]
    unknown = sorted(set(wanted) - set(schema.names))
    if unknown:
        raise KeyError(f"the cache has no column(s) {unknown}; it has {schema.names}")
    return list(dict.fromkeys([*wanted, *TOKEN_COLUMNS]))


def _index_columns(schema: pa.Schema, require_text: str | None) -> list[str]:
    if require_text is not None and require_text not in schema.names:
        raise MissingColumnError(f"the cache has no column {require_text!r}; its columns are {schema.names}")
    return list(dict.fromkeys(["video_id", "schema_version", *([require_text] if require_text else [])]))


def _usable(index: pa.Table, require_text: str | None) -> np.ndarray:
    """Positions of the index rows to train on: all, or those whose `require_text` is a non-blank string (or, for a
    list column such as several answers per video, a non-empty list)."""
    if require_text is None:
        return np.arange(index.num_rows)
    column = index.column(require_text)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        present = pc.greater(pc.list_value_length(column), 0)
    else:
        present = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    return np.flatnonzero(pc.fill_null(present, False).to_numpy(zero_copy_only=False))


def _parquet_dataset(store: OutputStore) -> pads.FileSystemDataset:
    try:
        return pads.dataset(f"{store.path}/videos", filesystem=store.fs, format="parquet")
    except FileNotFoundError as error:
        raise EmptyCacheError(f"no compressed videos under {store.root}/videos; run jobs/compress_corpus.py "
                              f"--output {store.root} first") from error


def parquet_shard_plan(store: OutputStore, rank: int, world_size: int, *, require_text: str | None = None,
                       drop_last: bool = False) -> tuple[pa.Table, dict[tuple[str, int], list[int]]]:
    """What rank `rank` reads from the Parquet files: (the light index of all rows, {(file, row group): rows}).

    Only light columns are read for the index (from every file); the rank's positions (`shard_positions` over the
    usable rows in storage order: file name, row group, row) then name the row groups whose heavy columns it reads,
    so each rank reads its own runs of row groups and not the others'.
    """
    dataset = _parquet_dataset(store)
    fragments = sorted(dataset.get_fragments(), key=lambda fragment: fragment.path)
    if not fragments:
        raise EmptyCacheError(f"no compressed videos under {store.root}/videos; run jobs/compress_corpus.py "
                              f"--output {store.root} first")
    # storage order: rows numbered file by file (sorted by name), row group by row group
    groups = []  # (file, row group id, first row, row count)
    first = 0
    for fragment in fragments:
        for group in fragment.row_groups:
            groups.append((fragment.path, group.id, first, group.num_rows))
            first += group.num_rows
    check_schema_version(fragments[0].physical_schema, f"{store.root}/videos")
    index = pads.dataset([fragment.path for fragment in fragments], filesystem=store.fs,
                         format="parquet").to_table(columns=_index_columns(dataset.schema, require_text))
    usable = _usable(index, require_text)
    mine = usable[shard_positions(len(usable), rank, world_size, drop_last=drop_last)]
    starts = np.array([group[2] for group in groups])
    plan: dict[tuple[str, int], list[int]] = {}
    for row in mine.tolist():
        path, group_id, group_first, _ = groups[int(np.searchsorted(starts, row, side="right")) - 1]
        plan.setdefault((path, group_id), []).append(row - group_first)
    return index, plan


def _read_parquet_shard(store: OutputStore, metadata_columns, rank: int, world_size: int,
                        require_text: str | None, drop_last: bool) -> pa.Table:
    index, plan = parquet_shard_plan(store, rank, world_size, require_text=require_text, drop_last=drop_last)
    if index.num_rows == 0:
        raise EmptyCacheError(f"no compressed videos under {store.root}/videos; run jobs/compress_corpus.py "
                              f"--output {store.root} first")
    _check_row_versions(index.column("schema_version"), f"{store.root}/videos")
    dataset = _parquet_dataset(store)
    columns = _columns_to_read(dataset.schema, metadata_columns)
    fragments = {fragment.path: fragment for fragment in dataset.get_fragments()}
    parts = [fragments[path].subset(row_group_ids=[group_id]).to_table(columns=columns).take(rows)
             for (path, group_id), rows in plan.items()]
    if not parts:  # more ranks than videos, with drop_last
        return pa.schema([dataset.schema.field(name) for name in columns]).empty_table()
    return pa.concat_tables(parts)


def _read_lancedb_shard(store: OutputStore, metadata_columns, rank: int, world_size: int,
                        require_text: str | None, drop_last: bool) -> pa.Table:
    lance = store.lance_table()  # raises SchemaVersionError on another version
    if lance is None or lance.count_rows() == 0:
        raise EmptyCacheError(f"no LanceDB table of compressed videos at {store.lancedb_uri}; run "
                              f"jobs/compress_corpus.py --output {store.root} first")
    index = (lance.search().select(_index_columns(lance.schema, require_text)).with_row_id(True).limit(None)
             .to_arrow())
    _check_row_versions(index.column("schema_version"), store.lancedb_uri)
    # storage order here is the row id order; take_row_ids reads only the rows asked for
    index = index.sort_by("_rowid")
    usable = _usable(index, require_text)
    mine = usable[shard_positions(len(usable), rank, world_size, drop_last=drop_last)]
    columns = _columns_to_read(lance.schema, metadata_columns)
    if not len(mine):
        return pa.schema([lance.schema.field(name) for name in columns]).empty_table()
    unique = list(dict.fromkeys(index.column("_rowid").take(mine).to_pylist()))
    rows = lance.take_row_ids(unique).select(columns).to_arrow()
    # take_row_ids may return rows in any order: put them back in the order asked for (padding repeats some)
    by_id = {video_id: position for position, video_id in enumerate(rows.column("video_id").to_pylist())}
    return rows.take([by_id[video_id] for video_id in index.column("video_id").take(mine).to_pylist()]).select(columns)


# ---------------------------------------------------------------------------------------------------------------
# one Arrow row -> one item


def _row_values(table: pa.Table, index: int) -> dict:
    """Row `index` as Python values, with the vector columns as numpy arrays (to_pylist would box every float)."""
    row = {}
    for name in table.column_names:
        cell = table.column(name)[index]
        if name == "base":
            row[name] = cell.values.flatten().to_numpy(zero_copy_only=False).reshape(len(cell), -1)
        elif name in ("pooled", "cluster_sizes"):
            row[name] = cell.values.to_numpy(zero_copy_only=False)
        else:
            row[name] = cell.as_py()
    return row


def item_from_row(row: dict) -> dict:
    """A stored row (Python/numpy values) -> the training item: token tensors plus the light metadata."""
    return _item(compressed_video_from_row(row), {name: value for name, value in row.items()
                                                  if name not in HEAVY_COLUMNS})


def item_from_video(video: CompressedVideo, base_dtype: str, **metadata) -> dict:
    """A video compressed just now -> the item the cache would hand out for it once stored with `base_dtype`
    (the base goes through the same rounding), so fresh and cached tokens of one video are identical."""
    return _item(CompressedVideo.from_storage(video.to_storage(base_dtype=base_dtype)), metadata)


def _item(video: CompressedVideo, metadata: dict) -> dict:
    return {**metadata, "base": torch.as_tensor(video.base, dtype=torch.float32),
            "dynamics": torch.as_tensor(video.dynamics, dtype=torch.int64),
            "cluster_sizes": torch.as_tensor(video.sizes, dtype=torch.int64)}


class CachedTokenDataset(Dataset):
    """Map-style Dataset over the compressed videos of one output root (this rank's shard of them).

    root: the job's --output (local path or s3://bucket/prefix). source: "parquet" (the files under videos/) or
    "lancedb" (the table kept in step with them); both hold the same rows. metadata_columns: the light columns
    to hand out besides video_id and uri (default: all of them, e.g. caption, num_frames, encoder).
    rank / world_size: this process's shard; default from torch.distributed when it is initialised.
    drop_last: how shards are made equal (see `shard_positions`): False repeats up to world_size - 1 videos,
    True leaves up to world_size - 1 out. require_text: keep only rows whose column of that name is a non-blank
    string (e.g. the caption), decided before sharding so the shards stay equal.
    Items are ordered by video_id.
    """

    def __init__(self, root: str, *, source: str = "parquet", metadata_columns: Sequence[str] | None = None,
                 rank: int | None = None, world_size: int | None = None, s3_endpoint_url: str | None = None,
                 require_text: str | None = None, drop_last: bool = False):
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
        self.root, self.source = root, source
        self.rank, self.world_size = _default_rank_and_world_size(rank, world_size)
        self.store = OutputStore(root, s3_endpoint_url=s3_endpoint_url)
        read_shard = _read_parquet_shard if source == "parquet" else _read_lancedb_shard
        # Repeated after a store fault its clients' retries did not ride out (a response cut mid-body): reading twice
        # is harmless.
        rows = repeat_on_store_faults(read_shard, self.store, metadata_columns, self.rank, self.world_size,
                                      require_text, drop_last)
        self.rows = rows.sort_by("video_id").combine_chunks()

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        return item_from_row(_row_values(self.rows, index % len(self)))

    def settings(self) -> OutputContract:
        """What the cached videos were made with (encoder, sampling, K, seed): the output's recorded contract.
        Raises pipeline.store.contract.SettingsUnknown for an old output whose settings cannot be told for sure."""
        return read_contract(self.store)

    @property
    def dim(self) -> int:
        """D, the width of the base vectors (one encoder per output root)."""
        dims = set(self.rows.column("dim").to_pylist())
        if len(dims) != 1:
            raise ValueError(f"{self.root} mixes token widths {sorted(dims)}; train on one encoder's output")
        return dims.pop()


# ---------------------------------------------------------------------------------------------------------------
# batching


def _pad_dynamics(maps: list[torch.Tensor]) -> torch.Tensor:
    """[T, H, W] maps -> [B, Tmax, Hmax, Wmax], padded at the end of each axis with -1 (a cell of no cluster)."""
    t, h, w = (max(m.shape[axis] for m in maps) for axis in range(3))
    return torch.stack([F.pad(m, (0, w - m.shape[2], 0, h - m.shape[1], 0, t - m.shape[0]), value=PAD_CELL)
                        for m in maps])


def collate_videos(items: Sequence[dict]) -> dict:
    """Items -> a batch: tensors padded along K (and T, H, W), a mask, and the metadata as lists.

    base [B, Kmax, D] float32 (zeros in padding), base_mask [B, Kmax] bool (True = real base row),
    cluster_sizes [B, Kmax] int64 (0 in padding), dynamics [B, Tmax, Hmax, Wmax] int64 (-1 in padding, which
    tokendyn.CrossDynamicsAttention reads as no cell), and for every other key a list.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    base = pad_sequence([item["base"] for item in items], batch_first=True)
    k = torch.tensor([len(item["base"]) for item in items])
    batch = {
        "base": base,
        "base_mask": torch.arange(base.shape[1]) < k[:, None],
        "cluster_sizes": pad_sequence([item["cluster_sizes"] for item in items], batch_first=True),
        "dynamics": _pad_dynamics([item["dynamics"] for item in items]),
    }
    for name in items[0]:
        if name not in TENSOR_KEYS:
            batch[name] = [item[name] for item in items]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


def _items_from_arrow_batch(batch: pa.Table) -> dict[str, list]:
    """map_batches body: stored rows -> item columns (tensors become numpy arrays, ragged along K)."""
    items = [item_from_row(_row_values(batch, index)) for index in range(batch.num_rows)]
    columns = {name: [item[name] for item in items] for name in items[0]} if items else {}
    for name in TENSOR_KEYS:
        if name in columns:
            columns[name] = [tensor.numpy() for tensor in columns[name]]
    return columns


def ray_dataset(root: str, *, metadata_columns: Sequence[str] | None = None, s3_endpoint_url: str | None = None,
                override_num_blocks: int | None = None):
    """A Ray Data Dataset of items streamed from the Parquet files under `root`/videos.

    Batch it for torch with `ds.iter_torch_batches(batch_size=..., collate_fn=CollateRayBatch())`; Ray Train
    workers get their share through `ray.train.get_dataset_shard`.
    """
    import ray.data

    store = OutputStore(root, s3_endpoint_url=s3_endpoint_url)
    index = store.read_videos(columns=["video_id", "schema_version"])
    if index is None or index.num_rows == 0:
        raise EmptyCacheError(f"no compressed videos under {root}/videos; run jobs/compress_corpus.py "
                              f"--output {root} first")
    _check_row_versions(index.column("schema_version"), f"{root}/videos")
    columns = _columns_to_read(_parquet_dataset(store).schema, metadata_columns)
    context = ray.data.DataContext.get_current()
    newer_reader = context.use_datasource_v2
    # Ray's newer Parquet reader merges small files into one read task whatever override_num_blocks asks (a
    # job's files are often small), and a reader of the blocks gets nothing until the whole merged block is done;
    # the older one honours it. The choice is made when the plan is built.
    context.use_datasource_v2 = newer_reader and override_num_blocks is None
    try:
        videos = ray.data.read_parquet(f"{store.path}/videos", filesystem=store.fs, file_extensions=["parquet"],
                                       override_num_blocks=override_num_blocks)
    finally:
        context.use_datasource_v2 = newer_reader
    return (videos.select_columns(columns)
            .map_batches(_items_from_arrow_batch, batch_format="pyarrow", batch_size=None))  # block by block


def python_value(value):
    return value.item() if isinstance(value, np.generic) else value


class CollateRayBatch(NumpyBatchCollateFn):
    """`iter_torch_batches` collate_fn: Ray's column batch -> the same padded batch as `collate_videos`."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        names = list(batch)
        items = []
        for index in range(len(batch[names[0]])):
            # numpy scalars back to Python values, so metadata looks the same as from CachedTokenDataset
            item = {name: python_value(batch[name][index]) for name in names}
            for name in TENSOR_KEYS:
                item[name] = torch.from_numpy(np.array(item[name]))  # a copy: Ray's buffers are read-only
            items.append(item)
        return collate_videos(items)
