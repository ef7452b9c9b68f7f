"""Fidelity of kept tokens, without an LLM.

The reference is always the L2-normalised original tokens (what Token Dynamics and the baselines summarise).
Shapes: tokens and reconstruction are [..., D] with the same leading shape (e.g. [T, H, W, D] and
base[dynamics] or kept[assignment]); a pooled vector is [D]. Every function returns a Python float.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reconstruction_rel_mse",
    "mean_cosine",
    "pooled_cosine",
    "token_ratio",
    "byte_ratio",
    "storage_nbytes",
]


def _pair(tokens: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
    if tokens.shape != reconstruction.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and reconstruction {tuple(reconstruction.shape)} differ")
    d = tokens.shape[-1]
    return F.normalize(tokens.reshape(-1, d).float(), dim=-1), reconstruction.reshape(-1, d).float()


def reconstruction_rel_mse(tokens: Tensor, reconstruction: Tensor) -> float:
    """sum |x - r|^2 / sum |x|^2 over rows, x the normalised tokens [..., D], r the reconstruction [..., D].

    For Token Dynamics this is the k-means distortion divided by the number of tokens.
    """
    x, r = _pair(tokens, reconstruction)
    return float(((x - r) ** 2).sum() / (x * x).sum().clamp_min(1e-30))


def mean_cosine(tokens: Tensor, reconstruction: Tensor) -> float:
    """Mean over rows of cos(x, r), tokens and reconstruction [..., D]."""
    x, r = _pair(tokens, reconstruction)
    return float(F.cosine_similarity(x, r, dim=-1, eps=1e-12).mean())


def pooled_cosine(reference: Tensor, pooled: Tensor) -> float:
    """cos(reference pooled vector, pooled [D]).

    reference: a pooled vector [D], or tokens [..., D] whose pooled vector (mean of the normalised tokens) is
    taken here.
    """
    if reference.dim() > 1:
        reference = F.normalize(reference.reshape(-1, reference.shape[-1]).float(), dim=-1).mean(0)
    return float(F.cosine_similarity(reference.float(), pooled.float(), dim=0, eps=1e-12))


def token_ratio(kept: Tensor, tokens: Tensor) -> float:
    """Vectors kept / tokens in: kept [K, D], tokens [..., D]."""
    return kept.shape[0] / (tokens.numel() // tokens.shape[-1])


def storage_nbytes(storage: dict) -> int:
    """Payload bytes of a `CompressedVideo.to_storage()` dict: its arrays and bytes (base, cluster sizes, dynamics
    map, pooled vector); the scalar shape fields are not counted."""
    total = 0
    for value in storage.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, (bytes, bytearray, memoryview)):
            total += len(value)
    return total


def byte_ratio(compressed_bytes: int, tokens: Tensor, bytes_per_value: int | None = None) -> float:
    """Bytes kept / raw bytes: compressed_bytes (e.g. `storage_nbytes`) over tokens [..., D] stored with
    bytes_per_value each (default: the tokens' own element size)."""
    per_value = tokens.element_size() if bytes_per_value is None else bytes_per_value
    return compressed_bytes / (tokens.numel() * per_value)
