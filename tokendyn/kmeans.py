"""Spherical k-means over the tokens of one video (or a batch of same-shape videos), fixed or adaptive K.

Rows are L2-normalised and all arithmetic is float32, whatever the input dtype. One fit has five steps:

1. Over-seeding. Greedy k-means++ (as scikit-learn: 2 + ln M candidates per step drawn proportionally to the
   squared distance to the nearest chosen seed; the one that lowers the total most is kept) picks M = 2 * K_top
   seed rows from a seeded generator, and every row joins its nearest seed. Beyond SEED_ROUNDS + 1 seeds, a few
   steps share each round's distances (`_seed`), since the loop costs ops rather than arithmetic. The sampling
   only needs approximate distances, so it runs on a 128-d count sketch of the rows (a random signed sum of
   coordinate groups) when D > 128. The means and sizes of these up to M clusters are then taken in full
   dimension.
2. Ward merging. Repeatedly merge the two clusters whose union raises the distortion least; for mean centroids
   that increase is exactly n_a n_b / (n_a + n_b) * |c_a - c_b|^2. Merging stops at K (fixed mode) or at
   k_min - 1 (adaptive mode, which records the curves D(K) and F(K) on the way). This costs O(M^2 D).
3. (adaptive mode only) Select K on the curves, see below, and replay the merges down to it.
4. Lloyd refinement at K: each row goes to the centroid of highest cosine similarity, each centroid becomes the
   mean of its member rows, until no centroid moves by `tol` (L2) or after `max_iter` iterations. On CPU, for
   videos large enough, bounds on the similarities skip the rows whose label cannot change (`_lloyd_bounded`).
5. Split/merge moves (at most SPLIT_MERGE_PASSES): split the cluster whose 2-way split lowers the distortion
   most and merge the cheapest pair of the K + 1 clusters that leaves, when the split gains more than
   MOVE_GAIN_RATIO times what the merge costs; refine again and keep the move if the distortion went down.
   Seeding is dominated by the mass of a diffuse background, so a small distinct object (a few tokens) can miss
   every seed and end up inside a background cluster, which Ward merging and Lloyd cannot undo; it is then
   that cluster's least similar members, and splitting it off gains several times what re-joining two
   background pieces costs. tests/tokendyn check planted small objects against scikit-learn's KMeans(n_init=10).

Over-seeding then merging makes one run about as good as the best of ten k-means++ restarts (tests/tokendyn
check it against scikit-learn's KMeans(n_init=10)). Similarities are computed in row chunks: nothing is N x N.

Distortion = sum_i |x_i - c_(l_i)|^2 over the normalised rows x_i and their centroids c (means, not
re-normalised): scikit-learn's `inertia_` on the same rows, so the two compare directly. Fidelity = the mean over
rows of cos(x_i, c_(l_i)), i.e. how well base[dynamics] reconstructs each token's direction (the rows of a
cluster sum to n c, so the fidelity is sum_j n_j |c_j| / N, known in closed form for every merged partition).

Objectives. Ward merging, the split/merge moves and the reported distortion use the squared distance; Lloyd
assigns by cosine, which maximises the fidelity (for fixed centroid directions the cosine assignment is best, and
for fixed members the normalised mean is the best direction). For unit rows a cluster costs n (1 - |c|^2) in
distortion and n (1 - |c|) in fidelity; as 1 - |c|^2 = (1 - |c|)(1 + |c|) with |c| close to 1 for any cluster
worth keeping, the two rank merges and partitions alike, and the distortion tests against scikit-learn bound
the difference. The fidelity rule reads the exact fidelity of each merged partition, and the refinement at the
selected K only raises it, so the output reaches the target whatever the difference.

Adaptive K (`adaptive_kmeans`): the fit above with K_top = k_max gives, for every K in [k_min - 1, k_max], the
distortion D(K) and the fidelity F(K) of the merged partition. Two rules:

- "fidelity" (default): the smallest K in [k_min, k_max] with F(K) >= target (`fidelity_k`), else k_max. The
  fidelity is absolute: a clip whose tokens barely vary reaches 0.9 with a few centroids, while structureless
  tokens (noise) never do and get k_max. A relative measure such as D(K) / D(1) would rescale a near-static
  clip's small variation to the full range and ask as many tokens for it as for noise. The range only clips the
  answer; F grows with K, so K is monotone in the target. A wider range means a fit from more seeds (2 k_max),
  hence a slightly different merge tree: where the target is crossed at a break in the curve (the content has
  parts) K does not move, but where F creeps past the target on a flat stretch (diffuse content that just
  reaches it) K can move by one or two (3 of 40 random planted videos when k_max went from 64 to 128).
- "elbow" (Kneedle on a log scale, `select_k`): map K and log D(K) linearly onto [0, 1] (from K = k_min - 1 to
  k_max) and select the K in [k_min, k_max] lying farthest below the straight line joining the two ends of that
  curve. Ties go to the smaller K; when no K lies more than 1e-3 below the line, K = k_max. Limits: rescaling both
  axes finds an elbow on any convex curve, so on structureless content the answer follows the range (noise gets
  a K in the middle of it) and a clip with fewer distinct tokens than k_max gets exactly that many. It suits
  content with a clear number of parts.
Cost: one fixed fit at k_max plus the extra merges (O(k_max^2 D)), with the refinement at a K <= k_max.

Duplicates: rows whose squared distance (on the sketch) is below `SAME_TOKEN` (cosine above 1 - SAME_TOKEN / 2)
count as one token. Seeding stops when every row is such a duplicate of a seed, so a video with fewer distinct
tokens than K gets one cluster per distinct token: the result has min(K, distinct tokens) rows and every cluster
is non-empty (a cluster emptied during Lloyd takes the row farthest from its own centroid among clusters that
can spare one). Cluster ids are numbered in order of first appearance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SAME_TOKEN",
    "SKETCH_DIM",
    "KMeansResult",
    "spherical_kmeans",
    "spherical_kmeans_batch",
    "adaptive_kmeans",
    "adaptive_kmeans_batch",
    "select_k",
    "fidelity_k",
    "normalize_rows",
]

SAME_TOKEN = 1e-4
SKETCH_DIM = 128
OVERSEED = 2
# Over-seeding draws its seeds in at most this many rounds (see `_seed`).
SEED_ROUNDS = 12
# Split/merge moves after the first refinement (each followed by a refinement), at most.
SPLIT_MERGE_PASSES = 4
MOVE_GAIN_RATIO = 1.5
# Fidelity values within this of the target count as reaching it (float32 centroids of identical rows have a
# norm of 1 only up to rounding).
FIDELITY_SLACK = 1e-6
CONVERGENCE_CHECK_EVERY = 4
# Lloyd on CPU skips the rows that bounds prove cannot change label (`_lloyd_bounded`) once one video's
# similarity product has this many multiply-adds (16 frames x 7 x 7 x 1280 at K = 32 has 2^25).
BOUNDED_LLOYD_MIN_WORK = 1 << 23
# Bounds must separate a row's best similarity from the others by this much before it is skipped; float32
# rounding of the similarities and drifts is orders of magnitude smaller.
BOUND_MARGIN = 1e-4
K_RULES = ("fidelity", "elbow")
# Bounds a [B, rows, K] similarity block to a few tens of MB per video. It depends on K only, so a video gives
# bit-identical results alone or in a batch.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class KMeansResult:
    """One video's clustering.

    centroids: [K, D] float32, mean of the member rows (of the L2-normalised inputs).
    labels: [N] int64 in [0, K), numbered in order of first appearance.
    sizes: [K] int64, every entry > 0.
    distortion: sum over rows of the squared L2 distance to its centroid (scikit-learn's inertia).
    iterations: Lloyd iterations of the refinements.
    fidelity: mean over rows of the cosine similarity to their centroid (in [0, 1] for non-negative clusters).
    """

    centroids: Tensor
    labels: Tensor
    sizes: Tensor
    distortion: float
    iterations: int
    fidelity: float

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


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


# ----------------------------------------------------------------------------------------------------------------
# Ward merging and the elbow


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


def _curve(start: Tensor, costs: Tensor, k_start: Tensor, k_min: int, k_max: int) -> Tensor:
    """A loss (distortion, or cosine loss) at K = lo .. k_max, lo = max(k_min - 1, 1).

    start [B] loss with k_start [B] clusters, costs [B, S] its increase per merge, in merge order
    -> [B, k_max - lo + 1]. Above k_start (fewer clusters available) the curve stays flat at the best reachable value.
    """
    lo = max(k_min - 1, 1)
    ks = torch.arange(lo, k_max + 1, device=costs.device)
    cum = torch.cat([costs.new_zeros(costs.shape[0], 1), costs.cumsum(1)], 1).double()  # after m merges
    merges = (k_start[:, None] - ks[None, :]).clamp(0, cum.shape[1] - 1)
    return start[:, None] + cum.gather(1, merges)


def select_k(curve: Tensor, k_min: int, k_max: int) -> Tensor:
    """The elbow rule of the module docstring.

    curve: [B, k_max - lo + 1] distortion at K = lo .. k_max with lo = max(k_min - 1, 1) (non-increasing in K)
    -> [B] int64 selected K in [k_min, k_max].
    """
    lo = max(k_min - 1, 1)
    if k_max == lo:
        return torch.full((curve.shape[0],), k_max, dtype=torch.int64, device=curve.device)
    ks = torch.arange(lo, k_max + 1, device=curve.device)
    xs = (ks - lo).double() / (k_max - lo)  # [M]
    curve = curve.double()
    # Log scale: a break is a large relative drop wherever it sits. Values below 1e-4 of the first one count as
    # equal, so rounding noise (about 1e-7 N) near zero distortion cannot make a break.
    logd = torch.log(curve + 1e-4 * curve[:, :1] + 1e-30)
    drop = logd[:, :1] - logd[:, -1:]  # [B, 1]
    ys = torch.where(drop > 1e-12, (logd - logd[:, -1:]) / drop.clamp_min(1e-12), 0.0)  # flat: smallest K wins
    gap = ((1.0 - xs)[None, :] - ys)[:, ks >= k_min]
    best = gap.max(1)
    k = k_min + best.indices  # first maximum: ties go to the smaller K
    # No point below the line (straight or concave curve): returns never diminish, keep the most tokens.
    return torch.where(best.values > 1e-3, k, k_max)


def fidelity_k(fidelity: Tensor, k_min: int, k_max: int, target: float) -> Tensor:
    """The fidelity rule of the module docstring.

    fidelity: [B, k_max - lo + 1] mean cosine at K = lo .. k_max with lo = max(k_min - 1, 1) (non-decreasing in K)
    -> [B] int64: the smallest K in [k_min, k_max] whose fidelity reaches `target` (within FIDELITY_SLACK), else k_max.
    """
    lo = max(k_min - 1, 1)
    reached = (fidelity >= target - FIDELITY_SLACK)[:, k_min - lo :]  # [B, k_max - k_min + 1]
    first = reached.to(torch.int8).argmax(1)  # first True, or 0 when none
    return torch.where(reached.any(1), k_min + first, k_max)


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


# ----------------------------------------------------------------------------------------------------------------
# Lloyd refinement


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


def _split_merge(x: Tensor, labels: Tensor, centres: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """One split/merge move per video: split the cluster whose 2-way split lowers the distortion most and
    merge the cheapest pair of the resulting K + 1 clusters, when the gain beats the cost.

    x [B, N, D]; labels [B, N] and centres [B, K, D] (their means) from Lloyd; valid [B, K] -> new centres
    [B, K, D] (unchanged where no move), moved [B] bool.

    Each cluster is split by one 2-means step inside it (by cosine, as Lloyd), from its centroid and its member
    least similar to it; the split gain n_a n_b / n |c_a - c_b|^2 and the Ward merge cost are exact distortion
    changes. This recovers a small distinct cluster that seeding never hit: it sits in some cluster as its least
    similar members, and splitting it off gains far more than merging two pieces of a diffuse background costs.
    Cost: two [N, K] similarity products (to the centroids, to the farthest members), O(N D) for the halves'
    means, O(K^2 D) for the merge costs; nothing N x N.
    """
    B, N, D = x.shape
    K = centres.shape[1]
    pos = torch.arange(N, device=x.device).expand(B, N)

    sim = _dot_own(x, F.normalize(centres, dim=-1, eps=1e-12), labels)  # [B, N] cosine to the own centroid
    lowest = sim.new_full((B, K), math.inf).scatter_reduce(1, labels, sim, reduce="amin")
    far = torch.full((B, K), N, dtype=torch.int64, device=x.device).scatter_reduce(
        1, labels, torch.where(sim <= lowest.gather(1, labels), pos, N), reduce="amin"
    )
    far_rows = x.gather(1, far.clamp(max=N - 1)[:, :, None].expand(B, K, D))  # unit rows
    to_far = _dot_own(x, far_rows, labels)
    half_means, half_sizes = _cluster_means(x, labels * 2 + (to_far > sim).long(), 2 * K)
    first, second = half_means[:, 0::2], half_means[:, 1::2]
    n_a, n_b = half_sizes[:, 0::2].double(), half_sizes[:, 1::2].double()
    gain = n_a * n_b / (n_a + n_b).clamp_min(1) * ((first - second) ** 2).sum(-1).double()
    split_gain, j = torch.where(valid, gain, 0.0).max(1)  # [B]

    # K + 1 clusters after the split: slot j holds one half, slot K the other. The cheapest merge among them
    # (other than undoing the split) may take a half: a piece of background split off with an object rejoins
    # the rest of the background.
    rows = torch.arange(B, device=x.device)
    ids = torch.arange(K + 1, device=x.device)
    cand = torch.cat([centres, second[rows, j][:, None]], 1)  # [B, K + 1, D]
    cand[rows, j] = first[rows, j]
    n = torch.cat([torch.where(valid, _counts(labels, K), 0).double(), n_b[rows, j][:, None]], 1)
    n[rows, j] = n_a[rows, j]
    usable = torch.cat([valid, valid[rows, j][:, None]], 1) & (n > 0)
    c_sq = (cand * cand).sum(-1)
    d2 = torch.baddbmm(c_sq[:, :, None] + c_sq[:, None, :], cand, cand.transpose(1, 2), alpha=-2.0)
    cost = n[:, :, None] * n[:, None, :] / (n[:, :, None] + n[:, None, :]).clamp_min(1) * d2.double().clamp_min(0)
    undo = (ids[None, :, None] == j[:, None, None]) & (ids[None, None, :] == K)
    pair_ok = usable[:, :, None] & usable[:, None, :] & (ids[:, None] < ids[None, :]) & ~undo
    merge_cost, flat = torch.where(pair_ok, cost, math.inf).view(B, -1).min(1)
    a, b = flat // (K + 1), flat % (K + 1)
    # Splitting off a distinct cluster gains several times what the merge costs (2x to 4x on the planted-object
    # tests); on diffuse data the moves trade nearly equal amounts (< 0.1% of the distortion) and are left out.
    moved = split_gain > MOVE_GAIN_RATIO * merge_cost + 1e-9 * N
    if not bool(moved.any()):  # the common case on diffuse content; the caller reads it back anyway
        return centres, moved

    na, nb = n[rows, a][:, None], n[rows, b][:, None]
    merged = ((na * cand[rows, a].double() + nb * cand[rows, b].double()) / (na + nb).clamp_min(1)).float()
    new = cand.clone()
    new[rows, a] = merged
    new[rows, b] = cand[rows, K]  # slot b is freed: the second half moves in (a no-op when b is that half)
    new = new[:, :K]
    return torch.where(moved[:, None, None], new, centres), moved


# ----------------------------------------------------------------------------------------------------------------
# the fit


def _canonical(labels: Tensor, centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Renumber clusters by first appearance; unused slots go last.

    labels [B, N], centres [B, K, D] -> labels [B, N], centres [B, K, D], sizes [B, K].
    """
    B, N = labels.shape
    K = centres.shape[1]
    pos = torch.arange(N, device=labels.device).expand(B, N)
    first = torch.full((B, K), N, dtype=torch.int64, device=labels.device).scatter_reduce(
        1, labels, pos, reduce="amin"
    )
    order = torch.sort(first, dim=1, stable=True).indices  # [B, K] old slot of each new id
    new_id = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=labels.device).expand(B, K))
    labels = new_id.gather(1, labels)
    return labels, centres.gather(1, order[:, :, None].expand_as(centres)), _counts(labels, K)


