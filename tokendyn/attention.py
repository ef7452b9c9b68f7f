"""Cross-dynamics attention: K base tokens take in the motion of their clusters, without growing in number.

Motion features come from the dynamics map alone and never from the values of the cluster ids, so they do not
depend on how the clusters happen to be numbered. For cluster k in frame t (`motion_features`):

    occupancy   fraction of the frame's cells that belong to k
    present     1 if k has any cell in the frame, else 0
    centre      centre of mass (y, x) of k's cells, cell centres scaled to (0, 1) by the grid extent
    spread      standard deviation (y, x) of k's cells, in the same units
    velocity    change of the centre since the previous frame, per unit of normalised time (so a cluster that
                crosses the frame over the clip has velocity ~1 whatever T is; 0 unless k is present in both)

(all zero when k is absent), plus a sinusoidal encoding of the frame's time t / (T - 1) in [0, 1]. Then:

    0. track: each cluster's features, resampled (linear interpolation over normalised time) to `track_steps`
       points and flattened, go through an MLP into one D-dim track token that is added to the base token. It
       sees the whole trajectory at once, so where a cluster went (not only where it is on average) is a linear
       function of its input;
    1. cross-attention: base token k (query) attends over its own T motion tokens (an MLP of each (k, t) feature
       vector and time code),
    2. self-attention among the K base tokens (padded rows masked out as keys),
    3. an MLP
(1-3 as pre-norm residual blocks).

Every step treats clusters as a set (no positional code on k), so permuting the base rows and relabelling the map
the same way permutes the output rows the same way.

Padding: map cells with id -1 belong to no cluster (padding of frames or of the grid). Frames without a valid
cell are masked out of the cross-attention, and time and coordinates are scaled by the extent of the valid cells,
so padding the map with -1 at the end of any axis changes nothing. base_mask [B, K] (True = real) marks padded
base rows: they never influence real rows, and their outputs are zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossDynamicsAttention", "motion_features", "resample_tracks", "time_encoding", "NUM_MOTION_FEATURES"]

NUM_MOTION_FEATURES = 8


def _extent(mask: Tensor) -> Tensor:
    """mask [..., L] bool -> [...] float32: 1 + index of the last True (at least 1)."""
    steps = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask * steps).amax(-1).clamp_min(1).float()


def motion_features(dynamics: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-cluster, per-frame motion features of a dynamics map.

    dynamics: [B, T, H, W] int cluster ids in [0, k), or -1 for padding.
    -> features [B, k, T, 8] float32 (occupancy, present, centre y, x, spread y, x, velocity y, x),
       frame_valid [B, T] bool (the frame has a valid cell), num_frames [B] float32 (extent of valid frames).
    """
    B, T, H, W = dynamics.shape
    device = dynamics.device
    ids = dynamics.long().reshape(B, T, H * W)
    valid = ids >= 0
    # Extent of the valid cells along each axis, so trailing padding does not rescale anything.
    frame_valid = valid.any(2)  # [B, T]
    cell_valid = valid.any(1).view(B, H, W)
    num_frames, height, width = _extent(frame_valid), _extent(cell_valid.any(2)), _extent(cell_valid.any(1))

    # Sums of integer cell coordinates (row, column, their squares) per cluster and frame. Integer-valued float
    # sums are exact, so the scatter's atomics on accelerators cannot reorder any rounding. Bin 0 collects the
    # padding cells.
    y = torch.arange(H, device=device, dtype=torch.float32).repeat_interleave(W)
    x = torch.arange(W, device=device, dtype=torch.float32).repeat(H)
    stats = torch.stack([torch.ones_like(y), y, x, y * y, x * x], -1)  # [HW, 5]
    bins = torch.zeros(B, T, k + 1, 5, device=device).scatter_add_(
        2, (ids + 1)[..., None].expand(B, T, H * W, 5), stats.expand(B, T, H * W, 5)
    )[:, :, 1:]
    count = bins[..., 0]  # [B, T, k]
    present = count > 0
    n = count.clamp_min(1)
    my, mx = bins[..., 1] / n, bins[..., 2] / n  # mean row / column in cells
    h, w = height[:, None, None], width[:, None, None]
    cy, cx = (my + 0.5) / h, (mx + 0.5) / w  # cell centres scaled to (0, 1)
    sy = (bins[..., 3] / n - my * my).clamp_min(0).sqrt() / h
    sx = (bins[..., 4] / n - mx * mx).clamp_min(0).sqrt() / w
    occupancy = count / valid.sum(2, keepdim=True).clamp_min(1)
    both = present[:, 1:] & present[:, :-1]
    per_clip = (num_frames - 1).clamp_min(1)[:, None, None]  # frame steps in one unit of normalised time
    vy = F.pad(torch.where(both, cy[:, 1:] - cy[:, :-1], 0.0) * per_clip, (0, 0, 1, 0))
    vx = F.pad(torch.where(both, cx[:, 1:] - cx[:, :-1], 0.0) * per_clip, (0, 0, 1, 0))
    feats = torch.stack([occupancy, present.float(), cy, cx, sy, sx, vy, vx], -1)  # [B, T, k, 8]
    feats = feats * present[..., None]
    return feats.transpose(1, 2), frame_valid, num_frames


