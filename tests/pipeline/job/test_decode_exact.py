"""Seeking decode gives exactly the frames of a full sequential decode, over codecs, GOP structures (B-frames, open
GOPs, one keyframe or every frame a keyframe), containers, variable frame rates, rotations and odd sizes; and
`decoder="decord"` gives decord's bytes. The oracles are independent of pipeline.job.decode: every frame decoded
in order by PyAV without a seek, numbered by presentation time, and decord's own get_batch."""

from __future__ import annotations

import av
import decord
import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from pipeline.job.clip_encoding import MIN_SIDE, ClipFormat, encode_clip, moving_texture, repeat_clip
from pipeline.job.decode import (DECORD_IDENTICAL_FORMATS, _PyAVReader, decode_frames, decode_video,
                                 nearest_keyframes, sample_frame_indices)

CONTAINERS = {"h264": ("mp4", "mkv"), "hevc": ("mp4", "mkv"), "vp9": ("webm", "mkv"), "av1": ("mkv", "mp4")}
AVAILABLE = [codec for codec, encoder in
             {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}.items()
             if encoder in av.codecs_available]


def full_decode(path) -> np.ndarray:
    """Oracle: every frame, decoded in one pass from the start, in presentation order, upright."""
    with av.open(str(path)) as container:
        frames = sorted(((frame.pts, frame) for frame in container.decode(video=0)), key=lambda item: item[0])
        return np.stack([np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90) % 4)
                         for _, frame in frames])


@st.composite
def clip_formats(draw):
    codec = draw(st.sampled_from(AVAILABLE))
    b_frames = codec in ("h264", "hevc")
    odd = codec == "h264" and draw(st.booleans())
    if odd:
        height, width, pix_fmt = draw(st.integers(17, 41)) | 1, draw(st.integers(17, 67)) | 1, "yuv444p"
    else:
        low = max(16, MIN_SIDE[codec])
        height, width = 2 * draw(st.integers(low // 2, 40)), 2 * draw(st.integers(low // 2, 56))
        pix_fmt = "yuv420p" if codec == "av1" else draw(st.sampled_from(["yuv420p", "yuv420p", "yuv444p"]))
    fmt = ClipFormat(codec=codec, gop=draw(st.sampled_from([1, 2, 5, 12, 30, 250])),
                     bframes=draw(st.sampled_from([0, 1, 3])) if b_frames else 0,
                     open_gop=b_frames and draw(st.booleans()), pix_fmt=pix_fmt,
                     rotation=draw(st.sampled_from([0, 0, 90, 180, 270])))
    frame_ms = draw(st.sampled_from([None, None, [20, 100], [33, 34, 33, 50]]))
    return fmt, draw(st.sampled_from(CONTAINERS[codec])), (height, width), draw(st.integers(1, 70)), frame_ms


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clip=clip_formats(), where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=12))
def test_seeking_decode_gives_the_frames_of_a_full_decode(tmp_path_factory, clip, where):
    fmt, container, (height, width), count, frame_ms = clip
    path = tmp_path_factory.mktemp("exact") / f"clip.{container}"
    try:
        encode_clip(path, moving_texture(count, height, width, seed=count), fmt, frame_ms=frame_ms)
    except av.error.FFmpegError:  # what the muxers refuse (1-2 HEVC frames with B-frames in MP4, say) is no input
        reject()
    oracle = full_decode(path)
    total = len(oracle)
    indices = [int(fraction * total) for fraction in where]  # wanted frames, in any order, repeats allowed

    reader = _PyAVReader(str(path), 0)
    assert reader.frame_count == total
    np.testing.assert_array_equal(decode_frames(path, indices, size=None, decoder="pyav"), oracle[indices])
    clip16 = decode_video(path, num_frames=16, size=None, decoder="pyav")
    np.testing.assert_array_equal(clip16.frames, oracle[sample_frame_indices(total, num_frames=16)])

    by_decord = decode_frames(path, indices, size=None, decoder="decord")
    if fmt.pix_fmt in DECORD_IDENTICAL_FORMATS:  # read by seeking: the full decode's frames
        np.testing.assert_array_equal(by_decord, oracle[indices])
    # decord itself gives other frames than a full decode on open GOPs (it is not the oracle there), reads no AV1,
    # garbles 180-degree turns and fails on narrow frames. Elsewhere its bytes are what decoder="decord" gives.
    if fmt.codec != "av1" and not fmt.rotation and not fmt.open_gop and width >= 32:
        try:
            truth = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_batch(sorted(set(indices))).asnumpy()
        except decord.DECORDError:  # e.g. a one-frame WebM: "broken metadata"; then PyAV decodes it
            truth = None
        if truth is not None:
            row = {index: i for i, index in enumerate(sorted(set(indices)))}
            np.testing.assert_array_equal(by_decord, truth[[row[i] for i in indices]])


