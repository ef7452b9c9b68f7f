"""Sources: local folders, manifests (CSV / JSONL / Parquet), S3 prefixes and objects, stable ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.job import sources
from pipeline.job.sample_clips import SAMPLE_CLIP_NAMES, sample_clip_dir
from pipeline.job.sources import (
    VIDEO_EXTENSIONS,
    canonical_uri,
    list_videos,
    read_bytes,
    video_id_for,
)


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------------------------
# ids


def test_video_id_is_stable_and_depends_only_on_the_canonical_uri(tmp_path, monkeypatch):
    path = tmp_path / "a" / "clip.mp4"
    ids = {
        video_id_for(str(path)),
        video_id_for(f"file://{path}"),
        video_id_for(str(tmp_path / "a" / "." / "b" / ".." / "clip.mp4")),
    }
    monkeypatch.chdir(tmp_path)
    ids.add(video_id_for("a/clip.mp4"))
    assert len(ids) == 1
    (video_id,) = ids
    assert len(video_id) == 20 and all(c in "0123456789abcdef" for c in video_id)
    assert video_id != video_id_for(str(tmp_path / "a" / "clip2.mp4"))
    # Pinned value: ids must not change between releases, or resume would redo everything.
    assert video_id_for("s3://bucket/videos/clip.mp4") == "4bf14ad5f8da23243b99"


def test_unsupported_uri_schemes_are_rejected():
    with pytest.raises(ValueError, match="scheme"):
        canonical_uri("http://example.com/a.mp4")
    with pytest.raises(ValueError):
        canonical_uri("   ")


# ---------------------------------------------------------------------------------------------------------------
# local folders


def test_local_folder_is_listed_recursively_by_extension(tmp_path):
    videos = [
        touch(tmp_path / "a.mp4"),
        touch(tmp_path / "sub" / "b.MKV"),
        touch(tmp_path / "sub" / "deeper" / "c.webm"),
        touch(tmp_path / "d.mov"),
    ]
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "image.jpg")
    touch(tmp_path / "sub" / "mp4")  # an extension-less file named like one

    rows = list_videos(str(tmp_path))

    assert sorted(row["uri"] for row in rows) == sorted(str(path) for path in videos)
    assert [row["video_id"] for row in rows] == sorted(row["video_id"] for row in rows)
    assert all(row["video_id"] == video_id_for(row["uri"]) for row in rows)
    assert all(set(row) == {"video_id", "uri"} for row in rows)


def test_real_sample_clip_folder_lists_every_clip():
    rows = list_videos(str(sample_clip_dir()))
    assert sorted(Path(row["uri"]).name for row in rows) == sorted(SAMPLE_CLIP_NAMES)


def test_listing_is_the_same_across_calls_and_cwds(tmp_path, monkeypatch):
    touch(tmp_path / "v" / "a.mp4")
    touch(tmp_path / "v" / "b.avi")
    first = list_videos(str(tmp_path / "v"))
    monkeypatch.chdir(tmp_path)
    assert list_videos("v") == first


def test_missing_input_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_videos(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        list_videos(str(tmp_path / "nope.csv"))


def test_single_video_file_is_a_one_row_input(tmp_path):
    clip = touch(tmp_path / "one.m4v")
    assert list_videos(str(clip)) == [{"video_id": video_id_for(str(clip)), "uri": str(clip)}]
    with pytest.raises(ValueError, match="neither"):
        list_videos(str(touch(tmp_path / "notes.txt")))


def test_extension_set_covers_common_containers():
    assert {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"} <= VIDEO_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in VIDEO_EXTENSIONS)


# ---------------------------------------------------------------------------------------------------------------
# manifests


MANIFEST_RECORDS = [
    {"uri": "clips/a.mp4", "caption": "a dog", "label": 1},
    {"uri": "{root}/elsewhere/b.mp4", "caption": "a cat", "label": 2, "video_id": "custom-b"},
    {"uri": "clips/./a.mp4", "caption": "duplicate of a", "label": 3},
    {"uri": "s3://bucket/c.mp4", "caption": "remote", "label": 4},
]


def write_manifest(path: Path, records: list[dict]) -> Path:
    columns = sorted({key for record in records for key in record})
    table = pa.Table.from_pylist([{key: record.get(key) for key in columns} for record in records])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        import pyarrow.csv

        pyarrow.csv.write_csv(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("extension", [".csv", ".jsonl", ".parquet"])
def test_manifest_rows_carry_extra_columns_resolve_relative_uris_and_drop_duplicates(tmp_path, extension):
    records = [{**r, "uri": r["uri"].format(root=tmp_path)} for r in MANIFEST_RECORDS]
    manifest = write_manifest(tmp_path / "lists" / f"manifest{extension}", records)

    rows = list_videos(str(manifest))

    by_uri = {row["uri"]: row for row in rows}
    relative_a = str(tmp_path / "lists" / "clips" / "a.mp4")
    assert sorted(by_uri) == sorted([relative_a, str(tmp_path / "elsewhere" / "b.mp4"), "s3://bucket/c.mp4"])
    assert by_uri[relative_a]["caption"] == "a dog"  # first occurrence wins
    assert by_uri[relative_a]["label"] == 1
    assert by_uri[relative_a]["video_id"] == video_id_for(relative_a)
    assert by_uri[str(tmp_path / "elsewhere" / "b.mp4")]["video_id"] == "custom-b"
    assert by_uri["s3://bucket/c.mp4"]["video_id"] == video_id_for("s3://bucket/c.mp4")
    assert [row["video_id"] for row in rows] == sorted(row["video_id"] for row in rows)


def test_manifest_without_uri_column_is_a_clear_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.mp4", "caption": "x"}])
    with pytest.raises(ValueError, match="no 'uri' column"):
        list_videos(str(manifest))


def test_manifest_with_empty_uri_or_clashing_ids_is_rejected(tmp_path):
    empty = write_manifest(tmp_path / "empty.jsonl", [{"uri": "a.mp4"}, {"uri": ""}])
    with pytest.raises(ValueError, match="row 2: empty uri"):
        list_videos(str(empty))
    clash = write_manifest(tmp_path / "clash.jsonl", [{"uri": "a.mp4", "video_id": "v"}, {"uri": "b.mp4", "video_id": "v"}])
    with pytest.raises(ValueError, match="two uris"):
        list_videos(str(clash))


def test_numeric_video_ids_in_a_csv_stay_strings(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,video_id\na.mp4,17\nb.mp4,\n")
    rows = {row["uri"]: row for row in list_videos(str(manifest))}
    assert rows[str(tmp_path / "a.mp4")]["video_id"] == "17"
    assert rows[str(tmp_path / "b.mp4")]["video_id"] == video_id_for(str(tmp_path / "b.mp4"))


# ---------------------------------------------------------------------------------------------------------------
# S3 (moto server)


def test_s3_prefix_listing_paginates_and_filters_by_extension(s3_client, s3_bucket, moto_s3_endpoint, monkeypatch):
    monkeypatch.setattr(sources, "S3_LIST_PAGE_SIZE", 4)  # 23 keys -> 6 pages
    keys = [f"videos/part{i % 3}/clip{i:04d}.mp4" for i in range(23)]
    for key in keys:
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=b"v")
    s3_client.put_object(Bucket=s3_bucket, Key="videos/readme.txt", Body=b"t")
    s3_client.put_object(Bucket=s3_bucket, Key="videos2/outside.mp4", Body=b"v")  # shares the prefix string only

    rows = list_videos(f"s3://{s3_bucket}/videos", s3_endpoint_url=moto_s3_endpoint)

    assert sorted(row["uri"] for row in rows) == sorted(f"s3://{s3_bucket}/{key}" for key in keys)
    assert all(row["video_id"] == video_id_for(row["uri"]) for row in rows)
    assert [row["video_id"] for row in rows] == sorted(row["video_id"] for row in rows)
    assert len(list_videos(f"s3://{s3_bucket}", s3_endpoint_url=moto_s3_endpoint)) == len(keys) + 1


def test_s3_read_bytes_round_trips_a_real_clip(s3_client, s3_bucket, moto_s3_endpoint, sample_clip_paths):
    data = sample_clip_paths["carphone_distorted"].read_bytes()
    s3_client.put_object(Bucket=s3_bucket, Key="clips/carphone.mp4", Body=data)
    assert read_bytes(f"s3://{s3_bucket}/clips/carphone.mp4", s3_endpoint_url=moto_s3_endpoint) == data
    with pytest.raises(FileNotFoundError):
        read_bytes(f"s3://{s3_bucket}/clips/missing.mp4", s3_endpoint_url=moto_s3_endpoint)


def test_s3_manifest_resolves_relative_uris_against_its_prefix(s3_client, s3_bucket, moto_s3_endpoint):
    body = "uri,caption\nclips/a.mp4,first\n../other/b.mp4,second\ns3://elsewhere/c.mp4,third\nclips/a.mp4,again\n"
    s3_client.put_object(Bucket=s3_bucket, Key="lists/manifest.csv", Body=body.encode())

    rows = list_videos(f"s3://{s3_bucket}/lists/manifest.csv", s3_endpoint_url=moto_s3_endpoint)

    assert {row["uri"]: row["caption"] for row in rows} == {
        f"s3://{s3_bucket}/lists/clips/a.mp4": "first",
        f"s3://{s3_bucket}/other/b.mp4": "second",
        "s3://elsewhere/c.mp4": "third",
    }


def test_s3_missing_bucket_or_manifest_raises_file_not_found(moto_s3_endpoint, s3_bucket):
    with pytest.raises(FileNotFoundError):
        list_videos("s3://no-such-bucket-anywhere/videos", s3_endpoint_url=moto_s3_endpoint)
    with pytest.raises(FileNotFoundError):
        list_videos(f"s3://{s3_bucket}/missing.jsonl", s3_endpoint_url=moto_s3_endpoint)


def test_local_read_bytes(tmp_path):
    path = touch(tmp_path / "x.mp4", b"abc")
    assert read_bytes(str(path)) == b"abc"
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "missing.mp4"))
    assert os.path.isabs(list_videos(str(tmp_path))[0]["uri"])
