"""Decoding: frame sampling rules, decord vs PyAV on real clips, resizing, inputs and failures."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.decode import DecodeError, DecodedClip, decode_video, resize_frames, sample_frame_indices

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
    from pipeline import decode

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
    from pipeline.decode import decode_frames

    for decoder in ("decord", "pyav"):
        frames = decode_frames(str(synthetic_clip), [5, 0, 17, 17], size=None, decoder=decoder)
        assert [frame_index_of(frame) for frame in frames] == [5, 0, 17, 17]
