"""Checkpoints of the video LLM: what `jobs/train_from_cache.py` writes and `jobs/ask.py` reads.

A checkpoint holds only what training changed and what is needed to use it again, in files that load without
running code (safetensors for tensors, JSON for the rest; nothing is unpickled):

    checkpoint-<step>/model.safetensors      the trained weights
    checkpoint-<step>/optimizer.safetensors  the optimizer's tensors (keyed "<param index>.<name>"), to resume
    checkpoint-<step>/checkpoint.json        step; architecture (VideoPrefixLM.architecture(): widths, the LLM's
                                             name, which LLM blocks train, the prompt format); video (the settings
                                             contract of the cache it was trained on, so new videos are tokenised
                                             the same way and a cache made otherwise is refused); the optimizer's
                                             other state and its parameter groups

Each is written into checkpoint-<step>.partial/ and renamed, so the last one is always complete. The pickled
checkpoint-<step>.pt files of earlier versions are refused: loading a pickle can run any code the file holds.
`jobs/convert_checkpoint.py` turns them into folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.readers.video_lm import VideoPrefixLM, load_llm
from pipeline.store.contract import ContractError, OutputContract, same_encoder

CHECKPOINT_GLOB = "checkpoint-[0-9]*[0-9]"  # folders; not their .partial drafts
PICKLED_GLOB = "checkpoint-*.pt"
MANIFEST, MODEL_FILE, OPTIMIZER_FILE = "checkpoint.json", "model.safetensors", "optimizer.safetensors"
FORMAT = 2
CONTRACT_RECORDER = "train_from_cache"


class CheckpointMismatch(ContractError):
    """Tokens made otherwise than the ones a checkpoint was trained on (other encoder, sampling, K or width)."""


class PickledCheckpoint(ValueError):
    """A checkpoint of the earlier pickled format: refused, since unpickling it could run code."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is a pickled checkpoint of an earlier version; it is not loaded, since unpickling "
                         f"a file can run any code it holds. Convert it once to the safe format with "
                         f"`python jobs/convert_checkpoint.py {path}` (which reads only tensors and plain data) and "
                         f"use the folder it writes")


def checkpoint_paths(folder: Path) -> list[Path]:
    """The checkpoint folders under `folder`, in step order; refused if it holds pickled checkpoints."""
    folder = Path(folder)
    pickled = sorted(folder.glob(PICKLED_GLOB))
    if pickled:
        raise PickledCheckpoint(pickled[-1])
    return sorted(path for path in folder.glob(CHECKPOINT_GLOB) if (path / MANIFEST).is_file())  # zero-padded


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or the last checkpoint of a --checkpoint-dir."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        raise PickledCheckpoint(path)
    if (path / MANIFEST).is_file():
        return path
    found = checkpoint_paths(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint-<step> folder or a folder of them; "
                                "jobs/train_from_cache.py --checkpoint-dir writes them)")
    return found[-1]


def save_checkpoint(folder: Path, model: VideoPrefixLM, optimizer, step: int,
                    video: OutputContract | None) -> Path:
    return write_checkpoint(folder, {
        "step": step, "architecture": model.architecture(), "model": model.trained_state(),
        "optimizer": optimizer.state_dict(),
        "video": video.as_json(CONTRACT_RECORDER) if video is not None else None})


