"""Choosing K in adaptive mode, step 3 of the fit in tokendyn.kmeans: the loss curves over K built from the Ward
merge costs (`_curve`), the two rules that read them (`fidelity_k`, `select_k`), and the checks of a rule.

Adaptive K (`adaptive_kmeans`): the fit of tokendyn.kmeans with K_top = k_max gives, for every K in
[k_min - 1, k_max], the distortion D(K) and the fidelity F(K) of the merged partition. Two rules:

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Fidelity values within this of the target count as reaching it (float32 centroids of identical rows have a
# norm of 1 only up to rounding).
FIDELITY_SLACK = 1e-6
K_RULES = ("fidelity", "elbow")


@dataclass(frozen=True)
class _Adaptive:
    """How adaptive mode picks K: `rule` "fidelity" (with `target`) or "elbow", within [k_min, k_max]."""

    k_min: int
    k_max: int
    rule: str
    target: float



def check_k_rule(rule: str, target: float) -> None:
    """Raise ValueError unless rule is one of K_RULES and target (the fidelity rule's) lies in (0, 1]."""
    if rule not in K_RULES:
        raise ValueError(f"rule must be one of {K_RULES}, got {rule!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")



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

