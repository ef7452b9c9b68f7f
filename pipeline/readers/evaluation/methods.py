"""Every method in one shape (`KeptTokens`: K kept vectors and the map of cells to them), its fidelity and its
stored size: Token Dynamics at fixed and adaptive K, the tokendyn baselines at the same budgets, full tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tokendyn
from pipeline.readers.evaluation.config import ADAPTIVE, EvaluationConfig
from tokendyn import baselines, metrics

FULL = "full"
TOKEN_DYNAMICS = "token_dynamics"
BASELINES = {"uniform_pool": baselines.uniform_pool, "tome_merge": baselines.tome_merge}
BYTES_PER_VALUE = 2  # kept vectors stored as float16, as the pipeline writes bases
POOLED_BYTES_PER_VALUE = 4  # the pooled vector is stored as float32
SIZE_BYTES = 4  # cluster sizes are int32


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


def fidelity(tokens: torch.Tensor, kept: KeptTokens) -> dict[str, float]:
    """Reconstruction and pooled-vector fidelity of what a method kept, against the full tokens [T, H, W, D]."""
    rebuilt = kept.reconstruct()
    return {
        "rel_mse": metrics.reconstruction_rel_mse(tokens, rebuilt),
        "mean_cosine": metrics.mean_cosine(tokens, rebuilt),
        "pooled_cosine": metrics.pooled_cosine(tokens, kept.pooled),
    }


class Compressor:
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
