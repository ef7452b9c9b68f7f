"""Text towers: a text query embedded by the text half of the table's two-tower encoder (SigLIP, CLIP).

Text search embeds the text with the text tower saved next to the table's encoder (SigLIP, CLIP: same hub id or
directory) and compares it with the pooled vectors. Pooled vectors are means of patch tokens from a hidden layer
of the vision tower, while text embeddings live in the towers' joint (projected) space, so scores are only
meaningful when the recorded layer is the vision tower's projected output; from inner layers they are a rough
signal at best. When the sizes differ (CLIP: hidden 768 vs projection 512), the text vector is mapped back
through the vision projection's transpose W^T t, which ranks like the inner product <W x, t> in the joint space
(the final layer norm is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.readers.search.errors import NoTextTowerError, SearchError

EFFICIENTNET_ENCODER = "efficientnet-lite0"


@dataclass
class TextTower:
    """The text half of a two-tower checkpoint (SigLIP, CLIP) and its tokenizer."""

    name: str
    model: Any
    tokenizer: Any

    def embed(self, text: str) -> np.ndarray:
        """Text -> its embedding in the joint space, [P] float32."""
        import torch

        config = self.model.config.text_config
        # SigLIP was trained on texts padded to the full length; CLIP pools the end-of-text token either way.
        padding = "max_length" if config.model_type.startswith("siglip") else True
        inputs = self.tokenizer([text], padding=padding, truncation=True,
                                max_length=config.max_position_embeddings, return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns a model output
        return features[0].float().cpu().numpy()

    def query_vector(self, text: str, dim: int) -> np.ndarray:
        """The text as a query against pooled vectors of size `dim` (see the module notes)."""
        embedding = self.embed(text)
        if embedding.shape[-1] == dim:
            return embedding
        projection = getattr(self.model, "visual_projection", None)
        weight = getattr(projection, "weight", None)
        if weight is not None and tuple(weight.shape) == (embedding.shape[-1], dim):
            return weight.detach().float().cpu().numpy().T @ embedding  # W^T t: [D]
        raise SearchError(f"{self.name} embeds text in {embedding.shape[-1]} dims and has no vision projection "
                          f"from the table's {dim}-dim pooled vectors to that space")


def load_text_tower(name: str) -> TextTower:
    """The text model and tokenizer saved with the encoder `name` (hub id or local directory)."""
    if name == EFFICIENTNET_ENCODER:
        raise NoTextTowerError(f"{EFFICIENTNET_ENCODER} is an image-only encoder with no text tower, so this table "
                               "cannot be searched by text: compress the corpus with a SigLIP or CLIP encoder "
                               "(--encoder) for text search")
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise NoTextTowerError(f"cannot load the table's encoder {name!r} to find its text tower: {error}") from error
    if getattr(config, "text_config", None) is None:
        raise NoTextTowerError(f"{name} has no text tower (its config has no text_config); text search needs a "
                               "two-tower checkpoint such as SigLIP or CLIP saved with its tokenizer")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(name, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", ()) if key.startswith("text")]
    if missing or not hasattr(model, "get_text_features"):
        raise NoTextTowerError(f"{name} holds no text tower weights (missing: {missing[:4]})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise NoTextTowerError(f"{name} has no tokenizer saved next to the model") from error
    return TextTower(name=name, model=model.eval(), tokenizer=tokenizer)
