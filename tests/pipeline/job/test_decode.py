"""Decoding: frame sampling rules, decord vs PyAV on real clips, resizing, inputs and failures."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.job.clip_encoding import ClipFormat, encode_clip
from pipeline.job.decode import (DecodeError, DecodedClip, decode_frames, decode_video, resize_frames,
                             sample_frame_indices)

# ---------------------------------------------------------------------------------------------------------------
# sampling rules


def test_uniform_sampling_takes_segment_centres_over_the_whole_clip():
    assert sample_frame_indices(100, num_frames=4) == [12, 37, 62, 87]
    assert sample_frame_indices(132, num_frames=16)[0] == 4 and sample_frame_indices(132, num_frames=16)[-1] == 127
    indices = sample_frame_indices(1000, num_frames=16)
    assert len(indices) == 16 and len(set(indices)) == 16
    gaps = np.diff(indices)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert sample_frame_indices(16, num_frames=16) == list(range(16))
    assert sample_frame_indices(1, num_frames=1) == [0]


def test_short_clip_repeats_frames_so_t_is_always_num_frames():
    indices = sample_frame_indices(3, num_frames=8)
    assert indices == [0, 0, 0, 1, 1, 2, 2, 2]
    for total in range(1, 16):
        indices = sample_frame_indices(total, num_frames=16)
        assert len(indices) == 16
        assert indices == sorted(indices)
        assert set(indices) == set(range(total))  # every source frame is used
        counts = np.bincount(indices)
        assert counts.max() - counts.min() <= 1  # repeated as evenly as possible


def test_fps_sampling_takes_one_frame_every_one_over_fps_seconds():
    assert sample_frame_indices(100, num_frames=None, fps=5, source_fps=25) == list(range(0, 100, 5))
    assert sample_frame_indices(120, num_frames=None, fps=1, source_fps=29.97) == [0, 29, 59, 89, 119]
    # Faster than the source: every frame, none twice.
    assert sample_frame_indices(10, num_frames=None, fps=60, source_fps=25) == list(range(10))
    # A clip shorter than one step still gives its first frame.
    assert sample_frame_indices(3, num_frames=None, fps=1, source_fps=25) == [0]


def test_fps_wins_over_num_frames_and_max_frames_caps_it_by_uniform_thinning():
    full = sample_frame_indices(250, num_frames=16, fps=5, source_fps=25)
    assert full == list(range(0, 250, 5))  # num_frames is ignored in fps mode
    capped = sample_frame_indices(250, fps=5, source_fps=25, max_frames=8)
    assert len(capped) == 8
    assert set(capped) <= set(full) and capped == sorted(capped)
    assert capped[0] < 50 and capped[-1] > 200  # still spans the whole clip
    assert sample_frame_indices(250, fps=5, source_fps=25, max_frames=100) == full


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_frames=0, num_frames=4),
        dict(total_frames=10, num_frames=0),
        dict(total_frames=10, num_frames=None),
        dict(total_frames=10, num_frames=None, fps=2, source_fps=0.0),
        dict(total_frames=10, num_frames=None, fps=-1, source_fps=25),
        dict(total_frames=10, fps=2, source_fps=25, max_frames=0),
    ],
)
def test_invalid_sampling_arguments_are_rejected(kwargs):
    total = kwargs.pop("total_frames")
    with pytest.raises(ValueError):
        sample_frame_indices(total, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# decord vs PyAV on real clips


@pytest.mark.parametrize("clip", ["bikes", "carphone_pristine", "bigbuckbunny"])
def test_decord_and_pyav_give_the_same_frames_on_real_clips(sample_clip_paths, clip):
    path = sample_clip_paths[clip]
    by_decord = decode_video(path, num_frames=6, size=None, decoder="decord")
    by_pyav = decode_video(path, num_frames=6, size=None, decoder="pyav")

    assert by_decord.frame_indices == by_pyav.frame_indices
    assert by_decord.source_frames == by_pyav.source_frames
    assert by_decord.fps == pytest.approx(by_pyav.fps)
    assert by_decord.frames.shape == by_pyav.frames.shape == (6, *by_decord.source_size, 3)
    difference = np.abs(by_decord.frames.astype(np.int16) - by_pyav.frames.astype(np.int16))
    assert difference.mean() < 0.5 and difference.max() <= 2
    # Different frames of the clip really differ, so equality above is not trivial.
    assert np.abs(by_decord.frames[0].astype(np.int16) - by_decord.frames[-1]).mean() > 5


def test_real_clip_metadata_and_resize(sample_clip_paths):
    clip = decode_video(sample_clip_paths["bikes"], num_frames=16, size=(224, 224))
    assert isinstance(clip, DecodedClip)
    assert clip.frames.shape == (16, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.source_frames == 250 and clip.fps == pytest.approx(25.0)
    assert clip.source_size == (272, 640)
    assert clip.frame_indices == sample_frame_indices(250, num_frames=16)


# ---------------------------------------------------------------------------------------------------------------
# resizing


def test_resize_scales_the_shorter_side_and_takes_the_centre_crop():
    # 100 x 300 frame: left third red, middle third green, right third blue.
    frame = np.zeros((1, 100, 300, 3), dtype=np.uint8)
    frame[:, :, :100, 0] = frame[:, :, 100:200, 1] = frame[:, :, 200:, 2] = 255
    resized = resize_frames(frame, (50, 50))
    assert resized.shape == (1, 50, 50, 3)
    # Only the green middle third survives the centre crop; no squashing, no padding.
    assert resized[0, :, 5:-5, 1].min() > 250 and resized[0, :, 5:-5, [0, 2]].max() < 5
    # 300x100 (bands top to bottom) -> 40x20: rows 50..250 are kept, so red, green, blue take 10, 20, 10 rows.
    # Squashing instead would give about 13 rows each.
    portrait = resize_frames(frame.transpose(0, 2, 1, 3).copy(), (40, 20))
    assert portrait.shape == (1, 40, 20, 3)
    assert portrait[0, 11:29, :, 1].min() > 250
    assert portrait[0, :8, :, 0].min() > 250 and portrait[0, -8:, :, 2].min() > 250
    assert resize_frames(frame, None) is frame


def _centre_crop_box_expectations(height, width, target_h, target_w, box):
    """The box is whole pixels inside the frame, at least 1x1, centred, keeps one full side, and its other side is
    the whole number nearest to the target's aspect ratio (checked in exact integer arithmetic)."""
    left, top, right, bottom = box
    assert all(isinstance(value, int) for value in box)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    crop_w, crop_h = right - left, bottom - top
    assert left == (width - crop_w) // 2 and top == (height - crop_h) // 2
    if width * target_h >= height * target_w:  # wider than the target: full height, width from the aspect
        assert crop_h == height
        assert crop_w == 1 or 2 * abs(crop_w * target_h - height * target_w) <= target_h
    else:
        assert crop_w == width
        assert crop_h == 1 or 2 * abs(crop_h * target_w - width * target_h) <= target_w


