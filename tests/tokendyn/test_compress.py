import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

import tokendyn
from tokendyn import CompressedVideo, compress, compress_batch
from tokendyn.clustering import lloyd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_video(k: int, shape=(6, 7, 8), dim: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [T, H, W, D] whose cells take one of k well-separated directions (+ noise) -> tokens, truth [T, H, W]."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    cells = math.prod(shape)
    truth = torch.cat([torch.arange(k), torch.randint(0, k, (cells - k,), generator=g)])
    truth = truth[torch.randperm(cells, generator=g)].view(shape)
    tokens = centres[truth] * (1 + torch.rand(*shape, 1, generator=g)) + 0.02 * torch.randn(*shape, dim, generator=g)
    return tokens, truth


def moving_square(T=8, H=12, W=12, dim=32, side=3, seed=0):
    """A side x side square moving one cell right and down per frame over a two-texture background.

    -> tokens [T, H, W, dim], true top-left corner per frame [T, 2].
    """
    g = torch.Generator().manual_seed(seed)
    sky, ground, square = F.normalize(torch.randn(3, dim, generator=g), dim=-1)
    tokens = torch.empty(T, H, W, dim)
    tokens[:, : H // 2], tokens[:, H // 2 :] = sky, ground
    corners = torch.tensor([[1 + t, 1 + t] for t in range(T)])
    for t, (y, x) in enumerate(corners.tolist()):
        tokens[t, y : y + side, x : x + side] = square
    return tokens + 0.05 * torch.randn(T, H, W, dim, generator=g), corners


# The package's `compress` attribute is the function; the module is reached by its full name.
compress_module = importlib.import_module("tokendyn.compress")


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.flatten().tolist(), b.flatten().tolist()))
    return len(pairs) == len(set(a.flatten().tolist())) == len(set(b.flatten().tolist()))


# ---------------------------------------------------------------------------------------------------------------
# the record


def test_shapes_and_reconstruction():
    tokens, truth = planted_video(5)
    cv = compress(tokens, 5)
    assert (cv.k, cv.num_frames, cv.grid, cv.dim) == (5, 6, (7, 8), 48)
    assert cv.base.dtype == torch.float32 and cv.dynamics.dtype == torch.int64 and cv.sizes.dtype == torch.int64
    assert torch.equal(cv.decompress(), cv.base[cv.dynamics])
    assert cv.decompress().shape == (6, 7, 8, 48)
    assert same_partition(cv.dynamics, truth)
    assert torch.equal(cv.sizes, torch.bincount(cv.dynamics.flatten(), minlength=5))


def test_pooled_is_the_mean_of_all_normalised_tokens():
    tokens = torch.randn(4, 5, 5, 24)
    cv = compress(tokens, 7)
    torch.testing.assert_close(cv.pooled(), F.normalize(tokens.reshape(-1, 24), dim=-1).mean(0), rtol=0, atol=1e-6)


def test_result_tensors_can_join_autograd():
    cv = compress(torch.randn(3, 4, 4, 16), 5)
    assert not (cv.base.is_inference() or cv.dynamics.is_inference() or cv.sizes.is_inference())
    base = cv.base[None].clone().requires_grad_(True)
    tokendyn.CrossDynamicsAttention(16, num_heads=4)(base, cv.dynamics[None]).sum().backward()
    assert base.grad is not None


