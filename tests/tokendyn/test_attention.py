import pytest
import torch
import torch.nn.functional as F

from tokendyn import CrossDynamicsAttention, motion_features
from tokendyn.attention import NUM_MOTION_FEATURES, resample_tracks, time_encoding


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def module(dim=32, heads=4, seed=0) -> CrossDynamicsAttention:
    torch.manual_seed(seed)
    return CrossDynamicsAttention(dim, num_heads=heads).eval()


def random_inputs(B=2, K=6, T=5, H=4, W=5, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, K, D, generator=g)
    dynamics = torch.randint(0, K, (B, T, H, W), generator=g)
    return base, dynamics


def test_output_shape_and_gradients():
    att = module().train()
    base, dynamics = random_inputs()
    base.requires_grad_(True)
    out = att(base, dynamics)
    assert out.shape == base.shape
    out.square().sum().backward()
    assert base.grad is not None and all(p.grad is not None for p in att.parameters())


def test_relabelling_clusters_permutes_the_output_rows():
    att = module()
    base, dynamics = random_inputs()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # new row i holds old row perm[i]
    relabel = torch.argsort(perm)  # old id -> new id
    out = att(base, dynamics)
    out_perm = att(base[:, perm], relabel[dynamics])
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-5, atol=1e-5)
    # The map matters: the same base with another map gives another output.
    other = torch.roll(dynamics, 1, dims=-1)
    assert not torch.allclose(att(base, other), out, atol=1e-4)


def test_motion_features_follow_the_relabelling():
    _, dynamics = random_inputs()
    perm = torch.tensor([2, 5, 0, 1, 3, 4])
    feats, _, _ = motion_features(dynamics, 6)
    feats_perm, _, _ = motion_features(torch.argsort(perm)[dynamics], 6)
    torch.testing.assert_close(feats_perm, feats[:, perm])


def test_motion_features_of_a_moving_square():
    T, H, W = 4, 6, 8
    dynamics = torch.zeros(1, T, H, W, dtype=torch.int64)
    for t in range(T):
        dynamics[0, t, 1:3, t : t + 2] = 1  # a 2 x 2 square moving right by one cell per frame
    feats, frame_valid, num_frames = motion_features(dynamics, 2)
    assert feats.shape == (1, 2, T, NUM_MOTION_FEATURES) and bool(frame_valid.all()) and num_frames.item() == T
    square = feats[0, 1]
    occupancy, present, cy, cx, sy, sx, vy, vx = square.unbind(-1)
    torch.testing.assert_close(occupancy, torch.full((T,), 4 / (H * W)))
    assert present.tolist() == [1.0] * T
    torch.testing.assert_close(cy, torch.full((T,), 2.0 / H))  # rows 1 and 2: centre 1.5 + 0.5 cell, over H
    torch.testing.assert_close(cx, (torch.arange(T) + 1.0) / W)
    torch.testing.assert_close(sy, torch.full((T,), 0.5 / H))
    # One cell per frame is (T - 1) cells per unit of normalised time.
    torch.testing.assert_close(vx, torch.tensor([0.0] + [(T - 1) / W] * (T - 1)))
    torch.testing.assert_close(vy, torch.zeros(T))
    # A cluster absent from a frame has all-zero features there.
    absent = motion_features(torch.zeros(1, 2, 3, 3, dtype=torch.int64), 3)[0]
    assert bool((absent[0, 1:] == 0).all())


