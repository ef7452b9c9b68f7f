"""Lloyd refinement, step 4 of the fit in tokendyn.kmeans (run again after each split/merge move): cosine
assignment, member means, the refill of emptied clusters, and the bounded variant that skips settled rows.

Each row goes to the centroid of highest cosine similarity, each centroid becomes the mean of its member rows,
until no centroid moves by `tol` (L2) or after `max_iter` iterations. On CPU, for videos large enough
(`_bounds_pay`, BOUNDED_LLOYD_MIN_WORK), bounds on the similarities skip the rows whose label cannot change
(`_lloyd_bounded`). A cluster emptied during Lloyd takes the row farthest from its own centroid among clusters
that can spare one (`_fill_empty`). Similarities are computed in row chunks: nothing is N x N.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokendyn.clustering.common import _cluster_means, _counts, _rows_per_chunk

CONVERGENCE_CHECK_EVERY = 4
# Lloyd on CPU skips the rows that bounds prove cannot change label (`_lloyd_bounded`) once one video's
# similarity product has this many multiply-adds (16 frames x 7 x 7 x 1280 at K = 32 has 2^25).
BOUNDED_LLOYD_MIN_WORK = 1 << 23
# Bounds must separate a row's best similarity from the others by this much before it is skipped; float32
# rounding of the similarities and drifts is orders of magnitude smaller.
BOUND_MARGIN = 1e-4


def _assign(x: Tensor, centres: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """x [B, N, D], centres [B, K, D] (means), valid [B, K] or None (all valid) -> labels [B, N], cosine [B, N].

    Cosine assignment: argmax over valid clusters of x . c / |c|, in row chunks.
    """
    N = x.shape[1]
    dirs = F.normalize(centres, dim=-1, eps=1e-12).transpose(1, 2)  # [B, D, K]
    step = _rows_per_chunk(centres.shape[1])
    best, labels = [], []
    for s in range(0, N, step):
        sim = torch.bmm(x[:, s : s + step], dirs)
        if valid is not None:
            sim = sim.masked_fill_(~valid[:, None, :], -math.inf)
        b, l = sim.max(-1)
        best.append(b)
        labels.append(l)
    return torch.cat(labels, 1), torch.cat(best, 1)


def _dot_own(x: Tensor, vectors: Tensor, labels: Tensor) -> Tensor:
    """x [B, N, D], vectors [B, K, D], labels [B, N] -> [B, N] x_i . vectors[l_i].

    Row chunks of a [B, N, K] product, then the own column: a gather of the vectors to [B, N, D] would cost
    as much arithmetic and a fresh N x D buffer (page faults that cost more than the product here).
    """
    N = x.shape[1]
    step = _rows_per_chunk(vectors.shape[1])
    vectors_t = vectors.transpose(1, 2)
    return torch.cat([torch.bmm(x[:, s : s + step], vectors_t).gather(2, labels[:, s : s + step, None])[:, :, 0]
                      for s in range(0, N, step)], 1)


def _fill_empty(labels: Tensor, sim_of: Callable[[], Tensor], valid: Tensor, counts: Tensor | None = None
                ) -> Tensor:
    """labels [B, N], sim_of() -> [B, N] (cosine of each row to its own centroid), valid [B, K], counts [B, K]
    (the cluster sizes, when known) -> labels [B, N], every valid cluster non-empty (a new tensor if any moved).

    An empty cluster takes the row least similar to its own centroid among clusters of size >= 2. This path is
    rare (a cluster must lose all its rows in one step), so it is a plain loop, and the similarities are only
    asked for when it is taken.
    """
    counts = _counts(labels, valid.shape[1]) if counts is None else counts
    empty = valid & (counts == 0)
    if not bool(empty.any()):
        return labels
    labels, sim, counts = labels.clone(), sim_of().clone(), counts.clone()
    for b, j in empty.nonzero().tolist():
        spare = counts[b][labels[b]] >= 2
        i = int(torch.where(spare, sim[b], math.inf).argmin())
        counts[b, labels[b, i]] -= 1
        counts[b, j] = 1
        labels[b, i] = j
        sim[b, i] = math.inf
    return labels


def _lloyd(
    x: Tensor, centres: Tensor, valid: Tensor, max_iter: int, tol: float, active: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, N, D]; centres [B, K, D] start; valid [B, K]; active [B] videos to refine; labels [B, N] kept for
    the others -> labels [B, N], means [B, K, D], iterations [B].

    The returned centroids of the refined videos are the means of their labels. A video that has converged (or
    was not active) is frozen, so its result does not depend on the rest of the batch. On an accelerator the
    convergence test reads back to the host only every CONVERGENCE_CHECK_EVERY iterations (frozen videos make
    the extra iterations no-ops for the result).
    """
    B, K = valid.shape
    if _bounds_pay(x, K):
        return _lloyd_bounded(x, centres, valid, max_iter, tol, active, labels)
    mask = None if bool(valid.all()) else valid
    check_every = 1 if x.device.type == "cpu" else CONVERGENCE_CHECK_EVERY
    active = active.clone()
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    for i in range(max_iter):
        new_labels, new_sim = _assign(x, centres, mask)
        new_labels = _fill_empty(new_labels, lambda: new_sim, valid)
        means, _ = _cluster_means(x, new_labels, K)
        shift = (means - centres).norm(dim=-1).amax(1)  # [B]
        centres = torch.where(active[:, None, None], means, centres)
        labels = torch.where(active[:, None], new_labels, labels)
        iters += active.long()
        active &= shift >= tol
        if (i + 1) % check_every == 0 and not bool(active.any()):
            break
    return labels, centres, iters


