"""Arrow schemas of the job's output: one row per compressed video, one row per failure.

The same video schema is used for the Parquet files and the LanceDB table, so the two stores hold identical rows.
`dim` (the encoder's token width) is part of the schema because vectors are fixed-size lists.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # imported where rows become videos: the store's writers and its upkeep never load torch
    from tokendyn import CompressedVideo

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"tokendyn.schema_version"

# Columns every video row has, in order; manifest columns (e.g. `caption`) follow them.
ID_FIELDS = [pa.field("video_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)]


class SchemaVersionError(RuntimeError):
    """The output was written by another schema version of this pipeline."""


def video_schema(dim: int, base_dtype: str = "float16", extra_fields: list[pa.Field] = ()) -> pa.Schema:
    base_type = pa.float16() if base_dtype == "float16" else pa.float32()
    fields = [
        *ID_FIELDS,
        *extra_fields,
        pa.field("num_frames", pa.int32()),
        pa.field("grid_h", pa.int32()),
        pa.field("grid_w", pa.int32()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("fps", pa.float32()),
        pa.field("source_frames", pa.int32()),
        pa.field("encoder", pa.string()),
        pa.field("encoder_layer", pa.int32()),
        pa.field("dim", pa.int32()),
        pa.field("k", pa.int32()),
        pa.field("base", pa.list_(pa.list_(base_type, dim))),
        pa.field("cluster_sizes", pa.list_(pa.int32())),
        pa.field("dynamics", pa.binary()),
        pa.field("dynamics_dtype", pa.string()),
        pa.field("pooled", pa.list_(pa.float32(), dim)),
        pa.field("schema_version", pa.int32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


ERROR_SCHEMA = pa.schema(
    [
        *ID_FIELDS,
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def video_row(
    video: CompressedVideo,
    *,
    frame_indices: list[int],
    fps: float,
    source_frames: int,
    encoder: str,
    encoder_layer: int | None,
    base_dtype: str,
    created_at: datetime,
) -> dict:
    """The compressed columns of one video row (ids and manifest columns are added by the caller)."""
    stored = video.to_storage(base_dtype=base_dtype)
    return {
        "num_frames": stored["num_frames"],
        "grid_h": stored["grid_h"],
        "grid_w": stored["grid_w"],
        "frame_indices": list(frame_indices),
        "fps": float(fps),
        "source_frames": int(source_frames),
        "encoder": encoder,
        "encoder_layer": encoder_layer,
        "dim": stored["dim"],
        "k": stored["k"],
        "base": list(stored["base"]),
        "cluster_sizes": stored["cluster_sizes"],
        "dynamics": stored["dynamics"],
        "dynamics_dtype": "uint8" if stored["k"] <= 256 else "uint16",
        "pooled": stored["pooled"],
        "schema_version": SCHEMA_VERSION,
        "created_at": created_at,
    }


def compressed_video_from_row(row: dict) -> CompressedVideo:
    """Inverse of `video_row` for a row read back as Python values (e.g. `table.to_pylist()`)."""
    from tokendyn import CompressedVideo

    return CompressedVideo.from_storage(
        {
            "k": row["k"],
            "dim": row["dim"],
            "num_frames": row["num_frames"],
            "grid_h": row["grid_h"],
            "grid_w": row["grid_w"],
            "base": np.asarray(row["base"]),
            "cluster_sizes": np.asarray(row["cluster_sizes"], dtype=np.int32),
            "dynamics": row["dynamics"],
            "pooled": np.asarray(row["pooled"], dtype=np.float32),
        }
    )


def check_schema_version(schema: pa.Schema, where: str) -> None:
    """Raise SchemaVersionError with a readable message if `schema` was written by another version."""
    metadata = schema.metadata or {}
    found = metadata.get(SCHEMA_VERSION_KEY)
    if found is None and "schema_version" not in schema.names:
        raise SchemaVersionError(f"{where} was not written by this pipeline (no schema version recorded).")
    if found is not None and int(found) != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} holds schema version {int(found)}, this pipeline reads and writes version {SCHEMA_VERSION}. "
            "Write to a new --output, or convert the old output first."
        )
