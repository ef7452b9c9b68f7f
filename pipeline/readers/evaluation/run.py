"""What compressed video tokens keep: fidelity and self-retrieval of Token Dynamics vs baselines at equal budgets.

Videos. Every input clip is cut into `segments` equal temporal segments, each treated as its own video, so that a
handful of clips gives a gallery of tens of videos (neighbouring segments of one clip look alike, which makes
retrieval harder, not easier). The clip is decoded once, `2 * frames` frames per segment spread uniformly over the
whole clip (decode_video's rule; short clips repeat frames); segment s owns positions [2Ts, 2T(s+1)) and its
video is every other one of them (T = `frames` frames).

Methods, each keeping K tokens per video (the budget), with a map from every cell to the token that stands for it:
  - token_dynamics@K: spherical k-means base + dynamics map (tokendyn.compress with k=K);
  - token_dynamics@adaptive: K chosen per video within [k_min, k_max];
  - uniform_pool@K, tome_merge@K: tokendyn.baselines at the same K (the "adaptive" budget gives each video the K
    that Token Dynamics chose for it). Uniform pooling keeps at most K: its bins must factor over (T, H, W);
  - full: all T*H*W tokens (the reference).
Every method summarises the L2-normalised tokens (each kept vector is a mean of normalised tokens).

Fidelity, on the gallery videos (tokendyn.metrics): reconstruction relative MSE and mean cosine of the tokens
rebuilt from what was kept (kept[assignment]) against the normalised full tokens, cosine of the pooled vectors,
tokens kept, token ratio and stored bytes per video (`stored_bytes`).

Self-retrieval. Each gallery video is altered four ways and every altered copy (a query) must find its own
original among all gallery videos:
  - temporal_shift: the same frame pattern started a quarter of a segment later (earlier for the last segment),
    at odd offsets so that no sampled frame is shared with the original;
  - crop: a 70% x 70% window off the top-left corner, scaled back to full size;
  - resize: shrunk to a third of its side and scaled back up (a low-resolution copy);
  - colour: hue rotated by 30 degrees, saturation x0.6, brightness x1.15.
Queries and gallery go through the same method. Two similarities:
  - pooled: cosine of the pooled vectors (size-weighted mean of the kept tokens; for full tokens, the mean of the
    normalised tokens). Since every kept vector is a mean of normalised tokens, every method's pooled vector equals
    the full one: pooled retrieval cannot tell the methods apart, and it shows that none of them loses it;
  - maxsim: sum_i w_i max_j cos(q_i, g_j) / sum_i w_i over the query's kept tokens q_i (w_i = number of cells q_i
    stands for) and the gallery video's kept tokens g_j; for full tokens, every token with w = 1.
Recall@n = share of queries whose original is among the n most similar gallery videos (ties count against).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.job.tokenizer import DecodeError, VideoTokenizer, list_videos
from pipeline.readers.evaluation.alterations import ALTERATIONS, SegmentFrames, split_clip
from pipeline.readers.evaluation.config import EvaluationConfig
from pipeline.readers.evaluation.methods import FULL, Compressor, fidelity, method_label, methods_to_run, stored_bytes
from pipeline.readers.evaluation.retrieval import retrieval
from pipeline.store.contract_fields import settings_with_defaults


@dataclass
class EncodedVideo:
    """One gallery video's tokens [T, H, W, D] and those of its altered copies."""

    video_id: str
    tokens: torch.Tensor
    altered: dict[str, torch.Tensor]


@dataclass
class MethodResult:
    """One row of the report: a method at a budget, averaged over the gallery videos (fidelity) or queries."""

    label: str
    method: str
    budget: int | str | None
    tokens_kept: float  # mean K over the gallery videos
    token_ratio: float  # tokens kept / T*H*W
    bytes_per_video: float
    byte_ratio: float  # bytes_per_video / bytes of the full tokens in float16
    rel_mse: float
    mean_cosine: float
    pooled_cosine: float
    recall: dict[str, dict[int, float]]  # similarity -> n -> recall@n over all queries
    recall_by_alteration: dict[str, dict[str, float]]  # similarity -> alteration -> recall@1
    compress_ms: float  # mean time to compress one video


@dataclass
class EvaluationReport:
    config: EvaluationConfig
    clips: list[str]
    encoder: str
    grid: tuple[int, int, int]  # (T, H, W) of every video
    dim: int
    gallery_size: int
    queries: int
    results: list[MethodResult]
    seconds: dict[str, float]  # wall time of each phase
    skipped: list[str] = field(default_factory=list)  # "<clip>: <reason>" for clips that could not be decoded


def list_clips(input: str) -> list[tuple[str, str]]:
    """(name, uri) of every video under `input` (a folder, a manifest or one file); names are file stems, made
    unique with the parent folder when two files share a stem."""
    uris = sorted(row["uri"] for row in list_videos(input))
    if not uris:
        raise FileNotFoundError(f"no video files under {input}")
    stems = [uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for uri in uris]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    names = [f"{uri.rstrip('/').rsplit('/', 2)[-2]}_{stem}" if stem in repeated else stem
             for stem, uri in zip(stems, uris)]
    return list(zip(names, uris))


