"""pipeline.readers.video_lm: padding changes no example's loss, the video prefix is used, the loss is on the caption only,
checkpoints hold only what trains, and the real pretrained GGUF LLM loads offline through the hub-id code path."""

from __future__ import annotations

import pytest
import torch

from pipeline.readers.video_lm import (
    DEFAULT_LLM, IGNORE_INDEX, VideoPrefixLM, caption_batch, left_pad, load_llm, prompt_ids, resolve_llm,
)

DIM, FRAMES, GRID = 16, 3, (2, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_video_lm):
    return tiny_video_lm


def video(k: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"base": torch.randn(k, DIM, generator=generator),
            "dynamics": torch.randint(0, k, (FRAMES, *GRID), generator=generator)}


def batch_of(videos: list[dict]) -> dict:
    """Right-padded along K, as pipeline.readers.cache.collate_videos pads; garbage in the padding must not matter."""
    k_max = max(len(v["base"]) for v in videos)
    base = torch.full((len(videos), k_max, DIM), 1e3)
    mask = torch.zeros(len(videos), k_max, dtype=torch.bool)
    for row, v in enumerate(videos):
        base[row, :len(v["base"])], mask[row, :len(v["base"])] = v["base"], True
    return {"base": base, "dynamics": torch.stack([v["dynamics"] for v in videos]), "base_mask": mask}


