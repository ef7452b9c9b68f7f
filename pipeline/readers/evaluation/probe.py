"""A probe of what a video's tokens carry: one small reader, trained the same way on every representation.

A representation of a video is a set (or sequence) of tokens [L, D], optionally with a dynamics map [T, H, W]
whose ids index the tokens. `ProbeReader` is the same for all: LayerNorm + linear to a small width, then (when a
map is given) tokendyn.CrossDynamicsAttention, (for ordered tokens) a learned position per slot, a 2-layer
transformer, attention pooling and one linear head per attribute. `TrajectoryReader` is the plain reader of a map
alone: an MLP over each cluster's resampled track (tokendyn.attention.resample_tracks), max-pooled over clusters;
it is the yardstick of how much of the map a reader gets. `FrameGridReader` reads every encoder token (the upper
bound): per frame, its cells (with learned cell positions) pooled by attention into a few tokens, then the same
reader as above over those tokens of all frames (with learned positions); a transformer over all T*H*W tokens at
once costs seconds a step on a CPU.

`train_probe` trains one reader on one seed and returns its held-out predictions; `accuracy_interval` turns the
predictions of several seeds into a mean and a 95 % bootstrap interval over the held-out videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokendyn.attention import NUM_MOTION_FEATURES, CrossDynamicsAttention, motion_features, resample_tracks


@dataclass
class ProbeData:
    """One representation of a split: tokens [N, L, D], mask [N, L] (True = real token), optional dynamics
    [N, T, H, W] (ids into the tokens, -1 = no cell), labels {attribute: [N] int64}."""

    tokens: Tensor
    mask: Tensor
    labels: dict[str, Tensor]
    dynamics: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        dynamics = None if self.dynamics is None else self.dynamics[index].long()
        return self.tokens[index].float(), self.mask[index], dynamics


class ProbeReader(nn.Module):
    """tokens [B, L, D], mask [B, L], dynamics [B, T, H, W] or None -> {attribute: logits [B, classes]}.

    classes: {attribute: number of values}. positions: learned position codes for L ordered slots (0: the tokens
    are a set). dynamics: read a map through CrossDynamicsAttention with this many track steps (None: no map).
    """

    def __init__(self, dim: int, classes: dict[str, int], *, width: int = 64, heads: int = 4, layers: int = 2,
                 positions: int = 0, dynamics: int | None = None):
        super().__init__()
        self.input = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.positions = nn.Parameter(torch.randn(positions, width) * 0.02) if positions else None
        self.dynamics = (CrossDynamicsAttention(width, num_heads=heads, track_steps=dynamics)
                         if dynamics is not None else None)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.heads = nn.ModuleDict({name: nn.Linear(width, count) for name, count in classes.items()})

    def forward(self, tokens: Tensor, mask: Tensor, dynamics: Tensor | None) -> dict[str, Tensor]:
        h = self.input(tokens)
        if self.positions is not None:
            h = h + self.positions[: h.shape[1]]
        if self.dynamics is not None:
            h = self.dynamics(h, dynamics, mask)
        h = self.encoder(h, src_key_padding_mask=~mask)
        pooled = self.pool(self.query.expand(h.shape[0], -1, -1), h, h, key_padding_mask=~mask)[0][:, 0]
        return {name: head(pooled) for name, head in self.heads.items()}


class FrameGridReader(nn.Module):
    """Every token of a video: tokens [B, T * cells, D] (frame by frame), mask, dynamics (unused) -> logits.

    Each frame's `cells` tokens, with learned cell positions, are pooled by attention (learned queries) into
    `per_frame` tokens; the T * per_frame tokens then go through a ProbeReader with learned slot positions.
    """

    def __init__(self, dim: int, classes: dict[str, int], *, frames: int, cells: int, per_frame: int = 4,
                 width: int = 64, heads: int = 4):
        super().__init__()
        self.cells, self.per_frame = cells, per_frame
        self.input = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.cell_positions = nn.Parameter(torch.randn(cells, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, per_frame, width) * 0.02)
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.reader = ProbeReader(width, classes, width=width, heads=heads, positions=frames * per_frame)

    def forward(self, tokens: Tensor, mask: Tensor, dynamics: Tensor | None) -> dict[str, Tensor]:
        B = tokens.shape[0]
        h = self.input(tokens).reshape(-1, self.cells, self.queries.shape[-1]) + self.cell_positions
        frames = self.pool(self.queries.expand(h.shape[0], -1, -1), h, h)[0]  # [B * T, per_frame, width]
        frames = frames.reshape(B, -1, frames.shape[-1])
        frame_mask = mask.reshape(B, -1, self.cells).any(-1).repeat_interleave(self.per_frame, 1)
        return self.reader(frames, frame_mask, None)


class TrajectoryReader(nn.Module):
    """The map alone, read plainly: dynamics [B, T, H, W] with ids < k -> {attribute: logits}.

    Each cluster's motion features, resampled to `steps` points, flattened, through an MLP; max over clusters.
    """

    def __init__(self, k: int, classes: dict[str, int], *, width: int = 64, steps: int = 16):
        super().__init__()
        self.k, self.steps = k, steps
        self.mlp = nn.Sequential(nn.Linear(NUM_MOTION_FEATURES * steps, width), nn.GELU(), nn.Linear(width, width),
                                 nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(width, count) for name, count in classes.items()})

    def forward(self, tokens: Tensor, mask: Tensor, dynamics: Tensor | None) -> dict[str, Tensor]:
        feats, _, num_frames = motion_features(dynamics, self.k)  # [B, k, T, 8]
        h = self.mlp(resample_tracks(feats, num_frames, self.steps).flatten(2))  # [B, k, width]
        present = feats[..., 1].amax(-1) > 0  # clusters with a cell
        pooled = h.masked_fill(~present[..., None], float("-inf")).amax(1)
        return {name: head(pooled) for name, head in self.heads.items()}


def train_probe(reader: nn.Module, train: ProbeData, heldout: ProbeData, *, steps: int, batch_size: int = 32,
                lr: float = 1e-3, seed: int = 0) -> dict[str, np.ndarray]:
    """Train `reader` on `train` (AdamW, summed cross-entropy of the attributes) and return its held-out
    predictions {attribute: [N] int}."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.01)
    reader.train()
    for _ in range(steps):
        index = torch.randint(len(train), (min(batch_size, len(train)),), generator=generator)
        logits = reader(*train.batch(index))
        loss = sum(F.cross_entropy(logits[name], train.labels[name][index]) for name in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    reader.eval()
    predictions: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(heldout), 64):
            index = torch.arange(start, min(start + 64, len(heldout)))
            for name, values in reader(*heldout.batch(index)).items():
                predictions.setdefault(name, []).append(values.argmax(-1).numpy())
    return {name: np.concatenate(parts) for name, parts in predictions.items()}


def accuracy_interval(correct: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """correct [seeds, N] bool -> (mean accuracy, 95 % interval low, high): a bootstrap over the N held-out
    videos of their accuracy averaged over the seeds (so the interval covers which videos were held out)."""
    per_video = correct.mean(0)
    rng = np.random.default_rng(seed)
    means = per_video[rng.integers(0, len(per_video), (resamples, len(per_video)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(per_video.mean()), float(low), float(high)
