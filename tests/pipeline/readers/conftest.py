"""Fixtures of the reader tests: a tiny untrained video LLM.

- tiny_video_lm   (model in eval mode, tokenizer): VideoPrefixLM on TINY_VIDEO_DIM-dim tokens over the tiny Llama of
                  tiny_llm_dir (width 8, 4 heads); module-scoped, seeded
"""

from __future__ import annotations

import pytest
import torch

from pipeline.readers.video_lm import VideoPrefixLM, load_llm

TINY_VIDEO_DIM = 16


@pytest.fixture(scope="module")
def tiny_video_lm(tiny_llm_dir):
    lm, tokenizer = load_llm(str(tiny_llm_dir))
    torch.manual_seed(0)
    return VideoPrefixLM(TINY_VIDEO_DIM, lm, video_heads=4, video_width=8, llm_name=str(tiny_llm_dir)).eval(), tokenizer
