"""Rows staged by writers anywhere and committed by one process (pipeline.store.staging): invisible until
committed, then in Parquet and LanceDB exactly as written, one Lance commit per flush, and what is never committed
removed without touching what was."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from output_checks import lance_dataset, lance_ids, staged_files, unreferenced_lance_files
from pipeline.store.storage import OutputStore
from test_storage import video_table


def rows_of(table, ids: list[str]) -> list[dict]:
    return sorted((row for row in table.to_pylist() if row["video_id"] in ids), key=lambda row: row["video_id"])


def test_staged_rows_are_invisible_until_committed_then_in_both_stores_in_one_lance_commit(output_root):
    root, options = output_root
    store = OutputStore(root, **options)
    store.reconcile()
    store.write_videos(video_table(["a"]))  # a table the driver made (its list items are named by Parquet)
    version = store.lance_table().version

    writer = OutputStore(root, **options)  # a worker's own store
    written = [video_table(["b", "c"], seed=1), video_table(["d"], seed=2)]
    staged = [writer.stage_videos(table) for table in written]
    assert store.done_ids() == {"a"} and lance_ids(store) == ["a"]
    assert store.lance_table().version == version

    store.commit_staged(staged)
    expected = [row for table in written for row in table.to_pylist()]
    assert rows_of(store.read_videos(), ["b", "c", "d"]) == sorted(expected, key=lambda row: row["video_id"])
    assert rows_of(store.lance_table().to_arrow(), ["b", "c", "d"]) == rows_of(store.read_videos(), ["b", "c", "d"])
    assert lance_ids(store) == ["a", "b", "c", "d"]
    assert store.lance_table().version == version + 1  # one commit for the flush
    assert staged_files(store) == []


def test_rows_staged_for_a_table_made_from_parquet_rows_are_committed(tmp_path):
    """A table made from rows read back from Parquet (as reconcile makes one after a crash) names list items
    "element", rows from Ray Data "item"; Lance refuses an append whose names differ unless the rows take the
    table's."""
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    pq.write_table(video_table(["a"]), tmp_path / "a.parquet")
    store.write_videos(pq.read_table(tmp_path / "a.parquet"))
    assert "element" in str(store.lance_table().schema.field("cluster_sizes").type)
    staged = video_table(["b"], seed=1)
    store.commit_staged([OutputStore(store.root).stage_videos(staged)])
    assert lance_ids(store) == ["a", "b"]
    assert rows_of(store.lance_table().to_arrow(), ["b"]) == staged.to_pylist()