@settings(max_examples=500, deadline=None)
@given(height=st.integers(1, 100_000), width=st.integers(1, 100_000),
       target_h=st.integers(1, 4096), target_w=st.integers(1, 4096))
@example(height=110, width=256, target_h=224, target_w=224)  # a float box put its top at -7e-15
@example(height=4320, width=7680, target_h=224, target_w=224)
@example(height=1, width=4000, target_h=224, target_w=224)
def test_crop_box_is_whole_pixels_inside_the_frame_for_every_size(height, width, target_h, target_w):
    from pipeline.job.decode import _centre_crop_box

    box = _centre_crop_box(height, width, target_h, target_w)
    _centre_crop_box_expectations(height, width, target_h, target_w, box)


@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 600), width=st.integers(1, 600), target_h=st.integers(1, 300),
       target_w=st.integers(1, 300), level=st.integers(0, 255))
@example(height=110, width=256, target_h=224, target_w=224, level=7)
@example(height=2, width=2, target_h=224, target_w=224, level=200)
@example(height=1, width=1, target_h=3, target_w=5, level=1)
def test_resize_returns_exactly_the_target_shape_for_every_size(height, width, target_h, target_w, level):
    frames = np.full((2, height, width, 3), level, dtype=np.uint8)
    frames[1] = 255 - level
    resized = resize_frames(frames, (target_h, target_w))
    assert resized.shape == (2, target_h, target_w, 3) and resized.dtype == np.uint8
    # A uniform frame stays that colour: nothing outside the frame (no padding) is sampled.
    assert (resized[0] == level).all() and (resized[1] == 255 - level).all()


