"""Ray Data stages of the compression job: thin adapters over the steps of pipeline.job.tokenizer.VideoTokenizer
(the write stage that follows them is in pipeline.job.writing).

Each stage is a callable class (Ray builds one per actor, so set-up happens once) that declares the resources it
needs. Rows stay small: ids, uris and manifest columns travel; decoded frames exist only between the decode and
encode stages, as one binary cell per video. A failing video becomes a row with error columns set (see
pipeline.job.errors), which later stages pass through untouched.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

import tokendyn
from pipeline.job.config import JobConfig, Resources
from pipeline.job.errors import ERROR_COLUMNS, no_failure, record_failure
from pipeline.job.stage_clock import report
from pipeline.job.tokenizer import VideoTokenizer
from pipeline.store.schema import now_utc, video_row, video_schema

# Columns the decode stage adds; everything else in its input (ids, manifest columns) is carried through.
FRAME_COLUMNS = ("frames", "frames_shape", "frame_indices", "fps", "source_frames")
ERROR_FIELDS = [pa.field(name, pa.string()) for name in ERROR_COLUMNS]


def _is_failed(row: dict) -> bool:
    return row.get("error_stage") is not None


class DecodeStage:
    """Decode one video per call into `frames` at the encoder's input size, in a time-limited child process."""

    def __init__(self, config: JobConfig, input_size: tuple[int, int], clock=None) -> None:
        """clock: the run's StageClock (pipeline.job.stage_clock), told each video's decode seconds."""
        self.config = config
        self.clock = clock
        self.tokenizer = VideoTokenizer(config.output_settings(), s3_endpoint_url=config.s3_endpoint_url,
                                        decode_timeout_s=config.decode_timeout_s, input_size=input_size)

    @staticmethod
    def resources(config: JobConfig) -> Resources:
        return Resources(num_cpus=1.0)

    def __call__(self, row: dict) -> dict:
        row = {**row, **no_failure()}
        started = time.perf_counter()
        try:
            clip = self.tokenizer.decode(row["uri"])
        except Exception as exc:
            return {**record_failure(row, "decode", exc), "frames": b"", "frames_shape": [],
                    "frame_indices": [], "fps": None, "source_frames": None}
        finally:
            report(self.clock, "decode", time.perf_counter() - started, 1)
        return {**row, "frames": clip.frames.tobytes(), "frames_shape": list(clip.frames.shape),
                "frame_indices": [int(i) for i in clip.frame_indices], "fps": float(clip.fps),
                "source_frames": int(clip.source_frames)}

    def close(self) -> None:
        """Stop the decode child process."""
        self.tokenizer.close()

    def __del__(self) -> None:
        self.close()


def check_extra_columns(extra_fields: list[pa.Field]) -> None:
    """Refuse carried (manifest) columns named like a column the stages add: one would silently replace the
    other."""
    taken = {*video_schema(1).names, *FRAME_COLUMNS, *ERROR_COLUMNS}
    clashes = sorted(f.name for f in extra_fields if f.name in taken)
    if clashes:
        raise ValueError(f"manifest column(s) {clashes} have the name of an output column; rename them in the "
                         "manifest (the output's columns are listed in docs/output.md)")


def _device_for(config: JobConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() and config.gpus_per_worker > 0 else "cpu"


class EncodeCompressStage:
    """Encode the frames of a batch of videos in one forward pass and compress their tokens in one batched fit."""

    def __init__(self, config: JobConfig, extra_fields: list[pa.Field] | None = None, clock=None) -> None:
        """extra_fields: the Arrow types of the carried (manifest) columns, fixed for the whole run; None takes
        them from each batch. clock: the run's StageClock, told each batch's encode and compress seconds."""
        self.config = config
        self.clock = clock
        self.extra_fields = extra_fields
        self.tokenizer = VideoTokenizer(config.output_settings(), device=_device_for(config))
        self.encoder = self.tokenizer.encoder

    @staticmethod
    def resources(config: JobConfig) -> Resources:
        return Resources(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        videos = [row for row in rows if not _is_failed(row)]
        started = time.perf_counter()
        tokens = self._encode(videos, rows)
        encoded = time.perf_counter()
        compressed = self._compress(tokens)
        report(self.clock, "encode", encoded - started, len(rows))
        report(self.clock, "compress", time.perf_counter() - encoded, len(videos))
        created_at = now_utc()
        out = []
        for row in rows:
            carried = {key: value for key, value in row.items() if key not in FRAME_COLUMNS}
            if _is_failed(row):
                out.append(carried)
                continue
            try:
                video = compressed[row["video_id"]]
                if isinstance(video, Exception):
                    raise video
                out.append({**carried, **video_row(
                    video, frame_indices=row["frame_indices"], fps=row["fps"], source_frames=row["source_frames"],
                    encoder=self.encoder.name, encoder_layer=self.encoder.layer,
                    base_dtype=self.config.base_dtype, created_at=created_at)})
            except Exception as exc:
                out.append(record_failure(carried, "compress", exc))
        return pa.Table.from_pylist(out, schema=self.output_schema(batch.schema))

    def _encode(self, videos: list[dict], rows: list[dict]) -> dict[str, torch.Tensor]:
        """Tokens [T, gh, gw, D] per video_id. A failed forward marks the videos of the batch as failed."""
        if not videos:
            return {}
        frames = [np.frombuffer(v["frames"], dtype=np.uint8).reshape(v["frames_shape"]) for v in videos]
        try:
            tokens = self.tokenizer.encode(np.concatenate(frames))
        except Exception as exc:
            for index, row in enumerate(rows):
                if not _is_failed(row):
                    rows[index] = record_failure(row, "encode", exc)
            return {}
        per_video = torch.split(tokens, [f.shape[0] for f in frames])
        return {v["video_id"]: t for v, t in zip(videos, per_video)}

    def _compress(self, tokens: dict[str, torch.Tensor]) -> dict[str, tokendyn.CompressedVideo | Exception]:
        """The batch's videos in one batched fit (one fit per shape: on an accelerator about the cost of one
        video's), each result identical to compressing the video alone. A video that cannot be compressed fails
        the batched call, so then each is compressed alone and only the bad one becomes its exception."""
        ids = list(tokens)
        try:
            return dict(zip(ids, self.tokenizer.compress_batch([tokens[i] for i in ids])))
        except Exception:
            compressed: dict[str, tokendyn.CompressedVideo | Exception] = {}
            for i in ids:
                try:
                    compressed[i] = self.tokenizer.compress(tokens[i])
                except Exception as exc:
                    compressed[i] = exc
            return compressed

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """Video columns, the manifest columns of the input, and the error columns."""
        extra = self.extra_fields
        if extra is None:
            known = {*FRAME_COLUMNS, *ERROR_COLUMNS, "video_id", "uri"}
            extra = [f for f in input_schema if f.name not in known]
        schema = video_schema(self.encoder.dim, self.config.base_dtype, extra)
        for f in ERROR_FIELDS:
            schema = schema.append(f)
        return schema
