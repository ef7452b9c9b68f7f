"""What a re-run may do to an existing output: the settings contract, --overwrite, manifest column types."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from job_scripts import load_job_script
from pipeline.job.sources import video_id_for
from pipeline.store.storage import OutputStore

SMALL = ["--frames", "2", "--k", "2"]
# what `sample_output` was made with
SAMPLE_OUTPUT_FLAGS = ["--encoder", "efficientnet-lite0", "--frames", "8", "--k", "8", "--neighbours", "0"]


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


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_rerun_with_other_settings_is_refused_before_touching_the_output(
        sample_output, tmp_path, ray_local, tiny_siglip_dir, capsys):
    main = load_job_script("compress_corpus").main
    source, _ = sample_output
    output = tmp_path / "out"
    shutil.copytree(source, output)
    corpus = tmp_path / "corpus"  # the refusal comes before any video is looked at
    corpus.mkdir()
    before = snapshot(output)

    def refused(*flags: str) -> str:
        assert main(["--input", str(corpus), "--output", str(output), *SAMPLE_OUTPUT_FLAGS, *flags]) == 2
        assert snapshot(output) == before  # no lock file, no reconcile, no change of any byte
        return capsys.readouterr().err

    err = refused("--k", "16")
    assert json.loads((output / "settings.json").read_text())["settings"]["k"] == 8
    assert "k: 8 -> 16" in err and "another --output" in err and "--rebuild" in err
    err = refused("--encoder", str(tiny_siglip_dir), "--seed", "3")
    assert f"encoder: 'efficientnet-lite0' -> '{tiny_siglip_dir}'" in err and "seed: 0 -> 3" in err
    assert err.count("\n") == 1  # one line, no traceback

    # An output written before settings were recorded is adopted from its rows and run.json, then held to them.
    (output / "settings.json").unlink()
    before = snapshot(output)
    err = refused("--base-dtype", "float32")
    assert "base_dtype: 'float16' -> 'float32'" in err


def test_a_refusal_or_a_rerun_with_nothing_to_do_starts_no_ray(sample_output, tmp_path):
    source, _ = sample_output
    output = tmp_path / "out"
    shutil.copytree(source, output)
    ray_tmp = tempfile.mkdtemp(prefix="tdray-", dir="/tmp")  # Ray puts its session directories here
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    entry = Path(__file__).resolve().parents[2] / "jobs" / "compress_corpus.py"

    done = tmp_path / "done.csv"  # the videos the output holds (the corpus also has one that fails every time)
    done.write_text("\n".join(["uri", *OutputStore(str(output)).read_videos(columns=["uri"]).column("uri")
                                .to_pylist()]) + "\n")

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(entry), "--input", str(done), "--output", str(output),
                               *SAMPLE_OUTPUT_FLAGS, *flags], env=env, capture_output=True, text=True, timeout=120)

    try:
        refused = run("--k", "16")
        assert refused.returncode == 2 and "k: 8 -> 16" in refused.stderr
        rerun = run()
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "0 ok, 0 failed, 4 skipped" in rerun.stdout
        assert not list(Path(ray_tmp).rglob("session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_rebuild_starts_the_output_over_with_the_new_settings(tmp_path, run_job_on, make_synthetic_clip):
    corpus = small_corpus(tmp_path / "corpus", make_synthetic_clip, 2)
    output = tmp_path / "out"
    run_job_on(corpus, output, *SMALL)
    old_files = set((output / "videos").iterdir())
    summary = run_job_on(corpus, output, *SMALL, "--k", "3", "--rebuild")
    assert summary.ok == 2 and summary.skipped == 0
    assert not old_files & set((output / "videos").iterdir())
    store = OutputStore(str(output))
    assert store.read_videos().num_rows == 2 and lance_rows(store).num_rows == 2
    recorded = json.loads((output / "settings.json").read_text())
    assert recorded["settings"]["k"] == 3 and recorded["encoder"] == {"name": "efficientnet-lite0", "layer": None,
                                                                      "dim": 1280}


def test_a_manifest_column_set_in_one_row_of_eight_is_carried_through(tmp_path, run_job_on, make_synthetic_clip):
    corpus = small_corpus(tmp_path / "corpus", make_synthetic_clip, 8)
    manifest = tmp_path / "manifest.jsonl"
    lines = [{"uri": str(corpus / f"v{index}.mp4"), "rating": None, "empty": None} for index in range(8)]
    lines[5] = {**lines[5], "caption": "the only caption", "rating": 4}
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "out"

    summary = run_job_on(manifest, output, *SMALL, "--batch-size", "1")  # one video per block
    assert (summary.ok, summary.failed) == (8, 0)
    store = OutputStore(str(output))
    for table in (store.read_videos(), store.lance_table().search().limit(None).to_arrow()):
        assert table.num_rows == 8
        assert table.schema.field("caption").type == pa.string()
        assert table.schema.field("rating").type == pa.int64()
        assert table.schema.field("empty").type == pa.string()  # a column empty everywhere is kept, as strings
        by_uri = {row["uri"]: row for row in table.to_pylist()}
        assert by_uri[str(corpus / "v5.mp4")]["caption"] == "the only caption"
        assert by_uri[str(corpus / "v5.mp4")]["rating"] == 4
        assert sum(row["caption"] is not None for row in by_uri.values()) == 1


def test_a_manifest_column_named_like_an_output_column_is_refused(tmp_path, ray_local, make_synthetic_clip, capsys):
    corpus = small_corpus(tmp_path / "corpus", make_synthetic_clip, 1)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri,k,caption\n{corpus / 'v0.mp4'},3,a clip\n")
    output = tmp_path / "out"
    main = load_job_script("compress_corpus").main
    assert main(["--input", str(manifest), "--output", str(output), *SMALL, "--neighbours", "0"]) == 2
    err = capsys.readouterr().err
    assert "manifest column(s) ['k']" in err and err.count("\n") == 1
    assert not output.exists()