@dataclass(frozen=True)
class _Adaptive:
    """How adaptive mode picks K: `rule` "fidelity" (with `target`) or "elbow", within [k_min, k_max]."""

    k_min: int
    k_max: int
    rule: str
    target: float


def _mean_cosine(centres: Tensor, sizes: Tensor, n_rows: int) -> Tensor:
    """centres [B, K, D] (means), sizes [B, K] -> [B] float64 mean over rows of the cosine to their centroid.

    The rows of a cluster sum to n c, so their cosines to c / |c| sum to n |c|.
    """
    return (sizes.double() * centres.double().norm(dim=-1)).sum(1) / n_rows


def _fit(x: Tensor, x_sq_total: Tensor, k_top: int, adaptive: _Adaptive | None, seed: int, max_iter: int,
         tol: float) -> tuple[list[KMeansResult], Tensor | None]:
    """x [B, N, D] normalised, x_sq_total [B] float64 sum of its squared row norms -> per-video results and, in
    adaptive mode, distortion curves [B, C]."""
    B, N, _ = x.shape
    g = _generator(seed)
    m = min(int(OVERSEED * k_top), N)
    sign = _sketch_signs(x.shape[2], SKETCH_DIM, g, x)
    p = _sketch(x, sign)
    seed_labels = _seed(p, m, k_top, g)
    means, sizes = _cluster_means(x, seed_labels, m)
    valid = sizes > 0
    k_start = valid.sum(1)
    floor = k_top if adaptive is None else max(adaptive.k_min - 1, 1)
    pairs, costs, cos_losses = _ward_merges(means, sizes, valid, max(m - floor, 0),
                                            cosine=adaptive is not None and adaptive.rule == "fidelity")

    curve = None
    if adaptive is None:
        k_sel = torch.full((B,), k_top, dtype=torch.int64, device=x.device)
    else:
        curve = _curve(_distortion(x_sq_total, means, sizes), costs, k_start, adaptive.k_min, adaptive.k_max)
        if adaptive.rule == "elbow":
            k_sel = select_k(curve, adaptive.k_min, adaptive.k_max)
        else:
            cos_loss = _curve(N - _mean_cosine(means, sizes, N) * N, cos_losses, k_start, adaptive.k_min,
                              adaptive.k_max)
            k_sel = fidelity_k(1.0 - cos_loss / N, adaptive.k_min, adaptive.k_max, adaptive.target)
    owner = _replay(pairs, k_start, k_sel, m)
    centres = _merge(means, sizes, owner)
    slot_valid = valid & (owner == torch.arange(m, device=x.device))
    # Keep k_top slots, surviving ones first: the refinement then has the same width alone or in a batch
    # (bit-identical results) and never costs more than a fixed fit at k_top.
    keep = torch.sort((~slot_valid).to(torch.int8), dim=1, stable=True).indices[:, : min(k_top, m)]
    centres = centres.gather(1, keep[:, :, None].expand(-1, -1, x.shape[2]))
    slot_valid = slot_valid.gather(1, keep)

    everyone = torch.ones(B, dtype=torch.bool, device=x.device)
    labels = torch.zeros(B, N, dtype=torch.int64, device=x.device)
    labels, centres, iters = _lloyd(x, centres, slot_valid, max_iter, tol, everyone, labels)
    distortion = _distortion(x_sq_total, centres, _counts(labels, centres.shape[1]))
    searching = everyone  # videos whose last move paid off; the others would only propose it again
    for _ in range(SPLIT_MERGE_PASSES):
        start, moved = _split_merge(x, labels, centres, slot_valid)
        moved &= searching
        if not bool(moved.any()):
            break
        new_labels, new_centres, new_iters = _lloyd(x, start, slot_valid, max_iter, tol, moved, labels)
        new_distortion = _distortion(x_sq_total, new_centres, _counts(new_labels, centres.shape[1]))
        # Lloyd assigns by cosine, not by distance: keep a move only where it lowered the distortion.
        better = moved & (new_distortion < distortion)
        labels = torch.where(better[:, None], new_labels, labels)
        centres = torch.where(better[:, None, None], new_centres, centres)
        distortion = torch.where(better, new_distortion, distortion)
        iters += new_iters
        searching = better
    labels, centres, sizes = _canonical(labels, centres)
    distortion = _distortion(x_sq_total, centres, sizes).tolist()
    fidelity = _mean_cosine(centres, sizes, N).tolist()
    k_eff = (sizes > 0).sum(1).tolist()
    results = [
        KMeansResult(centres[b, : k_eff[b]], labels[b], sizes[b, : k_eff[b]], distortion[b], it, fidelity[b])
        for b, it in enumerate(iters.tolist())
    ]
    return results, curve