def test_on_an_open_gop_decord_is_not_a_full_decode_and_the_default_decoder_is(tmp_path):
    # x264's open GOPs, a keyframe every 2 frames: decord's own frames differ from a one-pass decode's; the default
    # decoder ("decord", read by seeking) gives the one-pass frames.
    path = encode_clip(tmp_path / "open.mp4", moving_texture(40, 48, 64), ClipFormat(gop=2, bframes=1,
                                                                                    open_gop=True))
    oracle = full_decode(path)
    indices = list(range(1, 40, 3))
    by_decord_itself = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_batch(indices).asnumpy()
    assert not np.array_equal(by_decord_itself, oracle[indices])
    np.testing.assert_array_equal(decode_frames(path, indices, size=None, decoder="decord"), oracle[indices])


@pytest.mark.parametrize("codec", [c for c in ("h264", "hevc") if c in AVAILABLE])
def test_seeking_decodes_a_fraction_of_the_frames_a_sequential_pass_does(tmp_path, codec):
    # 10 copies of a 2-keyframe clip: 600 frames, a keyframe every 30; 4 frames wanted far apart.
    short = encode_clip(tmp_path / "short.mp4", moving_texture(60, 64, 96), ClipFormat(codec=codec, gop=30,
                                                                                      bframes=3))
    path = repeat_clip(short, tmp_path / "long.mp4", 10)
    oracle = full_decode(path)
    assert len(oracle) == 600
    wanted = [29, 200, 415, 599]
    seeking = _PyAVReader(str(path), 0)
    np.testing.assert_array_equal(seeking.get_frames(wanted), oracle[wanted])
    # From each keyframe to the frame wanted, at most: 30 + 21 + 26 + 30; B-frames nothing refers to are skipped.
    assert seeking.frames_decoded <= 107
    sequential = _PyAVReader(str(path), 0)
    sequential.index.seekable = False
    np.testing.assert_array_equal(sequential.get_frames(wanted), oracle[wanted])
    assert sequential.frames_decoded == 600


def test_decord_frames_are_read_by_seeking_where_the_bytes_agree(tmp_path, monkeypatch):
    path = encode_clip(tmp_path / "clip.mp4", moving_texture(90, 48, 64), ClipFormat(gop=15, bframes=2))
    truth = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_batch([3, 40, 77]).asnumpy()

    class NoDecord:
        def __init__(self, *args, **kwargs):
            raise AssertionError("decord itself was used")

    from pipeline.job import decode

    monkeypatch.setattr(decode, "_DecordReader", NoDecord)
    np.testing.assert_array_equal(decode_frames(path, [3, 40, 77], size=None, decoder="decord"), truth)


def test_a_stream_the_index_cannot_describe_is_decoded_sequentially(tmp_path):
    # A raw H.264 elementary stream has no timestamps per packet: numbered as the frames come out, as before.
    path = encode_clip(tmp_path / "clip.h264", moving_texture(40, 32, 48), ClipFormat(gop=10, bframes=2))
    reader = _PyAVReader(str(path), 0)
    assert not reader.index.seekable
    with av.open(str(path)) as container:
        oracle = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    np.testing.assert_array_equal(decode_frames(path, [0, 17, 39], size=None, decoder="pyav"), oracle[[0, 17, 39]])


def test_nearest_keyframes():
    assert nearest_keyframes([0, 4, 5, 6, 14, 29], [0, 10, 20]) == [0, 0, 0, 10, 10, 20]
    assert nearest_keyframes([3, 3, 9], [0]) == [0, 0, 0]
    assert nearest_keyframes([2, 7], []) == [2, 7]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_keyframe_sampling_decodes_the_keyframe_nearest_each_segment_centre(tmp_path, decoder):
    short = encode_clip(tmp_path / "short.mp4", moving_texture(50, 32, 48), ClipFormat(gop=25, bframes=3))
    path = repeat_clip(short, tmp_path / "long.mp4", 4)  # 200 frames, keyframes every 25
    oracle = full_decode(path)
    clip = decode_video(path, num_frames=8, size=None, decoder=decoder, sample="keyframes")
    centres = sample_frame_indices(200, num_frames=8)  # 12, 37, 62, ...
    assert clip.frame_indices == nearest_keyframes(centres, list(range(0, 200, 25))) == \
        [0, 25, 50, 75, 100, 125, 150, 175]
    np.testing.assert_array_equal(clip.frames, oracle[clip.frame_indices])
    with pytest.raises(ValueError, match="sampling"):
        decode_video(path, sample="nearest")