@pytest.mark.parametrize("size", [(110, 256), (256, 110), (1, 4000), (4000, 1), (2, 2), (4320, 7680), (1081, 1919)])
def test_resize_of_awkward_and_huge_frames(size):
    frames = np.zeros((1, *size, 3), dtype=np.uint8)
    frames[0, :, : max(1, size[1] // 2)] = 200  # left half bright: the centre crop keeps both halves
    resized = resize_frames(frames, (224, 224))
    assert resized.shape == (1, 224, 224, 3)


# ---------------------------------------------------------------------------------------------------------------
# synthetic clips: exact frame identity, inputs, containers


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_decoded_rows_are_the_frames_named_by_frame_indices(synthetic_clip, decoder, frame_index_of):
    clip = decode_video(synthetic_clip, num_frames=5, size=(32, 32), decoder=decoder)
    assert clip.source_frames == 24 and clip.fps == pytest.approx(12.0)
    assert clip.frame_indices == sample_frame_indices(24, num_frames=5)
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_short_clip_decodes_to_num_frames_with_repeats(make_synthetic_clip, decoder, frame_index_of):
    path = make_synthetic_clip("short", num_frames=3, fps=10)
    clip = decode_video(path, num_frames=8, size=(16, 16), decoder=decoder)
    assert clip.frames.shape == (8, 16, 16, 3)
    assert clip.frame_indices == [0, 0, 0, 1, 1, 2, 2, 2]
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_fps_mode_on_a_container_without_a_frame_count(make_synthetic_clip, decoder, frame_index_of):
    path = make_synthetic_clip("webm", num_frames=20, fps=10, container="webm")  # webm stores no frame count
    clip = decode_video(path, fps=2.5, size=(16, 16), decoder=decoder)
    assert clip.source_frames == 20
    assert clip.frame_indices == [0, 4, 8, 12, 16]
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_decode_from_bytes_and_file_objects_matches_decode_from_path(sample_clip_paths, decoder):
    path = sample_clip_paths["carphone_distorted"]
    from_path = decode_video(path, num_frames=4, size=(64, 64), decoder=decoder)
    data = path.read_bytes()
    for source in (data, io.BytesIO(data), str(path)):
        clip = decode_video(source, num_frames=4, size=(64, 64), decoder=decoder)
        assert clip.frame_indices == from_path.frame_indices
        np.testing.assert_array_equal(clip.frames, from_path.frames)


def test_decode_from_s3(s3_client, s3_bucket, moto_s3_endpoint, synthetic_clip, frame_index_of):
    s3_client.put_object(Bucket=s3_bucket, Key="v/clip.mp4", Body=synthetic_clip.read_bytes())
    clip = decode_video(f"s3://{s3_bucket}/v/clip.mp4", num_frames=3, size=(16, 16), s3_endpoint_url=moto_s3_endpoint)
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices == [4, 12, 20]


# ---------------------------------------------------------------------------------------------------------------
# awkward sources: odd and extreme sizes, pixel formats, rotation, variable frame rate

# (height, width, pixel format): 4:2:0 needs even sizes, so odd ones are 4:4:4 or grey. decord 0.6 fails on some
# narrow widths (1-4, 6, 8, 12, 16 px); those frames come from PyAV.
AWKWARD_SIZES = [(110, 256, "yuv420p"), (33, 17, "yuv444p"), (2, 2, "yuv444p"), (1, 4000, "yuv444p"),
                 (4000, 1, "yuv444p"), (7, 5, "gray")]


def clip_frame_index(frame: np.ndarray, pix_fmt: str) -> int:
    """The index a decoded synthetic frame shows. Grey H.264 is limited-range luma: level L decodes to
    (L - 16) * 255 / 219, so grey clips are read back through that mapping."""
    if pix_fmt.startswith("gray"):
        return int(round(float(frame.mean()) * 219 / 255 / 8))
    return int(round((float(frame.mean()) - 16) / 8))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("height, width, pix_fmt", AWKWARD_SIZES)
def test_clips_of_awkward_sizes_decode_to_exactly_the_target_size(make_synthetic_clip, decoder, height, width,
                                                                  pix_fmt):
    path = make_synthetic_clip("awkward", num_frames=6, fps=10, size=(height, width), pix_fmt=pix_fmt)
    clip = decode_video(path, num_frames=3, size=(224, 224), decoder=decoder)
    assert clip.frames.shape == (3, 224, 224, 3)
    assert clip.source_size == (height, width) and clip.source_frames == 6
    assert [clip_frame_index(frame, pix_fmt) for frame in clip.frames] == clip.frame_indices == [1, 3, 5]


@pytest.mark.parametrize("pix_fmt", ["yuv420p10le", "yuv444p", "yuv444p10le", "gray", "gray10le"])
def test_10_bit_444_and_grey_sources_decode_alike_with_both_decoders(make_synthetic_clip, pix_fmt):
    path = make_synthetic_clip("format", num_frames=12, fps=10, size=(48, 64), pix_fmt=pix_fmt)
    by_decoder = {decoder: decode_video(path, num_frames=4, size=(32, 32), decoder=decoder)
                  for decoder in ("decord", "pyav")}
    for clip in by_decoder.values():
        assert clip.frames.shape == (4, 32, 32, 3) and clip.source_frames == 12
        assert [clip_frame_index(frame, pix_fmt) for frame in clip.frames] == clip.frame_indices
    difference = np.abs(by_decoder["decord"].frames.astype(np.int16) - by_decoder["pyav"].frames)
    assert difference.max() <= 2


def quadrant_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [count, h, w, 3]: red top-left, green top-right, blue bottom-left and a grey bottom-right quadrant
    whose level tells the frame index; no two rotations of it look alike."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    frames[:, : height // 2, : width // 2] = (220, 30, 30)
    frames[:, : height // 2, width // 2:] = (30, 220, 30)
    frames[:, height // 2:, : width // 2] = (30, 30, 220)
    for index in range(count):
        frames[index, height // 2:, width // 2:] = 40 + 40 * index
    return frames


def write_clip(path, frames: np.ndarray, *, rotation: int = 0, pix_fmt: str = "yuv444p", frame_ms=None,
               codec: str = "h264"):
    """Encode RGB frames [T, h, w, 3] at 10 fps. rotation: counter-clockwise degrees recorded in the display matrix
    (as phones record portrait video). frame_ms: per-frame durations, for a variable frame rate."""
    return encode_clip(path, frames, ClipFormat(codec=codec, fps=10, gop=250, pix_fmt=pix_fmt, rotation=rotation),
                       frame_ms=frame_ms)


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_clips_come_out_upright(tmp_path, decoder, rotation):
    source = quadrant_frames(4)
    path = write_clip(tmp_path / f"rotated_{rotation}.mp4", source, rotation=rotation)
    with av.open(str(path)) as container:  # the file really carries the rotation
        assert next(container.decode(video=0)).rotation == (rotation + 180) % 360 - 180
    # Oracle: the unrotated source frames turned with numpy (np.rot90 turns counter-clockwise, as the matrix says).
    upright = np.rot90(source, k=rotation // 90, axes=(1, 2))
    clip = decode_video(path, num_frames=4, size=None, decoder=decoder)
    assert clip.frames.shape == upright.shape and clip.source_size == upright.shape[1:3]
    difference = np.abs(clip.frames.astype(np.int16) - upright)
    assert difference.mean() < 3, difference.mean()
    for wrong_turn in {1, 2, 3} - {rotation // 90}:  # and it is not upright by accident
        wrong = np.rot90(source, k=wrong_turn, axes=(1, 2))
        if wrong.shape == clip.frames.shape:
            assert np.abs(clip.frames.astype(np.int16) - wrong).mean() > 30
    resized = decode_video(path, num_frames=2, size=(24, 40), decoder=decoder)
    assert resized.frames.shape == (2, 24, 40, 3)
    # Frames read again at stored indices (as visualize does) are upright too.
    np.testing.assert_array_equal(decode_frames(path, [3, 0], size=None, decoder=decoder), clip.frames[[3, 0]])


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_variable_frame_rate_clip_decodes_by_frame_index(tmp_path, decoder, frame_index_of):
    levels = np.array([16 + 8 * i for i in range(20)], dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (20, 48, 64, 3)).copy()
    path = write_clip(tmp_path / "vfr.mp4", frames, pix_fmt="yuv420p", frame_ms=[20, 100])  # 50 and 10 fps
    clip = decode_video(path, num_frames=5, size=(16, 16), decoder=decoder)
    assert clip.source_frames == 20
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices == [2, 6, 10, 14, 18]
    # fps sampling counts frames at the container's average rate (about 17 fps here), the same with both decoders.
    assert 10 < clip.fps < 50
    by_rate = decode_video(path, fps=clip.fps / 4, size=(16, 16), decoder=decoder)
    assert by_rate.frame_indices == [0, 4, 8, 12, 16]
    assert [frame_index_of(frame) for frame in by_rate.frames] == by_rate.frame_indices


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="PyAV built without an AV1 encoder")
def test_a_codec_decord_cannot_open_is_decoded_by_pyav(tmp_path, frame_index_of):
    # decord 0.6 bundles an FFmpeg without AV1: with --decoder decord the clip still decodes, through PyAV.
    levels = np.array([16 + 8 * i for i in range(6)], dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (6, 48, 64, 3)).copy()
    path = write_clip(tmp_path / "av1.mp4", frames, pix_fmt="yuv420p", codec="av1")
    clip = decode_video(path, num_frames=3, size=(16, 16), decoder="decord")
    assert clip.source_frames == 6
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices == [1, 3, 5]


# ---------------------------------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_undecodable_inputs_raise_decode_error(tmp_path, corrupt_video_path, sample_clip_paths, decoder):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = sample_clip_paths["bikes"].read_bytes()[:20_000]
    for source in (corrupt_video_path, corrupt_video_path.read_bytes(), empty, b"", truncated):
        with pytest.raises(DecodeError):
            decode_video(source, num_frames=2, size=(16, 16), decoder=decoder)


def test_missing_file_and_unknown_decoder(tmp_path, synthetic_clip):
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_video(synthetic_clip, decoder="opencv")


def test_audio_only_file_is_a_decode_error(tmp_path):
    import av

    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    for decoder in ("decord", "pyav"):
        with pytest.raises(DecodeError):
            decode_video(path.read_bytes(), decoder=decoder)


def test_pyav_resamples_when_the_stream_is_shorter_than_its_metadata(synthetic_clip, monkeypatch, frame_index_of):
    from pipeline.job import decode

    original_init = decode._PyAVReader.__init__

    def over_reporting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.frame_count += 40  # as a container whose header claims more frames than it holds

    monkeypatch.setattr(decode._PyAVReader, "__init__", over_reporting_init)
    clip = decode_video(synthetic_clip, num_frames=4, size=(16, 16), decoder="pyav")
    assert clip.source_frames == 24
    assert clip.frame_indices == sample_frame_indices(24, num_frames=4)
    assert [frame_index_of(frame) for frame in clip.frames] == clip.frame_indices


def test_decode_frames_reads_exactly_the_given_indices(synthetic_clip, frame_index_of):
    for decoder in ("decord", "pyav"):
        frames = decode_frames(str(synthetic_clip), [5, 0, 17, 17], size=None, decoder=decoder)
        assert [frame_index_of(frame) for frame in frames] == [5, 0, 17, 17]
