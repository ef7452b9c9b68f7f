import pytest
import torch
import torch.nn.functional as F

from tokendyn.baselines import pool_grid, tome_merge, uniform_pool


def member_means(tokens: torch.Tensor, kept: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    x = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
    flat = assignment.flatten()
    return torch.stack([x[flat == j].mean(0) for j in range(kept.shape[0])])


@pytest.mark.parametrize(
    "shape, budget, grid",
    [
        ((16, 7, 7), 32, (2, 4, 4)),
        ((16, 7, 7), 49, (1, 7, 7)),
        ((16, 7, 7), 16, (1, 4, 4)),
        ((16, 27, 27), 64, (1, 8, 8)),
        ((4, 6, 6), 1, (1, 1, 1)),
        ((2, 3, 3), 100, (2, 3, 3)),
    ],
)
def test_pool_grid(shape, budget, grid):
    assert pool_grid(shape, budget) == grid


def test_uniform_pool_bins_are_contiguous_and_keep_member_means():
    tokens = torch.randn(8, 6, 6, 16)
    kept, assignment = uniform_pool(tokens, 18)
    a, b, c = pool_grid((8, 6, 6), 18)
    assert kept.shape == (a * b * c, 16) and assignment.shape == (8, 6, 6)
    assert sorted(assignment.unique().tolist()) == list(range(a * b * c))
    # Contiguous bins: along each axis the bin index never decreases.
    assert bool((assignment.diff(dim=0) >= 0).all() and (assignment.diff(dim=1) >= 0).all())
    assert bool((assignment.diff(dim=2) >= 0).all())
    torch.testing.assert_close(kept, member_means(tokens, kept, assignment), rtol=0, atol=1e-6)


def test_tome_merge_hits_the_budget_and_keeps_member_means():
    tokens = torch.randn(4, 5, 5, 16, generator=torch.Generator().manual_seed(0))
    kept, assignment = tome_merge(tokens, 13)
    assert kept.shape == (13, 16) and assignment.shape == (4, 5, 5)
    assert sorted(assignment.unique().tolist()) == list(range(13))
    torch.testing.assert_close(kept, member_means(tokens, kept, assignment), rtol=0, atol=1e-6)


def test_tome_merge_pairs_each_token_with_its_most_similar_partner():
    # Raster order alternates sets A and B, so A = (p, q, r, s) and B = (p, q, r, s) with noise: one round of
    # matching must merge each A token into its twin.
    g = torch.Generator().manual_seed(1)
    distinct = F.normalize(torch.randn(4, 12, generator=g), dim=-1)
    tokens = distinct.repeat_interleave(2, 0) + 0.01 * torch.randn(8, 12, generator=g)
    kept, assignment = tome_merge(tokens.view(1, 1, 8, 12), 4)
    assert assignment.flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(kept, distinct, rtol=0, atol=0.02)


def test_budget_at_or_above_the_token_count_keeps_every_token():
    tokens = torch.randn(2, 2, 3, 5)
    for method in (uniform_pool, tome_merge):
        kept, assignment = method(tokens, 50)
        assert kept.shape == (12, 5)
        torch.testing.assert_close(kept[assignment], F.normalize(tokens, dim=-1))


@pytest.mark.parametrize("method", [uniform_pool, tome_merge])
def test_bad_input(method):
    with pytest.raises(ValueError, match="T, H, W, D"):
        method(torch.randn(4, 4, 8), 4)
    with pytest.raises(ValueError, match="budget"):
        method(torch.randn(2, 4, 4, 8), 0)
    with pytest.raises(ValueError, match="empty video"):
        method(torch.randn(0, 4, 4, 8), 4)


@pytest.mark.parametrize("frames, budget", [(6, 6), (6, 4), (3, 8)])
def test_frame_pool_keeps_one_mean_per_frame_group(frames, budget):
    from tokendyn.baselines import frame_pool

    tokens = torch.randn(frames, 3, 4, 5, generator=torch.Generator().manual_seed(frames + budget))
    kept, assignment = frame_pool(tokens, budget)
    assert kept.shape == (min(frames, budget), 5)
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    for t in range(frames):  # brute force: every cell of frame t maps to the token of its group
        assert (assignment[t] == assignment[t, 0, 0]).all()
    for group in range(kept.shape[0]):
        members = unit[assignment == group]
        torch.testing.assert_close(kept[group], members.mean(0))
    assert assignment[:, 0, 0].tolist() == sorted(assignment[:, 0, 0].tolist())  # time order kept
