"""pipeline.readers.evaluation: segments and alterations, the common compressed form, retrieval scores, the report.

Fast: synthetic frames and random tokens only (the run on real clips is in tests/jobs/test_evaluate.py).
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from pipeline.readers.evaluation import alterations, methods, retrieval
from pipeline.readers.evaluation import config as evaluation_config


def position_frames(count: int, size: int = 16) -> np.ndarray:
    """uint8 [count, size, size, 3] whose frame p is uniformly p (so a frame tells its decoded position)."""
    return np.repeat(np.arange(count, dtype=np.uint8), size * size * 3).reshape(count, size, size, 3)


def random_kept(generator: torch.Generator, k: int, dim: int = 6, grid=(2, 3, 4)) -> methods.KeptTokens:
    """A random KeptTokens whose assignment uses every one of its k vectors (k <= cells)."""
    cells = int(np.prod(grid))
    assignment = torch.cat([torch.arange(k), torch.randint(0, k, (cells - k,), generator=generator)])
    assignment = assignment[torch.randperm(cells, generator=generator)].reshape(grid)
    kept = torch.randn(k, dim, generator=generator)
    return methods.KeptTokens(kept, assignment, kept.mean(0))


# ---------------------------------------------------------------------------------------------------------------
# segments and alterations


@pytest.mark.parametrize("frames,segments", [(8, 6), (4, 3), (5, 1), (16, 2)])
def test_segment_positions_stay_in_their_window_and_the_shift_shares_no_frame(frames, segments):
    total = 2 * frames * segments
    for segment in range(segments):
        original, shifted = alterations.segment_positions(segment, segments, frames)
        assert len(original) == len(shifted) == frames
        assert original.min() >= 2 * frames * segment and original.max() < 2 * frames * (segment + 1)
        assert np.all(np.diff(original) == 2)
        assert shifted.min() >= 0 and shifted.max() < total
        # Odd offset from even positions: never the same decoded frame (unless clamped at the clip's ends).
        assert not set(original.tolist()) & set(shifted.tolist())
        moved = shifted - original
        backwards = segment == segments - 1 and segments > 1
        expected = -alterations.shift_positions(frames) if backwards else alterations.shift_positions(frames)
        assert np.all(moved[(shifted > 0) & (shifted < total - 1)] == expected)


def test_shift_is_about_a_quarter_segment_and_odd():
    for frames in range(1, 40):
        shift = alterations.shift_positions(frames)
        assert shift % 2 == 1
        assert abs(shift - frames / 2) <= 1.5  # a quarter of the 2T positions a segment spans


def test_split_clip_takes_every_other_frame_of_each_segment():
    frames, segments = 4, 3
    decoded = position_frames(2 * frames * segments)
    videos = alterations.split_clip("clip", decoded, segments, frames)
    assert [v.video_id for v in videos] == ["clip/0", "clip/1", "clip/2"]
    for segment, video in enumerate(videos):
        assert video.frames[:, 0, 0, 0].tolist() == [2 * frames * segment + 2 * i for i in range(frames)]
        assert set(video.altered) == set(alterations.ALTERATIONS)
        shown = video.altered["temporal_shift"][:, 0, 0, 0]
        original, shifted = alterations.segment_positions(segment, segments, frames)
        assert shown.tolist() == shifted.tolist()
        for altered in video.altered.values():
            assert altered.shape == video.frames.shape and altered.dtype == np.uint8


def test_split_clip_rejects_a_wrong_frame_count():
    with pytest.raises(ValueError, match="expected 24 decoded frames"):
        alterations.split_clip("clip", position_frames(23), 3, 4)


def gradient_frame(size: int = 100) -> np.ndarray:
    """Red rises left to right, green top to bottom: a pixel's colour says where it came from."""
    ramp = np.linspace(0, 255, size)
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[..., 0] = ramp[None, :].round()
    frame[..., 1] = ramp[:, None].round()
    return frame[None]


def test_crop_shows_the_top_left_window_at_full_size():
    frame = gradient_frame()
    cropped = alterations.crop_frames(frame, keep=0.7)
    assert cropped.shape == frame.shape
    # The result spans source columns/rows 5%..75%: red/green go from ~5% to ~75% of 255.
    assert cropped[0, 50, 0, 0] == pytest.approx(0.05 * 255, abs=6)
    assert cropped[0, 50, -1, 0] == pytest.approx(0.75 * 255, abs=6)
    assert cropped[0, 0, 50, 1] == pytest.approx(0.05 * 255, abs=6)
    assert cropped[0, -1, 50, 1] == pytest.approx(0.75 * 255, abs=6)