def _run(x: Tensor, k_top: int, adaptive: _Adaptive | None, seed: int, max_iter: int, tol: float
         ) -> tuple[list[KMeansResult], Tensor | None]:
    """`_fit` on x [B, N, D] (any float dtype) in inference mode, which trims the per-op overhead that dominates
    small fits. Inference tensors cannot join an autograd graph later, so the results are returned as clones."""
    with torch.inference_mode():
        x, sq_norms = _normalize(x)
        results, curve = _fit(x, sq_norms.sum(1), k_top, adaptive, seed, max_iter, tol)
    results = [
        KMeansResult(r.centroids.clone(), r.labels.clone(), r.sizes.clone(), r.distortion, r.iterations, r.fidelity)
        for r in results
    ]
    return results, None if curve is None else curve.clone()


def check_k_rule(rule: str, target: float) -> None:
    """Raise ValueError unless rule is one of K_RULES and target (the fidelity rule's) lies in (0, 1]."""
    if rule not in K_RULES:
        raise ValueError(f"rule must be one of {K_RULES}, got {rule!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")


# ----------------------------------------------------------------------------------------------------------------
# public API


def spherical_kmeans_batch(
    x: Tensor, k: int, *, seed: int = 0, max_iter: int = 50, tol: float = 1e-4
) -> list[KMeansResult]:
    """Spherical k-means of B videos at once.

    x: [B, N, D] any float dtype (rows are normalised here) -> B results, each identical to
    `spherical_kmeans(x[b], k, ...)`; every step is one batched op over the B videos.
    """
    _check_points(x, 3)
    _check_int("k", k)
    _check_options(max_iter, tol)
    return _run(x, k, None, seed, max_iter, tol)[0]


