"""pipeline.readers.cache: items, sharding across ranks and DataLoader workers, padding, Parquet vs LanceDB, Ray Data."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import tokendyn
from pipeline.readers.cache import (
    CachedTokenDataset, CollateRayBatch, EmptyCacheError, MissingColumnError, collate_videos, parquet_shard_plan,
    ray_dataset, shard_positions, shard_video_ids,
)
from pipeline.store.schema import SCHEMA_VERSION_KEY, SchemaVersionError, now_utc, video_row, video_schema
from pipeline.store.storage import OutputStore

DIM, FRAMES, GRID = 8, 2, (3, 3)
NUM_VIDEOS = 7
KS = (3, 5, 4)  # videos get different K, so batches need padding


def compressed(index: int) -> tokendyn.CompressedVideo:
    generator = torch.Generator().manual_seed(index)
    tokens = torch.randn(FRAMES, *GRID, DIM, generator=generator)
    return tokendyn.compress(tokens, k=KS[index % len(KS)], seed=0)


def video_table(indices, schema_version_metadata: bytes | None = None) -> pa.Table:
    schema = video_schema(DIM, "float32", [pa.field("caption", pa.string())])
    if schema_version_metadata is not None:
        schema = schema.with_metadata({SCHEMA_VERSION_KEY: schema_version_metadata})
    rows = []
    for index in indices:
        stored = video_row(compressed(index), frame_indices=list(range(FRAMES)), fps=12.0, source_frames=24,
                           encoder="test-encoder", encoder_layer=None, base_dtype="float32", created_at=now_utc())
        if schema_version_metadata is not None:
            stored["schema_version"] = int(schema_version_metadata)
        rows.append({"video_id": f"video-{index:02d}", "uri": f"/videos/{index:02d}.mp4",
                     "caption": f"caption of video {index}", **stored})
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> str:
    """Seven videos written in two commits (two Parquet files, two LanceDB merges), as the job would."""
    root = str(tmp_path_factory.mktemp("cache"))
    store = OutputStore(root)
    store.write_videos(video_table(range(0, 4)))
    store.write_videos(video_table(range(4, NUM_VIDEOS)))
    return root


ALL_IDS = {f"video-{index:02d}" for index in range(NUM_VIDEOS)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- sharding --------------------------------------------------------------------------------------------------


def test_two_ranks_get_equal_shards_that_together_cover_every_video(cache_root):
    shards = [[item["video_id"] for item in CachedTokenDataset(cache_root, rank=rank, world_size=2)]
              for rank in (0, 1)]
    seen = shards[0] + shards[1]
    assert [len(shard) for shard in shards] == [4, 4]  # equal, so DDP ranks run the same number of steps
    assert set(seen) == ALL_IDS and len(seen) == NUM_VIDEOS + 1  # 7 videos padded to 8: one is seen twice


def test_drop_last_gives_equal_shards_without_repeats(cache_root):
    shards = [[item["video_id"] for item in CachedTokenDataset(cache_root, rank=rank, world_size=2, drop_last=True)]
              for rank in (0, 1)]
    seen = shards[0] + shards[1]
    assert [len(shard) for shard in shards] == [3, 3] and len(set(seen)) == 6 and set(seen) <= ALL_IDS


def test_as_many_ranks_as_videos_see_every_video_exactly_once(cache_root):
    seen = [item["video_id"] for rank in range(NUM_VIDEOS)
            for item in CachedTokenDataset(cache_root, rank=rank, world_size=NUM_VIDEOS)]
    assert sorted(seen) == sorted(ALL_IDS)


def test_dataloader_workers_with_sharding_see_every_video(cache_root):
    seen = []
    for rank in (0, 1):
        dataset = CachedTokenDataset(cache_root, rank=rank, world_size=2)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_videos)
        seen += [video_id for batch in loader for video_id in batch["video_id"]]
    assert set(seen) == ALL_IDS and len(seen) == 8


def test_shard_positions_match_distributed_samplers_rule():
    """Brute force over sizes: equal lengths, contiguous runs, every position covered (pad) or none repeated
    (drop), exactly as many as torch's DistributedSampler gives each rank."""
    from torch.utils.data.distributed import DistributedSampler

    for count in range(0, 12):
        for world_size in range(1, 6):
            for drop_last in (False, True):
                shards = [shard_positions(count, rank, world_size, drop_last=drop_last)
                          for rank in range(world_size)]
                flat = [position for shard in shards for position in shard]
                if count:
                    expected = len(DistributedSampler(range(count), num_replicas=world_size, rank=0,
                                                      drop_last=drop_last, shuffle=False))
                    assert {len(shard) for shard in shards} == {expected}
                if drop_last:
                    assert len(set(flat)) == len(flat) == count - count % world_size
                elif count:
                    assert set(flat) == set(range(count)) and len(flat) - count < world_size
                assert all(0 <= position < max(count, 1) for position in flat)


