"""Checkpoints of the video LLM: what `jobs/train_from_cache.py` writes and `jobs/ask.py` reads.

A checkpoint holds only what training changed and what is needed to use it again:

    step, model (the trained weights), optimizer (its state, to resume),
    architecture   VideoPrefixLM.architecture(): widths, the LLM's name, which LLM blocks train, the prompt format
    video          the settings contract of the cache it was trained on (encoder, input size, frames, K, ...), so
                   new videos are tokenised the same way and a cache made otherwise is refused

Files are checkpoint-<step>.pt, written under a temporary name and renamed, so the last one is always complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.readers.video_lm import VideoPrefixLM, load_llm
from pipeline.store.contract import ContractError, OutputContract, same_encoder

CHECKPOINT_GLOB = "checkpoint-*.pt"
CONTRACT_RECORDER = "train_from_cache"


class CheckpointMismatch(ContractError):
    """Tokens made otherwise than the ones a checkpoint was trained on (other encoder, sampling, K or width)."""


def checkpoint_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(CHECKPOINT_GLOB))  # zero-padded step numbers sort in step order


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the last checkpoint of a --checkpoint-dir."""
    path = Path(path)
    if path.is_file():
        return path
    found = checkpoint_paths(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a {CHECKPOINT_GLOB} file or a folder of them; "
                                "jobs/train_from_cache.py --checkpoint-dir writes them)")
    return found[-1]


def save_checkpoint(folder: Path, model: VideoPrefixLM, optimizer, step: int,
                    video: OutputContract | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{step:08d}.pt"
    partial = path.with_suffix(".partial")
    torch.save({"step": step, "architecture": model.architecture(), "model": model.trained_state(),
                "optimizer": optimizer.state_dict(),
                "video": video.as_json(CONTRACT_RECORDER) if video is not None else None}, partial)
    os.replace(partial, path)
    return path


def read_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


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
    """(model in eval mode, its tokenizer, the checkpoint's contents, the checkpoint file) from a checkpoint file
    or folder. llm: an already loaded (lm, tokenizer) of the checkpoint's LLM (else loaded from its name)."""
    checkpoint = latest_checkpoint(path)
    state = read_checkpoint(checkpoint)
    lm, tokenizer = llm if llm is not None else load_llm(state["architecture"]["llm"])
    model = VideoPrefixLM.from_architecture(state["architecture"], lm=lm)
    model.load_trained_state(state["model"])
    return model.to(device).eval(), tokenizer, state, checkpoint
