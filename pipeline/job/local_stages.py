"""The job's stages without Ray: DecodeStage in a pool of processes feeding one EncodeCompressStage in this one.

For machines that have torch, transformers, pyarrow and a decoder but no Ray (a GPU machine lent for a benchmark):
the same classes the Ray Data plan runs, so what is measured is the job's own per-video path. Result rows are
returned to the caller, not written.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.job.config import JobConfig
from pipeline.job.stages import DecodeStage, EncodeCompressStage

_decode_stage: DecodeStage | None = None  # one per pool process


def _start_decoder(config: JobConfig, input_size: tuple[int, int]) -> None:
    global _decode_stage
    torch.set_num_threads(1)
    _decode_stage = DecodeStage(config, input_size)


def _decode(row: dict) -> dict:
    return _decode_stage(row)


@dataclass
class LocalRun:
    videos: int = 0
    failed: int = 0
    wall_s: float = 0.0
    encoder_busy_s: float = 0.0  # inside EncodeCompressStage calls, the device synchronised

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.wall_s if self.wall_s else 0.0

    @property
    def encoder_busy_share(self) -> float:
        return self.encoder_busy_s / self.wall_s if self.wall_s else 0.0


def run_stages(rows: list[dict], config: JobConfig, decoders: int, warm_up: int = 0) -> Iterator[pa.Table | LocalRun]:
    """Decode `rows` (each with video_id and uri) in `decoders` processes and encode + compress them in batches of
    `config.batch_size` here; yields each batch's output table, then the LocalRun totals. The first `warm_up` rows
    are decoded once before the clock starts (process start-up is not measured)."""
    encode = EncodeCompressStage(config)
    device = encode.tokenizer.device
    totals, batch = LocalRun(), []
    context = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
    with context.Pool(decoders, initializer=_start_decoder,
                      initargs=(config, tuple(encode.encoder.input_size))) as pool:
        pool.map(_decode, rows[:warm_up])
        started = time.perf_counter()
        for index, decoded in enumerate(pool.imap_unordered(_decode, rows), start=1):
            batch.append(decoded)
            if len(batch) == config.batch_size or index == len(rows):
                encode_started = time.perf_counter()
                out = encode(pa.Table.from_pylist(batch))
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                totals.encoder_busy_s += time.perf_counter() - encode_started
                totals.failed += out.filter(pc.is_valid(out.column("error_stage"))).num_rows
                totals.videos += out.num_rows
                batch = []
                yield out
        totals.wall_s = time.perf_counter() - started
    yield totals