def test_record_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="sizes"):
        CompressedVideo(torch.zeros(3, 4), torch.zeros(2, 2, 2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected base"):
        CompressedVideo(torch.zeros(3, 4), torch.zeros(2, 2, dtype=torch.int64), torch.ones(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# behaviour


def test_moving_square_is_tracked_by_the_dynamics_map():
    tokens, corners = moving_square()
    cv = compress(tokens, 3)
    square = int(cv.sizes.argmin())  # the square is the smallest of the three regions
    for t in range(cv.num_frames):
        cells = (cv.dynamics[t] == square).nonzero().float()
        assert len(cells) > 0
        centre = cells.mean(0)
        truth = corners[t].float() + 1.0  # centre of a 3 x 3 square
        assert float((centre - truth).abs().max()) <= 1.0


def test_adaptive_mode_picks_the_planted_k():
    tokens, truth = planted_video(11, shape=(8, 6, 6), dim=40, seed=3)
    cv = compress(tokens, None, k_min=4, k_max=24, k_rule="elbow")
    assert cv.k == 11
    assert same_partition(cv.dynamics, truth)


def test_fewer_distinct_tokens_than_k():
    tokens = torch.zeros(3, 4, 4, 8)
    tokens[..., 0] = 1.0
    tokens[:, :2, :, 1] = 1.0  # two distinct directions
    cv = compress(tokens, 32)
    assert cv.k == 2 and bool((cv.sizes > 0).all())
    torch.testing.assert_close(cv.decompress(), F.normalize(tokens, dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tokens(dtype):
    tokens, truth = planted_video(6)
    cv = compress(tokens.to(dtype), 6)
    assert cv.base.dtype == torch.float32
    assert same_partition(cv.dynamics, truth)


def test_same_seed_same_result():
    tokens = torch.randn(4, 6, 6, 40, generator=torch.Generator().manual_seed(1))
    a, b = compress(tokens, 12, seed=5), compress(tokens, 12, seed=5)
    assert torch.equal(a.base, b.base) and torch.equal(a.dynamics, b.dynamics)
    a, b = compress(tokens, None, seed=5), compress(tokens, None, seed=5)
    assert torch.equal(a.base, b.base) and torch.equal(a.dynamics, b.dynamics)


@pytest.mark.parametrize("k", [9, None])
@pytest.mark.parametrize("cpu_batch_max", [1 << 19, 0])  # batched fits, and large videos fitted one by one
def test_batch_is_identical_to_one_by_one(k, cpu_batch_max, monkeypatch):
    monkeypatch.setattr(compress_module, "_CPU_BATCH_MAX_ELEMENTS", cpu_batch_max)
    g = torch.Generator().manual_seed(2)
    videos = [
        torch.randn(4, 5, 5, 160, generator=g),
        planted_video(7, shape=(4, 5, 5), dim=160, seed=1)[0],
        torch.randn(3, 5, 5, 160, generator=g),  # another shape: its own group
        torch.randn(4, 5, 5, 160, generator=g).half(),  # another dtype: its own group
        torch.randn(4, 5, 5, 160, generator=g),
    ]
    batched = compress_batch(videos, k, k_min=3, k_max=16, seed=4)
    for video, b in zip(videos, batched):
        single = compress(video, k, k_min=3, k_max=16, seed=4)
        assert torch.equal(single.base, b.base) and torch.equal(single.dynamics, b.dynamics)
        assert torch.equal(single.sizes, b.sizes)


def test_batch_of_nothing():
    assert compress_batch([], 8) == []


def test_equal_budget_token_dynamics_beats_the_baselines_on_structured_video():
    tokens, _ = moving_square(T=6, H=10, W=10)
    cv = compress(tokens, 4)
    ours = tokendyn.metrics.reconstruction_rel_mse(tokens, cv.decompress())
    for baseline in (tokendyn.baselines.uniform_pool, tokendyn.baselines.tome_merge):
        kept, assignment = baseline(tokens, cv.k)
        assert ours < tokendyn.metrics.reconstruction_rel_mse(tokens, kept[assignment])


# ---------------------------------------------------------------------------------------------------------------
# storage form


@pytest.mark.parametrize("k, map_bytes", [(7, 1), (300, 2)])
def test_storage_round_trip_is_exact_for_float32(k, map_bytes):
    tokens = torch.randn(3, 10, 12, 16, generator=torch.Generator().manual_seed(0))
    cv = compress(tokens, k)
    assert cv.k == k
    d = cv.to_storage("float32")
    assert isinstance(d["dynamics"], bytes) and len(d["dynamics"]) == 3 * 10 * 12 * map_bytes
    assert d["base"].dtype == np.float32 and d["base"].shape == (k, 16)
    assert d["cluster_sizes"].dtype == np.int32 and d["pooled"].dtype == np.float32
    assert (d["k"], d["dim"], d["num_frames"], d["grid_h"], d["grid_w"]) == (k, 16, 3, 10, 12)
    back = CompressedVideo.from_storage(d)
    assert torch.equal(back.base, cv.base) and torch.equal(back.dynamics, cv.dynamics)
    assert torch.equal(back.sizes, cv.sizes)
    np.testing.assert_array_equal(np.frombuffer(d["dynamics"], np.uint8 if k <= 256 else "<u2"),
                                  cv.dynamics.flatten().numpy())


def test_storage_float16_base_and_plain_python_values():
    cv = compress(torch.randn(2, 4, 4, 8), 5)
    d = cv.to_storage()
    assert d["base"].dtype == np.float16
    np.testing.assert_allclose(d["pooled"], cv.pooled().numpy(), rtol=0, atol=1e-6)  # from the float32 base
    # What a reader gets back from Arrow: lists and bytes.
    plain = dict(d, base=d["base"].tolist(), cluster_sizes=d["cluster_sizes"].tolist())
    back = CompressedVideo.from_storage(plain)
    assert back.base.dtype == torch.float32
    torch.testing.assert_close(back.base, cv.base, rtol=1e-3, atol=1e-3)
    assert torch.equal(back.dynamics, cv.dynamics)
    assert torch.equal(CompressedVideo.from_storage(dict(d, dynamics=list(d["dynamics"]))).dynamics, cv.dynamics)


def test_storage_rejects_corrupt_input():
    d = compress(torch.randn(2, 4, 4, 8), 5).to_storage()
    with pytest.raises(ValueError, match="dynamics holds"):
        CompressedVideo.from_storage(dict(d, dynamics=d["dynamics"][:-1]))
    with pytest.raises(ValueError, match="ids must lie"):
        CompressedVideo.from_storage(dict(d, dynamics=bytes([9]) * 32))
    with pytest.raises(ValueError, match="base_dtype"):
        compress(torch.randn(2, 4, 4, 8), 5).to_storage("int8")


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "tokens, k, match",
    [
        (torch.randn(4, 5, 6), 4, "rank 4"),
        (torch.randn(1, 4, 5, 6, 7), 4, "rank 4"),
        (torch.randn(0, 4, 4, 8), 4, "empty video"),
        (torch.randn(2, 0, 4, 8), 4, "empty video"),
        (torch.randn(2, 4, 4, 0), 4, "empty video"),
        (torch.full((2, 2, 2, 4), float("nan")), 2, "NaN or Inf"),
        (torch.tensor([1.0, float("-inf")]).repeat(2, 2, 2, 2), 2, "NaN or Inf"),
        (torch.ones(2, 2, 2, 4, dtype=torch.int32), 2, "floating point"),
        (torch.randn(2, 2, 2, 4), 0, "k must be"),
        (torch.randn(2, 2, 2, 4), -3, "k must be"),
    ],
)
def test_bad_input_raises_value_error(tokens, k, match):
    with pytest.raises(ValueError, match=match):
        compress(tokens, k)


def test_bad_adaptive_range():
    with pytest.raises(ValueError, match="k_min"):
        compress(torch.randn(2, 2, 2, 4), None, k_min=9, k_max=4)
    with pytest.raises(ValueError, match="k_min must be"):
        compress(torch.randn(2, 2, 2, 4), None, k_min=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tokens_stay_on_cuda_and_match_the_partition():
    tokens, truth = planted_video(6)
    cv = compress(tokens.cuda(), 6)
    assert cv.base.is_cuda and cv.dynamics.is_cuda
    assert same_partition(cv.dynamics.cpu(), truth)
    assert torch.equal(CompressedVideo.from_storage(cv.to_storage("float32")).dynamics, cv.dynamics.cpu())


# ---------------------------------------------------------------------------------------------------------------
# small objects in a noisy background


def video_with_objects(shape=(12, 10, 10), dim=32, objects=2, moving=True, noise=0.05, seed=0):
    """A background vector plus noise (std `noise` per dimension) with `objects` one-cell objects, moving one cell
    per frame along their row (or static). An object cell is the background plus the object's own unit vector, as
    ViT tokens share a large common component, so each object is a small, tight cluster at cosine ~0.7 from the
    background and ~0.5 from the other objects. -> tokens [T, H, W, dim], masks [objects, T, H, W] bool."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = shape
    background, *directions = F.normalize(torch.randn(objects + 1, dim, generator=g), dim=-1)
    tokens = background.expand(T, H, W, dim).clone()
    masks = torch.zeros(objects, T, H, W, dtype=torch.bool)
    starts = torch.randperm(H * W, generator=g)[:objects].tolist()  # distinct cells: objects never overlap
    for o, (start, direction) in enumerate(zip(starts, directions)):
        y, x = divmod(start, W)
        for t in range(T):
            masks[o, t, y, (x + t * moving) % W] = True
        tokens[masks[o]] = background + direction
    return tokens + noise * torch.randn(T, H, W, dim, generator=g), masks


@pytest.mark.parametrize(
    "shape, objects, moving, k",
    [
        ((12, 10, 10), 2, True, 3),  # the case where seeding used to merge both objects
        ((12, 10, 10), 2, False, 3),
        ((8, 9, 9), 3, True, 4),
        ((12, 10, 10), 4, True, 8),
        ((8, 12, 12), 3, False, 16),
        ((8, 12, 12), 5, True, 32),
    ],
)
def test_small_objects_keep_their_own_cluster_and_distortion_matches_sklearn(shape, objects, moving, k):
    for seed in range(5):
        tokens, masks = video_with_objects(shape, objects=objects, moving=moving, seed=seed)
        cv = compress(tokens, k, seed=seed)
        for mask in masks:  # all of the object in one cluster, and nothing else in it
            ids = cv.dynamics[mask].unique()
            assert ids.numel() == 1 and int(mask.sum()) == int((cv.dynamics == ids[0]).sum()), (seed, k)
        xn = F.normalize(tokens.reshape(-1, tokens.shape[-1]), dim=-1)
        distortion = float(((xn - cv.decompress().reshape(xn.shape)) ** 2).sum())
        with threadpool_limits(1):
            sk = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(xn.numpy())
        assert distortion <= 1.01 * sk.inertia_, (seed, k)


def test_small_objects_keep_their_own_cluster_in_wide_tokens():
    # 256-dim tokens: wider than the seeding sketch, so only the split/merge moves in full dimension separate the
    # objects (a split proposed from sketched similarities loses some of them).
    for seed in range(5):
        tokens, masks = video_with_objects((12, 10, 10), dim=256, objects=2, moving=True, seed=seed)
        cv = compress(tokens, 3, seed=seed)
        for mask in masks:
            ids = cv.dynamics[mask].unique()
            assert ids.numel() == 1 and int(mask.sum()) == int((cv.dynamics == ids[0]).sum()), seed


# ---------------------------------------------------------------------------------------------------------------
# adaptive K by fidelity


def static_scene(T=8, H=7, W=7, dim=48, seed=0):
    """One frame of a few textures (moving_square's first frame) repeated T times: tokens [T, H, W, dim]."""
    frame = moving_square(T=1, H=H, W=W, dim=dim, side=2, seed=seed)[0]
    return frame.expand(T, H, W, dim).clone()


CONTENTS = {
    "noise": lambda seed: torch.randn(8, 7, 7, 64, generator=torch.Generator().manual_seed(seed)),
    "static": lambda seed: static_scene(seed=seed),
    "moving square": lambda seed: moving_square(T=6, H=8, W=8, dim=48, seed=seed)[0],
    "textures": lambda seed: planted_video(9, shape=(6, 7, 7), dim=48, seed=seed)[0],
}


def fidelity_of(tokens: torch.Tensor, cv: CompressedVideo) -> float:
    return float(tokendyn.metrics.mean_cosine(tokens, cv.decompress()))


@pytest.mark.parametrize("k_min, k_max", [(8, 32), (8, 64), (16, 96), (2, 16)])
def test_noise_gets_k_max_for_any_range(k_min, k_max):
    for seed in range(2):
        assert compress(CONTENTS["noise"](seed), None, k_min=k_min, k_max=k_max, seed=seed).k == k_max


def test_static_clip_gets_few_tokens_and_reaches_the_target():
    for seed in range(3):
        tokens = static_scene(seed=seed)
        for k_min, k_max in [(1, 64), (2, 32), (1, 16)]:
            cv = compress(tokens, None, k_min=k_min, k_max=k_max, seed=seed)
            assert cv.k <= 4 and fidelity_of(tokens, cv) >= 0.9


@pytest.mark.parametrize("content", sorted(CONTENTS))
def test_k_is_monotone_in_the_target_and_the_output_reaches_it(content):
    for seed in range(2):
        tokens = CONTENTS[content](seed)
        ks = []
        for target in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
            cv = compress(tokens, None, k_min=1, k_max=48, target_fidelity=target, seed=seed)
            ks.append(cv.k)
            assert cv.k == 48 or fidelity_of(tokens, cv) >= target - 1e-5, (content, seed, target)
        assert ks == sorted(ks), (content, seed, ks)


@pytest.mark.parametrize("content", ["static", "moving square", "textures"])
def test_widening_the_range_around_the_answer_keeps_k(content):
    for seed in range(2):
        tokens = CONTENTS[content](seed)
        answer = compress(tokens, None, k_min=1, k_max=64, seed=seed).k
        assert answer < 64
        for k_min, k_max in [(1, answer), (answer, answer + 3), (max(1, answer - 2), 2 * answer), (1, 128)]:
            assert compress(tokens, None, k_min=k_min, k_max=k_max, seed=seed).k == answer, (seed, k_min, k_max)
        # The range clips the answer.
        if answer > 1:
            assert compress(tokens, None, k_min=1, k_max=answer - 1, seed=seed).k == answer - 1
        assert compress(tokens, None, k_min=answer + 1, k_max=answer + 4, seed=seed).k == answer + 1


def test_bad_rule_or_target():
    with pytest.raises(ValueError, match="rule"):
        compress(torch.randn(2, 2, 2, 4), None, k_rule="knee")
    for target in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target"):
            compress(torch.randn(2, 2, 2, 4), None, target_fidelity=target)


@pytest.mark.parametrize("bounded", [False, True])
def test_split_merge_moves_are_identical_in_a_batch_and_alone(bounded, monkeypatch):
    # At K=3 the object videos need a split/merge move (seeding puts an object in the background) and the noise
    # video does not: videos that move and videos that stay share the batch. Lloyd with bounds (CPU, videos
    # large enough) refines only the videos that moved, row by row: forced here on small videos.
    if bounded:
        monkeypatch.setattr(lloyd, "BOUNDED_LLOYD_MIN_WORK", 0)
    videos = [video_with_objects(objects=2, seed=seed)[0] for seed in range(3)]
    videos.insert(1, torch.randn(12, 10, 10, 32, generator=torch.Generator().manual_seed(0)))
    for k in (3, None):
        batched = compress_batch(videos, k, k_min=2, k_max=6, seed=0)
        for video, b in zip(videos, batched):
            alone = compress(video, k, k_min=2, k_max=6, seed=0)
            assert torch.equal(alone.base, b.base) and torch.equal(alone.dynamics, b.dynamics)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recovers_small_objects_and_batches_like_one_by_one():
    videos = [video_with_objects(objects=2, seed=seed)[0].cuda() for seed in range(3)]
    for k in (3, None):
        batched = compress_batch(videos, k, k_min=2, k_max=6, seed=0)
        for video, b in zip(videos, batched):
            alone = compress(video, k, k_min=2, k_max=6, seed=0)
            assert torch.equal(alone.dynamics, b.dynamics)
            # CUDA's atomic adds sum a cluster's tokens in no fixed order: the base agrees to float rounding
            torch.testing.assert_close(alone.base, b.base, rtol=0, atol=1e-5)
            on_cpu = compress(video.cpu(), k, k_min=2, k_max=6, seed=0)
            assert same_partition(on_cpu.dynamics, b.dynamics.cpu())
