"""Decoding: sampled RGB frames of one video, resized for the encoder.

Two decoders give the same frames for the same indices: decord (default; random access by frame index) and
PyAV (sequential decode up to the last wanted frame). Both convert to RGB with FFmpeg's swscale.

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
to RGB with FFmpeg's swscale.

Indices are clamped to the frame count the decoder reports (decord's packet count; PyAV's stream metadata or
packet count). A file whose stream ends before that count is handled by PyAV (it resamples over the frames it
really found); decord's `get_batch` can hang on such files, which only a process-level timeout can stop.
"""

from __future__ import annotations

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

    def get_frames(self, indices: list[int]) -> np.ndarray:
        unique = sorted(set(indices))
        try:
            batch = self._reader.get_batch(unique).asnumpy()
        except Exception as error:
            raise DecodeError(f"decord failed to decode frames {unique[:4]}...: {error}") from error
        if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
            raise DecodeError(f"decord returned frames of shape {batch.shape} for {len(unique)} RGB frames")
        row_of = {index: row for row, index in enumerate(unique)}
        return batch[[row_of[i] for i in indices]]


class _StreamShorterThanReported(Exception):
    def __init__(self, real_count: int):
        super().__init__(real_count)
        self.real_count = real_count


class _PyAVReader:
    def __init__(self, source: str | io.BytesIO, num_threads: int):
        self._source = source
        self._num_threads = num_threads
        with self._open() as container:
            stream = container.streams.video[0]
            self.avg_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            # Many containers (mkv, webm) leave the frame count empty; demuxing packets is cheap and exact.
            self.frame_count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)

    def _open(self):
        try:
            container = av.open(_rewound(self._source))
        except Exception as error:
            raise DecodeError(f"PyAV cannot open the video: {error}") from error
        if not container.streams.video:
            container.close()
            raise DecodeError("the file has no video stream")
        return container

    def get_frames(self, indices: list[int]) -> np.ndarray:
        wanted, found, last_position = set(indices), {}, -1
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self._num_threads:
                stream.thread_count = self._num_threads
            try:
                for last_position, frame in enumerate(container.decode(stream)):
                    if last_position in wanted:
                        found[last_position] = _upright(frame.to_ndarray(format="rgb24"), frame.rotation)
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
    """read(reader) with the chosen decoder. A rotated clip, or one that decord cannot open or decode, is read by
    PyAV (see the module docstring); when PyAV fails too, decord's error is raised."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    if decoder == "pyav" or round(_display_rotation(source) / 90) % 4:
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
) -> DecodedClip:
    """Sample, decode and resize the frames of one video.

    source: a local path, an s3:// uri, raw bytes or a binary file object.
    num_frames / fps / max_frames: frame sampling, see `sample_frame_indices` (fps wins over num_frames;
        max_frames caps fps sampling, None = no cap: the job always gives one).
    size: (height, width) of the returned frames (shorter side + centre crop); None keeps the (upright) source size.
    num_threads: decoder threads; 0 lets FFmpeg choose.
    Raises FileNotFoundError for a missing file and DecodeError for anything that is not a decodable video.
    """
    data = _as_decodable(source, s3_endpoint_url)
    sampling = dict(num_frames=num_frames, fps=fps, max_frames=max_frames)
    clip = _read_with(decoder, data, num_threads, lambda reader: _sample_and_read(reader, **sampling))
    clip.frames = resize_frames(clip.frames, size)
    return clip


def _sample_and_read(reader, *, num_frames: int | None, fps: float | None, max_frames: int | None) -> DecodedClip:
    """The sampled frames of one opened video, at the source size."""
    if reader.frame_count < 1:
        raise DecodeError("the video stream has no frames")
    if fps is not None and reader.avg_fps <= 0:
        raise DecodeError("the container gives no frame rate, so frames cannot be sampled by fps")
    sampling = dict(num_frames=num_frames, fps=fps, source_fps=reader.avg_fps, max_frames=max_frames)
    indices = sample_frame_indices(reader.frame_count, **sampling)
    try:
        frames = reader.get_frames(indices)
        source_frames = reader.frame_count
    except _StreamShorterThanReported as short:
        # The metadata over-reported the length: sample again over the frames that really exist.
        if short.real_count < 1:
            raise DecodeError("the video stream decodes to no frames") from None
        source_frames = short.real_count
        indices = sample_frame_indices(source_frames, **sampling)
        frames = reader.get_frames(indices)
    return DecodedClip(
        frames=frames,
        frame_indices=indices,
        fps=reader.avg_fps,
        source_frames=source_frames,
        source_size=(int(frames.shape[1]), int(frames.shape[2])),
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
    frames = _read_with(decoder, data, 0, lambda reader: reader.get_frames(list(frame_indices)))
    return resize_frames(frames, size)