def test_low_resolution_removes_fine_detail_and_keeps_layout():
    checker = ((np.indices((96, 96)).sum(axis=0) % 2) * 255).astype(np.uint8)
    frame = np.repeat(checker[..., None], 3, axis=2)[None]
    blurred = alterations.low_resolution_frames(frame, factor=3)
    assert blurred.std() < 0.1 * frame.std()  # one-pixel checks do not survive a third of the resolution
    smooth = gradient_frame(96)
    assert np.abs(alterations.low_resolution_frames(smooth).astype(int) - smooth).mean() < 3


def test_recolouring_rotates_hue_and_scales_saturation_and_brightness():
    frame = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    frame[...] = (200, 60, 60)  # a red
    out = alterations.recoloured_frames(frame, hue_degrees=30.0, saturation=0.6, brightness=1.15)[0, 4, 4] / 255.0
    hue_in, _, sat_in = colorsys.rgb_to_hls(200 / 255, 60 / 255, 60 / 255)
    hue_out, _, sat_out = colorsys.rgb_to_hls(*out)
    assert (hue_out - hue_in) * 360 == pytest.approx(30.0, abs=4.0)
    assert sat_out < sat_in
    assert out.max() * 255 > 200  # brighter


# ---------------------------------------------------------------------------------------------------------------
# the common compressed form


def test_full_tokens_keep_every_normalised_token_and_pool_them():
    tokens = torch.randn(2, 3, 4, 5) * torch.rand(2, 3, 4, 1) * 10
    normalised = tokens / tokens.norm(dim=-1, keepdim=True)
    full = methods.full_tokens(tokens)
    assert full.k == 24 and full.sizes.tolist() == [1] * 24
    assert torch.allclose(full.reconstruct(), normalised, atol=1e-6)
    assert torch.allclose(full.pooled, normalised.reshape(-1, 5).mean(0), atol=1e-6)
    assert methods.fidelity(tokens, full) == pytest.approx({"rel_mse": 0.0, "mean_cosine": 1.0, "pooled_cosine": 1.0},
                                                      abs=1e-6)


@pytest.mark.parametrize("method", ["uniform_pool", "tome_merge"])
def test_baselines_pool_to_the_full_pooled_vector(method):
    # Each kept vector is a mean of normalised tokens, so the size-weighted mean is the mean of all of them.
    tokens = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(3))
    kept = methods.baseline(method, tokens, 6)
    assert kept.k <= 6 and kept.assignment.shape == (3, 4, 4)
    assert torch.allclose(kept.pooled, methods.full_tokens(tokens).pooled, atol=1e-6)


@pytest.mark.parametrize("k", [5, None])
def test_token_dynamics_in_the_common_form(k):
    import tokendyn

    tokens = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(4))
    config = evaluation_config.EvaluationConfig(k_min=2, k_max=9)
    [kept] = methods.token_dynamics([tokens], k, config)
    alone = tokendyn.compress(tokens, k, k_min=2, k_max=9)
    assert torch.equal(kept.kept, alone.base) and torch.equal(kept.assignment, alone.dynamics)
    assert torch.equal(kept.sizes, alone.sizes)
    assert torch.allclose(kept.pooled, methods.full_tokens(tokens).pooled, atol=1e-6)
    # Rebuilding from base + map is what the metric scores: the k-means distortion per token.
    normalised = tokens / tokens.norm(dim=-1, keepdim=True)
    expected = ((normalised - kept.reconstruct()) ** 2).sum() / normalised.pow(2).sum()
    assert methods.fidelity(tokens, kept)["rel_mse"] == pytest.approx(float(expected), rel=1e-5)