def _bounds_pay(x: Tensor, k: int) -> bool:
    """Whether `_lloyd_bounded` refines x [B, N, D] at K = k: on CPU (it reads counts back every iteration), and
    where one video's similarity product (N D K multiply-adds) outweighs the few dozen small ops per iteration
    that the bounds cost. It depends on the shape of one video only: a video takes the same path alone or in a
    batch."""
    return x.device.type == "cpu" and k >= 2 and x.shape[1] * x.shape[2] * k >= BOUNDED_LLOYD_MIN_WORK


def _lloyd_bounded(
    x: Tensor, centres: Tensor, valid: Tensor, max_iter: int, tol: float, active: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`_lloyd` (same arguments, same labels) that only revisits the rows whose label can change.

    Elkan's bounds for cosine similarity: for unit x and centroid directions u, u', |x.u' - x.u| <= |u' - u|.
    Each row keeps a lower bound on its similarity to its own centroid and an upper bound on its similarity to
    each other one ([B, N, K], as one similarity block); when the directions move by drift_j, the first drops
    by its own cluster's drift and each of the others grows by that cluster's drift. Only rows where the bounds
    no longer separate (with a margin far above float32 rounding) are recomputed, exactly, and the cluster sums
    are updated with the rows that changed cluster. Near convergence that is a small share of the rows, so an
    iteration costs a few dozen small ops instead of an N x K product and a pass over x. The labels are those
    of `_assign` (the full argmax): a skipped row's argmax cannot have moved. The centroids are the member means
    up to the float32 rounding of the updates (about 1e-7 relative).
    """
    B, N, D = x.shape
    K = valid.shape[1]
    iters = torch.zeros(B, dtype=torch.int64, device=x.device)
    if not bool(active.any()):
        return labels, centres, iters
    invalid = None if bool(valid.all()) else ~valid
    active = active.clone()
    dirs = F.normalize(centres, dim=-1, eps=1e-12)
    step = _rows_per_chunk(K)
    upper = torch.cat([torch.bmm(x[:, s : s + step], dirs.transpose(1, 2)) for s in range(0, N, step)], 1)
    if invalid is not None:
        upper.masked_fill_(invalid[:, None, :], -math.inf)
    best, assigned = upper.max(-1)  # [B, N]: first maximum, as `_assign`
    flat_x, flat_upper, flat_best, flat_assigned = x.reshape(B * N, D), upper.view(B * N, K), best.view(-1), \
        assigned.view(-1)
    slot = torch.arange(B, device=x.device)[:, None] * K  # video b's clusters are rows b K .. b K + K - 1 of the sums
    unit = torch.ones(N, dtype=torch.int64, device=x.device)
    every_row = torch.arange(B * N, device=x.device).view(B, N)
    sums = counts = None
    for i in range(max_iter):
        any_moved = i == 0
        if i > 0:
            new_dirs = F.normalize(centres, dim=-1, eps=1e-12)
            drift = torch.linalg.vector_norm(new_dirs - dirs, dim=-1)  # [B, K]
            dirs = new_dirs
            best -= drift.gather(1, assigned)
            upper += drift[:, None, :]
            rival = upper.scatter(2, assigned[:, :, None], -math.inf).amax(2)
            stale = (best <= rival.add_(BOUND_MARGIN)).view(-1).nonzero().view(-1)  # rows of [B * N]
            video = torch.div(stale, N, rounding_mode="floor") if B > 1 else None
            # Per video, so a video does the same ops (and gets the same floats) alone or in a batch.
            for b in range(B):
                rows = stale if B == 1 else stale[video == b]
                # Gathering rows costs a copy of them: past a quarter of the video, the product over all of its
                # rows (read in place) is cheaper.
                whole = rows.shape[0] * 4 > N
                if whole:
                    rows = every_row[b]
                for s in range(0, rows.shape[0], step):
                    idx = rows[s : s + step]
                    x_rows = x[b, s : s + step] if whole else flat_x.index_select(0, idx)
                    sim = torch.mm(x_rows, dirs[b].T)
                    if invalid is not None:
                        sim.masked_fill_(invalid[b], -math.inf)
                    flat_upper.index_copy_(0, idx, sim)
                    row_best, row_label = sim.max(-1)
                    flat_best.index_copy_(0, idx, row_best)
                    old_label = flat_assigned.index_select(0, idx)
                    flat_assigned.index_copy_(0, idx, row_label)
                    moved = (row_label != old_label).nonzero()[:, 0]
                    if moved.shape[0]:
                        any_moved = True
                        moved_rows = x_rows.index_select(0, moved)
                        into, out_of = row_label.index_select(0, moved), old_label.index_select(0, moved)
                        if b:
                            into, out_of = into + b * K, out_of + b * K
                        sums.index_add_(0, into, moved_rows).index_add_(0, out_of, moved_rows, alpha=-1)
                        one = unit[: moved.shape[0]]
                        counts.index_add_(0, into, one).index_add_(0, out_of, one, alpha=-1)
        if not any_moved:  # same labels, so the same (non-empty) clusters and means: every centroid stays put
            iters += active
            active &= tol <= 0.0
            if not bool(active.any()):
                break
            continue
        filled = _fill_empty(assigned, lambda: _dot_own(x, dirs, assigned), valid,
                             None if counts is None else counts.view(B, K))
        if filled is not assigned:
            best.copy_(torch.where(filled != assigned, -math.inf, best))  # moved rows: recomputed next time
            assigned.copy_(filled)
            sums = None
        if sums is None:  # a fresh sum over the rows: the first iteration, or after a refill
            flat = (assigned + slot).view(-1)
            sums = x.new_zeros(B * K, D).index_add_(0, flat, flat_x)
            counts = _counts(flat[None], B * K)[0]
        means = (sums / counts.clamp_min(1)[:, None].to(x.dtype)).view(B, K, D)
        shift = torch.linalg.vector_norm(means - centres, dim=-1).amax(1)  # [B]
        if B == 1:  # alone, the video is active here: the loop ends as soon as it is not
            centres, labels = means, assigned
        else:
            centres = torch.where(active[:, None, None], means, centres)
            labels = torch.where(active[:, None], assigned, labels)
        iters += active
        active &= shift >= tol
        if not bool(active.any()):
            break
    return labels, centres, iters
