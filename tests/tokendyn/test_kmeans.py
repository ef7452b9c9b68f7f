import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from tokendyn.clustering import common, lloyd
from tokendyn.clustering import ward as merging
from tokendyn.kmeans import (
    adaptive_kmeans,
    adaptive_kmeans_batch,
    fidelity_k,
    select_k,
    spherical_kmeans,
    spherical_kmeans_batch,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(k: int, per: int, dim: int, *, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k well-separated directions, `per` noisy copies each, shuffled -> x [k * per, dim], truth [k * per]."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    truth = torch.arange(k).repeat_interleave(per)
    x = centres[truth] + noise * torch.randn(k * per, dim, generator=g) / math.sqrt(dim)
    order = torch.randperm(k * per, generator=g)
    return x[order], truth[order]


def token_like(n: int, dim: int, seed: int) -> torch.Tensor:
    """Non-negative, sparse, heavy-tailed rows around 30 prototypes (like post-ReLU CNN features)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(30, dim, generator=g) ** 3
    pick = torch.randint(0, 30, (n,), generator=g)
    return (protos[pick] * torch.rand(n, dim, generator=g) * 2 - 0.3).relu()


def blobs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g)
    return centres[torch.randint(0, 20, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g)


def anisotropic(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * torch.linspace(3, 0.1, dim)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------------------------------------------------------
# quality


@pytest.mark.parametrize(
    "make, n, dim, k, seed",
    [
        (token_like, 784, 256, 32, 0),
        (token_like, 600, 128, 24, 1),
        (token_like, 400, 64, 16, 2),
        (blobs, 500, 8, 16, 3),
        (anisotropic, 800, 32, 20, 4),
    ],
)
def test_distortion_within_2_percent_of_sklearn_best_of_10(make, n, dim, k, seed):
    x = make(n, dim, seed)
    xn = F.normalize(x, dim=-1)
    ours = spherical_kmeans(x, k, seed=seed)
    with threadpool_limits(1):
        sk = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(xn.numpy())
    assert ours.k == k
    assert ours.distortion <= 1.02 * sk.inertia_


def test_distortion_is_the_sum_of_squared_distances_to_the_centroids():
    x = blobs(300, 16, 0)
    r = spherical_kmeans(x, 7)
    direct = ((F.normalize(x, dim=-1) - r.centroids[r.labels]) ** 2).sum()
    assert r.distortion == pytest.approx(float(direct), rel=1e-5, abs=1e-6 * x.shape[0])


def test_centroids_are_member_means_sizes_count_members_ids_by_first_appearance():
    x = token_like(400, 48, 3)
    r = spherical_kmeans(x, 10)
    xn = F.normalize(x, dim=-1)
    for j in range(r.k):
        torch.testing.assert_close(r.centroids[j], xn[r.labels == j].mean(0), rtol=0, atol=1e-6)
    assert torch.equal(r.sizes, torch.bincount(r.labels, minlength=r.k))
    assert bool((r.sizes > 0).all())
    first_seen = [int((r.labels == j).nonzero()[0]) for j in range(r.k)]
    assert first_seen == sorted(first_seen)
    assert r.centroids.dtype == torch.float32 and r.labels.dtype == torch.int64 and r.sizes.dtype == torch.int64


@pytest.mark.parametrize("k, dim", [(12, 64), (5, 3), (30, 256)])
def test_planted_clusters_are_recovered_exactly(k, dim):
    x, truth = planted(k, 25, dim, seed=k)
    r = spherical_kmeans(x, k)
    assert r.k == k
    assert same_partition(r.labels, truth)


def test_lloyd_converges_on_planted_data():
    x, _ = planted(8, 30, 32)
    r = spherical_kmeans(x, 8, max_iter=50)
    assert r.iterations < 50


# ---------------------------------------------------------------------------------------------------------------
# adaptive K


@pytest.mark.parametrize("k_min, k_max, k_true", [(4, 32, 12), (4, 32, 4), (8, 64, 21), (2, 16, 15)])
@pytest.mark.parametrize("rule, target", [("elbow", 0.9), ("fidelity", 0.99)])
def test_adaptive_picks_the_planted_k(k_min, k_max, k_true, rule, target):
    x, truth = planted(k_true, 20, 48, seed=k_true)
    r, curve = adaptive_kmeans(x, k_min, k_max, rule=rule, target=target)
    assert r.k == k_true
    assert same_partition(r.labels, truth)
    assert curve.shape == (k_max - max(k_min - 1, 1) + 1,)
    assert bool((curve[:-1] >= curve[1:] - 1e-9).all())  # distortion never rises with K


def test_adaptive_curve_is_the_distortion_of_the_merged_partitions():
    x, _ = planted(6, 20, 16, seed=2)
    (r, curve) = adaptive_kmeans(x, 3, 12)
    # At the selected K the curve is the merged (pre-refinement) distortion: refinement only lowers it
    # (up to the closed form's rounding, about 1e-7 per row).
    assert r.distortion <= float(curve[r.k - 2]) + 1e-6 * x.shape[0]


def test_select_k_rule():
    ks = torch.arange(3, 11).double()  # k_min = 4, k_max = 10 -> curve over K = 3 .. 10
    log_knee = torch.where(ks <= 6, 10.0 - 2 * (ks - 3), 4.0 - 0.1 * (ks - 6))  # sharp bend at K = 6
    knee = log_knee.exp()[None]
    straight = (-0.3 * ks).exp()[None]  # constant relative gain per cluster
    concave = (-(ks**2) / 30).exp()[None]  # growing relative gain
    flat = torch.full((1, 8), 5.0, dtype=torch.float64)
    assert select_k(knee, 4, 10).tolist() == [6]
    assert select_k(straight, 4, 10).tolist() == [10]
    assert select_k(concave, 4, 10).tolist() == [10]
    assert select_k(flat, 4, 10).tolist() == [4]
    assert select_k(torch.zeros(1, 8), 4, 10).tolist() == [4]
    assert select_k(torch.cat([knee, flat]), 4, 10).tolist() == [6, 4]


def test_fidelity_k_rule():
    fidelity = torch.tensor([[0.5, 0.7, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0]], dtype=torch.float64)  # K = 3 .. 10
    assert fidelity_k(fidelity, 4, 10, 0.9).tolist() == [6]
    assert fidelity_k(fidelity, 4, 10, 0.9 + 1e-7).tolist() == [6]  # within the slack
    assert fidelity_k(fidelity, 4, 10, 0.5).tolist() == [4]  # reached below k_min: the range clips
    assert fidelity_k(fidelity[:, :5], 4, 7, 0.99).tolist() == [7]  # never reached: k_max
    assert fidelity_k(fidelity, 4, 10, 1.0).tolist() == [10]
    ks = [int(fidelity_k(fidelity, 4, 10, t)) for t in (0.1, 0.6, 0.86, 0.9, 0.96, 0.98, 1.0)]
    assert ks == sorted(ks)


def test_adaptive_with_equal_bounds_is_fixed_k():
    x = blobs(200, 8, 1)
    r, _ = adaptive_kmeans(x, 9, 9)
    assert r.k == 9


# ---------------------------------------------------------------------------------------------------------------
# duplicates, dtypes, determinism, batching


def test_k_above_distinct_tokens_gives_one_cluster_per_distinct_token():
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(5, 32, generator=g)
    x = distinct[torch.randint(0, 5, (200,), generator=g)] * torch.rand(200, 1, generator=g).add(0.5)  # same directions
    r = spherical_kmeans(x, 16)
    assert r.k == 5 and bool((r.sizes > 0).all())
    torch.testing.assert_close(r.centroids[r.labels], F.normalize(x, dim=-1), rtol=0, atol=1e-6)
    assert r.distortion == pytest.approx(0.0, abs=1e-6)
    ra, _ = adaptive_kmeans(x, 8, 32)
    assert ra.k == 5


def test_fewer_rows_than_k():
    x = torch.randn(3, 8)
    r = spherical_kmeans(x, 10)
    assert r.k == 3 and r.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x, truth = planted(6, 20, 40)
    r = spherical_kmeans(x.to(dtype), 6)
    assert r.centroids.dtype == torch.float32
    assert same_partition(r.labels, truth)


def test_same_seed_same_result_and_seed_matters():
    x = token_like(500, 200, 4)
    a, b = spherical_kmeans(x, 20, seed=7), spherical_kmeans(x, 20, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    c = spherical_kmeans(x, 20, seed=8)
    assert not torch.equal(a.labels, c.labels)


def test_batch_is_identical_to_one_by_one():
    xs = torch.stack([token_like(300, 160, s) for s in range(3)])
    for single, batched in zip([spherical_kmeans(x, 12, seed=3) for x in xs], spherical_kmeans_batch(xs, 12, seed=3)):
        assert torch.equal(single.labels, batched.labels)
        assert torch.equal(single.centroids, batched.centroids)
        assert single.distortion == batched.distortion and single.iterations == batched.iterations
    for (single, c1), (batched, c2) in zip([adaptive_kmeans(x, 4, 24) for x in xs], adaptive_kmeans_batch(xs, 4, 24)):
        assert torch.equal(single.labels, batched.labels) and torch.equal(c1, c2)


def test_chunked_similarity_gives_the_same_clustering(monkeypatch):
    x, truth = planted(10, 40, 24)
    whole = spherical_kmeans(x, 10)
    monkeypatch.setattr(common, "_CHUNK_ELEMENTS", 64)  # 256-row chunks over 400 rows
    chunked = spherical_kmeans(x, 10)
    assert torch.equal(whole.labels, chunked.labels)


@pytest.mark.parametrize("make, n, dim, k", [(token_like, 500, 160, 16), (blobs, 400, 8, 12)])
def test_bounded_lloyd_gives_the_labels_of_the_full_one(monkeypatch, make, n, dim, k):
    # Same start, same labels at every step: the bounds only skip rows whose argmax cannot move.
    x = F.normalize(make(n, dim, 0), dim=-1)[None]
    start = x[:, torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]]
    valid = torch.ones(1, k, dtype=torch.bool)
    everyone = torch.ones(1, dtype=torch.bool)
    none = torch.zeros(1, n, dtype=torch.int64)
    monkeypatch.setattr(lloyd, "BOUNDED_LLOYD_MIN_WORK", 1 << 62)
    full = lloyd._lloyd(x, start, valid, 50, 1e-4, everyone, none)
    monkeypatch.setattr(lloyd, "BOUNDED_LLOYD_MIN_WORK", 0)
    bounded = lloyd._lloyd(x, start, valid, 50, 1e-4, everyone, none)
    assert torch.equal(full[0], bounded[0]) and torch.equal(full[2], bounded[2])
    torch.testing.assert_close(full[1], bounded[1], rtol=0, atol=1e-6)


def test_bounded_lloyd_is_identical_in_a_batch_and_alone(monkeypatch):
    monkeypatch.setattr(lloyd, "BOUNDED_LLOYD_MIN_WORK", 0)
    xs = torch.stack([token_like(300, 160, s) for s in range(3)])
    for single, batched in zip([spherical_kmeans(x, 12, seed=3) for x in xs], spherical_kmeans_batch(xs, 12, seed=3)):
        assert torch.equal(single.labels, batched.labels) and torch.equal(single.centroids, batched.centroids)
        assert single.iterations == batched.iterations


def naive_ward(means: torch.Tensor, sizes: torch.Tensor, merges: int) -> list[tuple[int, int]]:
    """One pair per step, costs from the centroids: means [M, D], sizes [M] -> the merges (a, b), b into a < b."""
    c, n = means.double().clone(), sizes.double().clone()
    alive = n > 0
    taken = []
    for _ in range(merges):
        cost = n[:, None] * n[None, :] / (n[:, None] + n[None, :]).clamp_min(1) * torch.cdist(c, c) ** 2
        cost[~alive] = math.inf
        cost[:, ~alive] = math.inf
        cost.fill_diagonal_(math.inf)
        a, b = sorted(divmod(int(cost.argmin()), len(n)))
        c[a] = (n[a] * c[a] + n[b] * c[b]) / (n[a] + n[b])
        n[a] += n[b]
        alive[b] = False
        taken.append((a, b))
    return taken


@pytest.mark.parametrize("seed", range(4))
def test_ward_rounds_take_the_merges_of_one_pair_per_step(seed):
    # Merging all reciprocal nearest-neighbour pairs per round must give the greedy sequence, in its order.
    x = F.normalize(token_like(400, 24, seed), dim=-1)[None]
    labels = torch.randint(0, 48, (1, 400), generator=torch.Generator().manual_seed(seed))
    means, sizes = common._cluster_means(x, labels, 48)
    pairs, costs, _ = merging._ward_merges(means, sizes, sizes > 0, 40)
    assert [tuple(p) for p in pairs[0].tolist()] == naive_ward(means[0], sizes[0], 40)
    assert bool((costs[0, 1:] >= costs[0, :-1] * (1 - 1e-9)).all())  # the greedy costs never decrease


def test_ward_merges_without_cosine_losses_take_the_same_merges():
    x = F.normalize(blobs(300, 12, 5), dim=-1)[None]
    labels = torch.randint(0, 20, (1, 300), generator=torch.Generator().manual_seed(0))
    means, sizes = common._cluster_means(x, labels, 20)
    with_cos = merging._ward_merges(means, sizes, sizes > 0, 17)
    without = merging._ward_merges(means, sizes, sizes > 0, 17, cosine=False)
    assert torch.equal(with_cos[0], without[0]) and torch.equal(with_cos[1], without[1]) and without[2] is None


@pytest.mark.parametrize("n, k", [(60, 50), (100, 90)])
def test_k_close_to_the_number_of_rows_gives_k_clusters(n, k):
    # Every row is a seed (2 K > n): the extra seeds, drawn several per round, can pick the same row twice, so
    # the first K seeds must be drawn one at a time to be K distinct rows.
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    for seed in range(4):
        assert spherical_kmeans(x, k, seed=seed).k == k


def test_empty_clusters_are_refilled():
    # Two clusters start on the same side; the refill must still leave every cluster non-empty.
    x = torch.cat([torch.randn(50, 4) * 0.01 + torch.tensor([1.0, 0, 0, 0]), torch.randn(3, 4)])
    labels = torch.zeros(1, 53, dtype=torch.int64)
    sim = torch.rand(1, 53)
    valid = torch.ones(1, 3, dtype=torch.bool)
    filled = lloyd._fill_empty(labels, lambda: sim, valid)
    assert torch.bincount(filled[0], minlength=3).min() >= 1
    # The rows moved are the least similar ones.
    moved = (filled[0] != 0).nonzero()[:, 0]
    assert set(moved.tolist()) == set(sim[0].argsort()[:2].tolist())


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "x, k, match",
    [
        (torch.randn(2, 3, 4), 2, "rank-2"),
        (torch.randn(10), 2, "rank-2"),
        (torch.randn(0, 4), 2, "empty"),
        (torch.randn(5, 0), 2, "empty"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, "NaN or Inf"),
        (torch.ones(3, 2, dtype=torch.int64), 1, "floating point"),
        (torch.randn(5, 4), 0, "k must be"),
        (torch.randn(5, 4), 2.5, "k must be"),
    ],
)
def test_bad_input_raises_value_error(x, k, match):
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(x, k)


def test_bad_adaptive_range():
    with pytest.raises(ValueError, match="k_min"):
        adaptive_kmeans(torch.randn(20, 4), 10, 5)
    with pytest.raises(ValueError, match="max_iter"):
        spherical_kmeans(torch.randn(20, 4), 3, max_iter=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_partition():
    x, truth = planted(10, 30, 64)
    r = spherical_kmeans(x.cuda(), 10)
    assert r.centroids.is_cuda and same_partition(r.labels.cpu(), truth)
    again = spherical_kmeans(x.cuda(), 10)
    assert torch.equal(r.labels, again.labels)


def test_ward_merge_costs_are_the_exact_distortion_increases():
    x = F.normalize(blobs(300, 12, 5), dim=-1)[None]
    labels = torch.randint(0, 20, (1, 300), generator=torch.Generator().manual_seed(0))
    means, sizes = common._cluster_means(x, labels, 20)
    valid = sizes > 0
    k_start = valid.sum(1)
    pairs, costs, cos_losses = merging._ward_merges(means, sizes, valid, 17)
    x_sq = (x * x).sum(-1).double().sum(1)
    start = common._distortion(x_sq, means, sizes)
    start_cos = common._mean_cosine(means, sizes, 300) * 300
    for k in (19, 12, 3):
        owner = merging._replay(pairs, k_start, torch.tensor([k]), 20)
        merged = owner.gather(1, labels)
        assert merged.unique().numel() == k
        direct = common._distortion(x_sq, *common._cluster_means(x, merged, 20))
        assert float(direct) == pytest.approx(float(start + costs[0, : 20 - k].sum()), rel=1e-6)
        # The cosine losses are the exact drops of the sum over rows of the cosine to their centroid.
        centroids = common._cluster_means(x, merged, 20)[0][0]
        direct_cos = (x[0] * F.normalize(centroids, dim=-1)[merged[0]]).sum()
        assert float(direct_cos) == pytest.approx(float(start_cos - cos_losses[0, : 20 - k].sum()), rel=1e-5)
        # Greedy: no other merge of the k + 1 clusters would have cost less than the one taken.
        if k < 19:
            prev = merging._replay(pairs, k_start, torch.tensor([k + 1]), 20).gather(1, labels)
            m, n = common._cluster_means(x, prev, 20)
            alive = n[0] > 0
            cm, nn_ = m[0][alive].double(), n[0][alive].double()
            ward = nn_[:, None] * nn_[None, :] / (nn_[:, None] + nn_[None, :]) * torch.cdist(cm, cm) ** 2
            ward.fill_diagonal_(math.inf)
            assert float(costs[0, 20 - k - 1]) == pytest.approx(float(ward.min()), rel=1e-6)