def test_padded_base_rows_change_nothing_for_real_rows():
    att = module()
    base, dynamics = random_inputs(B=1, K=4)
    padded = torch.cat([base, torch.randn(1, 3, 32)], 1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    out = att(base, dynamics)
    out_padded = att(padded, dynamics, mask)
    torch.testing.assert_close(out_padded[:, :4], out, rtol=1e-5, atol=1e-5)
    assert bool((out_padded[:, 4:] == 0).all())
    # Different padding values, same result.
    padded[:, 4:] = 100.0
    torch.testing.assert_close(att(padded, dynamics, mask)[:, :4], out, rtol=1e-5, atol=1e-5)


def test_batch_of_padded_videos_matches_each_video_alone():
    att = module()
    base_a, dyn_a = random_inputs(B=1, K=6, T=5, H=4, W=5, seed=1)
    base_b, dyn_b = random_inputs(B=1, K=3, T=3, H=3, W=4, seed=2)
    base = torch.zeros(2, 6, 32)
    base[0], base[1, :3] = base_a[0], base_b[0]
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    dynamics = torch.full((2, 5, 4, 5), -1, dtype=torch.int64)  # -1 pads frames, rows and columns
    dynamics[0], dynamics[1, :3, :3, :4] = dyn_a[0], dyn_b[0]
    out = att(base, dynamics, mask)
    torch.testing.assert_close(out[:1], att(base_a, dyn_a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:, :3], att(base_b, dyn_b), rtol=1e-5, atol=1e-5)


def test_time_encoding_uses_the_real_number_of_frames():
    enc = time_encoding(6, torch.tensor([6.0, 3.0]), num_freqs=2)
    assert enc.shape == (2, 6, 4)
    torch.testing.assert_close(enc[1, 2], enc[0, 5])  # last real frame of each video: tau = 1


def test_half_precision_module():
    att = module().to(torch.bfloat16)
    base, dynamics = random_inputs()
    out = att(base.bfloat16(), dynamics)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        CrossDynamicsAttention(30, num_heads=4)
    att = module()
    with pytest.raises(ValueError, match="expected base"):
        att(torch.randn(6, 32), torch.zeros(1, 2, 2, 2, dtype=torch.int64))


def test_output_does_not_collapse_to_the_input():
    # Random init: the motion branch must actually change the base (else equivariance would be vacuous).
    att = module()
    base, dynamics = random_inputs()
    assert F.mse_loss(att(base, dynamics), base) > 1e-3


def test_velocity_is_per_unit_of_normalised_time_whatever_the_frame_count():
    def crossing(T):  # one cell wide column crossing 9 columns over the clip
        dynamics = torch.zeros(1, T, 3, 10, dtype=torch.int64)
        for t in range(T):
            dynamics[0, t, :, round(9 * t / (T - 1))] = 1
        return motion_features(dynamics, 2)[0][0, 1, 1:, 7]  # vx after the first frame

    assert crossing(4).mean().item() == pytest.approx(0.9)
    assert crossing(10).mean().item() == pytest.approx(0.9)


def test_resampled_tracks_interpolate_over_the_valid_frames():
    feats = torch.arange(5.0).view(1, 1, 5, 1).expand(2, 3, 5, 2).clone()  # feature value = frame index
    num_frames = torch.tensor([5.0, 3.0])  # the second video's frames 3 and 4 are padding
    feats[1, :, 3:] = 100.0
    tracks = resample_tracks(feats, num_frames, steps=9)
    assert tracks.shape == (2, 3, 9, 2)
    torch.testing.assert_close(tracks[0, 0, :, 0], torch.linspace(0, 4, 9))
    torch.testing.assert_close(tracks[1, 2, :, 1], torch.linspace(0, 2, 9))  # never reads the padding
    same = resample_tracks(feats[:1], num_frames[:1], steps=5)
    torch.testing.assert_close(same, feats[:1])
    one_frame = resample_tracks(feats[:1, :, :1], torch.tensor([1.0]), steps=4)
    torch.testing.assert_close(one_frame, feats[:1, :, :1].expand(1, 3, 4, 2))


def test_the_track_token_tells_a_motion_from_its_reverse():
    # Left against right with the same cells overall: the per-frame attention can only tell them through the time
    # code; the track token alone (no attention weights trained) already separates them.
    T, H, W = 6, 4, 8
    right = torch.zeros(1, T, H, W, dtype=torch.int64)
    for t in range(T):
        right[0, t, 1:3, t : t + 2] = 1
    left = right.flip(1)
    feats_r, _, n = motion_features(right, 2)
    feats_l, _, _ = motion_features(left, 2)
    track_r, track_l = resample_tracks(feats_r, n, 6), resample_tracks(feats_l, n, 6)
    x_r, x_l = track_r[0, 1, :, 3], track_l[0, 1, :, 3]
    assert (x_r[-1] - x_r[0]).item() > 0.5 and (x_l[-1] - x_l[0]).item() < -0.5
    att = CrossDynamicsAttention(32, num_heads=4, track_steps=0).eval()
    with_track = module()
    base = torch.randn(1, 2, 32)
    assert not torch.allclose(with_track(base, right), with_track(base, left), atol=1e-4)
    assert att(base, right).shape == base.shape  # track_steps=0 keeps the per-frame attention alone
    assert with_track.track is not None and att.track is None
