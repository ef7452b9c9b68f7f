"""Shared building blocks of the spherical k-means (tokendyn.kmeans), read by several of its steps.

Owns the argument checks of the entry points, `normalize_rows`, the row-chunk size of the [B, rows, K]
similarity blocks (`_CHUNK_ELEMENTS`, read through `_rows_per_chunk`), the cluster sizes and means of a labelling,
and the distortion and mean cosine (fidelity) of a partition computed from its means alone (definitions in
tokendyn.kmeans).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Bounds a [B, rows, K] similarity block to a few tens of MB per video. It depends on K only, so a video gives
# bit-identical results alone or in a batch.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_options(max_iter: int, tol: float) -> None:
    _check_int("max_iter", max_iter)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def _check_points(x: Tensor, rank: int) -> None:
    """x: [N, D] (rank 2) or [B, N, D] (rank 3), floating point, non-empty."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        want = "[N, D]" if rank == 2 else "[B, N, D]"
        raise ValueError(f"expected a rank-{rank} tensor {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty input: shape {tuple(x.shape)} has no tokens or no features")
    if not x.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {x.dtype}")


def normalize_rows(x: Tensor) -> Tensor:
    """x: [..., D] any float dtype -> [..., D] float32 with unit L2 rows (all-zero rows stay zero).

    Raises ValueError on NaN/Inf. The check runs on the row norms (a NaN or Inf entry makes its norm NaN or Inf),
    which is cheaper than a pass of isfinite over the input.
    """
    return _normalize(x)[0]


def _normalize(x: Tensor) -> tuple[Tensor, Tensor]:
    """`normalize_rows`, also returning sq_norms [...] float64: the squared norms of the normalised rows (1, or 0
    for all-zero rows), from the row norms rather than a second pass over the rows."""
    x = x.float()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("tokens contain NaN or Inf")
    clamped = norms.clamp_min(1e-12)
    return x / clamped, (norms / clamped).double().square()[..., 0]



# ----------------------------------------------------------------------------------------------------------------
# shared building blocks; x is [B, N, D] float32 with normalised rows


def _rows_per_chunk(k: int) -> int:
    return max(256, _CHUNK_ELEMENTS // max(k, 1))



def _counts(labels: Tensor, k: int) -> Tensor:
    """labels [B, N] -> [B, k] int64 cluster sizes (integer scatter: exact and order-free on every device)."""
    return torch.zeros(labels.shape[0], k, dtype=torch.int64, device=labels.device).scatter_add_(
        1, labels, torch.ones_like(labels)
    )


def _cluster_means(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x [B, N, D], labels [B, N] -> means [B, k, D] (zero for empty clusters), sizes [B, k] int64."""
    B, N, D = x.shape
    if x.device.type == "cpu":
        # index_add_ is sequential on CPU: deterministic and the cheapest.
        flat = labels if B == 1 else labels + torch.arange(B, device=x.device)[:, None] * k
        sums = x.new_zeros(B * k, D).index_add_(0, flat.reshape(-1), x.reshape(B * N, D)).view(B, k, D)
    else:
        # index_add_ uses float atomics on accelerators (run-to-run noise); a one-hot matmul is deterministic.
        sums = x.new_zeros(B, k, D)
        step = _rows_per_chunk(k)
        for s in range(0, N, step):
            onehot = F.one_hot(labels[:, s : s + step], k).to(x.dtype)
            sums += torch.bmm(onehot.transpose(1, 2), x[:, s : s + step])
    sizes = _counts(labels, k)
    return sums / sizes.clamp_min(1)[:, :, None].to(x.dtype), sizes


def _distortion(x_sq_total: Tensor, means: Tensor, sizes: Tensor) -> Tensor:
    """[B] sum |x|^2, means [B, K, D], sizes [B, K] -> [B] float64 distortion.

    For mean centroids sum_i |x_i - c|^2 = sum_i |x_i|^2 - n |c|^2 per cluster, which needs no pass over the
    rows; with float32 centroids the absolute error is about 1e-7 N.
    """
    c_sq = (means.double() ** 2).sum(-1)
    return (x_sq_total - (sizes.double() * c_sq).sum(1)).clamp_min(0.0)



def _mean_cosine(centres: Tensor, sizes: Tensor, n_rows: int) -> Tensor:
    """centres [B, K, D] (means), sizes [B, K] -> [B] float64 mean over rows of the cosine to their centroid.

    The rows of a cluster sum to n c, so their cosines to c / |c| sum to n |c|.
    """
    return (sizes.double() * centres.double().norm(dim=-1)).sum(1) / n_rows