def spherical_kmeans(x: Tensor, k: int, *, seed: int = 0, max_iter: int = 50, tol: float = 1e-4) -> KMeansResult:
    """Spherical k-means of one video's tokens.

    x: [N, D] any float dtype (rows are L2-normalised here; float32 math) -> K = min(k, distinct rows) clusters,
    all non-empty. See the module docstring for the method and the definition of distortion.
    """
    _check_points(x, 2)
    return spherical_kmeans_batch(x[None], k, seed=seed, max_iter=max_iter, tol=tol)[0]


def adaptive_kmeans_batch(
    x: Tensor, k_min: int = 8, k_max: int = 64, *, rule: str = "fidelity", target: float = 0.9, seed: int = 0,
    max_iter: int = 50, tol: float = 1e-4
) -> list[tuple[KMeansResult, Tensor]]:
    """Adaptive-K spherical k-means of B videos (rules in the module docstring).

    x: [B, N, D] any float dtype -> per video (result, curve), curve [k_max - lo + 1] float64 distortion at
    K = lo .. k_max with lo = max(k_min - 1, 1). The result has the selected K (fewer clusters only when the
    video has fewer distinct tokens). rule: "fidelity" (smallest K whose mean cosine reaches `target`) or "elbow"
    (`target` unused).
    """
    _check_points(x, 3)
    _check_int("k_min", k_min)
    _check_int("k_max", k_max)
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")
    check_k_rule(rule, target)
    _check_options(max_iter, tol)
    results, curve = _run(x, k_max, _Adaptive(k_min, k_max, rule, float(target)), seed, max_iter, tol)
    return list(zip(results, curve.unbind(0)))


def adaptive_kmeans(
    x: Tensor, k_min: int = 8, k_max: int = 64, *, rule: str = "fidelity", target: float = 0.9, seed: int = 0,
    max_iter: int = 50, tol: float = 1e-4
) -> tuple[KMeansResult, Tensor]:
    """Adaptive-K spherical k-means of one video. x: [N, D] -> (result, curve [k_max - lo + 1])."""
    _check_points(x, 2)
    return adaptive_kmeans_batch(x[None], k_min, k_max, rule=rule, target=target, seed=seed, max_iter=max_iter,
                                 tol=tol)[0]
