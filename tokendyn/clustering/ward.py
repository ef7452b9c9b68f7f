"""Ward merging, step 2 of the fit in tokendyn.kmeans: the greedy merge sequence of the over-seeded clusters, and
its replay down to a chosen K.

Repeatedly merge the two clusters whose union raises the distortion least; for mean centroids that increase is
exactly n_a n_b / (n_a + n_b) * |c_a - c_b|^2. Merging stops at K (fixed mode) or at k_min - 1 (adaptive mode,
whose per-merge costs give the curves D(K) and F(K) that tokendyn.clustering.choose_k reads). This costs
O(M^2 D). `_replay` finds the slot each seed cluster ends in once the merges down to the selected K are applied,
and `_merge` takes the size-weighted means of those slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _ward_merges(means: Tensor, sizes: Tensor, valid: Tensor, steps: int, cosine: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Greedy Ward merging, `steps` merges per video.

    means [B, M, D], sizes [B, M], valid [B, M] -> pairs [B, steps, 2] (slot b merged into slot a < b),
    costs [B, steps] float64 (distortion increase), cos_losses [B, steps] float64 (decrease of the sum over rows
    of the cosine to their centroid; None unless `cosine`), in the order greedy merging (the cheapest pair
    first) takes them. Steps past a video's last valid pair are meaningless; callers only read the first
    k_start - floor of them, floor = M - steps.

    Merging one pair per step costs a few dozen small ops per merge. Ward's linkage is reducible (merging a and
    b never brings a + b closer to any cluster than a or b was), so every reciprocal nearest-neighbour pair is a
    merge of the greedy sequence, at its current cost, and the costs along that sequence never decrease. Each
    round therefore merges all reciprocal pairs at once (costs updated by Lance-Williams, rows then columns),
    and the rounds stop once the k-th cheapest merge found (k = the merges the video needs) costs no more than
    the cheapest pair left, which every later merge costs at least: the k cheapest merges found are then the
    first k of the greedy sequence, and sorting them by cost gives its order (ties by round, then slot).
    """
    B, M, _ = means.shape
    dev = means.device
    n = torch.where(valid, sizes, 0).double().clamp_min(1e-300)  # > 0 keeps the denominators from vanishing
    c_sq = (means * means).sum(-1)
    d2 = torch.baddbmm(c_sq[:, :, None] + c_sq[:, None, :], means, means.transpose(1, 2), alpha=-2.0)
    eye = torch.eye(M, dtype=torch.bool, device=dev)
    pair_ok = valid[:, :, None] & valid[:, None, :] & ~eye
    n_i, n_j = n[:, :, None], n[:, None, :]
    cost = torch.where(pair_ok, n_i * n_j / (n_i + n_j).clamp_min(1) * d2.double().clamp_min(0.0), math.inf)
    mass = n * c_sq.double()  # n |c|^2 per slot; a merge of a and b leaves mass_a + mass_b - cost
    ids = torch.arange(M, device=dev)
    # Per slot b, the merge that removed it: its cost, the slot a it joined, the round, the cosine loss.
    merged_cost = cost.new_full((B, M), math.inf)
    merged_into = torch.zeros(B, M, dtype=torch.int64, device=dev)
    merged_round = torch.zeros(B, M, dtype=torch.int64, device=dev)
    merged_cos = cost.new_zeros(B, M)
    needed = (steps - (M - valid.sum(1))).clamp_min(0)  # [B]
    kth = (needed - 1).clamp_min(0)[:, None]
    for r in range(M):  # every round merges at least the cheapest pair of each video not done
        row_min, nn = cost.min(2)  # [B, M]: each cluster's cheapest partner (the first on ties)
        cheapest_left = row_min.amin(1)
        done = (needed == 0) | torch.isinf(cheapest_left)
        if r:
            done |= merged_cost.sort(1).values.gather(1, kth)[:, 0] <= cheapest_left
        if bool(done.all()):
            break
        mutual = (nn.gather(1, nn) == ids) & torch.isfinite(row_min) & ~done[:, None]
        is_a, is_b = mutual & (ids < nn), mutual & (nn < ids)  # b joins a < b
        n_nn, mass_nn = n.gather(1, nn), mass.gather(1, nn)
        merged_mass = (mass + mass_nn - row_min).clamp_min(0.0)
        merged_cost = torch.where(is_b, row_min, merged_cost)
        merged_into = torch.where(is_b, nn, merged_into)
        merged_round = torch.where(is_b, r, merged_round)
        if cosine:
            # sum_i x_i . c_hat over a cluster is n |c| = sqrt(n * n |c|^2): the mean-cosine loss of this merge.
            loss = (n * mass).sqrt() + (n_nn * mass_nn).sqrt() - ((n + n_nn) * merged_mass).sqrt()
            merged_cos = torch.where(is_b, loss, merged_cos)
        n_new = torch.where(is_a, n + n_nn, n)
        mass = torch.where(is_a, merged_mass, mass)
        # Lance-Williams for Ward, d(a + b, k) = ((n_a + n_k) d(a, k) + (n_b + n_k) d(b, k) - n_k d(a, b)) /
        # (n_a + n_b + n_k): first for the rows of the merged pairs (against the old clusters), then for their
        # columns (against the clusters after the row pass), so two pairs merged in the same round meet right.
        n_k, with_a, with_b = n[:, None, :], n[:, :, None], n_nn[:, :, None]
        c_nn = cost.gather(1, nn[:, :, None].expand(B, M, M))  # row of each cluster's partner
        with_a, with_b = n_k + with_a, n_k + with_b
        rows = (with_a * cost + with_b * c_nn - n_k * row_min[:, :, None]) / (with_a + with_b - n_k)
        cost = torch.where(is_a[:, :, None], rows, cost)
        n_k, with_a, with_b = n_new[:, :, None], n[:, None, :], n_nn[:, None, :]
        c_nn = cost.gather(2, nn[:, None, :].expand(B, M, M))  # column of each cluster's partner
        with_a, with_b = n_k + with_a, n_k + with_b
        cols = (with_a * cost + with_b * c_nn - n_k * row_min[:, None, :]) / (with_a + with_b - n_k)
        cost = torch.where(is_a[:, None, :], cols, cost)
        cost = torch.minimum(cost, cost.transpose(1, 2))  # the two passes round differently: keep it symmetric
        cost.masked_fill_(is_b[:, :, None] | is_b[:, None, :] | eye, math.inf)
        n = n_new
    by_round = merged_round.sort(dim=1, stable=True).indices
    order = by_round.gather(1, merged_cost.gather(1, by_round).sort(dim=1, stable=True).indices)[:, :steps]
    pairs = torch.stack([merged_into.gather(1, order), order], 2)
    costs = merged_cost.gather(1, order)
    # A video out of pairs (at most one cluster left) has inf costs there; those steps are never read.
    finite = torch.isfinite(costs)
    costs = torch.where(finite, costs, 0.0)
    if not cosine:
        return pairs, costs, None
    return pairs, costs, torch.where(finite, merged_cos.gather(1, order), 0.0)



