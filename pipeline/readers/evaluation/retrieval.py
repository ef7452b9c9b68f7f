"""Self-retrieval maths: pooled-cosine and weighted-MaxSim similarity matrices, ranks and recall@n (pure torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.readers.evaluation.methods import KeptTokens

SIMILARITIES = ("pooled", "maxsim")
RECALL_AT = (1, 5)


def pooled_similarity(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """queries [Q, D], gallery [G, D] -> [Q, G] cosine similarity."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T


def maxsim_similarity(queries: Sequence[KeptTokens], gallery: Sequence[KeptTokens]) -> torch.Tensor:
    """[Q, G]: for each query, the size-weighted mean over its kept tokens of the best cosine in the gallery video."""
    gallery_vectors = F.normalize(torch.cat([g.kept for g in gallery]).float(), dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(gallery)), torch.tensor([g.k for g in gallery]))
    scores = torch.empty(len(queries), len(gallery))
    for row, query in enumerate(queries):
        cosines = F.normalize(query.kept.float(), dim=-1) @ gallery_vectors.T  # [Kq, total gallery tokens]
        best = torch.full((query.k, len(gallery)), -math.inf).scatter_reduce(
            1, owner.expand(query.k, -1), cosines, reduce="amax")
        weights = query.sizes.float()
        scores[row] = (weights[:, None] * best).sum(0) / weights.sum()
    return scores


def ranks_of_targets(similarity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q] 1-based rank of each query's target; gallery items scoring at least as high count ahead of it."""
    target_scores = similarity.gather(1, targets[:, None])
    others_ahead = (similarity >= target_scores).sum(1) - 1
    return others_ahead + 1


def recall_at(similarity: torch.Tensor, targets: torch.Tensor, n: int) -> float:
    """Share of queries whose target is among the top n of their row of similarity [Q, G]."""
    return float((ranks_of_targets(similarity, targets) <= n).float().mean())


def retrieval(gallery: list[KeptTokens], queries: dict[str, list[KeptTokens]]
              ) -> tuple[dict[str, dict[int, float]], dict[str, dict[str, float]]]:
    """Recall@n of every similarity over all queries, and recall@1 per alteration. Query i of each alteration is
    an altered copy of gallery video i."""
    targets = torch.arange(len(gallery))
    gallery_pooled = torch.stack([kept.pooled for kept in gallery])
    similarity = {
        name: {"pooled": pooled_similarity(torch.stack([kept.pooled for kept in altered]), gallery_pooled),
               "maxsim": maxsim_similarity(altered, gallery)}
        for name, altered in queries.items()
    }
    recall = {
        kind: {n: recall_at(torch.cat([similarity[name][kind] for name in queries]),
                            targets.repeat(len(queries)), n) for n in RECALL_AT}
        for kind in SIMILARITIES
    }
    by_alteration = {kind: {name: recall_at(similarity[name][kind], targets, 1) for name in queries}
                     for kind in SIMILARITIES}
    return recall, by_alteration