def clip_tokenizer(config: EvaluationConfig, encoder) -> VideoTokenizer:
    """Decodes a whole clip (2 * frames * segments frames, split into segments afterwards) and encodes as the job
    does; the methods compress."""
    settings = settings_with_defaults(encoder=encoder.name, decoder=config.decoder,
                                      frames=2 * config.frames * config.segments, seed=config.seed)
    return VideoTokenizer(settings, encoder=encoder)


def decode_segments(name: str, uri: str, config: EvaluationConfig, tokenizer: VideoTokenizer) -> list[SegmentFrames]:
    return split_clip(name, tokenizer.decode(uri).frames, config.segments, config.frames)


def encode_videos(videos: list[SegmentFrames], tokenizer: VideoTokenizer, batch: int) -> list[EncodedVideo]:
    """Encode every gallery video and altered copy, at most `batch` frames per encoder call."""

    def encode(frames: np.ndarray) -> torch.Tensor:
        return torch.cat([tokenizer.encode(frames[i: i + batch]).cpu() for i in range(0, len(frames), batch)])

    return [EncodedVideo(video.video_id, encode(video.frames),
                         {name: encode(frames) for name, frames in video.altered.items()}) for video in videos]


def evaluate_method(method: str, budget: int | str | None, videos: list[EncodedVideo], config: EvaluationConfig,
                    adaptive_k: dict[tuple[str, str | None], int]) -> MethodResult:
    compress = Compressor(method, budget, config, adaptive_k)
    gallery = compress([video.tokens for video in videos], [(video.video_id, None) for video in videos])
    queries = {name: compress([video.altered[name] for video in videos], [(video.video_id, name) for video in videos])
               for name in ALTERATIONS}
    scores = [fidelity(video.tokens, kept) for video, kept in zip(videos, gallery)]
    t, h, w, d = videos[0].tokens.shape
    recall, by_alteration = retrieval(gallery, queries)
    return MethodResult(
        label=method_label(method, budget),
        method=method,
        budget=budget,
        tokens_kept=float(np.mean([kept.k for kept in gallery])),
        token_ratio=float(np.mean([kept.k / (t * h * w) for kept in gallery])),
        bytes_per_video=float(np.mean([stored_bytes(method, kept.k, t * h * w, d) for kept in gallery])),
        byte_ratio=float(np.mean([stored_bytes(method, kept.k, t * h * w, d) for kept in gallery]))
        / stored_bytes(FULL, t * h * w, t * h * w, d),
        rel_mse=float(np.mean([s["rel_mse"] for s in scores])),
        mean_cosine=float(np.mean([s["mean_cosine"] for s in scores])),
        pooled_cosine=float(np.mean([s["pooled_cosine"] for s in scores])),
        recall=recall,
        recall_by_alteration=by_alteration,
        compress_ms=1000.0 * compress.seconds / max(1, compress.videos),
    )


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block with `count` torch intra-op threads. Compression and scoring work on one small video at a
    time, where extra threads cost more in synchronisation than they save (several times more on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_clips(clips: list[tuple[str, str]], encoder, config: EvaluationConfig,
                   log: Callable[[str], None] = lambda message: None) -> EvaluationReport:
    """The whole evaluation over (name, uri) clips with a loaded encoder (see the module docstring)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = clip_tokenizer(config, encoder)
    videos, used, skipped = [], [], []
    for name, uri in clips:
        log(f"decoding {name}")
        try:
            videos += decode_segments(name, uri, config, tokenizer)
            used.append(name)
        except (DecodeError, OSError) as error:  # one broken or unreadable file should not void the others' results
            log(f"skipping {name}: {error}")
            skipped.append(f"{name}: {error}")
    seconds["decode"] = time.perf_counter() - started
    if len(videos) < 2:
        reasons = f" (could not be decoded: {'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"retrieval needs at least two videos, got {len(videos)}: give more clips or --segments"
                         + reasons)
    frame_count = sum(len(v.frames) + sum(len(f) for f in v.altered.values()) for v in videos)
    log(f"encoding {frame_count} frames ({len(videos)} videos x {1 + len(ALTERATIONS)} versions)")
    started = time.perf_counter()
    encoded = encode_videos(videos, tokenizer, config.encode_batch)
    seconds["encode"] = time.perf_counter() - started
    started = time.perf_counter()
    adaptive_k: dict[tuple[str, str | None], int] = {}
    results = []
    with torch_threads(1):
        for method, budget in methods_to_run(config):
            log(f"compressing and scoring {method_label(method, budget)}")
            results.append(evaluate_method(method, budget, encoded, config, adaptive_k))
    seconds["compress_and_score"] = time.perf_counter() - started
    t, h, w, d = encoded[0].tokens.shape
    return EvaluationReport(config, used, encoder.name, (t, h, w), d, len(encoded), len(encoded) * len(ALTERATIONS),
                            results, seconds, skipped)
