"""Convert pickled checkpoints (checkpoint-<step>.pt, written by earlier versions) to checkpoint-<step>/ folders.

    python jobs/convert_checkpoint.py checkpoints/checkpoint-00000300.pt     # one file
    python jobs/convert_checkpoint.py checkpoints                            # every .pt file of a --checkpoint-dir

Each folder is written beside its file (or under --output) in the format jobs/ask.py and jobs/train_from_cache.py
read: safetensors and JSON, which load without running code. This is the only place that reads a pickle, and it
reads it with torch's restricted unpickler (`weights_only=True`), which builds tensors and plain containers only:
a file that needs anything else (such as one made to run a command when loaded) is refused, not run. The .pt
files are left as they are; remove them once the folders work, since a --checkpoint-dir that still holds them is
refused.

Exit status: 0, or 2 when a file is missing, is not a checkpoint, or holds more than tensors and plain data.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from pipeline.readers.checkpoint import PICKLED_GLOB, write_checkpoint

KEYS = {"step", "architecture", "model", "optimizer", "video"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A checkpoint-<step>.pt file, or a folder of them.")
    parser.add_argument("--output", help="Folder for the converted checkpoints (default: beside each file).")
    return parser.parse_args(argv)


def pickled_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = sorted(path.glob(PICKLED_GLOB)) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no {PICKLED_GLOB} file at {path}")
    return found


def convert(path: Path, output: Path) -> Path:
    """Write the checkpoint of the pickled file `path` as output/checkpoint-<step>/; returns that folder."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds more than tensors and plain data, so it is not loaded (loading it could run "
                         f"code): {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not KEYS <= set(state):
        raise ValueError(f"{path} is not a checkpoint of jobs/train_from_cache.py (expected the keys {sorted(KEYS)})")
    return write_checkpoint(output, state)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for path in pickled_files(Path(args.checkpoint)):
            folder = convert(path, Path(args.output) if args.output else path.parent)
            print(f"{path} -> {folder}")
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
