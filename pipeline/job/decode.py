"""Decoding: sampled RGB frames of one video, resized for the encoder.

Two decoders give the same frames for the same indices: decord (default) and PyAV. Frames are numbered by
presentation time, as decord numbers them. PyAV seeks by the packet index (read by demuxing, nothing decoded):
to the keyframe before each wanted frame, or on from the last frame decoded when that is nearer; frames no other
frame is predicted from are not decoded unless wanted (h264, hevc); a frame whose successor needs a seek anyway is
drained out of the decoder rather than pushed out by decoding more. The frames are exactly those of a full decode
from the start (tests/pipeline/job/test_decode_exact.py); a stream whose index cannot be trusted (packets without
timestamps, duplicates, discarded packets) is decoded from the start in one pass. With `decoder="decord"`, 8-bit
4:2:0 video is read by PyAV's seeking reader, which gives decord's bytes and decodes fewer frames (docs/scaling.md,
"Decoding"); decord itself reads the other formats. (On open GOPs decord's own frames are not a full decode's; the
seeking reader's are.)

`sample="keyframes"` (`nearest_keyframes`): the keyframe nearest to each sampled index instead, decoded alone.

Frame sampling (`sample_frame_indices`):
  - `num_frames=T`: T frames spread uniformly over the whole clip, one at the centre of each of T equal
    segments: index_i = floor((i + 0.5) * total / T).
    Short clips (fewer than T frames): the same formula repeats frames, so T frames always come back, in order,
    each source frame floor(T/total) or ceil(T/total) times. Same-shaped clips keep encoder batches and
    stored rows uniform; `frame_indices` records the repeats.
  - `fps=F` (takes precedence; `num_frames` is then ignored): one frame every 1/F seconds from t=0
    (index = floor(k * source_fps / F)), never the same frame twice (F above the source rate gives every frame).
    T grows with the clip's length; `max_frames` caps it by thinning the list uniformly with the rule above.

    The frame rate is the container's average rate, so on a variable-frame-rate source fps sampling is by frame
    index at that average rate, not by timestamp.

Resize (`resize_frames`): scale the shorter side to fit the target, then take the centre crop; the aspect ratio
is kept and nothing is padded. The crop box is computed in whole pixels with integer arithmetic, so any source
size (1x1, 1x4000 banners, odd sizes, 8K) gives exactly the target size. Done in one PIL call (crop box + bicubic
resampling, antialiased when shrinking).

Orientation: frames come out upright. A display matrix in the container (phones record portrait video as
landscape frames plus a rotation) is applied in quarter turns; mirroring in the matrix is not applied.

Decoders: decord 0.6 turns 90/270-degree clips itself but garbles 180-degree ones, cannot open AV1 (its bundled
FFmpeg predates it) and fails on some narrow frame widths (1-16 px). So a clip with a rotation is always decoded
by PyAV, and a clip that decord cannot open or decode is decoded again by PyAV; the decord error is raised only
when PyAV fails too. Any pixel format FFmpeg decodes works (8/10-bit 4:2:0, 4:4:4, grey): both decoders convert
to RGB with FFmpeg's swscale (decord's older build differs by up to 2 levels outside 8-bit 4:2:0).

Indices are clamped to the frame count the decoder reports (decord's packet count; PyAV's stream metadata or
packet count). A file whose stream ends before that count is handled by PyAV (it resamples over the frames it
really found); decord's `get_batch` can hang on such files, which only a process-level timeout can stop.
"""

from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

# PyAV is imported before decord can be: decord bundles an older FFmpeg/libvpx, and whichever loads first wins
# the shared symbols. With decord first, PyAV's libvpx encoders fail to open; the other order is safe for both.
import av  # noqa: F401  (import order matters, see above)
import numpy as np
from PIL import Image

from pipeline.job.sources import canonical_uri, is_s3_uri, read_bytes

DECODERS = ("decord", "pyav")
SAMPLING = ("exact", "keyframes")  # the sampled frames, or the keyframe nearest to each
VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, io.IOBase]


