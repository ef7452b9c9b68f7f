"""Over-seeding, step 1 of the fit in tokendyn.kmeans: the seeded generator, the count sketch and greedy
k-means++.

Greedy k-means++ (as scikit-learn: 2 + ln M candidates per step drawn proportionally to the squared distance to
the nearest chosen seed; the one that lowers the total most is kept) picks M = OVERSEED * K_top = 2 * K_top seed
rows from a seeded generator, and every row joins its nearest seed. Beyond SEED_ROUNDS + 1 seeds, a few steps
share each round's distances (`_seed`), since the loop costs ops rather than arithmetic. The sampling only needs
approximate distances, so it runs on a 128-d (SKETCH_DIM) count sketch of the rows (a random signed sum of
coordinate groups) when D > 128. The fit then takes the means and sizes of these up to M clusters in full
dimension.

Duplicates: rows whose squared distance (on the sketch) is below `SAME_TOKEN` (cosine above 1 - SAME_TOKEN / 2)
count as one token. Seeding stops when every row is such a duplicate of a seed, so a video with fewer distinct
tokens than K gets one cluster per distinct token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokendyn.clustering.common import _counts

SAME_TOKEN = 1e-4
SKETCH_DIM = 128
OVERSEED = 2
# Over-seeding draws its seeds in at most this many rounds (see `_seed`).
SEED_ROUNDS = 12


def _generator(seed: int) -> torch.Generator:
    # Random draws come from a CPU generator, so a seed gives the same draws on every device.
    return torch.Generator().manual_seed(seed)


def _sketch_signs(d: int, dim: int, g: torch.Generator, like: Tensor) -> Tensor | None:
    """Random signs [d] (dtype and device of `like`) for `_sketch`, or None when d <= dim (no sketch needed)."""
    if d <= dim:
        return None
    return (torch.rand(d, generator=g) < 0.5).to(like.device, like.dtype) * 2 - 1


def _sketch(x: Tensor, sign: Tensor | None, dim: int = SKETCH_DIM) -> Tensor:
    """Count sketch: x [B, N, D], sign [D] from `_sketch_signs` -> [B, N, dim] (x itself when sign is None).

    Each coordinate gets a random sign and coordinates j, j + dim, j + 2 dim, ... are summed into entry j.
    Inner products are preserved in expectation (the sign products of distinct coordinates average out), at the
    cost of one pass over x where a dense random projection would cost a matmul. The groups are accumulated
    one by one: no [B, N, D] temporary, and about half the time of a signed copy reduced over a strided axis.
    """
    if sign is None:
        return x
    D = x.shape[-1]
    out = x[..., :dim] * sign[:dim]
    for start in range(dim, D, dim):
        width = min(dim, D - start)
        out[..., :width].addcmul_(x[..., start : start + width], sign[start : start + width])
    return out


def _seed(p: Tensor, m: int, need: int, g: torch.Generator) -> Tensor:
    """Greedy k-means++ over-seeding, each row labelled with its nearest seed.

    p: [B, N, E] rows (the sketch) -> labels [B, N] in [0, m). A seed drawn once every row was a duplicate of an
    earlier seed labels no row: callers drop empty clusters. At least min(need, m) seeds label rows unless every
    row is a duplicate of a seed (a video with fewer distinct rows has one seed per distinct row).

    The draws are sequential (each depends on the distances to the seeds so far) and, at these sizes, bound by
    the number of ops per step rather than by arithmetic. So the m - 1 seeds after the first are drawn in at
    most SEED_ROUNDS rounds of s = ceil((m - 1) / SEED_ROUNDS) greedy steps that share the round's distances:
    each step draws its candidates independently and keeps its best one (with s = 1, m <= SEED_ROUNDS + 1, this
    is plain greedy k-means++). Two steps of a round can land in the same region, which over-seeding and the
    Ward merges absorb, or on the same row, which then labels nothing. Where that leaves fewer than `need`
    seeds before the rows run out (m close to N), the video is seeded again one step at a time. The squared
    norms ride along in two augmented copies of the rows, whose product is the squared distance directly.
    """
    B, N, E = p.shape
    trials = 2 + int(math.log(m))
    u = torch.rand(m, trials, generator=g).to(p.device)  # shared by all videos: same draws alone or in a batch
    p_sq = (p * p).sum(-1, keepdim=True)  # [B, N, 1]
    ones = torch.ones_like(p_sq)
    # [-2 p_i, 1, |p_i|^2 - SAME_TOKEN] . [p_j, |p_j|^2, 1] = |p_i - p_j|^2 - SAME_TOKEN: distances below
    # SAME_TOKEN become 0 (after the clamp), so duplicates of a seed carry no weight.
    seeds_aug = torch.cat([p * -2.0, ones, p_sq - SAME_TOKEN], 2).view(B * N, E + 2)
    rows_aug_t = torch.cat([p, p_sq, ones], 2).transpose(1, 2).contiguous()  # [B, E + 2, N]: the fast shape
    offset = torch.arange(B, device=p.device)[:, None] * N

    def dist(idx: Tensor) -> Tensor:  # idx [B, L] rows -> [B, L, N] squared distance minus SAME_TOKEN (not clamped)
        c = seeds_aug.index_select(0, (idx if B == 1 else idx + offset).view(-1)).view(B, -1, E + 2)
        return torch.bmm(c, rows_aug_t)

    first_d2 = dist((u[0, :1] * N).long().clamp_(max=N - 1).expand(B, 1))[:, 0].clamp_min_(0)  # [B, N]

    def draw(per_round: int) -> tuple[Tensor, Tensor]:  # -> labels [B, N], distance to the nearest seed [B, N]
        d2 = first_d2
        labels = torch.zeros(B, N, dtype=torch.int64, device=p.device)
        starts = range(1, m, per_round)
        fractions = u[1:].reshape(-1).split([min(per_round, m - first) * trials for first in starts])
        trial_of_step = torch.arange(0, per_round * trials, trials, device=p.device)
        for first, fraction in zip(starts, fractions):
            s = fraction.shape[0] // trials
            cum = d2.cumsum(1)
            # The first row whose prefix sum reaches the target: targets stay below the last prefix sum, so the
            # index never runs past the end, and rows of weight 0 are never drawn.
            cand = torch.searchsorted(cum, fraction * cum[:, -1:])  # [B, s * trials]
            cand_d2 = torch.minimum(dist(cand), d2[:, None, :]).clamp_min_(0)  # [B, s * trials, N]
            # Per step, the candidate that lowers the potential most.
            best = cand_d2.sum(2).view(B, s, trials).argmin(2)  # [B, s]
            if s == 1:
                new_d2 = cand_d2.gather(1, best[:, :, None].expand(B, 1, N))[:, 0]
                labels = torch.where(new_d2 < d2, first, labels)
            else:
                kept = cand_d2.gather(1, (best + trial_of_step[:s])[:, :, None].expand(B, s, N))  # [B, s, N]
                new_d2, step = kept.min(1)
                labels = torch.where(new_d2 < d2, step + first, labels)
            d2 = new_d2
        return labels, d2

    per_round = -(-(m - 1) // SEED_ROUNDS)
    labels, d2 = draw(per_round)
    if per_round > 1:
        short = (_counts(labels, m) > 0).sum(1) < min(need, m)
        short &= (d2 > 0).any(1)  # rows left that no seed covers
        if bool(short.any()):
            labels = torch.where(short[:, None], draw(1)[0], labels)
    return labels