def losses(model, tokenizer, videos: list[dict], captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.video_losses(**batch_of(videos), **caption_batch(tokenizer, captions, max_length=64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_examples_loss_is_the_same_alone_and_in_a_padded_batch(tiny, seed):
    model, tokenizer = tiny
    generator = torch.Generator().manual_seed(seed)
    ks = torch.randint(1, 7, (4,), generator=generator).tolist()
    videos = [video(k, seed=10 * seed + row) for row, k in enumerate(ks)]
    captions = ["a red car", "two bikes on a long road", "x", "a blue square moves left"]
    together = losses(model, tokenizer, videos, captions)
    for row in range(len(videos)):
        alone = losses(model, tokenizer, videos[row:row + 1], captions[row:row + 1])
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=1e-5, msg=f"K={ks}, row {row}")


def test_left_pad_moves_real_rows_to_the_end_in_order():
    values = torch.arange(8.0).view(2, 4, 1)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    moved, moved_mask = left_pad(values, mask)
    assert moved[0, 2:, 0].tolist() == [0.0, 1.0] and moved[1, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert moved_mask.tolist() == [[False, False, True, True], [True] * 4]


def test_the_caption_is_conditioned_on_the_video(tiny):
    model, tokenizer = tiny
    first = losses(model, tokenizer, [video(4, seed=1)], ["same text"])
    second = losses(model, tokenizer, [video(4, seed=2)], ["same text"])
    assert not torch.allclose(first, second, atol=1e-4)


def test_only_the_caption_and_its_end_are_targets(tiny):
    model, tokenizer = tiny
    text = caption_batch(tokenizer, ["ab", "abcd"], max_length=64)
    prompt = len(prompt_ids(tokenizer))
    assert (text["labels"][:, :prompt] == IGNORE_INDEX).all()
    assert text["labels"][0, prompt:].tolist() == [*tokenizer("ab", add_special_tokens=False)["input_ids"],
                                                   tokenizer.eos_token_id, IGNORE_INDEX, IGNORE_INDEX]
    k, text = 3, caption_batch(tokenizer, ["ab"], max_length=64)
    inputs = batch_of([video(k, seed=1)])
    with torch.no_grad():
        output = model(**inputs, **text)
    # position k + prompt - 1 + i predicts caption token i; no video or prompt position is a target
    targets = text["input_ids"][0, prompt:]
    predicted = output.logits[0, k + prompt - 1:k + prompt - 1 + len(targets)]
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(predicted, targets))


def test_wrong_token_width_is_a_clear_error(tiny):
    model, tokenizer = tiny
    wrong = batch_of([video(3, seed=1)])
    wrong["base"] = torch.randn(1, 3, DIM + 1)
    with pytest.raises(ValueError, match=f"{DIM}-dim"):
        model(**wrong, **caption_batch(tokenizer, ["x"], max_length=8))


def test_empty_caption_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        caption_batch(tiny[1], ["fine", ""], max_length=8)


def test_the_llm_is_frozen_by_default_and_partial_finetuning_opens_the_last_blocks(tiny_llm_dir):
    lm, _ = load_llm(str(tiny_llm_dir))
    model = VideoPrefixLM(DIM, lm, video_heads=4, video_width=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("lm.") for name in trainable)
    model.set_trainable("1")
    opened = {name for name, p in model.named_parameters() if p.requires_grad} - trainable
    assert opened and all(name.startswith(("lm.model.layers.1.", "lm.model.norm.")) for name in opened)
    model.set_trainable("full")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="blocks"):
        model.set_trainable("3")


def test_a_checkpoint_holds_only_trained_weights_and_round_trips(tiny):
    model, tokenizer = tiny
    state = model.trained_state()
    assert state and not any(name.startswith("lm.") for name in state)
    rebuilt = VideoPrefixLM.from_architecture(model.architecture())  # the LM reloads from its name
    rebuilt.load_trained_state(state)
    inputs = [video(4, seed=3)]
    torch.testing.assert_close(losses(rebuilt.eval(), tokenizer, inputs, ["hello"]),
                               losses(model, tokenizer, inputs, ["hello"]))


def test_the_token_base_alone_ignores_the_dynamics_map(tiny_llm_dir):
    lm, tokenizer = load_llm(str(tiny_llm_dir))
    model = VideoPrefixLM(DIM, lm, video_heads=4, video_width=8, use_dynamics=False).eval()
    one, other = video(4, seed=1), video(4, seed=1)
    other["dynamics"] = torch.flip(other["dynamics"], dims=[0])
    torch.testing.assert_close(losses(model, tokenizer, [one], ["a"]), losses(model, tokenizer, [other], ["a"]))


def test_what_a_stored_base_shows_reaches_the_llm_through_the_untrained_reader(tiny_llm_dir):
    # Unit-norm bases, as the job stores them, at the widths the motion benchmark uses: two unrelated bases with the
    # same map must come out different before any training (they came out at cosine 0.999 without the input norm).
    lm, _ = load_llm(str(tiny_llm_dir))
    torch.manual_seed(0)
    model = VideoPrefixLM(1280, lm, video_heads=8, video_width=128).eval()
    generator = torch.Generator().manual_seed(0)
    bases = torch.nn.functional.normalize(torch.randn(2, 4, 16, 1280, generator=generator), dim=-1)
    dynamics = torch.randint(0, 16, (4, 16, 7, 7), generator=generator)
    mask = torch.ones(4, 16, dtype=torch.bool)
    with torch.no_grad():
        one, other = (model.video_embeddings(base, dynamics, mask) for base in bases)
    assert torch.nn.functional.cosine_similarity(one, other, dim=-1).mean() < 0.8


# ---- the real pretrained LLM ------------------------------------------------------------------------------------


def test_the_default_llm_resolves_to_the_packaged_gguf(smollm2_gguf):
    assert resolve_llm(DEFAULT_LLM) == (str(smollm2_gguf.parent), smollm2_gguf.name)
    assert resolve_llm(str(smollm2_gguf)) == resolve_llm(str(smollm2_gguf.parent))
    assert resolve_llm("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


def test_the_pretrained_gguf_llm_loads_offline_and_knows_things(smollm2):
    lm, tokenizer = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    assert 130e6 < sum(p.numel() for p in lm.parameters()) < 140e6
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        answer = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])


def test_the_padded_batch_loss_holds_on_the_pretrained_llm(smollm2):
    lm, tokenizer = smollm2
    torch.manual_seed(0)
    model = VideoPrefixLM(DIM, lm, video_heads=4, video_width=8).eval()
    videos, captions = [video(2, seed=1), video(5, seed=2)], ["a red circle moves left", "a blue square"]
    together = losses(model, tokenizer, videos, captions)
    alone = torch.cat([losses(model, tokenizer, [v], [c]) for v, c in zip(videos, captions)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
    assert model.generate_captions(tokenizer, **batch_of(videos), max_new_tokens=3)  # runs on a padded batch
