"""Clips of a chosen codec and GOP structure, encoded with PyAV: what the decode benchmark's corpus and the frame-
identity tests are made of (jobs/bench/bench_decode.py, tests/pipeline/job/test_decode_exact.py).

`encode_clip` encodes RGB frames with a keyframe interval, B-frames, open or closed GOPs, a pixel format, a display
rotation and, optionally, per-frame durations (a variable frame rate). `repeat_clip` makes a long video out of a
short one by copying its packets with shifted timestamps (no re-encoding), so a 10-minute 4K source costs one
short encode; every copy starts on the short clip's first keyframe, so its GOP structure repeats as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# PyAV's encoder for each codec name the corpus uses; AV1 and VP9 have no B-frames in these encoders' terms.
ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
# The smallest frame side each encoder takes safely: x265 corrupts its heap on frames under its 64-pixel CTU (seen at
# widths of 40 and 48, aborting the process a few encodes later); SVT-AV1 refuses frames under 64.
MIN_SIDE = {"h264": 1, "hevc": 64, "vp9": 1, "av1": 64}


@dataclass(frozen=True)
class ClipFormat:
    """How a clip is encoded. gop: frames from one keyframe to the next; bframes: B-frames between references
    (h264, hevc); open_gop: keyframes that later frames may predict across (h264, hevc)."""

    codec: str = "h264"
    fps: int = 30
    gop: int = 60
    bframes: int = 0
    open_gop: bool = False
    pix_fmt: str = "yuv420p"
    rotation: int = 0
    preset: str = "ultrafast"


def _codec_options(fmt: ClipFormat) -> dict[str, str]:
    if fmt.codec == "h264":
        params = f"keyint={fmt.gop}:min-keyint={fmt.gop}:scenecut=0:bframes={fmt.bframes}"
        params += ":open-gop=1" if fmt.open_gop else ""
        return {"preset": fmt.preset, "x264-params": params}
    if fmt.codec == "hevc":
        params = (f"keyint={fmt.gop}:min-keyint={fmt.gop}:scenecut=0:bframes={fmt.bframes}:"
                  f"open-gop={int(fmt.open_gop)}:log-level=none")
        return {"preset": fmt.preset, "x265-params": params}
    if fmt.codec == "vp9":
        return {"g": str(fmt.gop), "keyint_min": str(fmt.gop), "deadline": "realtime", "cpu-used": "8"}
    if fmt.codec == "av1":
        return {"g": str(fmt.gop), "preset": "12", "svtav1-params": f"keyint={fmt.gop}"}
    raise ValueError(f"unknown codec {fmt.codec!r}; choose one of {sorted(ENCODERS)}")


def encode_clip(path: str | Path, frames: Iterable[np.ndarray], fmt: ClipFormat,
                frame_ms: list[int] | None = None) -> Path:
    """Encode RGB frames (each uint8 [h, w, 3], all one size) to `path` (the container from its suffix).
    frame_ms: per-frame durations in milliseconds, cycled (a variable frame rate); None: a constant `fmt.fps`."""
    frames = iter(frames)
    first = next(frames)
    if min(first.shape[:2]) < MIN_SIDE[fmt.codec]:
        raise ValueError(f"{fmt.codec} frames need sides of at least {MIN_SIDE[fmt.codec]} px here, got "
                         f"{first.shape[1]} x {first.shape[0]}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(ENCODERS[fmt.codec], rate=fmt.fps, options=_codec_options(fmt))
        stream.width, stream.height, stream.pix_fmt = first.shape[1], first.shape[0], fmt.pix_fmt
        if fmt.rotation:
            stream.set_display_rotation(fmt.rotation)
        if frame_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for index, image in enumerate(_chain(first, frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if frame_ms is not None:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += frame_ms[index % len(frame_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]):
    yield first
    yield from rest


def repeat_clip(source: str | Path, path: str | Path, times: int) -> Path:
    """`source` played `times` times back to back in `path`, by copying its video packets with shifted timestamps.
    The source must start on a keyframe that nothing before it is predicted from (any clip encode_clip makes)."""
    with av.open(str(source)) as reader:
        stream = reader.streams.video[0]
        packets = [(bytes(p), p.pts, p.dts, p.is_keyframe, p.duration) for p in reader.demux(stream) if p.size]
        span = max(pts + (duration or 0) for _, pts, _, _, duration in packets) - min(p[1] for p in packets)
        with av.open(str(path), "w") as writer:
            out = writer.add_stream_from_template(stream, opaque=True)  # AV1's decoder names no encoder
            for copy in range(times):
                for data, pts, dts, key, duration in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts = pts + copy * span, dts + copy * span
                    packet.is_keyframe, packet.duration = key, duration
                    packet.time_base, packet.stream = stream.time_base, out
                    writer.mux(packet)
    return Path(path)


def moving_texture(count: int, height: int, width: int, seed: int = 0) -> Iterable[np.ndarray]:
    """`count` RGB frames of a random texture that drifts and brightens a little each frame: every frame differs
    from its neighbours everywhere, so predicted frames carry real residuals and a wrong frame is never equal."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height + count, width + 2 * count, 3), dtype=np.uint8)
    for index in range(count):
        window = texture[index: index + height, 2 * index: 2 * index + width].astype(np.int16)
        yield np.clip(window // 2 + 60 + (index * 7) % 64, 0, 255).astype(np.uint8)
