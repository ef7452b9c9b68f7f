"""Drawing a dynamics map over a clip's frames: one colour per cluster, and each cluster's trajectory.

A dynamics map M [T, H, W] gives, for every sampled frame and grid cell, the cluster (token-base row) the cell
belongs to. Here each cell is painted over its pixels in its cluster's colour, and a cluster's trajectory is its
centre of mass over time: the mean (row, column) of its cells in each frame where it appears.

Pure numpy + PIL; no model and no torch. Frames are uint8 RGB [T, h, w, 3]; any frame size works (cells are
scaled to it).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

# Golden-ratio hue steps keep consecutive cluster ids far apart on the colour wheel for any K.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def cluster_colours(k: int) -> np.ndarray:
    """[k, 3] uint8 RGB colours, pairwise distinct, bright enough to read over video frames."""
    if k < 1:
        raise ValueError(f"need at least one cluster, got k={k}")
    colours = []
    for index in range(k):
        hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0
        # Alternate lightness/saturation so that clusters whose hues end up close still differ.
        lightness = (0.55, 0.42, 0.68)[index % 3]
        saturation = (0.95, 0.75)[(index // 3) % 2]
        colours.append(colorsys.hls_to_rgb(hue, lightness, saturation))
    return np.round(np.asarray(colours) * 255).astype(np.uint8)


def _check_map(dynamics: np.ndarray) -> np.ndarray:
    dynamics = np.asarray(dynamics)
    if dynamics.ndim != 3:
        raise ValueError(f"a dynamics map is [T, H, W]; got shape {dynamics.shape}")
    if not np.issubdtype(dynamics.dtype, np.integer) or (dynamics.size and dynamics.min() < 0):
        raise ValueError("a dynamics map holds non-negative integer cluster ids")
    return dynamics.astype(np.int64)


def _check_frames(frames: np.ndarray, dynamics: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, h, w, 3]; got {frames.dtype} {frames.shape}")
    if frames.shape[0] != dynamics.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames but the dynamics map has {dynamics.shape[0]}")


def centres_of_mass(dynamics: np.ndarray, k: int | None = None) -> np.ndarray:
    """M [T, H, W] -> [T, K, 2] float: mean (row, column) of each cluster's cells per frame, in cell units with
    cell centres at +0.5 (so 0..H and 0..W span the frame); NaN where the cluster is absent from the frame."""
    dynamics = _check_map(dynamics)
    frames, height, width = dynamics.shape
    k = int(dynamics.max()) + 1 if k is None else k
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    centres = np.full((frames, k, 2), np.nan)
    for t in range(frames):
        labels = dynamics[t].ravel()
        counts = np.bincount(labels, minlength=k)[:k]
        present = counts > 0
        centres[t, present, 0] = (np.bincount(labels, rows.ravel(), minlength=k)[:k] / np.maximum(counts, 1))[present]
        centres[t, present, 1] = (np.bincount(labels, cols.ravel(), minlength=k)[:k] / np.maximum(counts, 1))[present]
    return centres


def paint_map(dynamics_frame: np.ndarray, colours: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """M[t] [H, W] -> uint8 [h, w, 3] image of cluster colours, each cell a block (nearest-neighbour upscale)."""
    cells = colours[np.asarray(dynamics_frame)]
    return np.asarray(Image.fromarray(cells).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _cell_edges(dynamics_frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: pixels on a border between cells of different clusters (so regions read as regions)."""
    height, width = dynamics_frame.shape
    row_of = (np.arange(size[0]) * height) // size[0]
    col_of = (np.arange(size[1]) * width) // size[1]
    labels = dynamics_frame[row_of][:, col_of]
    edges = np.zeros(size, dtype=bool)
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edges


def overlay_frame(frame: np.ndarray, dynamics_frame: np.ndarray, colours: np.ndarray,
                  alpha: float = 0.45) -> np.ndarray:
    """One frame [h, w, 3] with its map M[t] [H, W] blended on top and cluster borders drawn dark."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    size = frame.shape[:2]
    painted = paint_map(dynamics_frame, colours, size).astype(np.float32)
    blended = (1.0 - alpha) * frame.astype(np.float32) + alpha * painted
    blended[_cell_edges(np.asarray(dynamics_frame), size)] *= 0.35
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def overlay_frames(frames: np.ndarray, dynamics: np.ndarray, colours: np.ndarray | None = None,
                   alpha: float = 0.45) -> np.ndarray:
    """frames uint8 [T, h, w, 3], M [T, H, W] -> uint8 [T, h, w, 3] with the map blended over every frame."""
    dynamics = _check_map(dynamics)
    _check_frames(frames, dynamics)
    colours = cluster_colours(int(dynamics.max()) + 1) if colours is None else colours
    return np.stack([overlay_frame(frame, cells, colours, alpha) for frame, cells in zip(frames, dynamics)])


def to_pixels(centres: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Centres in cell units [..., 2] (row, col) -> pixel coordinates [..., 2] as (x, y) for drawing."""
    scale_y, scale_x = size[0] / grid[0], size[1] / grid[1]
    return np.stack([centres[..., 1] * scale_x, centres[..., 0] * scale_y], axis=-1)


