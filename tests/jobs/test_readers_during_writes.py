"""Training and search read an output while a job is still committing into it: each read sees whole committed
videos only, none twice, and LanceDB never ahead of Parquet (the job commits Parquet first)."""

from __future__ import annotations

import threading

import numpy as np

from pipeline.readers.cache import CachedTokenDataset, EmptyCacheError
from pipeline.readers.search.index import SearchError, VideoSearch
from pipeline.store.contract import read_contract
from pipeline.store.storage import OutputStore

VIDEOS = 10  # the ten_clips fixture's


class Reader(threading.Thread):
    """Reads the output over and over (the training dataset from both sources, then an exact search) until told
    to stop, keeping every read's video ids and every error. `wait_for_a_read()` returns once a whole round
    started after the call has finished, so each commit is read at least once before the next."""

    def __init__(self, root: str) -> None:
        super().__init__(name="reader", daemon=True)
        self.root, self.reads, self.errors = root, [], []
        self.stop, self.rounds, self.round_done = threading.Event(), 0, threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            started_round = self.rounds
            self.reads.append({"lancedb": self.dataset_ids("lancedb"), "parquet": self.dataset_ids("parquet"),
                               "search": self.search_ids()})
            with self.round_done:
                self.rounds = started_round + 1
                self.round_done.notify_all()

    def wait_for_a_read(self, timeout_s: float = 60) -> None:
        with self.round_done:
            wanted = self.rounds + 2  # the round under way may have started before the commit
            assert self.round_done.wait_for(lambda: self.rounds >= wanted, timeout=timeout_s), "the reader stalled"

    def dataset_ids(self, source: str) -> list[str]:
        try:
            dataset = CachedTokenDataset(self.root, source=source, rank=0, world_size=1)
            for item in dataset:  # whole videos: a base row per cluster, a cluster id per cell
                k, sizes, dynamics = item["base"].shape[0], item["cluster_sizes"], item["dynamics"]
                if sizes.shape != (k,) or int(sizes.sum()) != dynamics.numel() or int(dynamics.max()) >= k:
                    self.errors.append((source, f"a partial video: {item['video_id']}"))
            return [item["video_id"] for item in dataset]
        except EmptyCacheError:  # an output with no videos yet
            return []
        except Exception as error:
            self.errors.append((source, repr(error)))
            return []

    def search_ids(self) -> list[str]:
        try:
            search = VideoSearch.open(self.root)
            return [hit.video_id for hit in search.by_vectors(np.ones(search.dim, np.float32), k=100, mode="exact")]
        except SearchError as error:
            if "holds no videos yet" not in str(error):
                self.errors.append(("search", repr(error)))
            return []
        except Exception as error:
            self.errors.append(("search", repr(error)))
            return []


def test_reads_during_a_job_see_whole_committed_videos_once(tmp_path, run_job_on, ten_clips):
    output = tmp_path / "out"
    reader = Reader(str(output))
    committed = []
    reader.start()
    try:
        summary = run_job_on(ten_clips, output, "--rows-per-file", "1",
                             on_batch=lambda videos: (committed.append(videos), reader.wait_for_a_read()))
    finally:
        reader.stop.set()
        reader.join(timeout=120)
    assert summary.ok == VIDEOS and len(committed) >= 2, (summary, committed)
    assert reader.errors == []

    final = set(OutputStore(str(output)).read_videos(columns=["video_id"]).column("video_id").to_pylist())
    assert len(final) == VIDEOS and read_contract(OutputStore(str(output))) is not None
    seen_sizes, previous = set(), {"lancedb": set(), "parquet": set(), "search": set()}
    for read in reader.reads:
        for source, ids in read.items():
            assert len(ids) == len(set(ids)), (source, ids)  # no video twice
            assert set(ids) <= final and previous[source] <= set(ids), source  # only committed, never unseen
            previous[source] = set(ids)
        # LanceDB was read first, Parquet just after: Parquet holds at least what the table showed
        assert set(read["lancedb"]) <= set(read["parquet"])
        seen_sizes.add(len(read["parquet"]))
    assert {0, VIDEOS} < seen_sizes  # reads saw the output empty, part-way and complete
    assert all(ids == final for ids in previous.values())
