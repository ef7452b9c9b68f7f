import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from lancedb.index import IvfSq

import tokendyn
from output_checks import lance_ids
from pipeline.store.schema import (SchemaVersionError, compressed_video_from_row, now_utc, video_row, video_schema)
from pipeline.store.done_ids import _hashes_held, _id_hashes, _merge_hashes
from pipeline.store.lance_table import _trained_partitions, _unindexed_fragments
from pipeline.store.storage import OutputLocked, OutputStore

DIM = 16


def video_table(ids: list[str], *, base_dtype: str = "float32", seed: int = 0) -> pa.Table:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, video_id in enumerate(ids):
        tokens = torch.randn(3, 2, 2, DIM, generator=generator)
        video = tokendyn.compress(tokens, k=4, seed=index)
        rows.append({"video_id": video_id, "uri": f"/videos/{video_id}.mp4", "caption": f"clip {video_id}",
                     **video_row(video, frame_indices=[0, 5, 10], fps=25.0, source_frames=12,
                                 encoder="test-encoder", encoder_layer=None, base_dtype=base_dtype,
                                 created_at=now_utc())})
    return pa.Table.from_pylist(rows, schema=video_schema(DIM, base_dtype, [pa.field("caption", pa.string())]))


def test_rows_round_trip_through_parquet_and_lancedb(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    written = video_table(["a", "b", "c"])
    store.write_videos(written)

    read = store.read_videos().sort_by("video_id")
    assert read.to_pylist() == written.to_pylist()
    assert lance_ids(store) == ["a", "b", "c"]
    lance_row = store.lance_table().search().where("video_id = 'b'").limit(1).to_arrow().to_pylist()[0]
    assert lance_row["dynamics"] == written.to_pylist()[1]["dynamics"]
    assert lance_row["caption"] == "clip b"

    # The stored row rebuilds the exact compressed video (float32 base).
    original = tokendyn.compress(torch.randn(3, 2, 2, DIM, generator=torch.Generator().manual_seed(0)), k=4, seed=0)
    rebuilt = compressed_video_from_row(read.to_pylist()[0])
    assert torch.equal(rebuilt.dynamics, original.dynamics)
    assert torch.equal(rebuilt.base, original.base)


def test_float16_base_is_stored_as_half(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a"], base_dtype="float16"))
    base_type = store.read_videos().schema.field("base").type
    assert base_type.value_type.value_type == pa.float16()


def test_repeated_writes_never_duplicate_lancedb_rows(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))
    store._upsert_lance(video_table(["a", "b"], seed=1))
    assert lance_ids(store) == ["a", "b"]


def test_reconcile_copies_rows_a_crash_left_only_in_parquet(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a"]))
    store._write_parquet("videos", video_table(["b", "c"]))  # as if the process died before the LanceDB write
    assert lance_ids(store) == ["a"]

    assert OutputStore(str(tmp_path / "out")).reconcile() == 2
    assert lance_ids(store) == ["a", "b", "c"]
    assert store.reconcile() == 0


def test_staged_files_are_invisible_to_readers(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a"]))
    staging = tmp_path / "out" / "_staging"
    pq.write_table(video_table(["partial"]), staging / "videos-part-x.parquet")
    (tmp_path / "out" / "videos" / "part-y.parquet.tmp").write_bytes(b"half a file")
    assert store.done_ids() == {"a"}


def test_remove_videos_deletes_from_both_stores(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))
    store.write_videos(video_table(["c"]))
    assert store.remove_videos(["b", "c", "not-there"]) == 2
    assert store.done_ids() == {"a"}
    assert lance_ids(store) == ["a"]
    assert len(list((tmp_path / "out" / "videos").glob("*.parquet"))) == 1  # the emptied file is gone


def test_other_schema_version_gives_a_clear_error(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    table = video_table(["a"])
    store._write_parquet("videos", table.replace_schema_metadata({b"tokendyn.schema_version": b"99"}))
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        store.done_ids()


def test_errors_and_run_summary(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert store.read_errors().num_rows == 0 and store.read_run_summary() is None
    errors = pa.Table.from_pylist([{"video_id": "x", "uri": "/x.mp4", "stage": "decode", "error_type": "DecodeError",
                                    "message": "bad", "run_id": store.run_id, "created_at": now_utc()}])
    store.write_errors(errors)
    assert store.read_errors().column("stage").to_pylist() == ["decode"]
    store.write_run_summary({"ok": 3})
    assert store.read_run_summary() == {"ok": 3}


def test_vector_index_only_once_large_enough(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table([f"v{i}" for i in range(40)]))
    assert not store.build_vector_index(min_rows=1000)
    assert store.build_vector_index(min_rows=20)
    assert store.lance_table().list_indices()


def test_s3_round_trip(moto_s3_endpoint, s3_bucket):
    store = OutputStore(f"s3://{s3_bucket}/out", s3_endpoint_url=moto_s3_endpoint)
    store.write_videos(video_table(["a", "b"]))
    store.write_run_summary({"ok": 2})

    again = OutputStore(f"s3://{s3_bucket}/out", s3_endpoint_url=moto_s3_endpoint)
    assert again.done_ids() == {"a", "b"}
    assert lance_ids(again) == ["a", "b"]
    assert again.read_run_summary() == {"ok": 2}
    pooled = np.asarray(again.read_videos().sort_by("video_id").column("pooled").to_pylist()[0])
    assert pooled.shape == (DIM,)


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    first = OutputStore(str(tmp_path / "out"))
    first.acquire_lock()
    second = OutputStore(str(tmp_path / "out"))
    with pytest.raises(OutputLocked, match=first.run_id):
        second.acquire_lock()
    first.release_lock()
    second.acquire_lock()  # free again
    second.release_lock()

    # A lock whose process is gone (same host) is stale and taken over.
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / "_lock").write_text(json.dumps(
        {"run_id": "old", "host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then"}))
    third = OutputStore(str(tmp_path / "out"))
    third.acquire_lock()
    assert json.loads((tmp_path / "out" / "_lock").read_text())["run_id"] == third.run_id

    # One from another host is kept unless broken explicitly.
    (tmp_path / "out" / "_lock").write_text(json.dumps({"run_id": "remote", "host": "elsewhere", "pid": 1}))
    with pytest.raises(OutputLocked, match="remote"):
        OutputStore(str(tmp_path / "out")).acquire_lock()
    OutputStore(str(tmp_path / "out")).acquire_lock(break_lock=True)


def test_s3_lock_is_exclusive(moto_s3_endpoint, s3_bucket):
    root = f"s3://{s3_bucket}/out"
    first = OutputStore(root, s3_endpoint_url=moto_s3_endpoint)
    first.acquire_lock()
    with pytest.raises(OutputLocked):
        OutputStore(root, s3_endpoint_url=moto_s3_endpoint).acquire_lock()
    first.release_lock()
    OutputStore(root, s3_endpoint_url=moto_s3_endpoint).acquire_lock()


def _slow_lock_reads(monkeypatch, seconds: float = 0.3) -> None:
    """Every contender reads the lock, then pauses: all of them judge the same lock stale before any acts."""
    read = OutputStore._read_lock

    def slow(self):
        found = read(self)
        time.sleep(seconds)
        return found

    monkeypatch.setattr(OutputStore, "_read_lock", slow)


def _contend(root: str, contenders: int, **store_kwargs) -> list[OutputStore]:
    """Let `contenders` stores try to take the lock at once (threads); returns those that got it."""
    stores = [OutputStore(root, **store_kwargs) for _ in range(contenders)]
    start = threading.Barrier(contenders)
    winners = []

    def take(store: OutputStore) -> None:
        start.wait()
        try:
            store.acquire_lock()
        except OutputLocked:
            return
        winners.append(store)

    threads = [threading.Thread(target=take, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in winners:
        store.stop_lease()
    return winners


def test_concurrent_takeovers_of_a_stale_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    _slow_lock_reads(monkeypatch)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lock").write_text(json.dumps(
        {"run_id": "old", "host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then"}))
    winners = _contend(str(out), 4)
    assert len(winners) == 1
    assert json.loads((out / "_lock").read_text())["run_id"] == winners[0].run_id
    assert (out / "_takeovers").exists()
    winners[0].release_lock()  # the claims were only needed while the takeover was contended
    assert sorted(path.name for path in out.iterdir()) == []


def test_concurrent_takeovers_of_an_expired_lease_on_s3_leave_exactly_one_holder(
        moto_s3_endpoint, s3_bucket, s3_client, monkeypatch):
    import json

    _slow_lock_reads(monkeypatch)
    s3_client.put_object(Bucket=s3_bucket, Key="out/_lock", Body=json.dumps(
        {"run_id": "old", "host": "elsewhere", "pid": 1, "token": "t", "expires_at": time.time() - 1}).encode())
    winners = _contend(f"s3://{s3_bucket}/out", 3, s3_endpoint_url=moto_s3_endpoint)
    assert len(winners) == 1
    held = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="out/_lock")["Body"].read())
    assert held["run_id"] == winners[0].run_id
    winners[0].release_lock()
    left = [item["Key"] for item in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    assert left == ["out/"], left


def test_an_expired_lease_from_another_host_is_taken_over_a_live_one_is_not(tmp_path):
    import json

    out = tmp_path / "out"
    remote = OutputStore(str(out), host="pod-a", lease_s=0.6)
    remote.acquire_lock()
    try:
        time.sleep(1.5)  # more than two lease times: only the holder's renewals keep the lease alive
        with pytest.raises(OutputLocked, match=remote.run_id):
            OutputStore(str(out), host="pod-b").acquire_lock()
    finally:
        remote.stop_lease()  # the holder dies without releasing: its lease is no longer renewed
    time.sleep(0.8)
    retry = OutputStore(str(out), host="pod-b")
    retry.acquire_lock()  # no --break-lock needed
    assert json.loads((out / "_lock").read_text())["run_id"] == retry.run_id
    retry.release_lock()
    assert not (out / "_lock").exists()


def test_replacing_rows_keeps_every_video_and_reconcile_finishes_an_interrupted_replacement(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))
    first = {row["video_id"]: row["created_at"] for row in store.read_videos().to_pylist()}

    store.write_videos(video_table(["b"], seed=1), replace=True)
    rows = {row["video_id"]: row["created_at"] for row in store.read_videos().to_pylist()}
    assert store.read_videos().num_rows == 2 and rows["a"] == first["a"] and rows["b"] > first["b"]

    # A crash right after committing a new row for "a": Parquet holds two rows of it, LanceDB the old one.
    store._write_parquet("videos", video_table(["a"], seed=2))
    assert OutputStore(str(tmp_path / "out")).reconcile() == 1
    rows = store.read_videos().to_pylist()
    assert sorted(row["video_id"] for row in rows) == ["a", "b"]
    newest = {row["video_id"]: row["created_at"] for row in rows}
    assert newest["a"] > first["a"]
    in_lance = store.lance_table().search().select(["video_id", "created_at"]).limit(None).to_arrow().to_pylist()
    assert {row["video_id"]: row["created_at"] for row in in_lance} == newest


def test_a_job_whose_lease_was_taken_over_writes_nothing_more(tmp_path):
    import json

    out = tmp_path / "out"
    holder = OutputStore(str(out), lease_s=0.3)
    holder.acquire_lock()
    (out / "_lock").write_text(json.dumps({"run_id": "usurper", "host": "elsewhere", "pid": 1, "token": "other",
                                           "expires_at": time.time() + 60}))
    time.sleep(0.5)  # the holder's next renewal finds another job's lease
    with pytest.raises(OutputLocked, match="was taken over"):
        holder.write_videos(video_table(["a"]))
    holder.release_lock()
    assert json.loads((out / "_lock").read_text())["run_id"] == "usurper"  # not ours to delete
    assert not (out / "videos").exists()


def test_start_over_leaves_only_the_lock_on_s3(moto_s3_endpoint, s3_bucket, s3_client):
    store = OutputStore(f"s3://{s3_bucket}/out", s3_endpoint_url=moto_s3_endpoint)
    store.acquire_lock()
    store.write_videos(video_table(["a", "b"]))
    store.write_errors(pa.Table.from_pylist([{"video_id": "x", "uri": "/x.mp4", "stage": "decode", "error_type": "E",
                                              "message": "bad", "run_id": store.run_id, "created_at": now_utc()}]))
    store.write_settings({"schema_version": 1})
    store.write_run_summary({"ok": 2})
    store.start_over()
    keys = [item["Key"] for item in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert [key for key in keys if not key.endswith("/")] == ["out/_lock"]  # (and maybe an empty folder marker)
    assert store.done_ids() == set() and store.lance_table() is None and store.read_settings() is None
    store.release_lock()


# ---- staying flat with size -------------------------------------------------------------------------------------


def fragment_count(store: OutputStore) -> int:
    return store.lance_table().stats()["fragment_stats"]["num_fragments"]


def test_commits_find_ids_through_a_video_id_index(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))
    store.write_videos(video_table(["c"]))
    (index,) = [i for i in store.lance_table().list_indices() if i.columns == ["video_id"]]
    assert index.index_type == "BTree"


def test_fragments_are_compacted_as_they_pile_up(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.lance_table.COMPACT_AT_NEW_FRAGMENTS", 4)
    store = OutputStore(str(tmp_path / "out"))
    for i in range(13):
        store.write_videos(video_table([f"v{i}"], seed=i))
        assert len(_unindexed_fragments(store.lance_table().to_lance())) < 4
        assert fragment_count(store) < 4 + 3
    assert lance_ids(store) == sorted(f"v{i}" for i in range(13))
    (index,) = [i for i in store.lance_table().list_indices() if i.columns == ["video_id"]]
    assert store.lance_table().index_stats(index.name).num_unindexed_rows < 4


def test_compaction_leaves_full_fragments_alone(tmp_path, monkeypatch):
    """No compaction rewrites a fragment that reached the target size, so its cost does not grow with the table."""
    monkeypatch.setattr("pipeline.store.lance_table.COMPACT_AT_NEW_FRAGMENTS", 4)
    monkeypatch.setattr("pipeline.store.lance_table.COMPACTED_FRAGMENT_ROWS", 8)
    store = OutputStore(str(tmp_path / "out"))
    full: dict[int, int] = {}  # fragment id -> rows, for every fragment that reached the target
    for i in range(40):
        store.write_videos(video_table([f"v{i}-{j}" for j in range(3)], seed=i))
        fragments = {f.fragment_id: f.metadata.physical_rows for f in store.lance_table().to_lance().get_fragments()}
        assert all(fragments.get(fragment_id) == rows for fragment_id, rows in full.items())
        full.update({fragment_id: rows for fragment_id, rows in fragments.items() if rows >= 8})
    assert len(full) >= 8
    assert lance_ids(store) == sorted(f"v{i}-{j}" for i in range(40) for j in range(3))


def test_vector_index_is_trained_once_then_extended_until_the_table_outgrows_it(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.lance_table.MAX_ROWS_PER_PARTITION", 10)  # from 100 rows on: rows / 10
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table([f"v{i}" for i in range(40)]))
    assert store.build_vector_index(min_rows=20)

    def pooled_index():
        (index,) = [i for i in store.lance_table().list_indices() if i.columns == ["pooled"]]
        return index

    first = pooled_index()
    assert _trained_partitions(first.name) == 6  # sqrt(40)
    store.write_videos(video_table([f"w{i}" for i in range(40)], seed=1))  # 80 rows: sqrt grows 6 -> 8
    assert store.build_vector_index(min_rows=20)
    assert pooled_index().name == first.name  # extended, not retrained (the name carries the partitions)
    assert store.lance_table().index_stats(first.name).num_unindexed_rows == 0

    store.write_videos(video_table([f"x{i}" for i in range(100)], seed=2))  # 180 rows: 18 >= 2 * 6
    assert store.build_vector_index(min_rows=20)
    assert _trained_partitions(pooled_index().name) == 18  # retrained with more partitions
    assert store.lance_table().index_stats(pooled_index().name).num_indexed_rows == 180


def test_a_vector_index_of_an_earlier_layout_is_replaced_at_the_next_build(tmp_path):
    """Outputs written before the RaBitQ index carry an IVF-SQ index named pooled_ivf<partitions>."""
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table([f"v{i}" for i in range(40)]))
    store.lance_table().create_index("pooled", config=IvfSq(distance_type="cosine", num_partitions=4),
                                     name="pooled_ivf4")
    assert store.build_vector_index(min_rows=20)
    (index,) = [i for i in store.lance_table().list_indices() if i.columns == ["pooled"]]
    assert index.index_type == "IvfRq" and _trained_partitions(index.name) == 6


def test_resume_after_a_clean_run_reads_no_parquet(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    store.write_videos(video_table(["a", "b", "c"]))
    store.finish_run()

    resumed = OutputStore(str(tmp_path / "out"))

    def no_parquet_reads(*args, **kwargs):
        raise AssertionError("start-up read the Parquet files")

    monkeypatch.setattr(resumed, "read_videos", no_parquet_reads)
    assert resumed.reconcile() == 0
    assert resumed.done_ids(["a", "c", "new", "o'brien"]) == {"a", "c"}


def test_done_ids_among_a_listing_agrees_with_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.done_ids.ID_LOOKUP_CHUNK", 3)
    store = OutputStore(str(tmp_path / "out"))
    held = [f"v{i}" for i in range(30)] + ["it's", 'say "hi"']
    store.write_videos(video_table(held))
    store.finish_run()
    resumed = OutputStore(str(tmp_path / "out"))
    resumed.reconcile()
    rng = np.random.default_rng(0)
    for size in (0, 1, 5, 7, 40):  # indexed lookups in chunks, then (40 > a quarter of the table) one id scan
        listing = list(rng.choice(held + [f"new{i}" for i in range(20)], size=size, replace=False))
        assert resumed.done_ids(listing) == set(listing) & set(held) == store.done_ids() & set(listing)


def test_reconcile_after_a_crash_while_removing_drops_what_parquet_no_longer_holds(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a"]))
    store.write_videos(video_table(["b"]))
    # As if --overwrite died between rewriting Parquet and deleting from LanceDB: "b" is left only in LanceDB.
    (tmp_path / "out" / "videos" / f"part-{store.run_id}-00001.parquet").unlink()
    assert lance_ids(store) == ["a", "b"]

    resumed = OutputStore(str(tmp_path / "out"))
    assert resumed.reconcile() == 0
    assert lance_ids(resumed) == ["a"]
    assert resumed.done_ids(["a", "b"]) == {"a"}


def test_a_table_whose_first_commit_never_finished_is_rebuilt_from_parquet(output_root):
    """A crash inside LanceDB's first commit leaves data files but no version: the table is listed yet unopenable."""
    root, options = output_root
    store = OutputStore(root, **options)
    store.write_videos(video_table(["a", "b"]))
    versions = f"{store.lancedb_uri.split('://')[-1]}/videos.lance/_versions"
    store.fs.delete_dir(versions)  # what the crash left: Parquet rows and LanceDB data files, no manifest
    assert [info for info in store.fs.get_file_info(pafs.FileSelector(store.lancedb_uri.split('://')[-1],
                                                                      recursive=True))
            if info.type == pafs.FileType.File]
    assert OutputStore(root, **options).lance_table() is None

    resumed = OutputStore(root, **options)
    assert resumed.reconcile() == 2
    resumed.write_videos(video_table(["c"]))
    assert lance_ids(resumed) == ["a", "b", "c"]


def test_a_reader_that_opens_while_the_first_version_lands_gets_the_table(tmp_path, monkeypatch):
    """A job's first commit to LanceDB: the table is listed, a reader's open finds no version yet, and by the time
    it looks again the version is there. The reader gets the table, not LanceDB's "was not found"."""
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))
    reader = OutputStore(str(tmp_path / "out"))
    db = reader._lance_db()
    open_table, opens = db.open_table, []

    def open_before_the_version_landed(name, *args, **kwargs):
        opens.append(name)
        if len(opens) == 1:  # Lance's own message for a listed table without a manifest
            raise ValueError(f"Table '{name}' was not found")
        return open_table(name, *args, **kwargs)

    monkeypatch.setattr(db, "open_table", open_before_the_version_landed)
    assert lance_ids(reader) == ["a", "b"] and len(opens) == 2


def _no_index_lookups(monkeypatch, store: OutputStore) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("looked the listing up in LanceDB instead of the id digest")

    monkeypatch.setattr(store, "_lance_ids_in", refuse)
    monkeypatch.setattr(store, "_lance_ids", refuse)


def test_a_resume_looks_its_listing_up_in_the_id_digest(output_root, monkeypatch):
    root, options = output_root
    store = OutputStore(root, **options)
    store.reconcile()
    store.write_videos(video_table(["a", "b", "it's"]))
    store.write_videos(video_table(["c"], seed=1))
    store.build_vector_index()  # the end of a run: compacts, which writes the digest
    store.finish_run()

    resumed = OutputStore(root, **options)
    resumed.reconcile()
    with monkeypatch.context() as patch:
        _no_index_lookups(patch, resumed)
        assert resumed.done_ids(["a", "c", "it's", "new"]) == {"a", "c", "it's"}
    resumed.write_videos(video_table(["d"], seed=2))  # after the digest: found by scanning the newer fragment
    _no_index_lookups(monkeypatch, resumed)
    assert resumed.done_ids(["a", "d", "new"]) == {"a", "d"}


def test_the_id_digest_agrees_with_parquet_through_deletes_replacements_and_crashes(tmp_path, monkeypatch):
    """Random runs of commits, replacements, removals, compactions and crashes (one cutting a compaction short
    before the digest is written): after each, a resumed run's listing lookup equals what Parquet holds."""
    monkeypatch.setattr("pipeline.store.lance_table.COMPACT_AT_NEW_FRAGMENTS", 3)
    root = str(tmp_path / "out")
    rng = np.random.default_rng(0)
    store, written, used_digest, crashes = OutputStore(root), 0, 0, 0
    store.reconcile()
    for step in range(24):
        action = rng.choice(["write", "write", "replace", "remove", "compact", "crash in compaction"])
        held = sorted(store.done_ids())
        if action == "write":
            store.write_videos(video_table([f"v{written + i}" for i in range(2)], seed=step))
            written += 2
        elif action == "replace" and held:
            store.write_videos(video_table(list(rng.choice(held, size=min(2, len(held)), replace=False)),
                                           seed=step), replace=True)
        elif action == "remove" and held:
            store.remove_videos([str(rng.choice(held))])
        elif action == "compact":
            store.compact_if_needed(force=True)
        elif action == "crash in compaction":
            def crash(*args, **kwargs):
                raise RuntimeError("killed")

            monkeypatch.setattr(store, "_write_id_digest", crash)
            try:
                store.write_videos(video_table([f"v{written}"], seed=step))
                store.compact_if_needed(force=True)  # (nothing to compact when that write created the table)
            except RuntimeError:
                crashes += 1
            written += 1
            store = OutputStore(root)  # the next run
            store.reconcile()
        expected = store.done_ids()  # read from Parquet
        resumed = OutputStore(root)
        resumed.reconcile()
        listing = [f"v{i}" for i in range(written + 3)]
        digest = resumed._digest_ids_among(resumed.lance_table(), set(listing)) if resumed.lance_table() else None
        used_digest += digest is not None
        assert digest in (None, expected & set(listing)), action
        assert resumed.done_ids(listing) == expected & set(listing), action
        resumed.finish_run()
    assert used_digest >= 8 and crashes >= 1


def test_a_run_ends_with_an_id_digest_even_with_nothing_to_compact(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table(["a", "b"]))  # creates the table, whose video_id index covers it all
    assert not store.compact_if_needed(force=True)
    store.build_vector_index()
    store.finish_run()
    resumed = OutputStore(str(tmp_path / "out"))
    resumed.reconcile()
    _no_index_lookups(monkeypatch, resumed)
    assert resumed.done_ids(["a", "x"]) == {"a"}


def test_new_rows_join_the_vector_index_as_deltas_once_enough_wait(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.lance_table.COMPACT_AT_NEW_FRAGMENTS", 2)
    monkeypatch.setattr("pipeline.store.lance_table.COMPACTED_FRAGMENT_ROWS", 16)
    monkeypatch.setattr("pipeline.store.lance_table.VECTOR_DELTA_ROWS_PER_PARTITION", 2)
    store = OutputStore(str(tmp_path / "out"))
    store.write_videos(video_table([f"v{i}" for i in range(40)]))
    assert store.build_vector_index(min_rows=20)
    (name,) = [i.name for i in store.lance_table().list_indices() if i.columns == ["pooled"]]
    delta_rows = 2 * _trained_partitions(name)  # 6 partitions: deltas of at least 12 rows
    segments = []
    for i in range(40):
        store.write_videos(video_table([f"w{i}"], seed=i))
        stats = store.lance_table().index_stats(name)
        assert stats.num_unindexed_rows < delta_rows + 2
        segments.append(stats.num_indices)
    assert max(segments) > 1
    store.build_vector_index(min_rows=20)
    stats = store.lance_table().index_stats(name)
    assert stats.num_indices == 1 and stats.num_unindexed_rows == 0


def test_hash_lookups_find_exactly_the_held_ids_even_when_first_halves_collide():
    held = _id_hashes([f"v{i}" for i in range(200)])
    # Ids whose hashes share a first half with a held one (made up: 128-bit collisions cannot be found).
    twins = (held[0][:5].copy(), held[1][:5] ^ np.uint64(1))
    merged = _merge_hashes(held, twins)
    assert np.all(np.diff(merged[0].astype(np.float64)) >= 0)
    wanted = _id_hashes([f"v{i}" for i in range(0, 400, 2)], sort=False)
    assert _hashes_held(merged, wanted).tolist() == [i < 200 for i in range(0, 400, 2)]
    assert _hashes_held(merged, twins).all() and not _hashes_held(held, twins).any()


def test_a_table_left_empty_by_a_crash_after_its_creation_is_filled_from_parquet(tmp_path):
    """A crash between creating the LanceDB table and adding the first rows leaves a table with no rows (which
    Python counts as false): the resumed run must add to it, not try to create it again."""
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    written = video_table(["a", "b"])
    store._write_parquet("videos", written)
    store._lance_db().create_table("videos", schema=written.schema)

    resumed = OutputStore(str(tmp_path / "out"))
    assert resumed.reconcile() == 2
    assert lance_ids(resumed) == ["a", "b"]
    assert resumed.done_ids(["a", "c"]) == {"a"}
