"""A small video language model that reads cached Token Dynamics tokens.

    base [B, K, D], dynamics [B, T, H, W]
      -> optional linear map to a narrower width W (keeps a small model small on 1280-dim tokens)  [B, K, W]
      -> CrossDynamicsAttention (motion of each cluster fused into its base vector)                [B, K, W]
      -> projector (LayerNorm + two-layer MLP, as LLaVA-1.5)                                        [B, K, hidden]
      -> prefix of a causal LM built from a transformers config, followed by the caption's tokens

The video costs K positions, whatever T, H and W are. Text is tokenised per byte (transformers' ByT5Tokenizer:
no vocabulary file, so nothing is downloaded). The loss is next-token cross-entropy on the caption only.

Padded base rows (base_mask False) are masked out of attention and take no position: position ids count real
tokens only, so a video's output does not depend on what else is in its batch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, PretrainedConfig

import tokendyn

IGNORE_INDEX = -100  # label value the transformers loss skips


def byte_tokenizer() -> ByT5Tokenizer:
    """UTF-8 bytes + pad/eos/unk: 259 ids, and an end-of-text token appended to every caption."""
    return ByT5Tokenizer(extra_ids=0)


def tiny_lm_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   max_positions: int = 1024) -> LlamaConfig:
    """A Llama-architecture config small enough to train on a CPU in seconds."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True)


class VideoPrefixLM(nn.Module):
    """Causal LM over [K video tokens, caption tokens]; see the module docstring.

    video_dim: D of the cached base vectors. video_heads: heads of the cross-dynamics attention (must divide the
    width it runs at). video_width: width the attention runs at (default: video_dim, no extra map).
    """

    def __init__(self, video_dim: int, lm_config: PretrainedConfig, video_heads: int = 8,
                 video_width: int | None = None):
        super().__init__()
        self.video_dim, self.video_heads, self.lm_config = video_dim, video_heads, lm_config
        self.video_width = video_width or video_dim
        self.narrow = nn.Identity() if self.video_width == video_dim else nn.Linear(video_dim, self.video_width)
        self.dynamics_attention = tokendyn.CrossDynamicsAttention(self.video_width, num_heads=video_heads)
        hidden = lm_config.hidden_size
        # Token norms differ between encoders; the LayerNorm fixes the projector's input scale.
        self.projector = nn.Sequential(nn.LayerNorm(self.video_width), nn.Linear(self.video_width, hidden),
                                       nn.GELU(), nn.Linear(hidden, hidden))
        self.lm = AutoModelForCausalLM.from_config(lm_config)

    def video_embeddings(self, base: torch.Tensor, dynamics: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor:
        """base [B, K, D], dynamics [B, T, H, W], base_mask [B, K] -> LM input embeddings [B, K, hidden]."""
        if base.shape[-1] != self.video_dim:
            raise ValueError(f"the model reads {self.video_dim}-dim video tokens, got base {tuple(base.shape)}")
        return self.projector(self.dynamics_attention(self.narrow(base), dynamics, base_mask))

    def forward(self, base: torch.Tensor, dynamics: torch.Tensor, base_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """Returns the transformers CausalLMOutput; logits [B, K + L, vocab], loss when labels [B, L] are given.

        input_ids / attention_mask [B, L]: the caption tokens (right-padded). Logits at position K - 1 + i predict
        caption token i, so the whole caption is conditioned on the video.
        """
        video = self.video_embeddings(base, dynamics, base_mask)
        text = self.lm.get_input_embeddings()(input_ids)
        mask = torch.cat([base_mask.to(attention_mask.dtype), attention_mask], dim=1)
        # Padding takes no position: a real token's position is the number of real tokens before it.
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        full_labels = None
        if labels is not None:
            video_labels = torch.full(base_mask.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            full_labels = torch.cat([video_labels, labels], dim=1)
        return self.lm(inputs_embeds=torch.cat([video, text], dim=1), attention_mask=mask, position_ids=positions,
                       labels=full_labels)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def architecture(self) -> dict:
        """What `from_architecture` needs to rebuild this model (weights excluded)."""
        return {"video_dim": self.video_dim, "video_heads": self.video_heads, "video_width": self.video_width,
                "lm_config": self.lm_config.to_dict()}

    @classmethod
    def from_architecture(cls, architecture: dict) -> VideoPrefixLM:
        lm = dict(architecture["lm_config"])
        lm_config = AutoConfig.for_model(lm.pop("model_type"), **lm)
        return cls(architecture["video_dim"], lm_config, video_heads=architecture["video_heads"],
                   video_width=architecture["video_width"])


def caption_batch(tokenizer: ByT5Tokenizer, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels [B, L] for captions (right-padded; padding is not a target)."""
    if any(not isinstance(caption, str) or not caption for caption in captions):
        raise ValueError(f"every caption must be a non-empty string, got {captions!r}")
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels}