def test_the_first_commit_creates_the_table_from_rows_staged_before_it_existed(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    first = [OutputStore(store.root).stage_videos(video_table([video_id], seed=i)) for i, video_id in
             enumerate(["a", "b"])]
    assert store.lance_table() is None
    store.commit_staged(first)
    store.commit_staged([OutputStore(store.root).stage_videos(video_table(["c"], seed=3))])
    assert lance_ids(store) == ["a", "b", "c"]
    assert rows_of(store.lance_table().to_arrow(), ["a", "b", "c"]) == rows_of(store.read_videos(), ["a", "b", "c"])


def test_what_was_staged_and_never_committed_is_removed_and_nothing_else(output_root):
    root, options = output_root
    store = OutputStore(root, **options)
    store.reconcile()
    store.write_videos(video_table(["a"]))
    store.commit_staged([store.stage_videos(video_table(["b"], seed=1))])
    orphan = store.stage_videos(video_table(["c"], seed=2))  # a writer killed before handing it on
    orphan_files = {f["files"][0]["path"] for f in json.loads(orphan.fragments)}
    assert orphan_files <= unreferenced_lance_files(store) and staged_files(store)
    committed = store.read_videos()

    store.remove_orphans()
    assert unreferenced_lance_files(store) == set() and staged_files(store) == []
    assert store.read_videos().to_pylist() == committed.to_pylist()
    assert lance_ids(store) == ["a", "b"]
    assert rows_of(store.lance_table().to_arrow(), ["a", "b"]) == rows_of(committed, ["a", "b"])


def test_a_run_that_did_not_end_cleanly_leaves_its_orphans_to_the_next_reconcile(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    store.commit_staged([store.stage_videos(video_table(["a"]))])
    store.stage_videos(video_table(["b"], seed=1))  # then the driver dies: no finish_run
    assert unreferenced_lance_files(store) and staged_files(store)

    resumed = OutputStore(store.root)
    resumed.reconcile()
    assert unreferenced_lance_files(resumed) == set() and staged_files(resumed) == []
    assert lance_ids(resumed) == ["a"] and resumed.done_ids() == {"a"}


def test_replacing_through_staged_rows_keeps_one_row_per_video(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.reconcile()
    store.write_videos(video_table(["a", "b"]))
    new = video_table(["a"], seed=7)
    store.commit_staged([store.stage_videos(new)], replace=True)
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == ["a", "b"]
    assert rows_of(store.read_videos(), ["a"]) == new.to_pylist()
    assert lance_ids(store) == ["a", "b"]
    assert rows_of(store.lance_table().to_arrow(), ["a"]) == new.to_pylist()


def test_a_commit_after_the_lease_was_lost_is_refused(tmp_path):
    from pipeline.store.storage import OutputLocked

    store = OutputStore(str(tmp_path / "out"))
    staged = store.stage_videos(video_table(["a"]))
    store._lease_lost = True
    with pytest.raises(OutputLocked):
        store.commit_staged([staged])
    assert store.read_videos() is None and store.lance_table() is None


class _AnswerLost:
    """A filesystem whose next `move` is done, and then reported failed as a dropped answer would be."""

    def __init__(self, fs):
        self._fs, self.lost = fs, False

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def move(self, source, destination):
        self._fs.move(source, destination)
        if not self.lost:
            self.lost = True
            raise OSError("When completing multiple part upload: AWS Error NETWORK_CONNECTION: Connection reset")


@pytest.mark.parametrize("lost", ["parquet move", "lance commit before", "lance commit after",
                                  "first lance commit after"])
def test_a_commit_repeated_after_a_fault_commits_each_video_once(output_root, monkeypatch, lost):
    """The store's clients retry single requests but not a commit's conditional writes, whose fate a dropped answer
    leaves unknown; the job repeats the commit (pipeline.job.errors.repeat_on_store_faults)."""
    import lance as lance_module

    root, options = output_root
    store = OutputStore(root, **options)
    store.reconcile()
    if lost != "first lance commit after":
        store.write_videos(video_table(["a"]))
    staged = [OutputStore(root, **options).stage_videos(video_table(["b", "c"], seed=1))]
    commit = lance_module.LanceDataset.commit
    faults = []

    def commit_then_lose_the_answer(*args, **kwargs):
        if faults:
            return commit(*args, **kwargs)
        faults.append(lost)
        if lost == "lance commit before":
            raise OSError("LanceError(IO): Generic S3 error: HTTP error: error sending request")
        commit(*args, **kwargs)
        raise OSError("LanceError(IO): Generic S3 error: HTTP error: error sending request")

    fs = store.fs
    if lost == "parquet move":
        store.fs = _AnswerLost(fs)
    else:
        monkeypatch.setattr(lance_module.LanceDataset, "commit", staticmethod(commit_then_lose_the_answer))
    with pytest.raises(OSError):
        store.commit_staged(staged)
    store.fs = fs
    store.commit_staged(staged)  # the repeat

    expected = ["b", "c"] if lost == "first lance commit after" else ["a", "b", "c"]
    assert sorted(store.read_videos(columns=["video_id"]).column("video_id").to_pylist()) == expected
    assert lance_ids(store) == expected
    assert staged_files(store) == []
