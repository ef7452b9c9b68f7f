"""pipeline.readers.evaluation.probe and .tracking: the probe reads a direction from a dynamics map (and not from a
map shuffled over time), its interval covers its mean; the tracking diagnosis against known trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.readers.evaluation import tracking
from pipeline.readers.evaluation.probe import (ProbeData, ProbeReader, TrajectoryReader, accuracy_interval,
                                               train_probe)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIRECTIONS = [(0, -1), (0, 1), (-1, 0), (1, 0), (0, 0)]  # left, right, up, down, still


def moving_square_maps(count: int, seed: int, *, T: int = 8, size: int = 8, k: int = 8):
    """Maps [count, T, size, size]: a static patchwork of clusters 1..k-1 with a few cells flipping each frame, and
    a 2 x 2 object of a random cluster id moving 4 cells one way (or staying); its direction index as the label."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((count, T, size, size), dtype=np.int64)
    labels = rng.integers(0, len(DIRECTIONS), count)
    for i, label in enumerate(labels):
        ids = rng.permutation(k)  # the object's id is arbitrary: the probe must not read the numbering
        background = ids[1:][rng.integers(0, k - 1, (size // 2, size // 2))].repeat(2, 0).repeat(2, 1)
        dy, dx = DIRECTIONS[label]
        # Start far enough from the edge it moves towards to travel 4 cells.
        y0, x0 = (rng.integers(4 if d < 0 else 0, size - 2 - (4 if d > 0 else 0) + 1) for d in (dy, dx))
        for t in range(T):
            frame = background.copy()
            flips = rng.random((size, size)) < 0.05
            frame[flips] = ids[1:][rng.integers(0, k - 1, flips.sum())]
            step = round(4 * t / (T - 1))
            y, x = y0 + dy * step, x0 + dx * step
            frame[y : y + 2, x : x + 2] = ids[0]
            maps[i, t] = frame
    return torch.from_numpy(maps), torch.from_numpy(labels)


def probe_split(maps, labels, *, dim=16, k=8, seed=0):
    base = torch.randn(len(maps), k, dim, generator=torch.Generator().manual_seed(seed))  # no direction in the base
    return ProbeData(base, torch.ones(len(maps), k, dtype=torch.bool), {"direction": labels}, maps)


def shuffled_in_time(maps: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([m[torch.randperm(m.shape[0], generator=g)] for m in maps])


@pytest.mark.parametrize("reader_kind", ["cross-dynamics", "trajectory"])
def test_the_probe_reads_direction_from_a_dynamics_map_and_not_from_one_shuffled_in_time(reader_kind):
    train_maps, train_labels = moving_square_maps(320, seed=1)
    held_maps, held_labels = moving_square_maps(200, seed=2)

    def accuracy(shuffle: bool, seed: int = 0) -> float:
        tm = shuffled_in_time(train_maps, 3) if shuffle else train_maps
        hm = shuffled_in_time(held_maps, 4) if shuffle else held_maps
        torch.manual_seed(seed)
        reader = (ProbeReader(16, {"direction": 5}, width=32, heads=4, dynamics=16) if reader_kind == "cross-dynamics"
                  else TrajectoryReader(8, {"direction": 5}, width=32))
        predicted = train_probe(reader, probe_split(tm, train_labels), probe_split(hm, held_labels, seed=9),
                                steps=300, lr=3e-3, seed=seed)
        return float((predicted["direction"] == held_labels.numpy()).mean())

    ordered, shuffled = accuracy(False), accuracy(True)  # measured: 0.97 / 0.39 and 0.98 / 0.44
    assert ordered >= 0.9, ordered
    # Shuffled frames keep where the object was, not the way it went: left/right and up/down are confused.
    assert shuffled <= 0.7 and ordered - shuffled >= 0.25, (ordered, shuffled)


def test_accuracy_interval_covers_the_mean_and_narrows_with_more_videos():
    rng = np.random.default_rng(0)
    small = rng.random((3, 50)) < 0.7
    large = rng.random((3, 2000)) < 0.7
    mean, low, high = accuracy_interval(small)
    assert low <= mean <= high and mean == pytest.approx(small.mean())
    _, low_l, high_l = accuracy_interval(large)
    assert high_l - low_l < (high - low) / 3
    assert low_l < 0.7 < high_l
    assert accuracy_interval(np.ones((3, 20), dtype=bool)) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# tracking diagnosis


def test_object_cells_take_half_covered_cells_or_the_most_covered_one():
    masks = np.zeros((2, 70, 70), dtype=bool)
    masks[0, 0:20, 0:20] = True  # covers cell (0, 0) whole and a tenth of its neighbours
    masks[1, 12:16, 12:16] = True  # a speck: no cell half covered
    cells = tracking.object_cells(masks, (7, 7))
    assert cells[0].sum() == 4 and cells[0, 0, 0] and cells[0, 1, 1]  # 20 px of 10-px cells: 2 x 2 cells
    assert cells[1].sum() == 1 and cells[1, 1, 1]


def test_follow_scores_against_known_trajectories():
    T, H, W = 6, 7, 7
    rng = np.random.default_rng(0)
    cells = np.zeros((T, H, W), dtype=bool)
    centres = np.zeros((T, 2))
    for t in range(T):
        cells[t, 2:4, t : t + 2] = True
        centres[t] = (3.0, t + 1.0)
    background = rng.integers(1, 5, (T, H, W))
    exact = np.where(cells, 7, background)
    scores = tracking.follow_scores(exact, cells, centres)
    assert scores == {"iou": 1.0, "frames_following": 1.0, "follows": 1.0, "centre_error": 0.0}
    # The object split between two clusters: each overlaps it with IoU 0.5 at best.
    split = exact.copy()
    split[:, 2] = np.where(cells[:, 2], 8, split[:, 2])
    assert tracking.follow_scores(split, cells, centres)["iou"] == pytest.approx(0.5)
    # Structureless noise follows nothing.
    for seed in range(3):
        noise = np.random.default_rng(seed).integers(0, 16, (T, H, W))
        assert tracking.follow_scores(noise, cells, centres)["follows"] == 0.0
    # A cluster that stays where the object started follows it in the first frames only.
    stuck = np.where(cells[:1].repeat(T, 0), 7, background)
    stuck_scores = tracking.follow_scores(stuck, cells, centres)
    assert stuck_scores["follows"] == 0.0 and stuck_scores["centre_error"] > 1.0
    summary = tracking.summarise([scores, stuck_scores])
    assert summary["follows"] == 0.5 and summary["clips"] == 2