def write_checkpoint(folder: Path, state: dict) -> Path:
    """Write `state` (step, architecture, model, optimizer, video: as read_checkpoint returns it) as
    folder/checkpoint-<step>/."""
    path = Path(folder) / f"checkpoint-{state['step']:08d}"
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a draft left by a killed run
    partial.mkdir(parents=True)
    optimizer_tensors, optimizer_rest = _split_optimizer(state["optimizer"])
    save_file(_unshared(state["model"]), partial / MODEL_FILE)
    save_file(_unshared(optimizer_tensors), partial / OPTIMIZER_FILE)
    manifest = {"format": FORMAT, "step": state["step"], "architecture": state["architecture"],
                "video": state["video"], "optimizer": optimizer_rest}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if path.exists():  # the same step written again (a rerun to the same --steps)
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def read_checkpoint(path: Path) -> dict:
    """{"step", "architecture", "model", "optimizer", "video"} of a checkpoint folder; nothing in it runs code."""
    path = latest_checkpoint(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST} is of checkpoint format {manifest.get('format')!r}; this version reads "
                         f"format {FORMAT}")
    optimizer = _joined_optimizer(load_file(path / OPTIMIZER_FILE), manifest["optimizer"])
    return {"step": manifest["step"], "architecture": manifest["architecture"], "video": manifest["video"],
            "model": load_file(path / MODEL_FILE), "optimizer": optimizer}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (an LLM's tied embeddings): each gets its own copy."""
    return {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer state_dict as (its tensors, the JSON-able rest)."""
    tensors, rest = {}, {}
    for index, entries in state_dict["state"].items():
        rest[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                rest[str(index)][name] = value
    return tensors, {"state": rest, "param_groups": state_dict["param_groups"]}


def _joined_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of _split_optimizer (JSON turns the groups' tuples into lists, which optimizers accept)."""
    state = {int(index): dict(entries) for index, entries in rest["state"].items()}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state[int(index)][name] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}


def video_contract(state: dict, where: str) -> OutputContract | None:
    """The settings of the tokens a checkpoint was trained on; None if it predates their recording."""
    recorded = state.get("video")
    return OutputContract.from_json(recorded, where) if recorded else None


def contract_for_new_videos(state: dict, checkpoint: Path) -> OutputContract:
    """The settings new videos are tokenised with for this checkpoint; refused if it does not record them."""
    contract = video_contract(state, str(checkpoint))
    if contract is None:
        raise CheckpointMismatch(f"{checkpoint} does not record how its tokens were made, so new videos cannot be "
                                 "tokenised for it; ask about videos of its --cache instead")
    return contract


def check_cache(state: dict, checkpoint: Path, tokens: OutputContract | None, dim: int, where: str) -> None:
    """Refuse a cache whose tokens the checkpoint's model was not trained on: another width, or (when both
    record them) other settings."""
    if dim != state["architecture"]["video_dim"]:
        raise CheckpointMismatch(f"{checkpoint} reads {state['architecture']['video_dim']}-dim video tokens; "
                                 f"{where} holds {dim}-dim ones")
    if tokens is not None:
        check_tokens_match(video_contract(state, str(checkpoint)), tokens, where, checkpoint)


def check_tokens_match(trained_on: OutputContract | None, tokens: OutputContract, where: str,
                       checkpoint: Path) -> None:
    """Refuse tokens made otherwise than the checkpoint's: a model reads only the kind of tokens it learned."""
    if trained_on is None:
        return
    differences = trained_on.differences(tokens.settings)
    if not same_encoder(trained_on.encoder, tokens.encoder) or (trained_on.layer, trained_on.dim) != (
            tokens.layer, tokens.dim):
        differences.append(f"encoder: {trained_on.encoder!r} layer {trained_on.layer}, {trained_on.dim} dims -> "
                           f"{tokens.encoder!r} layer {tokens.layer}, {tokens.dim} dims")
    if differences:
        raise CheckpointMismatch(f"{checkpoint} was trained on tokens made with other settings than {where}'s "
                                 f"({'; '.join(differences)}). Use a cache made with the checkpoint's settings, or "
                                 "pass the raw videos so they are tokenised as the checkpoint's were.")


def load_trained_model(path: str | os.PathLike, *, device: str = "cpu", llm=None
                       ) -> tuple[VideoPrefixLM, object, dict, Path]:
    """(model in eval mode, its tokenizer, the checkpoint's contents, the checkpoint folder) from a checkpoint
    or a --checkpoint-dir. llm: an already loaded (lm, tokenizer) of the checkpoint's LLM (else loaded from its name)."""
    checkpoint = latest_checkpoint(path)
    state = read_checkpoint(checkpoint)
    lm, tokenizer = llm if llm is not None else load_llm(state["architecture"]["llm"])
    model = VideoPrefixLM.from_architecture(state["architecture"], lm=lm)
    model.load_trained_state(state["model"])
    return model.to(device).eval(), tokenizer, state, checkpoint
