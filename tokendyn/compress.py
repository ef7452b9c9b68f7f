"""Token Dynamics compression of one video's patch tokens into a token base and a dynamics map.

tokens [T, H, W, D] -> CompressedVideo(base [K, D], dynamics [T, H, W], sizes [K]), where base holds the centroids
of a spherical k-means over all T*H*W L2-normalised tokens (tokendyn.kmeans) and dynamics[t, h, w] is the id of
the centroid that token belongs to, so base[dynamics] reconstructs every (normalised) token.

Fixed length: `k` given. Adaptive length: `k=None` picks K in [k_min, k_max] per video, by default the smallest K
whose mean cosine of tokens to their base vector reaches `target_fidelity` (`k_rule="elbow"`: the elbow of the
distortion curve); both rules are documented in tokendyn.kmeans. Either way K is smaller than asked when the
video has fewer distinct tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tokendyn.kmeans import KMeansResult, adaptive_kmeans_batch, check_k_rule, spherical_kmeans_batch

__all__ = ["CompressedVideo", "compress", "compress_batch"]

# Videos stacked into one batched fit hold at most this many float32 values (256 MB).
_BATCH_ELEMENTS = 1 << 26
# On CPU a video above this many values is fitted alone: its fit is compute-bound, and in a batch every video
# iterates until the slowest converges. Smaller videos are overhead-bound, and batching them is several times cheaper.
_CPU_BATCH_MAX_ELEMENTS = 1 << 19


@dataclass
class CompressedVideo:
    """A video as a token base and a dynamics map.

    base: [K, D] float32 centroids (means of L2-normalised tokens).
    dynamics: [T, H, W] int64 cluster ids in [0, K).
    sizes: [K] int64 number of tokens per cluster (all > 0).
    """

    base: Tensor
    dynamics: Tensor
    sizes: Tensor

    def __post_init__(self) -> None:
        if self.base.dim() != 2 or self.dynamics.dim() != 3 or self.sizes.dim() != 1:
            raise ValueError(
                "expected base [K, D], dynamics [T, H, W], sizes [K]; got shapes "
                f"{tuple(self.base.shape)}, {tuple(self.dynamics.shape)}, {tuple(self.sizes.shape)}"
            )
        if self.sizes.shape[0] != self.base.shape[0]:
            raise ValueError(f"sizes has {self.sizes.shape[0]} entries for {self.base.shape[0]} base rows")

    @property
    def k(self) -> int:
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.dynamics.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.dynamics.shape[1]), int(self.dynamics.shape[2])

    def decompress(self) -> Tensor:
        """-> [T, H, W, D] float32 = base[dynamics]: every token replaced by its centroid."""
        return self.base[self.dynamics]

    def pooled(self) -> Tensor:
        """-> [D] float32 size-weighted mean of the base, which equals the mean of all normalised tokens."""
        w = self.sizes.to(self.base.dtype)
        return (w[:, None] * self.base).sum(0) / w.sum()

    def to_storage(self, base_dtype: str = "float16") -> dict:
        """Plain values for Parquet/Lance.

        -> {"k", "dim", "num_frames", "grid_h", "grid_w": int,
            "base": np.ndarray [K, D] float16 or float32, "cluster_sizes": np.ndarray [K] int32,
            "dynamics": bytes, [T, H, W] in C order, uint8 when K <= 256 else uint16 little-endian,
            "pooled": np.ndarray [D] float32 (from the float32 base)}
        """
        if base_dtype not in ("float16", "float32"):
            raise ValueError(f"base_dtype must be 'float16' or 'float32', got {base_dtype!r}")
        if self.k > 65536:
            raise ValueError(f"K = {self.k} does not fit a uint16 dynamics map")
        h, w = self.grid
        ids = self.dynamics.detach().cpu().numpy()
        return {
            "k": self.k,
            "dim": self.dim,
            "num_frames": self.num_frames,
            "grid_h": h,
            "grid_w": w,
            "base": self.base.detach().float().cpu().numpy().astype(base_dtype),
            "cluster_sizes": self.sizes.detach().cpu().numpy().astype(np.int32),
            "dynamics": np.ascontiguousarray(ids.astype(_map_dtype(self.k))).tobytes(order="C"),
            "pooled": self.pooled().detach().float().cpu().numpy(),
        }

    @classmethod
    def from_storage(cls, d: dict) -> "CompressedVideo":
        """Inverse of `to_storage` (exact for a float32 base; the base comes back as float32, on CPU).

        Accepts numpy arrays or nested lists for base / cluster_sizes, and bytes or an integer array for
        dynamics. "pooled" is derived data and is not read.
        """
        k, dim = int(d["k"]), int(d["dim"])
        shape = (int(d["num_frames"]), int(d["grid_h"]), int(d["grid_w"]))
        base = np.asarray(d["base"], dtype=np.float32).reshape(k, dim)
        sizes = np.asarray(d["cluster_sizes"], dtype=np.int64).reshape(k)
        raw = d["dynamics"]
        if isinstance(raw, (bytes, bytearray, memoryview)):
            ids = np.frombuffer(raw, dtype=_map_dtype(k))
        else:
            ids = np.asarray(raw)
        if ids.size != shape[0] * shape[1] * shape[2]:
            raise ValueError(f"dynamics holds {ids.size} ids, expected {shape[0]}x{shape[1]}x{shape[2]}")
        ids = ids.astype(np.int64).reshape(shape)
        if ids.size and (ids.min() < 0 or ids.max() >= k):
            raise ValueError(f"dynamics ids must lie in [0, {k})")
        return cls(torch.from_numpy(base.copy()), torch.from_numpy(ids), torch.from_numpy(sizes))


def _map_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8) if k <= 256 else np.dtype("<u2")


def _check_video(tokens: Tensor) -> None:
    """tokens: [T, H, W, D] floating point with no empty axis."""
    if not isinstance(tokens, Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 4:
        raise ValueError(f"tokens must have shape [T, H, W, D] (rank 4), got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"empty video: tokens have shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {tokens.dtype}")


def _check_k(k: int | None, k_min: int, k_max: int) -> None:
    for name, value in (("k", k), ("k_min", k_min), ("k_max", k_max)):
        if name == "k" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1{' or None' if name == 'k' else ''}, got {value!r}")
    if k is None and k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")


def _record(result: KMeansResult, grid: tuple[int, int, int]) -> CompressedVideo:
    return CompressedVideo(result.centroids, result.labels.view(grid), result.sizes)


def compress_batch(
    videos: list[Tensor],
    k: int | None = 32,
    *,
    k_min: int = 8,
    k_max: int = 64,
    k_rule: str = "fidelity",
    target_fidelity: float = 0.9,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> list[CompressedVideo]:
    """Compress several videos; those of the same shape, dtype and device are fitted together.

    videos: list of [T, H, W, D] tensors -> one CompressedVideo each, in order, identical to `compress` of that
    video with the same arguments (on CUDA the same map, and the base to float rounding: atomic adds). A batch
    shares every step of the fit (one batched matmul instead of B), which is much cheaper on accelerators and for
    small videos; large videos on CPU are fitted one by one.
    """
    _check_k(k, k_min, k_max)
    if k is None:
        check_k_rule(k_rule, target_fidelity)
    for tokens in videos:
        _check_video(tokens)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, tokens in enumerate(videos):
        groups[(tuple(tokens.shape), tokens.dtype, tokens.device)].append(i)

    out: list[CompressedVideo | None] = [None] * len(videos)
    for (shape, _, device), members in groups.items():
        t, h, w, d = shape
        per_chunk = max(1, _BATCH_ELEMENTS // (t * h * w * d))
        if device.type == "cpu" and t * h * w * d > _CPU_BATCH_MAX_ELEMENTS:
            per_chunk = 1
        for s in range(0, len(members), per_chunk):
            chunk = members[s : s + per_chunk]
            x = torch.stack([videos[i].reshape(t * h * w, d) for i in chunk]) if len(chunk) > 1 else \
                videos[chunk[0]].reshape(1, t * h * w, d)  # a view: one video needs no copy
            if k is None:
                results = [r for r, _ in adaptive_kmeans_batch(x, k_min, k_max, rule=k_rule, target=target_fidelity,
                                                                seed=seed, max_iter=max_iter, tol=tol)]
            else:
                results = spherical_kmeans_batch(x, k, seed=seed, max_iter=max_iter, tol=tol)
            for i, r in zip(chunk, results):
                out[i] = _record(r, (t, h, w))
    return out  # type: ignore[return-value]


def compress(
    tokens: Tensor,
    k: int | None = 32,
    *,
    k_min: int = 8,
    k_max: int = 64,
    k_rule: str = "fidelity",
    target_fidelity: float = 0.9,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> CompressedVideo:
    """Compress one video.

    tokens: [T, H, W, D], any float dtype, any device (the result stays there).
    k: number of base vectors (fixed length), or None for adaptive length within [k_min, k_max], chosen by
    k_rule: "fidelity" (the smallest K whose mean cosine of tokens to their base vector reaches target_fidelity;
    k_max when none does) or "elbow" (target_fidelity unused). See tokendyn.kmeans.
    Raises ValueError for a wrong rank, an empty video, NaN/Inf tokens, k < 1 or a bad rule or target.
    """
    return compress_batch([tokens], k, k_min=k_min, k_max=k_max, k_rule=k_rule, target_fidelity=target_fidelity,
                          seed=seed, max_iter=max_iter, tol=tol)[0]