def test_sizes_count_the_cells_each_kept_vector_stands_for():
    kept = methods.KeptTokens(torch.eye(3), torch.tensor([[[0, 0], [2, 0]]]), torch.zeros(3))
    assert kept.sizes.tolist() == [3, 0, 1]
    assert torch.equal(kept.reconstruct()[0, 1, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_stored_bytes():
    # float16 vectors + float32 pooled vector; data-dependent maps add int32 sizes and one byte per cell (two
    # above 256 clusters); uniform pooling's map and sizes are implied by the grid.
    assert methods.stored_bytes("token_dynamics", 32, 392, 1280) == 32 * 1280 * 2 + 1280 * 4 + 32 * 4 + 392
    assert methods.stored_bytes("tome_merge", 300, 392, 1280) == 300 * 1280 * 2 + 1280 * 4 + 300 * 4 + 392 * 2
    assert methods.stored_bytes("uniform_pool", 32, 392, 1280) == 32 * 1280 * 2 + 1280 * 4
    assert methods.stored_bytes("full", 392, 392, 1280) == 392 * 1280 * 2


def test_stored_bytes_of_token_dynamics_match_the_pipeline_storage_form():
    import tokendyn
    from tokendyn.metrics import storage_nbytes

    video = tokendyn.compress(torch.randn(2, 3, 3, 16, generator=torch.Generator().manual_seed(5)), k=7)
    assert methods.stored_bytes("token_dynamics", video.k, 18, 16) == storage_nbytes(video.to_storage("float16"))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="frames"):
        evaluation_config.EvaluationConfig(frames=0)
    with pytest.raises(ValueError, match="every K"):
        evaluation_config.EvaluationConfig(ks=(8, 0))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluation_config.EvaluationConfig(ks=(), adaptive=False)
    with pytest.raises(ValueError, match="k_min"):
        evaluation_config.EvaluationConfig(k_min=10, k_max=5)
    assert evaluation_config.EvaluationConfig(ks=(16, 8, 16)).budgets == [8, 16, "adaptive"]


# ---------------------------------------------------------------------------------------------------------------
# retrieval


def test_maxsim_matches_a_brute_force_oracle():
    generator = torch.Generator().manual_seed(0)
    gallery = [random_kept(generator, k) for k in (3, 5, 1, 7)]
    queries = [random_kept(generator, k) for k in (2, 4, 6)]
    scores = retrieval.maxsim_similarity(queries, gallery)
    for q, query in enumerate(queries):
        weights = np.bincount(query.assignment.reshape(-1).numpy(), minlength=query.k)
        qv = query.kept.numpy() / np.linalg.norm(query.kept.numpy(), axis=1, keepdims=True)
        for g, item in enumerate(gallery):
            gv = item.kept.numpy() / np.linalg.norm(item.kept.numpy(), axis=1, keepdims=True)
            best = np.array([max(float(a @ b) for b in gv) for a in qv])
            assert scores[q, g].item() == pytest.approx(float((weights * best).sum() / weights.sum()), abs=1e-5)


def test_maxsim_of_a_set_with_itself_is_one():
    generator = torch.Generator().manual_seed(1)
    gallery = [random_kept(generator, k) for k in (3, 5, 4)]
    assert torch.allclose(retrieval.maxsim_similarity(gallery, gallery).diagonal(), torch.ones(3), atol=1e-5)


def test_ranks_and_recall_count_ties_against_the_query():
    similarity = torch.tensor([
        [0.9, 0.1, 0.2],  # target 0 is first
        [0.5, 0.5, 0.1],  # target 1 tied with item 0: rank 2
        [0.8, 0.7, 0.1],  # target 2 last: rank 3
    ])
    targets = torch.tensor([0, 1, 2])
    assert retrieval.ranks_of_targets(similarity, targets).tolist() == [1, 2, 3]
    assert retrieval.recall_at(similarity, targets, 1) == pytest.approx(1 / 3)
    assert retrieval.recall_at(similarity, targets, 2) == pytest.approx(2 / 3)
    assert retrieval.recall_at(similarity, targets, 5) == 1.0


def test_retrieval_finds_lightly_perturbed_copies_and_not_unrelated_ones():
    generator = torch.Generator().manual_seed(2)
    gallery = [random_kept(generator, 6, dim=16) for _ in range(10)]

    def perturbed(item: methods.KeptTokens) -> methods.KeptTokens:
        kept = item.kept + 0.05 * torch.randn(item.kept.shape, generator=generator)
        return methods.KeptTokens(kept, item.assignment, kept.mean(0))

    copies = {name: [perturbed(item) for item in gallery] for name in alterations.ALTERATIONS}
    recall, by_alteration = retrieval.retrieval(gallery, copies)
    assert recall["maxsim"][1] == recall["pooled"][1] == 1.0
    assert all(value == 1.0 for kind in by_alteration.values() for value in kind.values())

    # Queries that are copies of the wrong gallery item (shifted by one) are never found at rank 1.
    shifted = {name: items[1:] + items[:1] for name, items in copies.items()}
    recall, _ = retrieval.retrieval(gallery, shifted)
    assert recall["maxsim"][1] == recall["pooled"][1] == 0.0
