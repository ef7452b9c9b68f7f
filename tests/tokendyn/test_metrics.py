import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokendyn import compress, metrics


def test_perfect_reconstruction():
    tokens = torch.randn(2, 3, 3, 8)
    rebuilt = F.normalize(tokens, dim=-1)
    assert metrics.reconstruction_rel_mse(tokens, rebuilt) == pytest.approx(0.0, abs=1e-12)
    assert metrics.mean_cosine(tokens, rebuilt) == pytest.approx(1.0, abs=1e-6)


def test_known_values():
    tokens = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    rebuilt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # first row wrong by sqrt(2), second exact
    assert metrics.reconstruction_rel_mse(tokens, rebuilt) == pytest.approx(2.0 / 2.0)
    assert metrics.mean_cosine(tokens, rebuilt) == pytest.approx(0.5)
    assert metrics.pooled_cosine(tokens, torch.tensor([1.0, 1.0])) == pytest.approx(1.0)
    assert metrics.pooled_cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))


def test_token_dynamics_rel_mse_is_its_distortion_per_token_and_pooled_is_exact():
    tokens = torch.randn(3, 4, 4, 16, generator=torch.Generator().manual_seed(0))
    cv = compress(tokens, 6)
    direct = ((F.normalize(tokens, dim=-1) - cv.decompress()) ** 2).sum() / 48
    assert metrics.reconstruction_rel_mse(tokens, cv.decompress()) == pytest.approx(float(direct), rel=1e-6)
    assert metrics.pooled_cosine(tokens, cv.pooled()) == pytest.approx(1.0, abs=1e-6)


def test_ratios():
    tokens = torch.randn(4, 7, 7, 64, dtype=torch.float16)
    cv = compress(tokens, 8)
    assert metrics.token_ratio(cv.base, tokens) == 8 / 196
    d = cv.to_storage("float16")
    nbytes = metrics.storage_nbytes(d)
    assert nbytes == 8 * 64 * 2 + 8 * 4 + 196 * 1 + 64 * 4  # base, sizes, uint8 map, float32 pooled
    assert nbytes == sum(v.nbytes for v in d.values() if isinstance(v, np.ndarray)) + len(d["dynamics"])
    assert metrics.byte_ratio(nbytes, tokens) == nbytes / (196 * 64 * 2)
    assert metrics.byte_ratio(nbytes, tokens.float(), bytes_per_value=2) == nbytes / (196 * 64 * 2)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        metrics.mean_cosine(torch.randn(4, 8), torch.randn(5, 8))
