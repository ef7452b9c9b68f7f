"""pipeline.readers.video_lm: the video prefix is used, padding changes nothing for real rows, checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from pipeline.readers.video_lm import VideoPrefixLM, byte_tokenizer, caption_batch, tiny_lm_config

DIM, FRAMES, GRID = 16, 3, (2, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = tiny_lm_config(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2)
    return VideoPrefixLM(DIM, config, video_heads=4, video_width=8).eval()


def video(k: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"base": torch.randn(1, k, DIM, generator=generator),
            "dynamics": torch.randint(0, k, (1, FRAMES, *GRID), generator=generator),
            "base_mask": torch.ones(1, k, dtype=torch.bool)}


def logits(model, tokenizer, videos: dict, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**videos, **caption_batch(tokenizer, captions, max_length=64)).logits


def test_padding_does_not_change_the_output_of_real_rows(model, tokenizer):
    short, long = video(3, seed=1), video(5, seed=2)
    alone = logits(model, tokenizer, short, ["a red car"])
    padded_base = torch.zeros(2, 5, DIM)
    padded_base[0, :3], padded_base[1] = short["base"][0], long["base"][0]
    padded_base[0, 3:] = 1e3  # garbage in the padding must not leak into the real rows
    batch = {"base": padded_base, "dynamics": torch.cat([short["dynamics"], long["dynamics"]]),
             "base_mask": torch.tensor([[True, True, True, False, False], [True] * 5])}
    together = logits(model, tokenizer, batch, ["a red car", "two bikes on a road"])
    caption_length = alone.shape[1] - 3
    # The short video's caption positions come after 5 slots in the batch, after 3 when alone.
    torch.testing.assert_close(together[0, 5:5 + caption_length], alone[0, 3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[0, 2], alone[0, 2], atol=1e-4, rtol=1e-4)


def test_the_caption_is_conditioned_on_the_video(model, tokenizer):
    first = logits(model, tokenizer, video(4, seed=1), ["same text"])
    second = logits(model, tokenizer, video(4, seed=2), ["same text"])
    assert not torch.allclose(first[:, 4:], second[:, 4:], atol=1e-4)


def test_loss_is_on_the_caption_only(model, tokenizer):
    text = caption_batch(tokenizer, ["ab", "abcd"], max_length=64)
    assert text["labels"][0].tolist() == text["input_ids"][0, :3].tolist() + [-100, -100]  # "a", "b", end
    k, text = 3, caption_batch(tokenizer, ["ab"], max_length=64)
    with torch.no_grad():
        output = model(**video(k, seed=1), **text)
    # position k - 1 + i predicts caption token i; no video position is a target
    predicted = output.logits[0, k - 1:k - 1 + text["input_ids"].shape[1]]
    expected = torch.nn.functional.cross_entropy(predicted, text["input_ids"][0])
    torch.testing.assert_close(output.loss, expected)


def test_wrong_token_width_is_a_clear_error(model, tokenizer):
    wrong = video(3, seed=1)
    wrong["base"] = torch.randn(1, 3, DIM + 1)
    with pytest.raises(ValueError, match=f"{DIM}-dim"):
        model(**wrong, **caption_batch(tokenizer, ["x"], max_length=8))


def test_empty_caption_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        caption_batch(tokenizer, ["fine", ""], max_length=8)


def test_architecture_and_weights_round_trip(model, tokenizer):
    rebuilt = VideoPrefixLM.from_architecture(model.architecture())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    inputs = video(4, seed=3)
    torch.testing.assert_close(logits(rebuilt, tokenizer, inputs, ["hello"]),
                               logits(model, tokenizer, inputs, ["hello"]))
