"""Clips of a chosen codec and GOP structure, encoded with PyAV: what the decode benchmark's corpus and the frame-
identity tests are made of (jobs/bench/bench_decode.py, tests/pipeline/job/test_decode_exact.py).

`encode_clip` encodes RGB frames with a keyframe interval, B-frames, open or closed GOPs, a pixel format, a display
rotation and, optionally, per-frame durations (a variable frame rate). `repeat_clip` makes a long video out of a
short one by copying its packets with shifted timestamps (no re-encoding), so a 10-minute 4K source costs one
short encode; every copy starts on the short clip's first keyframe, so its GOP structure repeats as it is.

The decode corpus (`REALISTIC`, `SMALL`, `build_corpus`): videos of real content (the sample clip bigbuckbunny.mp4,
scaled to 480p .. 4K) encoded once as a 10-second segment with each entry's codec and GOP structure, then repeated
up to the entry's length (10 s to 10 min): decoding costs per frame what a real encode of that size does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipeline.job.sample_clips import sample_clip_paths

# PyAV's encoder for each codec name the corpus uses; AV1 and VP9 have no B-frames in these encoders' terms.
ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
# The smallest frame side each encoder takes safely: x265 corrupts its heap on frames under its 64-pixel CTU (seen at
# widths of 40 and 48, aborting the process a few encodes later). SVT-AV1 takes 4:2:0 only.
MIN_SIDE = {"h264": 1, "hevc": 64, "vp9": 1, "av1": 1}


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


# ---------------------------------------------------------------------------------------------------------------
# the decode corpus


SEGMENT_S = 10


@dataclass(frozen=True)
class Entry:
    """One corpus video: `height`p (16:9), `minutes` long, a keyframe every `gop_s` seconds."""

    codec: str
    height: int
    minutes: float
    gop_s: float
    bframes: int

    @property
    def name(self) -> str:
        length = f"{self.minutes:g}min" if self.minutes >= 1 else f"{round(self.minutes * 60)}s"
        return f"{self.codec}-{self.height}p-{length}-gop{self.gop_s:.2g}s-b{self.bframes}"

    @property
    def container(self) -> str:
        return "webm" if self.codec == "vp9" else "mp4"


# 480p to 4K, 10 s to 10 min, a keyframe every 0.5 to 10 s, four codecs, with and without B-frames.
REALISTIC = [
    Entry("h264", 480, 1 / 6, 0.5, 3),
    Entry("h264", 720, 3, 2, 3),
    Entry("h264", 720, 10, 10, 0),
    Entry("h264", 1080, 40 / 60, 250 / 30, 3),
    Entry("h264", 1080, 10, 2, 3),
    Entry("h264", 1080, 10, 0.5, 0),
    Entry("h264", 2160, 1, 2, 3),
    Entry("hevc", 1080, 3, 2, 3),
    Entry("vp9", 720, 1, 5, 0),
    Entry("av1", 1080, 1, 2, 0),
]
# What the suite runs: seconds to make and decode.
SMALL = [Entry("h264", 144, 1 / 3, 1, 3), Entry("h264", 144, 1 / 3, 10, 0), Entry("vp9", 144, 1 / 6, 2, 0)]


def source_frames(height: int) -> list[np.ndarray]:
    """The sample clip's frames (1280 x 720), scaled to 16:9 at `height` (even sizes)."""
    width = (height * 16 // 9) // 2 * 2
    with av.open(str(sample_clip_paths()["bigbuckbunny"])) as container:
        return [np.asarray(frame.to_image().resize((width, height), Image.Resampling.BILINEAR))
                for frame in container.decode(video=0)]


def build_corpus(entries: list[Entry], folder: Path, fps: int = 30) -> dict[Entry, Path]:
    """{entry: its video in `folder`}, encoding those not there yet (a 4K entry takes a minute or two)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, by_height = {}, {}
    for entry in entries:
        path = folder / f"{entry.name}.{entry.container}"
        if not path.exists():
            if entry.height not in by_height:
                by_height[entry.height] = source_frames(entry.height)
            frames = by_height[entry.height]
            segment_frames = min(SEGMENT_S * fps, max(1, round(entry.minutes * 60 * fps)))
            gop = max(1, round(entry.gop_s * fps))
            fmt = ClipFormat(codec=entry.codec, fps=fps, gop=gop, bframes=entry.bframes,
                             preset="veryfast" if entry.codec == "h264" else "ultrafast")
            print(f"  encoding {path.name}", flush=True)
            segment = folder / f"_segment.{entry.container}"
            encode_clip(segment, (frames[i % len(frames)] for i in range(segment_frames)), fmt)
            repeat_clip(segment, path, max(1, round(entry.minutes * 60 * fps / segment_frames)))
            segment.unlink()
        paths[entry] = path
    return paths