def _replay(pairs: Tensor, k_start: Tensor, k_sel: Tensor, m: int) -> Tensor:
    """pairs [B, S, 2], k_start [B], k_sel [B] -> owner [B, m]: the slot each seed cluster ends in at k_sel."""
    B, S, _ = pairs.shape
    steps = torch.arange(S, device=pairs.device)
    go = k_start[:, None] - steps[None, :] - 1 >= k_sel[:, None]  # [B, S] merges applied
    # Each applied merge points b at a (a < b, and b is never merged again): a forest whose roots are the
    # surviving slots. Unapplied merges write into a spare column m. Pointer jumping then finds every root in
    # log2(m) gathers instead of one pass per merge.
    parent = torch.arange(m + 1, device=pairs.device).repeat(B, 1)
    parent.scatter_(1, torch.where(go, pairs[:, :, 1], m), torch.where(go, pairs[:, :, 0], m))
    for _ in range(max(1, math.ceil(math.log2(m + 1)))):
        parent = parent.gather(1, parent)
    return parent[:, :m]


def _merge(means: Tensor, sizes: Tensor, owner: Tensor) -> Tensor:
    """means [B, M, D], sizes [B, M], owner [B, M] -> [B, M, D] size-weighted means per owner slot.

    A one-hot matmul keeps the sums deterministic on every device.
    """
    M = means.shape[1]
    member = F.one_hot(owner, M).to(means.dtype).transpose(1, 2) * sizes.to(means.dtype)[:, None, :]
    return torch.bmm(member, means) / member.sum(2, keepdim=True).clamp_min(1e-30)

