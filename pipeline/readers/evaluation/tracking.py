"""Does one cluster of a dynamics map follow a known object? The method's own quality figure on clips whose object
mask is known in every frame (jobs/bench_probe.py): if the object has no cluster of its own, no reader of the
tokens can get its direction or colour.

Per clip: the object's cells (grid cells at least half covered by its mask; the most covered cell when none is),
the cluster whose cells overlap them best over the clip (mean IoU over frames), the fraction of frames where that
overlap reaches 0.5, and the distance between that cluster's centre and the object's true centre, in cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FOLLOW_IOU = 0.5  # a frame's overlap that counts as following
FOLLOW_FRAMES = 0.5  # fraction of frames (more than) that must follow for the clip to count


def object_cells(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """masks [T, h, w] bool object pixels of square frames -> [T, gh, gw] bool cells at least half covered (the
    most covered cell of a frame when none is)."""
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], grid)[:, 0].numpy()
    cells = coverage >= 0.5
    for t in np.flatnonzero(~cells.any((1, 2))):
        cells[t].flat[coverage[t].argmax()] = True
    return cells


def follow_scores(dynamics: np.ndarray, cells: np.ndarray, centres: np.ndarray) -> dict[str, float]:
    """dynamics [T, gh, gw] cluster ids, cells [T, gh, gw] the object's cells, centres [T, 2] the object's true
    centre (y, x) in cells -> {"iou": mean best-cluster IoU over frames, "frames_following": fraction of frames with
    IoU >= FOLLOW_IOU, "follows": 1.0 when more than FOLLOW_FRAMES of them do, "centre_error": mean distance in
    cells of that cluster's centre to the object's, over the frames where the cluster has cells}."""
    clusters = np.unique(dynamics)
    members = dynamics[None] == clusters[:, None, None, None]  # [C, T, gh, gw]
    inter = (members & cells[None]).sum((2, 3))
    union = (members | cells[None]).sum((2, 3))
    iou = inter / np.maximum(union, 1)  # [C, T]
    best = iou.mean(1).argmax()
    mine = members[best]
    present = mine.any((1, 2))
    ys, xs = np.mgrid[0 : dynamics.shape[1], 0 : dynamics.shape[2]] + 0.5
    count = np.maximum(mine.sum((1, 2)), 1)
    centre = np.stack([(mine * ys).sum((1, 2)) / count, (mine * xs).sum((1, 2)) / count], -1)
    error = np.linalg.norm(centre - centres, axis=-1)[present]
    following = float((iou[best] >= FOLLOW_IOU).mean())
    return {"iou": float(iou[best].mean()), "frames_following": following,
            "follows": float(following > FOLLOW_FRAMES), "centre_error": float(error.mean()) if len(error) else
            float("nan")}


def summarise(scores: list[dict[str, float]]) -> dict[str, float]:
    """Per-clip follow_scores -> the fraction of clips followed, the mean IoU and the median centre error."""
    return {"clips": len(scores), "follows": float(np.mean([s["follows"] for s in scores])),
            "iou": float(np.mean([s["iou"] for s in scores])),
            "centre_error": float(np.nanmedian([s["centre_error"] for s in scores]))}