def test_shard_ids_do_not_depend_on_input_order():
    ids = [f"v{i}" for i in range(10)]
    assert shard_video_ids(ids, 1, 3) == shard_video_ids(list(reversed(ids)), 1, 3) == ["v4", "v5", "v6", "v7"]


def test_each_rank_reads_only_the_row_groups_of_its_shard(tmp_path):
    store = OutputStore(str(tmp_path))
    for first in range(0, 8, 2):  # four files of two videos
        store.write_videos(video_table(range(first, first + 2)))
    plans = [parquet_shard_plan(store, rank, 4)[1] for rank in range(4)]
    assert all(len(plan) == 1 and list(plan.values()) == [[0, 1]] for plan in plans)
    assert len({group for plan in plans for group in plan}) == 4  # four different row groups
    ids = [[item["video_id"] for item in CachedTokenDataset(str(tmp_path), rank=rank, world_size=4)]
           for rank in range(4)]
    assert sorted(video_id for shard in ids for video_id in shard) == [f"video-{i:02d}" for i in range(8)]


def test_rows_without_the_required_text_are_left_out_before_sharding(tmp_path):
    table = video_table(range(5))
    captions = pa.array(["a", None, "  ", "d", "e"])
    table = table.set_column(table.schema.get_field_index("caption"), "caption", captions)
    OutputStore(str(tmp_path)).write_videos(table)
    for source in ("parquet", "lancedb"):
        shards = [[item["caption"] for item in CachedTokenDataset(str(tmp_path), source=source, rank=rank,
                                                                  world_size=2, require_text="caption")]
                  for rank in (0, 1)]
        assert [len(shard) for shard in shards] == [2, 2] and set(shards[0] + shards[1]) == {"a", "d", "e"}
    with pytest.raises(MissingColumnError, match="no column 'summary'"):
        CachedTokenDataset(str(tmp_path), require_text="summary")


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_is_a_clear_error(rank, world_size):
    with pytest.raises(ValueError, match="rank"):
        shard_video_ids(["a"], rank, world_size)


# ---- items and batches -----------------------------------------------------------------------------------------


def test_items_hold_the_stored_tokens_and_manifest_columns(cache_root):
    dataset = CachedTokenDataset(cache_root)
    item = dataset[1]
    expected = compressed(1)
    assert item["video_id"] == "video-01" and item["caption"] == "caption of video 1"
    assert item["base"].dtype == torch.float32 and item["base"].shape == (KS[1], DIM)
    torch.testing.assert_close(item["base"], expected.base.float())
    assert item["dynamics"].dtype == torch.int64 and item["dynamics"].shape == (FRAMES, *GRID)
    assert torch.equal(item["dynamics"], expected.dynamics.long())
    assert item["cluster_sizes"].sum().item() == FRAMES * GRID[0] * GRID[1]
    assert item["num_frames"] == FRAMES and item["encoder"] == "test-encoder"
    assert "pooled" not in item


def test_metadata_columns_limit_what_items_carry(cache_root):
    item = CachedTokenDataset(cache_root, metadata_columns=["caption"])[0]
    assert "caption" in item and "encoder" not in item and "created_at" not in item
    with pytest.raises(KeyError, match="no_such_column"):
        CachedTokenDataset(cache_root, metadata_columns=["no_such_column"])


