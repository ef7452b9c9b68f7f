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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

import tokendyn
from tokendyn import baselines, metrics

ALTERATIONS = ("temporal_shift", "crop", "resize", "colour")
SIMILARITIES = ("pooled", "maxsim")
RECALL_AT = (1, 5)
FULL = "full"
TOKEN_DYNAMICS = "token_dynamics"
BASELINES = {"uniform_pool": baselines.uniform_pool, "tome_merge": baselines.tome_merge}
ADAPTIVE = "adaptive"
BYTES_PER_VALUE = 2  # kept vectors stored as float16, as the pipeline writes bases
POOLED_BYTES_PER_VALUE = 4  # the pooled vector is stored as float32
SIZE_BYTES = 4  # cluster sizes are int32


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class EvaluationConfig:
    frames: int = 8  # T, frames per video (segment)
    segments: int = 6  # videos cut from each clip
    ks: tuple[int, ...] = (8, 16, 32, 64)  # fixed budgets
    adaptive: bool = True
    k_min: int = 8
    k_max: int = 64
    k_rule: str = "fidelity"  # adaptive K rule, see tokendyn.kmeans
    target_fidelity: float = 0.9
    seed: int = 0
    decoder: str = "decord"
    encode_batch: int = 8  # frames per encoder call (small batches run faster on CPU here)

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if self.encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {self.encode_batch}")
        if not self.ks and not self.adaptive:
            raise ValueError("nothing to evaluate: give at least one K or keep adaptive on")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"every K must be >= 1, got {list(self.ks)}")
        if self.adaptive and not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.adaptive and (self.k_rule not in ("fidelity", "elbow") or not 0.0 < self.target_fidelity <= 1.0):
            raise ValueError(f"need k_rule fidelity or elbow and 0 < target_fidelity <= 1, got {self.k_rule!r}, "
                             f"{self.target_fidelity}")

    @property
    def budgets(self) -> list[int | str]:
        return [*sorted(set(self.ks)), *([ADAPTIVE] if self.adaptive else [])]


# ---------------------------------------------------------------------------------------------------------------
# videos: segments of decoded clips and their altered copies


@dataclass
class SegmentFrames:
    """One gallery video cut from a clip, and its altered copies (all uint8 [T, h, w, 3])."""

    video_id: str  # "<clip name>/<segment index>"
    frames: np.ndarray
    altered: dict[str, np.ndarray] = field(default_factory=dict)


