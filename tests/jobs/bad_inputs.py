"""Query videos that no CLI can use, and the check that a CLI reports them as one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bad_query_videos(folder: Path) -> dict[str, Path]:
    """name -> path of a missing file, random bytes, a text file, an empty file and a directory, each named .mp4."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.mp4" for name in ("missing", "corrupt", "text", "empty", "directory")}
    paths["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["text"].write_text("not a video\n")
    paths["empty"].write_bytes(b"")
    paths["directory"].mkdir()
    return paths


def assert_one_line_error(stderr: str) -> None:
    """stderr ends with exactly one `error: ...` line and holds no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