class DecodeError(Exception):
    """The input is not a video we can decode (empty, corrupt, no video stream, no frames)."""


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, h, w, 3], RGB, already resized to the requested size
    frame_indices: list[int]  # source frame index of each row of `frames`
    fps: float  # source average frame rate (0.0 when the container does not say)
    source_frames: int  # frame count of the source
    source_size: tuple[int, int] = (0, 0)  # (height, width) of the source frames
    frames_decoded: int = 0  # frames the decoder decoded to give these (decord's: counted by its seek rule)


# ---------------------------------------------------------------------------------------------------------------
# sampling


def _segment_centres(total: int, count: int) -> list[int]:
    """floor((i + 0.5) * total / count) for i < count: uniform, in order, repeating when total < count."""
    return [int((2 * i + 1) * total // (2 * count)) for i in range(count)]


def sample_frame_indices(
    total_frames: int,
    *,
    num_frames: int | None = 16,
    fps: float | None = None,
    source_fps: float = 0.0,
    max_frames: int | None = None,
) -> list[int]:
    """Source frame indices to decode; see the module docstring for the rules."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got total_frames={total_frames}")
    if fps is None:
        if num_frames is None or num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 when fps is not given, got {num_frames}")
        return _segment_centres(total_frames, num_frames)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if source_fps <= 0:
        raise ValueError("sampling by fps needs the source frame rate (source_fps > 0)")
    step = source_fps / fps
    count = int(np.ceil(total_frames / step - 1e-9))  # every k with k * step < total_frames
    indices = sorted({min(int(np.floor(k * step + 1e-9)), total_frames - 1) for k in range(count)})
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in _segment_centres(len(indices), max_frames)]
    return indices


def frames_to_decode(keyframes: list[int], wanted: list[int]) -> int:
    """Frames a decoder decodes to give `wanted` (ascending) when it goes from the keyframe before each wanted frame,
    or on from the previous one when that is nearer, decoding every frame on the way (no frame skipped)."""
    decoded, position = 0, -1
    for frame in wanted:
        after = bisect.bisect_right(keyframes, frame) - 1
        start = keyframes[after] if after >= 0 else 0
        decoded += frame - (position if start <= position else start - 1)
        position = frame
    return decoded


def nearest_keyframes(indices: list[int], keyframes: list[int]) -> list[int]:
    """Each index replaced by the nearest keyframe's (the earlier one on a tie); the order is kept and a keyframe
    may repeat. No keyframe listed (a stream without keyframe flags): the indices as they are."""
    if not keyframes:
        return list(indices)
    nearest = []
    for index in indices:
        after = bisect.bisect_left(keyframes, index)
        candidates = keyframes[max(0, after - 1): after + 1]
        nearest.append(min(candidates, key=lambda key: (abs(key - index), key)))
    return nearest


# ---------------------------------------------------------------------------------------------------------------
# resizing


def _centre_crop_box(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """The largest centred region of the source with the target's aspect ratio, in whole pixels, as a PIL box
    (l, t, r, b). Integer arithmetic only: the box is always inside the frame and at least 1x1."""
    if width * target_h >= height * target_w:  # wider than the target: full height, width rounded to the aspect
        crop_h = height
        crop_w = min(width, max(1, (2 * height * target_w + target_h) // (2 * target_h)))
    else:
        crop_w = width
        crop_h = min(height, max(1, (2 * width * target_h + target_w) // (2 * target_w)))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def resize_frames(frames: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, size[0], size[1], 3]: shorter side scaled to fit, centre crop, bicubic."""
    if size is None or tuple(frames.shape[1:3]) == tuple(size):
        return frames
    target_h, target_w = size
    box = _centre_crop_box(frames.shape[1], frames.shape[2], target_h, target_w)
    resized = [
        np.asarray(Image.fromarray(frame).resize((target_w, target_h), Image.Resampling.BICUBIC, box=box))
        for frame in frames
    ]
    return np.stack(resized)


def _resized(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """One frame [H, W, 3] resized as `resize_frames` resizes each: frames are resized as they are decoded, so a
    video's full-size frames are never all in memory at once."""
    return resize_frames(image[None], size)[0]


def _upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """[h, w, 3] -> the image turned by `rotation` degrees counter-clockwise (a display matrix's rotation, as
    PyAV's `VideoFrame.rotation` reports it), in quarter turns."""
    turns = round(rotation / 90) % 4
    return np.rot90(image, turns) if turns else image


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _as_decodable(source: VideoSource, s3_endpoint_url: str | None) -> str | io.BytesIO:
    """A local path (str) or an in-memory file; S3 objects are fetched whole."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, io.IOBase):
        data = source.read()
    elif is_s3_uri(str(source)):
        data = read_bytes(str(source), s3_endpoint_url=s3_endpoint_url)
    else:
        path = Path(canonical_uri(os.fspath(source)))
        if path.is_dir():
            raise IsADirectoryError(f"a directory, not a video: {source}")
        if not path.is_file():
            if path.exists():  # a FIFO, socket or device: opening it could block, so it is not opened
                raise DecodeError(f"not a regular file (FIFO, socket or device): {source}")
            raise FileNotFoundError(f"video not found: {source}")
        if path.stat().st_size == 0:
            raise DecodeError(f"empty file: {source}")
        with open(path, "rb"):  # an unreadable file fails here as PermissionError, not as a vague decoder error
            pass
        return str(path)
    if not data:
        raise DecodeError("empty input (0 bytes)")
    return io.BytesIO(data)


def _rewound(source: str | io.BytesIO) -> str | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


# ---------------------------------------------------------------------------------------------------------------
# decoders: each reports frame_count / avg_fps and returns the frames at given indices (in the given order)


class _DecordReader:
    def __init__(self, source: str | io.BytesIO, num_threads: int):
        import decord

        try:
            self._reader = decord.VideoReader(_rewound(source), ctx=decord.cpu(0), num_threads=num_threads)
        except Exception as error:  # decord raises bare RuntimeError/DECORDError for every open failure
            if "cannot find video stream" in str(error):  # say it as PyAV does, without decord's internals
                raise DecodeError("the file has no video stream") from error
            raise DecodeError(f"decord cannot open the video: {error}") from error
        self.frame_count = len(self._reader)
        self.avg_fps = float(self._reader.get_avg_fps() or 0.0)
        self.frames_decoded = 0

    @property
    def keyframe_indices(self) -> list[int]:
        return [int(i) for i in self._reader.get_key_indices()]

    def get_frames(self, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """The frames at `indices` (in that order), resized to `size`; sets `source_size`."""
        unique = sorted(set(indices))
        try:
            batch = self._reader.get_batch(unique).asnumpy()
        except Exception as error:
            raise DecodeError(f"decord failed to decode frames {unique[:4]}...: {error}") from error
        if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
            raise DecodeError(f"decord returned frames of shape {batch.shape} for {len(unique)} RGB frames")
        row_of = {index: row for row, index in enumerate(unique)}
        self.frames_decoded += frames_to_decode(self.keyframe_indices, unique)
        self.source_size = (int(batch.shape[1]), int(batch.shape[2]))
        return resize_frames(batch[[row_of[i] for i in indices]], size)


class _StreamShorterThanReported(Exception):
    def __init__(self, real_count: int):
        super().__init__(real_count)
        self.real_count = real_count


class _SeekMissed(Exception):
    """A seek did not give the wanted frame: the packet index does not describe the stream."""


# Codecs whose decoders skip non-reference frames exactly when asked per packet (AVDISCARD_NONREF): a skipped frame
# is one that no other frame is predicted from, so the frames that are decoded do not change.
SKIP_NONREF_CODECS = ("h264", "hevc")
# Pixel formats whose conversion to RGB by PyAV is byte-identical to decord's (tests/pipeline/job/
# test_decode_exact.py); 10-bit, 4:4:4 and grey sources differ by up to 2 levels, so decord decodes those itself.
DECORD_IDENTICAL_FORMATS = ("yuv420p", "yuvj420p")


@dataclass
class _PacketIndex:
    """A stream's video packets in presentation order, read by demuxing alone (nothing is decoded).

    Frame i is the packet with the i-th smallest pts, as decord numbers frames. `seekable`: the index describes the
    stream well enough to seek by it (every packet timed, no two alike, none that the demuxer discards, a keyframe
    first)."""

    pts: list[int]  # presentation time of frame i, ascending
    keyframes: list[int]  # frame indices of the keyframes, ascending
    seekable: bool

    @classmethod
    def of(cls, container, stream) -> _PacketIndex:
        timed, seekable = [], True
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if packet.pts is None or packet.is_discard:
                seekable = False
                continue
            timed.append((packet.pts, packet.is_keyframe))
        timed.sort()
        pts = [t for t, _ in timed]
        keyframes = [i for i, (_, key) in enumerate(timed) if key]
        seekable = seekable and bool(keyframes) and keyframes[0] == 0 and len(set(pts)) == len(pts)
        return cls(pts, keyframes, seekable)

    def keyframe_before(self, frame: int) -> int:
        """The position in `keyframes` of the last keyframe at or before `frame`."""
        return bisect.bisect_right(self.keyframes, frame) - 1


class _PyAVReader:
    """PyAV. Seeks: each wanted frame is decoded from the keyframe before it, or on from the last frame decoded when
    that is nearer, and frames that nothing is predicted from are skipped unless wanted (h264, hevc). A stream its
    packet index cannot describe is decoded sequentially from the start, numbering frames as they come out;
    with `sequential_fallback=False` such a stream raises DecodeError instead."""

    def __init__(self, source: str | io.BytesIO, num_threads: int, sequential_fallback: bool = True):
        self._source = source
        self._num_threads = num_threads
        self._sequential_fallback = sequential_fallback
        with self._open() as container:
            stream = container.streams.video[0]
            self.avg_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            self.pix_fmt = stream.codec_context.pix_fmt
            self.index = _PacketIndex.of(container, stream)
            # Many containers (mkv, webm) leave the frame count empty; the demuxed packets count exactly.
            self.frame_count = stream.frames or len(self.index.pts)
        self.index.seekable = self.index.seekable and self.frame_count == len(self.index.pts)
        self._frame_at = {pts: i for i, pts in enumerate(self.index.pts)}
        self.frames_decoded = 0  # frames the decoder gave so far (skipped frames are not decoded)

    @property
    def keyframe_indices(self) -> list[int]:
        return self.index.keyframes

    @property
    def gives_decord_frames(self) -> bool:
        """Whether this reader's frames are byte for byte decord's (seekable, and a format converted alike)."""
        return self.index.seekable and self.pix_fmt in DECORD_IDENTICAL_FORMATS

    def _open(self):
        try:
            container = av.open(_rewound(self._source))
        except Exception as error:
            raise DecodeError(f"PyAV cannot open the video: {error}") from error
        if not container.streams.video:
            container.close()
            raise DecodeError("the file has no video stream")
        return container

    def get_frames(self, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """The frames at `indices` (in that order), upright and resized to `size`; sets `source_size`."""
        if self.index.seekable:
            if max(indices) >= len(self.index.pts):
                raise _StreamShorterThanReported(len(self.index.pts))
            try:
                found = self._seek_and_decode(sorted(set(indices)), size)
                return np.stack([found[i] for i in indices])
            except _SeekMissed as missed:
                if not self._sequential_fallback:
                    raise DecodeError(f"seeking by the packet index failed: {missed}") from None
        return self._decode_sequentially(indices, size)

    def _keep(self, frame, size: tuple[int, int] | None) -> np.ndarray:
        image = _upright(frame.to_ndarray(format="rgb24"), frame.rotation)
        self.source_size = (int(image.shape[0]), int(image.shape[1]))
        return _resized(image, size)

    def _seek_and_decode(self, wanted: list[int], size: tuple[int, int] | None) -> dict[int, np.ndarray]:
        """{frame index: RGB image [h, w, 3], resized to `size`} of the wanted frames (ascending indices)."""
        index, found = self.index, {}
        wanted_at = {index.pts[i]: i for i in wanted}
        keyframe_of = {i: index.keyframes[index.keyframe_before(i)] for i in wanted}
        with self._open() as container:
            stream = container.streams.video[0]
            context = stream.codec_context
            # Slice threads only: with frame threads a packet's skip_frame setting would reach another packet.
            context.thread_type = "SLICE"
            context.thread_count = self._num_threads
            skip = "NONREF" if context.name in SKIP_NONREF_CODECS else "DEFAULT"
            last_out, sent = -1, None  # the frame the decoder gave last; pts sent since the last seek (None: drained)
            for position, target in enumerate(wanted):
                if target in found:
                    continue
                if sent is None or keyframe_of[target] > last_out:  # the keyframe is ahead: seeking decodes less
                    # FFmpeg seeks to the last keyframe whose pts is at or before the one asked (MP4 and Matroska).
                    container.seek(index.pts[keyframe_of[target]], backward=True, stream=stream)
                    sent = set()
                # When the next frame wanted is reached by a seek anyway, the decoder is drained once this one's
                # packet is in, instead of decoding later frames to push it out of its reordering delay.
                later = position + 1 < len(wanted) and keyframe_of[wanted[position + 1]] <= target
                last_out = self._decode_until(container, stream, target, wanted_at, found, skip, size, sent,
                                              drain=not later)
                if not later:
                    sent = None
        return found

    def _decode_until(self, container, stream, target: int, wanted_at: dict[int, int], found: dict[int, np.ndarray],
                      skip: str, size: tuple[int, int] | None, sent: set[int], drain: bool) -> int:
        """Feed packets until frame `target` comes out, keeping the frames of `wanted_at` ({pts: frame index}) on
        the way and skipping the others as `skip` says; with `drain`, the decoder is drained as soon as the target's
        packet is in (`sent`: the pts fed since the last seek) -> the last frame out. Raises _SeekMissed when the
        decoder gives a frame the index does not know, or ends without `target`."""
        context, last_out, target_pts = stream.codec_context, -1, self.index.pts[target]

        def take(frames) -> None:
            nonlocal last_out
            for frame in frames:
                if frame.pts not in self._frame_at:
                    raise _SeekMissed(f"the decoder gave a frame at pts {frame.pts}, which no packet has")
                last_out = self._frame_at[frame.pts]
                self.frames_decoded += 1
                if frame.pts in wanted_at:
                    found[wanted_at[frame.pts]] = self._keep(frame, size)

        try:
            if drain and target_pts in sent:
                take(context.decode(None))
            else:
                for packet in container.demux(stream):
                    sent.add(packet.pts)
                    context.skip_frame = "DEFAULT" if packet.pts in wanted_at else skip
                    take(context.decode(packet if packet.size else None))
                    if drain and packet.pts == target_pts:
                        take(context.decode(None))
                        break
                    if last_out >= target:
                        break
        except _SeekMissed:
            raise
        except Exception as error:
            raise DecodeError(f"PyAV failed while decoding towards frame {target}: {error}") from error
        if target not in found:
            raise _SeekMissed(f"frame {target} did not come out (last frame out: {last_out})")
        return last_out

    def _decode_sequentially(self, indices: list[int], size: tuple[int, int] | None) -> np.ndarray:
        wanted, found, last_position = set(indices), {}, -1
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self._num_threads:
                stream.thread_count = self._num_threads
            try:
                for last_position, frame in enumerate(container.decode(stream)):
                    self.frames_decoded += 1
                    if last_position in wanted:
                        found[last_position] = self._keep(frame, size)
                    if last_position >= max(wanted):
                        break
            except Exception as error:
                raise DecodeError(f"PyAV failed while decoding frame {last_position + 1}: {error}") from error
        if len(found) < len(wanted):
            raise _StreamShorterThanReported(last_position + 1)
        return np.stack([found[i] for i in indices])


def _display_rotation(source: str | io.BytesIO) -> float:
    """Degrees counter-clockwise that the container's display matrix turns the frames by (0 when it has none).
    FFmpeg attaches the matrix to decoded frames, so the first frame is decoded. 0 for a file PyAV cannot read:
    the decoder that reads it reports the error."""
    try:
        with av.open(_rewound(source)) as container:
            if not container.streams.video:
                return 0.0
            for frame in container.decode(container.streams.video[0]):
                return float(frame.rotation)
    except Exception:  # any failure here is reported by the decoder itself, in its own words
        return 0.0
    return 0.0


def _read_with(decoder: str, source: str | io.BytesIO, num_threads: int, read):
    """read(reader) with the chosen decoder.

    decord's frames are read by PyAV's seeking reader wherever the two give the same bytes (a seekable stream of a
    format they convert alike): it decodes fewer frames per frame kept (docs/scaling.md, "Decoding"). Otherwise a
    rotated clip, or one that decord cannot open or decode, is read by PyAV (see the module docstring); when PyAV
    fails too, decord's error is raised."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    if decoder == "pyav":
        return read(_PyAVReader(source, num_threads))
    try:
        seeking = _PyAVReader(source, num_threads, sequential_fallback=False)
        if seeking.gives_decord_frames:
            return read(seeking)
    except DecodeError:  # decord may still read it: as before, its own error is the one reported
        pass
    if round(_display_rotation(source) / 90) % 4:
        return read(_PyAVReader(source, num_threads))
    try:
        return read(_DecordReader(source, num_threads))
    except DecodeError as decord_error:
        try:
            return read(_PyAVReader(source, num_threads))
        except DecodeError:
            raise decord_error from None


# ---------------------------------------------------------------------------------------------------------------
# entry point


def decode_video(
    source: VideoSource,
    *,
    num_frames: int | None = 16,
    fps: float | None = None,
    size: tuple[int, int] | None = (224, 224),
    decoder: str = "decord",
    s3_endpoint_url: str | None = None,
    num_threads: int = 0,
    max_frames: int | None = None,
    sample: str = "exact",
) -> DecodedClip:
    """Sample, decode and resize the frames of one video.

    source: a local path, an s3:// uri, raw bytes or a binary file object.
    num_frames / fps / max_frames: frame sampling, see `sample_frame_indices` (fps wins over num_frames;
        max_frames caps fps sampling, None = no cap: the job always gives one).
    sample: "exact" decodes the sampled frames; "keyframes" the keyframe nearest to each (see `nearest_keyframes`).
    size: (height, width) of the returned frames (shorter side + centre crop); None keeps the (upright) source size.
    num_threads: decoder threads; 0 lets FFmpeg choose.
    Raises FileNotFoundError for a missing file and DecodeError for anything that is not a decodable video.
    """
    data = _as_decodable(source, s3_endpoint_url)
    if sample not in SAMPLING:
        raise ValueError(f"unknown sampling {sample!r}; choose one of {SAMPLING}")
    sampling = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, keyframes=sample == "keyframes")
    return _read_with(decoder, data, num_threads, lambda reader: _sample_and_read(reader, size=size, **sampling))


def _sample_and_read(reader, *, size: tuple[int, int] | None, num_frames: int | None, fps: float | None,
                     max_frames: int | None, keyframes: bool) -> DecodedClip:
    """The sampled frames of one opened video, resized to `size`."""
    if reader.frame_count < 1:
        raise DecodeError("the video stream has no frames")
    if fps is not None and reader.avg_fps <= 0:
        raise DecodeError("the container gives no frame rate, so frames cannot be sampled by fps")
    sampling = dict(num_frames=num_frames, fps=fps, source_fps=reader.avg_fps, max_frames=max_frames)

    def indices_over(total: int) -> list[int]:
        indices = sample_frame_indices(total, **sampling)
        return nearest_keyframes(indices, [k for k in reader.keyframe_indices if k < total]) if keyframes else indices

    indices = indices_over(reader.frame_count)
    try:
        frames = reader.get_frames(indices, size)
        source_frames = reader.frame_count
    except _StreamShorterThanReported as short:
        # The metadata over-reported the length: sample again over the frames that really exist.
        if short.real_count < 1:
            raise DecodeError("the video stream decodes to no frames") from None
        source_frames = short.real_count
        indices = indices_over(source_frames)
        frames = reader.get_frames(indices, size)
    return DecodedClip(
        frames=frames,
        frame_indices=indices,
        fps=reader.avg_fps,
        source_frames=source_frames,
        source_size=reader.source_size,
        frames_decoded=reader.frames_decoded,
    )


def decode_frames(
    source: VideoSource,
    frame_indices: list[int],
    *,
    size: tuple[int, int] | None = (224, 224),
    decoder: str = "decord",
    s3_endpoint_url: str | None = None,
) -> np.ndarray:
    """The frames at exactly these source indices (e.g. a stored row's `frame_indices`), resized as decode_video.

    -> uint8 [len(frame_indices), h, w, 3]. Raises like `decode_video`.
    """
    data = _as_decodable(source, s3_endpoint_url)
    return _read_with(decoder, data, 0, lambda reader: reader.get_frames(list(frame_indices), size))