def shift_positions(frames: int) -> int:
    """Positions the temporal-shift query is moved by: about a quarter of a segment (2T positions), odd so that
    it falls between the original's sampled positions (which are even)."""
    return 2 * (frames // 4) + 1


def segment_positions(segment: int, segments: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the clip's 2*T*segments decoded frames) of a segment's video and of its shifted copy."""
    window = 2 * frames
    original = segment * window + 2 * np.arange(frames)
    shift = shift_positions(frames)
    # The last segment has no later frames to move into, so its copy moves earlier instead.
    shifted = original - shift if segment == segments - 1 and segments > 1 else original + shift
    return original, np.clip(shifted, 0, segments * window - 1)


def crop_frames(frames: np.ndarray, keep: float = 0.7) -> np.ndarray:
    """A keep x keep window off the top-left corner (offset by 5% of each side), scaled back to full size."""
    height, width = frames.shape[1:3]
    left, top = 0.05 * width, 0.05 * height
    box = (left, top, left + keep * width, top + keep * height)
    return _map_images(frames, lambda image: image.resize((width, height), Image.Resampling.BICUBIC, box=box))


def low_resolution_frames(frames: np.ndarray, factor: int = 3) -> np.ndarray:
    """Shrunk by `factor` on each side and scaled back up: fine detail is lost, layout is kept."""
    height, width = frames.shape[1:3]
    small = (max(1, width // factor), max(1, height // factor))
    return _map_images(frames, lambda image: image.resize(small, Image.Resampling.BILINEAR)
                       .resize((width, height), Image.Resampling.BICUBIC))


def recoloured_frames(frames: np.ndarray, hue_degrees: float = 30.0, saturation: float = 0.6,
                      brightness: float = 1.15) -> np.ndarray:
    """Hue rotated, saturation and brightness scaled (as a colour-graded re-upload would be)."""
    hue_steps = int(round(hue_degrees / 360.0 * 256))

    def recolour(image: Image.Image) -> Image.Image:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue_steps) % 256
        rotated = Image.fromarray(hsv, mode="HSV").convert("RGB")
        return ImageEnhance.Brightness(ImageEnhance.Color(rotated).enhance(saturation)).enhance(brightness)

    return _map_images(frames, recolour)


def _map_images(frames: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(change(Image.fromarray(frame))) for frame in frames])


FRAME_ALTERATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "crop": crop_frames,
    "resize": low_resolution_frames,
    "colour": recoloured_frames,
}


def split_clip(name: str, decoded: np.ndarray, segments: int, frames: int) -> list[SegmentFrames]:
    """A clip's decoded frames [2*T*segments, h, w, 3] -> its segments, each with all four altered copies."""
    if decoded.shape[0] != 2 * frames * segments:
        raise ValueError(f"{name}: expected {2 * frames * segments} decoded frames, got {decoded.shape[0]}")
    videos = []
    for segment in range(segments):
        original, shifted = segment_positions(segment, segments, frames)
        video = SegmentFrames(f"{name}/{segment}", decoded[original])
        video.altered["temporal_shift"] = decoded[shifted]
        for alteration, change in FRAME_ALTERATIONS.items():
            video.altered[alteration] = change(video.frames)
        videos.append(video)
    return videos


# ---------------------------------------------------------------------------------------------------------------
# compression by every method, in one shape


@dataclass
class KeptTokens:
    """What a method keeps of one video: K vectors and, for every cell, the one that stands for it."""

    kept: torch.Tensor  # [K, D] float32
    assignment: torch.Tensor  # [T, H, W] int64 in [0, K)
    pooled: torch.Tensor  # [D] float32

    @property
    def k(self) -> int:
        return int(self.kept.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        """[K] cells each kept vector stands for."""
        return torch.bincount(self.assignment.reshape(-1), minlength=self.k)

    def reconstruct(self) -> torch.Tensor:
        """[T, H, W, D]: every cell replaced by its kept vector."""
        return self.kept[self.assignment]


def full_tokens(tokens: torch.Tensor) -> KeptTokens:
    """The reference: every L2-normalised token kept (what all methods summarise), pooled = their mean."""
    t, h, w, d = tokens.shape
    normalised = F.normalize(tokens.reshape(-1, d).float(), dim=-1)
    return KeptTokens(normalised, torch.arange(t * h * w).reshape(t, h, w), normalised.mean(0))


def token_dynamics(videos: list[torch.Tensor], k: int | None, config: EvaluationConfig) -> list[KeptTokens]:
    """Token Dynamics of each video [T, H, W, D] (k=None: adaptive); batched, with the same result as one by one."""
    compressed = tokendyn.compress_batch(videos, k, k_min=config.k_min, k_max=config.k_max, k_rule=config.k_rule,
                                         target_fidelity=config.target_fidelity, seed=config.seed)
    return [KeptTokens(video.base.float(), video.dynamics.long(), video.pooled().float()) for video in compressed]


def baseline(name: str, tokens: torch.Tensor, k: int) -> KeptTokens:
    """A tokendyn baseline at budget k; its pooled vector is the size-weighted mean of what it kept."""
    kept, assignment = BASELINES[name](tokens, k)
    kept, assignment = kept.float(), assignment.long()
    sizes = torch.bincount(assignment.reshape(-1), minlength=kept.shape[0]).to(kept.dtype)
    return KeptTokens(kept, assignment, (sizes[:, None] * kept).sum(0) / sizes.sum())


def stored_bytes(method: str, k: int, map_cells: int, dim: int) -> int:
    """Bytes to store one video as the pipeline stores a row: K x D float16 vectors and the float32 pooled vector;
    for methods whose assignment depends on the data, also the cluster sizes (int32) and the map (one id per cell:
    1 byte for K <= 256, else 2). Uniform pooling's assignment and sizes follow from the grid. Full tokens: the
    T*H*W x D tokens in float16."""
    if method == FULL:
        return map_cells * dim * BYTES_PER_VALUE
    kept = k * dim * BYTES_PER_VALUE + dim * POOLED_BYTES_PER_VALUE
    if method == "uniform_pool":
        return kept
    return kept + k * SIZE_BYTES + map_cells * (1 if k <= 256 else 2)


def method_label(method: str, budget: int | str | None) -> str:
    return FULL if method == FULL else f"{method}@{budget}"


# ---------------------------------------------------------------------------------------------------------------
# retrieval


def pooled_similarity(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """queries [Q, D], gallery [G, D] -> [Q, G] cosine similarity."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T


def maxsim_similarity(queries: Sequence[KeptTokens], gallery: Sequence[KeptTokens]) -> torch.Tensor:
    """[Q, G]: for each query, the size-weighted mean over its kept tokens of the best cosine in the gallery video."""
    gallery_vectors = F.normalize(torch.cat([g.kept for g in gallery]).float(), dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(gallery)), torch.tensor([g.k for g in gallery]))
    scores = torch.empty(len(queries), len(gallery))
    for row, query in enumerate(queries):
        cosines = F.normalize(query.kept.float(), dim=-1) @ gallery_vectors.T  # [Kq, total gallery tokens]
        best = torch.full((query.k, len(gallery)), -math.inf).scatter_reduce(
            1, owner.expand(query.k, -1), cosines, reduce="amax")
        weights = query.sizes.float()
        scores[row] = (weights[:, None] * best).sum(0) / weights.sum()
    return scores


def ranks_of_targets(similarity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q] 1-based rank of each query's target; gallery items scoring at least as high count ahead of it."""
    target_scores = similarity.gather(1, targets[:, None])
    others_ahead = (similarity >= target_scores).sum(1) - 1
    return others_ahead + 1


def recall_at(similarity: torch.Tensor, targets: torch.Tensor, n: int) -> float:
    """Share of queries whose target is among the top n of their row of similarity [Q, G]."""
    return float((ranks_of_targets(similarity, targets) <= n).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# running it


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
    from pipeline.job.sources import list_videos

    uris = sorted(row["uri"] for row in list_videos(input))
    if not uris:
        raise FileNotFoundError(f"no video files under {input}")
    stems = [uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for uri in uris]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    names = [f"{uri.rstrip('/').rsplit('/', 2)[-2]}_{stem}" if stem in repeated else stem
             for stem, uri in zip(stems, uris)]
    return list(zip(names, uris))


def decode_segments(name: str, uri: str, config: EvaluationConfig, size: tuple[int, int]) -> list[SegmentFrames]:
    from pipeline.job.decode import decode_video

    decoded = decode_video(uri, num_frames=2 * config.frames * config.segments, size=size, decoder=config.decoder)
    return split_clip(name, decoded.frames, config.segments, config.frames)


def encode_videos(videos: list[SegmentFrames], encoder, batch: int) -> list[EncodedVideo]:
    """Encode every gallery video and altered copy, at most `batch` frames per encoder call."""

    def encode(frames: np.ndarray) -> torch.Tensor:
        return torch.cat([encoder.encode(frames[i: i + batch]).cpu() for i in range(0, len(frames), batch)])

    return [EncodedVideo(video.video_id, encode(video.frames),
                         {name: encode(frames) for name, frames in video.altered.items()}) for video in videos]


def fidelity(tokens: torch.Tensor, kept: KeptTokens) -> dict[str, float]:
    """Reconstruction and pooled-vector fidelity of what a method kept, against the full tokens [T, H, W, D]."""
    rebuilt = kept.reconstruct()
    return {
        "rel_mse": metrics.reconstruction_rel_mse(tokens, rebuilt),
        "mean_cosine": metrics.mean_cosine(tokens, rebuilt),
        "pooled_cosine": metrics.pooled_cosine(tokens, kept.pooled),
    }


class _Compressor:
    """Applies one method at one budget to groups of videos, timing it. For the "adaptive" budget the baselines
    take the K that Token Dynamics chose for the same tokens (`adaptive_k`, keyed by (video_id, alteration or
    None for the gallery video))."""

    def __init__(self, method: str, budget: int | str | None, config: EvaluationConfig,
                 adaptive_k: dict[tuple[str, str | None], int]):
        self.method, self.budget, self.config, self.adaptive_k = method, budget, config, adaptive_k
        self.seconds, self.videos = 0.0, 0

    def __call__(self, tokens: list[torch.Tensor], keys: list[tuple[str, str | None]]) -> list[KeptTokens]:
        started = time.perf_counter()
        kept = self._compress(tokens, keys)
        self.seconds += time.perf_counter() - started
        self.videos += len(tokens)
        return kept

    def _compress(self, tokens: list[torch.Tensor], keys: list[tuple[str, str | None]]) -> list[KeptTokens]:
        if self.method == FULL:
            return [full_tokens(video) for video in tokens]
        if self.method == TOKEN_DYNAMICS:
            kept = token_dynamics(tokens, None if self.budget == ADAPTIVE else self.budget, self.config)
            if self.budget == ADAPTIVE:
                self.adaptive_k.update((key, video.k) for key, video in zip(keys, kept))
            return kept
        ks = [self.adaptive_k[key] for key in keys] if self.budget == ADAPTIVE else [self.budget] * len(tokens)
        return [baseline(self.method, video, k) for video, k in zip(tokens, ks)]


def methods_to_run(config: EvaluationConfig) -> list[tuple[str, int | str | None]]:
    """(method, budget) pairs in report order: full tokens, then per budget Token Dynamics and the baselines
    (Token Dynamics first, so that the adaptive baselines find its choice of K)."""
    pairs: list[tuple[str, int | str | None]] = [(FULL, None)]
    for budget in config.budgets:
        pairs += [(TOKEN_DYNAMICS, budget), *((name, budget) for name in BASELINES)]
    return pairs


def evaluate_method(method: str, budget: int | str | None, videos: list[EncodedVideo], config: EvaluationConfig,
                    adaptive_k: dict[tuple[str, str | None], int]) -> MethodResult:
    compress = _Compressor(method, budget, config, adaptive_k)
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


def retrieval(gallery: list[KeptTokens], queries: dict[str, list[KeptTokens]]
              ) -> tuple[dict[str, dict[int, float]], dict[str, dict[str, float]]]:
    """Recall@n of every similarity over all queries, and recall@1 per alteration. Query i of each alteration is
    an altered copy of gallery video i."""
    targets = torch.arange(len(gallery))
    gallery_pooled = torch.stack([kept.pooled for kept in gallery])
    similarity = {
        name: {"pooled": pooled_similarity(torch.stack([kept.pooled for kept in altered]), gallery_pooled),
               "maxsim": maxsim_similarity(altered, gallery)}
        for name, altered in queries.items()
    }
    recall = {
        kind: {n: recall_at(torch.cat([similarity[name][kind] for name in queries]),
                            targets.repeat(len(queries)), n) for n in RECALL_AT}
        for kind in SIMILARITIES
    }
    by_alteration = {kind: {name: recall_at(similarity[name][kind], targets, 1) for name in queries}
                     for kind in SIMILARITIES}
    return recall, by_alteration


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
    from pipeline.job.decode import DecodeError

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    videos, used, skipped = [], [], []
    for name, uri in clips:
        log(f"decoding {name}")
        try:
            videos += decode_segments(name, uri, config, tuple(encoder.input_size))
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
    encoded = encode_videos(videos, encoder, config.encode_batch)
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


# ---------------------------------------------------------------------------------------------------------------
# reporting


def reconstruction_wins(report: EvaluationReport) -> dict[int | str, bool]:
    """Per budget: does Token Dynamics rebuild the tokens with a lower relative MSE than every baseline?"""
    by_label = {result.label: result for result in report.results}
    wins = {}
    for budget in report.config.budgets:
        ours = by_label[method_label(TOKEN_DYNAMICS, budget)].rel_mse
        wins[budget] = all(ours < by_label[method_label(name, budget)].rel_mse for name in BASELINES)
    return wins


def _format_bytes(count: float) -> str:
    return f"{count / 1024:,.1f} KiB"


def markdown_report(report: EvaluationReport) -> str:
    """The results as Markdown: the main table, recall@1 per alteration, and the reconstruction verdict."""
    t, h, w = report.grid
    config = report.config
    lines = [
        "## Token Dynamics vs baselines at equal token budgets",
        "",
        f"{len(report.clips)} clips x {config.segments} segments = {report.gallery_size} videos of {t} frames x "
        f"{h}x{w} cells ({t * h * w} tokens of {report.dim} dims, {report.encoder}); {report.queries} queries "
        f"({', '.join(ALTERATIONS)}). Fidelity is averaged over the videos, recall over all queries.",
        "",
        "| method | tokens kept | token ratio | bytes / video | rel. MSE (lower is better) | mean cosine | "
        "pooled cosine | R@1 pooled | R@5 pooled | R@1 MaxSim | R@5 MaxSim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.label} | {r.tokens_kept:.1f} | {r.token_ratio:.3f} | {_format_bytes(r.bytes_per_video)} "
            f"({r.byte_ratio:.1%}) | "
            f"{r.rel_mse:.4f} | {r.mean_cosine:.4f} | {r.pooled_cosine:.4f} | {r.recall['pooled'][1]:.3f} | "
            f"{r.recall['pooled'][5]:.3f} | {r.recall['maxsim'][1]:.3f} | {r.recall['maxsim'][5]:.3f} |")
    lines += ["", "Recall@1 per alteration (MaxSim / pooled):", "",
              "| method | " + " | ".join(ALTERATIONS) + " |", "|---|" + "---:|" * len(ALTERATIONS)]
    for r in report.results:
        cells = [f"{r.recall_by_alteration['maxsim'][a]:.2f} / {r.recall_by_alteration['pooled'][a]:.2f}"
                 for a in ALTERATIONS]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    if report.skipped:
        lines += ["", "Skipped (could not be decoded): " + "; ".join(report.skipped) + "."]
    wins = reconstruction_wins(report)
    verdict = ", ".join(f"K={budget}: {'yes' if won else 'no'}" for budget, won in wins.items())
    lines += ["",
              f"Token Dynamics reconstructs better (lower rel. MSE) than both baselines at equal budget: {verdict}.",
              "", "Time: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in report.seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def report_as_dict(report: EvaluationReport) -> dict:
    """JSON-ready form of the report."""
    from dataclasses import asdict

    data = asdict(report)
    data["config"]["ks"] = list(report.config.ks)
    data["reconstruction_wins"] = {str(budget): won for budget, won in reconstruction_wins(report).items()}
    return data


_STYLE = {TOKEN_DYNAMICS: ("tab:red", "o", "Token Dynamics"), "uniform_pool": ("tab:blue", "s", "uniform pooling"),
          "tome_merge": ("tab:green", "^", "ToMe merging")}


def plot_report(report: EvaluationReport, path) -> None:
    """PNG: rel. MSE, mean cosine and recall@1 (MaxSim, pooled) against tokens kept, one line per method over the
    fixed budgets, adaptive budgets as stars, full tokens as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rel_mse", "reconstruction rel. MSE (lower is better)"), ("mean_cosine", "mean cosine"),
              ("maxsim", "recall@1, MaxSim"), ("pooled", "recall@1, pooled cosine")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    full = next(r for r in report.results if r.method == FULL)
    for axis, (key, title) in zip(axes, panels):
        for method, (colour, marker, name) in _STYLE.items():
            fixed = sorted((r for r in report.results if r.method == method and r.budget != ADAPTIVE),
                           key=lambda r: r.tokens_kept)
            axis.plot([r.tokens_kept for r in fixed], [_plotted_value(r, key) for r in fixed],
                      marker=marker, color=colour, label=name)
            for r in report.results:
                if r.method == method and r.budget == ADAPTIVE:
                    axis.plot([r.tokens_kept], [_plotted_value(r, key)], marker="*", markersize=13, color=colour,
                              markeredgecolor="black", linestyle="none")
        if key in SIMILARITIES:  # full tokens reconstruct themselves exactly: a line only where it says something
            axis.axhline(_plotted_value(full, key), color="black", linestyle="--", linewidth=1, label="full tokens")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(report.config.ks) or [1], [str(k) for k in sorted(report.config.ks)] or ["1"])
        axis.minorticks_off()
        axis.set_xlabel("tokens kept per video")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    if all(r.rel_mse > 0 for r in report.results if r.method != FULL):
        axes[0].set_yscale("log")
    axes[-1].plot([], [], marker="*", color="grey", markeredgecolor="black", linestyle="none", markersize=11,
                  label="adaptive K")
    axes[-1].legend(fontsize=8)
    t, h, w = report.grid
    figure.suptitle(f"{report.gallery_size} videos ({len(report.clips)} clips x {report.config.segments} segments), "
                    f"{t * h * w} tokens each, {report.encoder}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plotted_value(result: MethodResult, key: str) -> float:
    if key in SIMILARITIES:
        return result.recall[key][1]
    return getattr(result, key)
