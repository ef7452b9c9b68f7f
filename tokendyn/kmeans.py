"""Spherical k-means over the tokens of one video (or a batch of same-shape videos), fixed or adaptive K.

This module holds the entry points (`spherical_kmeans`, `adaptive_kmeans` and their batch forms), the result
type and the fit that chains the steps below; each step lives in a module of tokendyn.clustering, which
documents it in full (`common` holds the building blocks they share).

Rows are L2-normalised and all arithmetic is float32, whatever the input dtype. One fit has five steps:

1. Over-seeding (clustering.seeding). Greedy k-means++ (as scikit-learn) picks M = 2 * K_top seed rows from a
   seeded generator, and every row joins its nearest seed. The sampling only needs approximate distances, so it
   runs on a 128-d count sketch of the rows when D > 128. The means and sizes of these up to M clusters are then
   taken in full dimension.
2. Ward merging (clustering.ward). Repeatedly merge the two clusters whose union raises the distortion least;
   for mean centroids that increase is exactly n_a n_b / (n_a + n_b) * |c_a - c_b|^2. Merging stops at K (fixed
   mode) or at k_min - 1 (adaptive mode, which records the curves D(K) and F(K) on the way). This costs
   O(M^2 D).
3. (adaptive mode only) Select K on the curves (clustering.choose_k, see below), and replay the merges down to it.
4. Lloyd refinement at K (clustering.lloyd): each row goes to the centroid of highest cosine similarity, each
   centroid becomes the mean of its member rows, until no centroid moves by `tol` (L2) or after `max_iter`
   iterations. On CPU, for videos large enough, bounds on the similarities skip the rows whose label cannot
   change (`_lloyd_bounded`).
5. Split/merge moves (clustering.repair, at most SPLIT_MERGE_PASSES): split the cluster whose 2-way split lowers
   the distortion most and merge the cheapest pair of the K + 1 clusters that leaves, when the split gains more
   than MOVE_GAIN_RATIO times what the merge costs; refine again and keep the move if the distortion went down.
   This recovers a small distinct object that every seed missed (see clustering.repair for why it happens).

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
distortion D(K) and the fidelity F(K) of the merged partition. Two rules, given in full in clustering.choose_k:

- "fidelity" (default): the smallest K in [k_min, k_max] with F(K) >= target (`fidelity_k`), else k_max. The
  fidelity is absolute: a clip whose tokens barely vary reaches 0.9 with a few centroids, while structureless
  tokens (noise) never do and get k_max.
- "elbow" (Kneedle on a log scale, `select_k`): the K in [k_min, k_max] lying farthest below the straight line
  joining the two ends of the curve log D(K), both axes rescaled onto [0, 1]. It suits content with a clear
  number of parts.
Cost: one fixed fit at k_max plus the extra merges (O(k_max^2 D)), with the refinement at a K <= k_max.

Duplicates: rows whose squared distance (on the sketch) is below `SAME_TOKEN` (cosine above 1 - SAME_TOKEN / 2)
count as one token. Seeding stops when every row is such a duplicate of a seed, so a video with fewer distinct
tokens than K gets one cluster per distinct token: the result has min(K, distinct tokens) rows and every cluster
is non-empty (a cluster emptied during Lloyd takes the row farthest from its own centroid among clusters that
can spare one). Cluster ids are numbered in order of first appearance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The steps live in tokendyn.clustering; SAME_TOKEN, SKETCH_DIM, K_RULES, normalize_rows, select_k, fidelity_k and
# check_k_rule are re-exported here, where callers import them. Each tunable (BOUNDED_LLOYD_MIN_WORK,
# _CHUNK_ELEMENTS, ...) is read in the module that defines it: patch it there.
from tokendyn.clustering.choose_k import K_RULES, _Adaptive, _curve, check_k_rule, fidelity_k, select_k
from tokendyn.clustering.common import (
    _check_int,
    _check_options,
    _check_points,
    _cluster_means,
    _counts,
    _distortion,
    _mean_cosine,
    _normalize,
    normalize_rows,
)
from tokendyn.clustering.lloyd import _lloyd
from tokendyn.clustering.repair import SPLIT_MERGE_PASSES, _split_merge
from tokendyn.clustering.seeding import OVERSEED, SAME_TOKEN, SKETCH_DIM, _generator, _seed, _sketch, _sketch_signs
from tokendyn.clustering.ward import _merge, _replay, _ward_merges

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
    """Adaptive-K spherical k-means of B videos (rules in the module docstring and tokendyn.clustering.choose_k).

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
