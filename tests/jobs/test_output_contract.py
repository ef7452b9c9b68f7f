"""What a re-run may do to an existing output: the settings contract, --overwrite, manifest column types."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.sources import video_id_for
from pipeline.storage import OutputStore

SMALL = ["--frames", "2", "--k", "2"]


def small_corpus(folder: Path, make_synthetic_clip, count: int) -> Path:
    folder.mkdir()
    for index in range(count):
        shutil.copy(make_synthetic_clip("tiny", num_frames=4, size=(32, 32)), folder / f"v{index}.mp4")
    return folder


def created_at_by_id(table) -> dict[str, object]:
    return dict(zip(table.column("video_id").to_pylist(), table.column("created_at").to_pylist()))


def lance_rows(store: OutputStore):
    return store.lance_table().search().select(["video_id", "created_at"]).limit(None).to_arrow()


def test_overwrite_with_limit_replaces_only_what_it_recomputed(tmp_path, run_job_on, make_synthetic_clip):
    corpus = small_corpus(tmp_path / "corpus", make_synthetic_clip, 6)
    output = tmp_path / "out"
    assert run_job_on(corpus, output, *SMALL).ok == 6
    store = OutputStore(str(output))
    before = created_at_by_id(store.read_videos(columns=["video_id", "created_at"]))
    ids = sorted(before)
    # --limit takes the listing in video_id order: the first video can no longer be decoded, the second can.
    uri_of = {video_id_for(str(path)): path for path in corpus.iterdir()}
    uri_of[ids[0]].write_bytes(b"not a video any more")

    summary = run_job_on(corpus, output, *SMALL, "--overwrite", "--limit", "2")
    assert (summary.ok, summary.failed, summary.deferred, summary.skipped) == (1, 1, 4, 0)

    parquet = store.read_videos(columns=["video_id", "created_at"])
    after = created_at_by_id(parquet)
    assert parquet.num_rows == 6 and sorted(after) == ids  # nothing lost, nothing duplicated
    assert [i for i in ids if after[i] != before[i]] == [ids[1]]  # only the recomputed row was replaced
    lance = lance_rows(store)
    assert lance.num_rows == 6 and created_at_by_id(lance) == after
    errors = store.read_errors().to_pylist()
    assert [(e["video_id"], e["stage"]) for e in errors] == [(ids[0], "decode")]  # failed recompute recorded
