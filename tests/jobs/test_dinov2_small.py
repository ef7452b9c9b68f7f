"""The packaged DINOv2-S/14 (`--encoder dinov2-small`) end to end: the job's tokens are the converted model's
output, search and training read its cache, and a run at another input size is refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from job_scripts import load_job_script
from pipeline.job.packaged_dinov2 import IMAGENET_MEAN, IMAGENET_STD, converted_dinov2_dir
from pipeline.job.tokenizer import VideoTokenizer
from pipeline.readers.search import VideoSearch
from pipeline.store.contract import SettingsMismatch, read_contract
from pipeline.store.storage import OutputStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLAGS = ["--encoder", "dinov2-small", "--frames", "2", "--k", "4"]


@pytest.fixture(scope="module")
def dinov2_output(tmp_path_factory, run_job_on, sample_clip_paths):
    folder = tmp_path_factory.mktemp("dinov2")
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["uri", "caption"])
        writer.writeheader()
        writer.writerow({"uri": str(sample_clip_paths["carphone_pristine"]), "caption": "a man talks in a car"})
        writer.writerow({"uri": str(sample_clip_paths["bikes"]), "caption": "cyclists ride past"})
    summary = run_job_on(manifest, folder / "out", *FLAGS)
    assert (summary.ok, summary.failed) == (2, 0)
    return manifest, folder / "out"


def test_the_jobs_tokens_are_the_converted_models_output(dinov2_output):
    from transformers import Dinov2Model

    _, output = dinov2_output
    store = OutputStore(str(output))
    rows = store.read_videos().to_pylist()
    assert {(r["encoder"], r["encoder_layer"], r["dim"], r["grid_h"], r["grid_w"]) for r in rows} == {
        ("dinov2-small", 11, 384, 16, 16)}
    contract = read_contract(store)
    tokenizer = VideoTokenizer(contract)
    row = rows[0]
    clip = tokenizer.decode(row["uri"])
    assert list(clip.frame_indices) == list(row["frame_indices"])
    tokens = tokenizer.encode(clip.frames)

    model = Dinov2Model.from_pretrained(str(converted_dinov2_dir())).eval()
    pixels = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[11]
    torch.testing.assert_close(tokens, hidden[:, 1:].reshape(2, 16, 16, 384), atol=1e-4, rtol=1e-4)
    stored = np.asarray(row["base"], dtype=np.float32)
    np.testing.assert_allclose(stored, tokenizer.compress(tokens).base.numpy(), atol=2e-3)


def test_search_and_training_read_the_dinov2_cache(dinov2_output, sample_clip_paths, tiny_llm_dir, tmp_path):
    manifest, output = dinov2_output
    store = OutputStore(str(output))
    hits = VideoSearch(store).by_video(str(sample_clip_paths["carphone_distorted"]), k=1, mode="exact")
    assert hits[0].uri == str(sample_clip_paths["carphone_pristine"])  # tokenised as the output's rows were

    script = load_job_script("train_from_cache")
    result = script.run(script.parse_args([
        "--cache", str(output), "--checkpoint-dir", str(tmp_path / "ckpt"), "--steps", "2", "--batch-size", "2",
        "--raw-steps", "0", "--llm", str(tiny_llm_dir), "--video-width", "32", "--video-heads", "4"]))
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))


def test_a_run_at_another_input_size_is_refused(dinov2_output, run_job_on):
    manifest, output = dinov2_output
    with pytest.raises(SettingsMismatch, match="input_size: '\\(not set\\)' -> 448"):
        run_job_on(manifest, output, *FLAGS, "--input-size", "448")