def moving_clusters(centres: np.ndarray, min_frames: int = 2) -> np.ndarray:
    """Ids of the clusters present in at least `min_frames` frames: those with a trajectory to draw."""
    present = ~np.isnan(centres[..., 0])
    return np.flatnonzero(present.sum(axis=0) >= min_frames)


def consecutive_runs(path: np.ndarray) -> list[np.ndarray]:
    """path [T, 2] with NaN rows where the cluster is absent -> its pieces over consecutive frames. A cluster that
    leaves and comes back is drawn as separate pieces: a line across the gap would show motion that never was."""
    present = ~np.isnan(path[:, 0])
    runs, start = [], None
    for t, here in enumerate([*present, False]):
        if here and start is None:
            start = t
        elif not here and start is not None:
            runs.append(path[start:t])
            start = None
    return runs


def draw_trails(image: np.ndarray, centres_px: np.ndarray, upto: int, colours: np.ndarray,
                clusters: np.ndarray | None = None, width: int = 2, trail: int | None = None) -> np.ndarray:
    """Draw each cluster's path over frames 0..upto (centres_px [T, K, 2] as (x, y)) and a dot at frame `upto`.

    trail: how many steps back the path reaches (None: back to frame 0); short trails keep busy clips readable."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    clusters = np.arange(centres_px.shape[1]) if clusters is None else clusters
    radius = max(2, width + 1)
    for cluster in clusters:
        first = 0 if trail is None else max(0, upto - trail)
        colour = tuple(int(c) for c in colours[cluster])
        for run in consecutive_runs(centres_px[first: upto + 1, cluster]):
            if len(run) > 1:
                points = [tuple(p) for p in run]
                draw.line(points, fill=(0, 0, 0), width=width + 2)  # a dark outline keeps it visible on any colour
                draw.line(points, fill=colour, width=width)
        if not np.isnan(centres_px[upto, cluster, 0]):
            x, y = centres_px[upto, cluster]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(0, 0, 0))
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------------------------
# whole pictures: a PNG sheet and an animated GIF


def annotated_frames(frames: np.ndarray, dynamics: np.ndarray, colours: np.ndarray, scale: int = 1,
                     alpha: float = 0.45, trail: int | None = 3) -> np.ndarray:
    """uint8 [T, h*scale, w*scale, 3]: frame t with the map blended on and each trajectory's last `trail` steps
    drawn up to t (None: the whole path so far)."""
    dynamics = _check_map(dynamics)
    _check_frames(frames, dynamics)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    size = (frames.shape[1] * scale, frames.shape[2] * scale)
    if scale > 1:
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.BICUBIC)) for f in frames])
    centres_px = to_pixels(centres_of_mass(dynamics, len(colours)), dynamics.shape[1:], size)
    clusters = moving_clusters(centres_px)
    width = max(1, scale + 1)
    return np.stack([
        draw_trails(overlay_frame(frames[t], dynamics[t], colours, alpha), centres_px, t, colours, clusters, width,
                    trail)
        for t in range(len(frames))
    ])


def _stamp_frame_number(image: np.ndarray, t: int, total: int) -> np.ndarray:
    """Write "t/total" in a corner: tells the viewer where the loop is, and keeps GIF frames distinct (PIL merges
    identical consecutive frames, which would change the frame count)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    text = f"{t + 1}/{total}"
    draw.rectangle((0, 0, 8 + 7 * len(text), 14), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def write_gif(frames: np.ndarray, dynamics: np.ndarray, path, *, colours: np.ndarray | None = None, scale: int = 2,
              frame_ms: int = 400, trail: int | None = 3) -> None:
    """Animated GIF, one frame per sampled frame: map overlaid, each trajectory's recent steps drawn."""
    dynamics = _check_map(dynamics)
    colours = cluster_colours(int(dynamics.max()) + 1) if colours is None else colours
    images = annotated_frames(frames, dynamics, colours, scale, trail=trail)
    pictures = [Image.fromarray(_stamp_frame_number(image, t, len(images))) for t, image in enumerate(images)]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0, optimize=False)