def test_padded_batch_masks_the_padding(cache_root):
    dataset = CachedTokenDataset(cache_root)
    items = [dataset[0], dataset[1]]  # K = 3 and K = 5
    batch = collate_videos(items)
    assert batch["base"].shape == (2, 5, DIM)
    assert batch["base_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(batch["base"][0, :3], items[0]["base"])
    assert not batch["base"][0, 3:].any() and not batch["cluster_sizes"][0, 3:].any()
    assert batch["dynamics"].shape == (2, FRAMES, *GRID)
    assert batch["caption"] == ["caption of video 0", "caption of video 1"]


def test_dynamics_of_different_shapes_are_padded_with_no_cluster(cache_root):
    item = CachedTokenDataset(cache_root)[0]
    shorter = {**item, "dynamics": item["dynamics"][:1, :2]}  # 1 frame of a 2 x 3 grid
    batch = collate_videos([item, shorter])
    assert batch["dynamics"].shape == (2, FRAMES, *GRID)
    assert torch.equal(batch["dynamics"][1, :1, :2], shorter["dynamics"])
    assert (batch["dynamics"][1, 1:] == -1).all() and (batch["dynamics"][1, :, 2:] == -1).all()
    assert torch.equal(batch["dynamics"][0], item["dynamics"])


# ---- sources ---------------------------------------------------------------------------------------------------


def comparable(item: dict) -> dict:
    return {name: value.tolist() if isinstance(value, torch.Tensor) else value for name, value in item.items()}


def test_parquet_and_lancedb_give_the_same_items(cache_root):
    from_parquet = CachedTokenDataset(cache_root, source="parquet")
    from_lancedb = CachedTokenDataset(cache_root, source="lancedb")
    assert len(from_parquet) == len(from_lancedb) == NUM_VIDEOS
    for a, b in zip(from_parquet, from_lancedb):
        assert comparable(a) == comparable(b)


def test_lancedb_shards_match_parquet_shards(cache_root):
    for rank in (0, 1):
        ids = lambda source: [item["video_id"] for item in  # noqa: E731
                              CachedTokenDataset(cache_root, source=source, rank=rank, world_size=2)]
        assert ids("parquet") == ids("lancedb")


def test_reads_a_cache_on_s3(moto_s3_endpoint, s3_bucket, cache_root):
    root = f"s3://{s3_bucket}/corpus"
    OutputStore(root, s3_endpoint_url=moto_s3_endpoint).write_videos(video_table(range(NUM_VIDEOS)))
    local = [comparable(item) for item in CachedTokenDataset(cache_root, metadata_columns=["caption"])]
    for source in ("parquet", "lancedb"):
        remote = CachedTokenDataset(root, source=source, metadata_columns=["caption"],
                                    s3_endpoint_url=moto_s3_endpoint)
        assert [comparable(item) for item in remote] == local


@pytest.mark.parametrize("source", ["parquet", "lancedb"])
def test_missing_cache_is_a_clear_error(tmp_path, source):
    with pytest.raises(EmptyCacheError, match="compress_corpus"):
        CachedTokenDataset(str(tmp_path / "nothing-here"), source=source)


@pytest.mark.parametrize("source", ["parquet", "lancedb"])
def test_cache_of_another_schema_version_is_refused(tmp_path, source):
    OutputStore(str(tmp_path)).write_videos(video_table(range(2), schema_version_metadata=b"99"))
    with pytest.raises(SchemaVersionError, match="99"):
        CachedTokenDataset(str(tmp_path), source=source)


# ---- Ray Data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    started = not ray.is_initialized()
    if started:
        # address="local": a private cluster for this test, never one that happens to run on the machine
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_dataset_batches_match_the_torch_dataset(cache_root, local_ray):
    expected = {item["video_id"]: item for item in CachedTokenDataset(cache_root)}
    seen = []
    for batch in ray_dataset(cache_root, override_num_blocks=1).iter_torch_batches(batch_size=3, collate_fn=CollateRayBatch()):
        for row, video_id in enumerate(batch["video_id"]):
            item = expected[video_id]
            k = len(item["base"])
            assert batch["base_mask"][row].sum().item() == k
            torch.testing.assert_close(batch["base"][row, :k], item["base"])
            assert torch.equal(batch["dynamics"][row], item["dynamics"])
            assert batch["caption"][row] == item["caption"]
            seen.append(video_id)
    assert sorted(seen) == sorted(ALL_IDS)


def test_ray_dataset_reads_as_many_blocks_as_asked_from_small_files(tmp_path, local_ray):
    """Readers that stream (jobs/ask.py writes a part file per block) need blocks of the size they ask for; Ray's
    newer Parquet reader would merge the small files into one block."""
    store = OutputStore(str(tmp_path))
    for start in range(0, NUM_VIDEOS, 2):
        store.write_videos(video_table(range(start, min(start + 2, NUM_VIDEOS))))
    blocks = ray_dataset(str(tmp_path), override_num_blocks=4).materialize()
    assert blocks.num_blocks() == 4 and blocks.count() == NUM_VIDEOS
    assert local_ray.data.DataContext.get_current().use_datasource_v2  # the setting is left as it was


def test_settings_are_the_outputs_recorded_contract(tmp_path):
    from pipeline.job.config import JobConfig
    from pipeline.store.contract import SettingsUnknown, contract_of_rows

    store = OutputStore(str(tmp_path / "out"))
    table = video_table(range(2))
    store.write_videos(table)
    with pytest.raises(SettingsUnknown, match="records no settings"):  # rows alone do not tell seed, sampling
        CachedTokenDataset(store.root).settings()
    job = JobConfig(input="unused", encoder="test-encoder", frames=FRAMES, k=0, k_min=3, k_max=5, seed=7)
    store.write_settings(contract_of_rows(job, table).as_json("test"))
    store.write_run_summary({"config": {"frames": 99, "k": 1, "seed": 1}})  # the last run.json does not count
    settings = CachedTokenDataset(store.root).settings()
    assert (settings.encoder, settings.dim, settings.frames, settings.k, settings.seed) == (
        "test-encoder", DIM, FRAMES, None, 7)
    assert settings.compress_kwargs() == {"k": None, "k_min": 3, "k_max": 5, "k_rule": "fidelity",
                                          "target_fidelity": 0.9, "seed": 7}
