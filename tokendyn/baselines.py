"""Baselines at an equal token budget, for evaluation.

Each takes tokens [T, H, W, D] and a budget and returns (kept [K, D] float32, assignment [T, H, W] int64 in
[0, K)), so kept[assignment] is a reconstruction and the metrics of tokendyn.metrics apply as to Token Dynamics.
Like Token Dynamics, both summarise the L2-normalised tokens: each kept vector is the mean of the normalised
tokens assigned to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokendyn.kmeans import normalize_rows

__all__ = ["uniform_pool", "tome_merge", "pool_grid", "frame_pool"]

_CHUNK_ELEMENTS = 1 << 22


def _check(tokens: Tensor, budget: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 4:
        raise ValueError(f"tokens must be a tensor [T, H, W, D], got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.numel() == 0:
        raise ValueError(f"empty video: tokens have shape {tuple(tokens.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")


def _means(x: Tensor, assignment: Tensor, k: int) -> Tensor:
    """x [N, D], assignment [N] in [0, k) -> [k, D] mean of the rows assigned to each id."""
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, assignment, x)
    counts = torch.bincount(assignment, minlength=k).clamp_min(1)
    return sums / counts[:, None].to(x.dtype)


def pool_grid(shape: tuple[int, int, int], budget: int) -> tuple[int, int, int]:
    """(T, H, W), budget -> bins (a, b, c) per axis.

    a * b * c <= budget as large as possible; among those, square spatial bins (H / b closest to W / c), then
    as many spatial bins as possible: the budget keeps spatial detail and pools time first.
    """
    T, H, W = shape
    best, best_key = (1, 1, 1), None
    for a in range(1, T + 1):
        for b in range(1, H + 1):
            c = min(W, budget // (a * b))
            if c < 1:
                break
            key = (-(a * b * c), abs(H / b - W / c), -(b * c))
            if best_key is None or key < best_key:
                best, best_key = (a, b, c), key
    return best


def uniform_pool(tokens: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Uniform spatio-temporal average pooling.

    tokens [T, H, W, D], budget -> kept [a*b*c, D], assignment [T, H, W]: the video is cut into a x b x c
    near-equal contiguous bins (`pool_grid`; K = a*b*c <= budget, fewer only when the budget does not factor
    over the axes), and each bin keeps the mean of its normalised tokens.
    """
    _check(tokens, budget)
    T, H, W, D = tokens.shape
    a, b, c = pool_grid((T, H, W), budget)
    dev = tokens.device
    bt = torch.arange(T, device=dev) * a // T
    bh = torch.arange(H, device=dev) * b // H
    bw = torch.arange(W, device=dev) * c // W
    assignment = (bt[:, None, None] * b + bh[None, :, None]) * c + bw[None, None, :]
    x = normalize_rows(tokens.reshape(-1, D))
    return _means(x, assignment.reshape(-1), a * b * c), assignment


def frame_pool(tokens: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """One token per frame (per group of frames when T > budget): the mean of its normalised tokens.

    tokens [T, H, W, D], budget -> kept [min(T, budget), D], assignment [T, H, W] (every cell of a frame maps to
    that frame's token): the spatial layout is pooled away, the order of time is kept.
    """
    _check(tokens, budget)
    T, H, W, D = tokens.shape
    bins = min(T, budget)
    bt = torch.arange(T, device=tokens.device) * bins // T
    assignment = bt[:, None, None].expand(T, H, W)
    x = normalize_rows(tokens.reshape(-1, D))
    return _means(x, assignment.reshape(-1), bins), assignment.contiguous()


def _most_similar(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a [Na, D], b [Nb, D] unit rows -> (best cosine [Na], index into b [Na]), in row chunks of a."""
    step = max(1, _CHUNK_ELEMENTS // max(b.shape[0], 1))
    sims, idx = [], []
    for s in range(0, a.shape[0], step):
        v, i = (a[s : s + step] @ b.T).max(1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def tome_merge(tokens: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """ToMe-style bipartite soft matching over all T*H*W tokens, repeated until `budget` tokens remain.

    tokens [T, H, W, D], budget -> kept [min(budget, N), D], assignment [T, H, W].
    One round: the current tokens (raster order) alternate into sets A and B; each A token finds its most
    cosine-similar B token; the r most similar A tokens merge into their B partners (size-weighted means, so a
    kept vector is the mean of its normalised tokens), with r = min(|A|, tokens left - budget).
    """
    _check(tokens, budget)
    T, H, W, D = tokens.shape
    x = normalize_rows(tokens.reshape(-1, D))
    sums, sizes = x.clone(), torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
    owner = torch.arange(x.shape[0], device=x.device)  # current token of each original token
    while sums.shape[0] > budget:
        n = sums.shape[0]
        means = torch.nn.functional.normalize(sums / sizes[:, None], dim=-1)
        a_idx, b_idx = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
        sim, partner = _most_similar(means[a_idx], means[b_idx])
        r = min(a_idx.numel(), n - budget)
        merged = torch.sort(sim, descending=True, stable=True).indices[:r]  # positions in A
        target = b_idx[partner[merged]]
        source = a_idx[merged]
        sums = sums.index_add(0, target, sums[source])
        sizes = sizes.index_add(0, target, sizes[source])
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        keep[source] = False
        redirect = torch.arange(n, device=x.device)
        redirect[source] = target
        new_id = torch.cumsum(keep, 0) - 1
        owner = new_id[redirect[owner]]
        sums, sizes = sums[keep], sizes[keep]
    return sums / sizes[:, None], owner.view(T, H, W)