def occupancy(dynamics: np.ndarray, k: int) -> np.ndarray:
    """M [T, H, W] -> [K, T] number of cells of each cluster in each frame."""
    dynamics = _check_map(dynamics)
    return np.stack([np.bincount(frame.ravel(), minlength=k)[:k] for frame in dynamics], axis=1)


def write_sheet(frames: np.ndarray, dynamics: np.ndarray, path, *, title: str = "", columns: int = 8,
                colours: np.ndarray | None = None, dpi: int = 100) -> None:
    """PNG: every sampled frame with its map and trajectories so far; then all trajectories over the clip's mean
    frame, and each cluster's occupancy (cells per frame) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dynamics = _check_map(dynamics)
    _check_frames(frames, dynamics)
    k = int(dynamics.max()) + 1
    colours = cluster_colours(k) if colours is None else colours
    count = len(frames)
    columns = max(1, min(columns, count))
    frame_rows = math.ceil(count / columns)
    figure = plt.figure(figsize=(2.4 * columns, 2.4 * frame_rows + 4.0), dpi=dpi)
    grid = figure.add_gridspec(frame_rows + 1, columns, height_ratios=[1] * frame_rows + [1.7])
    annotated = annotated_frames(frames, dynamics, colours)
    for t, image in enumerate(annotated):
        axis = figure.add_subplot(grid[t // columns, t % columns])
        axis.imshow(image)
        axis.set_title(f"frame {t + 1}", fontsize=8)
        axis.axis("off")
    _trajectory_panel(figure.add_subplot(grid[frame_rows, : max(1, columns // 2)]), frames, dynamics, colours)
    _occupancy_panel(figure.add_subplot(grid[frame_rows, max(1, columns // 2):] if columns > 1
                                        else grid[frame_rows, 0]), dynamics, colours)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _trajectory_panel(axis, frames: np.ndarray, dynamics: np.ndarray, colours: np.ndarray) -> None:
    size = frames.shape[1:3]
    background = frames.astype(np.float32).mean(axis=0) * 0.55 + 255 * 0.45  # faded, so the paths stand out
    axis.imshow(background.astype(np.uint8))
    centres_px = to_pixels(centres_of_mass(dynamics, len(colours)), dynamics.shape[1:], size)
    sizes = occupancy(dynamics, len(colours)).sum(axis=1)
    for cluster in moving_clusters(centres_px):
        runs = consecutive_runs(centres_px[:, cluster])
        colour = colours[cluster] / 255.0
        width = 0.8 + 3.0 * math.sqrt(sizes[cluster] / sizes.max())
        for run in runs:
            axis.plot(run[:, 0], run[:, 1], "-", color=colour, linewidth=width, alpha=0.9)
        axis.plot(runs[0][0, 0], runs[0][0, 1], "o", color=colour, markersize=4, markeredgecolor="black")
        axis.plot(runs[-1][-1, 0], runs[-1][-1, 1], ">", color=colour, markersize=5, markeredgecolor="black")
    axis.set_xlim(0, size[1])
    axis.set_ylim(size[0], 0)
    axis.set_title("cluster trajectories (centre of mass; o start, > end; width ~ size)", fontsize=8)
    axis.axis("off")


def _occupancy_panel(axis, dynamics: np.ndarray, colours: np.ndarray) -> None:
    k = len(colours)
    frames = dynamics.shape[0]
    counts = occupancy(dynamics, k)
    order = np.argsort(-counts.sum(axis=1), kind="stable")  # biggest clusters on top
    shares = counts[order] / (dynamics.shape[1] * dynamics.shape[2])
    # Each row in its cluster's colour, deeper for a larger share of the frame's cells (square root, so that
    # small clusters stay visible next to the background ones).
    strength = np.sqrt(shares / max(shares.max(), 1e-9))
    rows = 1.0 - strength[..., None] * (1.0 - colours[order][:, None, :] / 255.0)
    # First column: the cluster's colour itself (the key to every other panel), then a white gap.
    swatches = colours[order][:, None, :] / 255.0
    image = np.concatenate([swatches, np.ones((k, 1, 3)), rows], axis=1)
    axis.imshow(image, aspect="auto", interpolation="nearest")
    axis.set_xlabel("frame", fontsize=8)
    axis.set_ylabel("cluster (largest first)", fontsize=8)
    axis.set_xticks([0, *range(2, frames + 2)], ["colour", *(str(t + 1) for t in range(frames))], fontsize=6)
    axis.set_yticks([])
    axis.set_title(f"occupancy: cells per frame of each of the {k} clusters", fontsize=8)
