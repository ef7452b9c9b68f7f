"""Checkpoints load without running code: safetensors and JSON, resumable exactly; pickled ones are refused, and
their converter reads tensors and plain data only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.readers.checkpoint import (
    PickledCheckpoint, checkpoint_paths, latest_checkpoint, load_trained_model, read_checkpoint, save_checkpoint,
    write_checkpoint,
)
from pipeline.readers.video_lm import VideoPrefixLM, load_llm
from job_scripts import load_job_script

VIDEO_DIM = 16


class RunsACommand:
    """Unpickling this runs `touch marker`: what a shared checkpoint file can do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny_model(tiny_llm_dir) -> VideoPrefixLM:
    lm, _ = load_llm(str(tiny_llm_dir))
    torch.manual_seed(0)
    model = VideoPrefixLM(VIDEO_DIM, lm, video_heads=2, video_width=8, llm_name=str(tiny_llm_dir))
    model.set_trainable("full")  # the tiny LLM ties its embeddings: tensors that share memory
    return model


def trained_steps(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, steps: int,
                  seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p * torch.randn(p.shape, generator=generator)).sum() for p in parameters).backward()
        optimizer.step()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_resumed_optimizer_steps_exactly_as_the_one_that_never_stopped(tmp_path, seed):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(5, 3)
    tied = {"weight": layer.weight, "bias": layer.bias, "alias.weight": layer.weight}  # shared memory, as tied LLMs
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    trained_steps(list(layer.parameters()), optimizer, 3, seed)
    write_checkpoint(tmp_path, {"step": 3, "architecture": {"kind": "linear"}, "video": None,
                                "model": {name: value.detach() for name, value in tied.items()},
                                "optimizer": optimizer.state_dict()})
    state = read_checkpoint(tmp_path)
    assert state["step"] == 3 and state["architecture"] == {"kind": "linear"} and state["video"] is None
    assert torch.equal(state["model"]["alias.weight"], layer.weight.detach())
    resumed = torch.nn.Linear(5, 3)
    resumed.load_state_dict({name: state["model"][name] for name in ("weight", "bias")})
    resumed_optimizer = torch.optim.AdamW(resumed.parameters())
    resumed_optimizer.load_state_dict(state["optimizer"])
    trained_steps(list(layer.parameters()), optimizer, 4, seed + 10)
    trained_steps(list(resumed.parameters()), resumed_optimizer, 4, seed + 10)
    for original, restored in zip(layer.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)


def test_a_checkpoint_folder_holds_no_pickle_and_gives_back_the_model(tmp_path, tiny_model, tiny_llm_dir):
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad])
    folder = save_checkpoint(tmp_path, tiny_model, optimizer, 12, None)
    assert folder.name == "checkpoint-00000012"
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                             "optimizer.safetensors"]
    model, _, state, found = load_trained_model(tmp_path)
    assert found == folder and state["step"] == 12
    for name, value in tiny_model.trained_state().items():
        assert torch.equal(model.state_dict()[name], value), name
    # a draft a killed run left is neither read nor in the way of the next save
    (tmp_path / "checkpoint-00000013.partial").mkdir()
    assert latest_checkpoint(tmp_path) == folder
    save_checkpoint(tmp_path, tiny_model, optimizer, 13, None)
    assert [path.name for path in checkpoint_paths(tmp_path)] == ["checkpoint-00000012", "checkpoint-00000013"]


def test_a_planted_pickle_is_refused_by_every_reader_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    planted = tmp_path / "shared" / "checkpoint-00000300.pt"
    planted.parent.mkdir()
    planted.write_bytes(pickle.dumps({"step": 300, "model": RunsACommand(marker)}))
    with pytest.raises(PickledCheckpoint, match="convert_checkpoint.py"):
        read_checkpoint(planted)
    with pytest.raises(PickledCheckpoint):
        latest_checkpoint(planted.parent)

    ask = load_job_script("ask")
    assert ask.main(["--checkpoint", str(planted.parent), "--input", str(tmp_path / "clip.mp4")]) == 2
    assert "pickled checkpoint" in capsys.readouterr().err
    with pytest.raises(PickledCheckpoint):  # resuming training does not start afresh beside it either
        checkpoint_paths(planted.parent)

    convert = load_job_script("convert_checkpoint")
    assert convert.main([str(planted)]) == 2
    assert "holds more than tensors and plain data" in capsys.readouterr().err
    assert not marker.exists() and not list(planted.parent.glob("checkpoint-*[0-9]"))
    pickle.loads(planted.read_bytes())  # the plant is real: a plain unpickler runs it
    assert marker.exists()


def test_a_pickled_checkpoint_of_the_earlier_format_converts_to_the_same_model(tmp_path, tiny_model, capsys):
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=3e-3)
    old = {"step": 40, "architecture": tiny_model.architecture(), "model": tiny_model.trained_state(),
           "optimizer": optimizer.state_dict(), "video": None}
    torch.save(old, tmp_path / "checkpoint-00000040.pt")  # as earlier versions wrote it
    convert = load_job_script("convert_checkpoint")
    assert convert.main([str(tmp_path)]) == 0
    assert "checkpoint-00000040.pt -> " in capsys.readouterr().out
    with pytest.raises(PickledCheckpoint):  # until the .pt file is removed, the folder is refused as a whole
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoint-00000040.pt").unlink()
    model, _, state, _ = load_trained_model(tmp_path)
    assert state["step"] == 40 and state["optimizer"]["param_groups"][0]["lr"] == 3e-3
    for name, value in old["model"].items():
        assert torch.equal(model.state_dict()[name], value), name
