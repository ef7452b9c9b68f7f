"""Similarity search over the job's LanceDB table."""

from __future__ import annotations

from pipeline.storage import OutputStore


def nearest_to_video(store: OutputStore, video_id: str, k: int = 3) -> list[dict]:
    """The k videos whose pooled vectors are closest (cosine) to `video_id`'s, itself excluded."""
    table = store.lance_table()
    if table is None:
        raise LookupError(f"{store.root} holds no videos yet")
    quoted = video_id.replace("'", "''")
    found = table.search().where(f"video_id = '{quoted}'").select(["pooled"]).limit(1).to_list()
    if not found:
        raise LookupError(f"video_id {video_id!r} is not in {store.root}")
    hits = (table.search(found[0]["pooled"], vector_column_name="pooled").metric("cosine")
            .select(["video_id", "uri"]).limit(k + 1).to_list())
    return [{"video_id": h["video_id"], "uri": h["uri"], "score": 1.0 - h["_distance"]}
            for h in hits if h["video_id"] != video_id][:k]