def resample_tracks(feats: Tensor, num_frames: Tensor, steps: int) -> Tensor:
    """Each cluster's features at `steps` evenly spaced points of normalised time (linear interpolation).

    feats [B, K, T, F] per-frame features; num_frames [B] extent of the valid frames (padding comes after it)
    -> [B, K, steps, F]. Only the first num_frames frames are read, so trailing padding changes nothing.
    """
    T = feats.shape[2]
    tau = torch.linspace(0, 1, steps, device=feats.device)
    position = tau[None, :] * (num_frames[:, None] - 1).clamp_min(0)  # [B, steps] in frames
    low = position.floor().long().clamp(0, T - 1)
    high = (low + 1).clamp_max((num_frames.long() - 1).clamp_min(0)[:, None])
    weight = (position - low)[:, None, :, None].to(feats.dtype)

    def at(frame: Tensor) -> Tensor:  # [B, steps] frame indices -> [B, K, steps, F]
        return feats.gather(2, frame[:, None, :, None].expand(-1, feats.shape[1], -1, feats.shape[3]))

    return torch.lerp(at(low), at(high), weight)


def time_encoding(num_steps: int, num_frames: Tensor, num_freqs: int) -> Tensor:
    """Sinusoidal code of normalised time.

    num_steps: T; num_frames: [B] extent of valid frames -> [B, T, 2 * num_freqs] for tau = t / (num_frames - 1)
    with frequencies pi * 2^j, j < num_freqs.
    """
    t = torch.arange(num_steps, device=num_frames.device, dtype=torch.float32)
    tau = t[None, :] / (num_frames[:, None] - 1).clamp_min(1)
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=num_frames.device, dtype=torch.float32)
    angles = tau[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class _Attention(nn.Module):
    """Multi-head attention with a key mask: q [B, Lq, D], kv [B, Lk, D], key_mask [B, Lk] (True = attend)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:  # [B, L, D] -> [B, heads, L, D / heads]
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, q: Tensor, kv: Tensor, key_mask: Tensor) -> Tensor:
        B, Lq, D = q.shape
        k, v = self.kv(kv).chunk(2, -1)
        # A query whose keys are all masked would get NaN; let it see everything (its output is discarded).
        key_mask = key_mask | ~key_mask.any(-1, keepdim=True)
        y = F.scaled_dot_product_attention(
            self._heads(self.q(q)), self._heads(k), self._heads(v), attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(B, Lq, D))


class CrossDynamicsAttention(nn.Module):
    """Fuses each cluster's motion into its base vector (see the module docstring).

    dim: D of the base vectors; num_heads must divide it. num_freqs: frequencies of the time code.
    track_steps: time points of each cluster's track token (0: no track token, the per-frame attention alone).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mlp_ratio: float = 4.0, num_freqs: int = 8,
                 dropout: float = 0.0, track_steps: int = 16):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_freqs, self.track_steps = num_freqs, track_steps
        self.track = nn.Sequential(
            nn.Linear(NUM_MOTION_FEATURES * track_steps, dim), nn.GELU(), nn.Linear(dim, dim)
        ) if track_steps else None
        self.motion = nn.Sequential(
            nn.Linear(NUM_MOTION_FEATURES + 2 * num_freqs, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.norm_query, self.norm_motion = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = _Attention(dim, num_heads, dropout)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, base: Tensor, dynamics: Tensor, base_mask: Tensor | None = None) -> Tensor:
        """base [B, K, D], dynamics [B, T, H, W] ids in [0, K) or -1 (padding), base_mask [B, K] bool
        (True = real row; None = all real) -> [B, K, D] (zero on padded rows)."""
        if base.dim() != 3 or dynamics.dim() != 4 or base.shape[0] != dynamics.shape[0]:
            raise ValueError(f"expected base [B, K, D] and dynamics [B, T, H, W], got {tuple(base.shape)} "
                             f"and {tuple(dynamics.shape)}")
        B, K, D = base.shape
        T = dynamics.shape[1]
        if base_mask is None:
            base_mask = torch.ones(B, K, dtype=torch.bool, device=base.device)
        feats, frame_valid, num_frames = motion_features(dynamics, K)  # [B, K, T, 8]
        time = time_encoding(T, num_frames, self.num_freqs)[:, None].expand(B, K, T, -1)
        motion = self.motion(torch.cat([feats, time], -1).to(base.dtype))  # [B, K, T, D]

        h = base
        if self.track is not None:
            tracks = resample_tracks(feats, num_frames, self.track_steps)  # [B, K, steps, 8]
            h = h + self.track(tracks.flatten(2).to(base.dtype))
        q = self.norm_query(h).reshape(B * K, 1, D)
        kv = self.norm_motion(motion).reshape(B * K, T, D)
        frames = frame_valid[:, None].expand(B, K, T).reshape(B * K, T)
        h = h + self.cross(q, kv, frames).view(B, K, D)
        n = self.norm_self(h)
        h = h + self.self_attn(n, n, base_mask)
        h = h + self.mlp(self.norm_mlp(h))
        return h * base_mask[..., None].to(h.dtype)
