"""Gallery videos cut from a decoded clip, and their altered copies: pure numpy / PIL on uint8 frames.

A clip is decoded once, `2 * frames` frames per segment spread uniformly over the whole clip; segment s owns
positions [2Ts, 2T(s+1)) and its video is every other one of them. Its copies: temporal_shift (the same pattern
started a quarter of a segment later, at odd offsets so that no sampled frame is shared), crop, resize (a
low-resolution copy) and colour (see each function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

ALTERATIONS = ("temporal_shift", "crop", "resize", "colour")


@dataclass
class SegmentFrames:
    """One gallery video cut from a clip, and its altered copies (all uint8 [T, h, w, 3])."""

    video_id: str  # "<clip name>/<segment index>"
    frames: np.ndarray
    altered: dict[str, np.ndarray] = field(default_factory=dict)


def shift_positions(frames: int) -> int:
    """Positions the temporal-shift query is moved by: about a quarter of a segment (2T positions), odd so that
    it falls between the original's sampled positions (which are even)."""
    return 2 * (frames // 4) + 1


def segment_positions(segment: int, segments: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the clip's 2*T*segments decoded frames) of a segment's video and of its shifted copy."""
    window = 2 * frames
    original = segment * window + 2 * np.arange(frames)
    shift = shift_positions(frames)
    # The last segment has no later frames to move into, so its copy moves earlier instead.
    shifted = original - shift if segment == segments - 1 and segments > 1 else original + shift
    return original, np.clip(shifted, 0, segments * window - 1)


def crop_frames(frames: np.ndarray, keep: float = 0.7) -> np.ndarray:
    """A keep x keep window off the top-left corner (offset by 5% of each side), scaled back to full size."""
    height, width = frames.shape[1:3]
    left, top = 0.05 * width, 0.05 * height
    box = (left, top, left + keep * width, top + keep * height)
    return _map_images(frames, lambda image: image.resize((width, height), Image.Resampling.BICUBIC, box=box))


def low_resolution_frames(frames: np.ndarray, factor: int = 3) -> np.ndarray:
    """Shrunk by `factor` on each side and scaled back up: fine detail is lost, layout is kept."""
    height, width = frames.shape[1:3]
    small = (max(1, width // factor), max(1, height // factor))
    return _map_images(frames, lambda image: image.resize(small, Image.Resampling.BILINEAR)
                       .resize((width, height), Image.Resampling.BICUBIC))


def recoloured_frames(frames: np.ndarray, hue_degrees: float = 30.0, saturation: float = 0.6,
                      brightness: float = 1.15) -> np.ndarray:
    """Hue rotated, saturation and brightness scaled (as a colour-graded re-upload would be)."""
    hue_steps = int(round(hue_degrees / 360.0 * 256))

    def recolour(image: Image.Image) -> Image.Image:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue_steps) % 256
        rotated = Image.fromarray(hsv, mode="HSV").convert("RGB")
        return ImageEnhance.Brightness(ImageEnhance.Color(rotated).enhance(saturation)).enhance(brightness)

    return _map_images(frames, recolour)


def _map_images(frames: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(change(Image.fromarray(frame))) for frame in frames])


FRAME_ALTERATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "crop": crop_frames,
    "resize": low_resolution_frames,
    "colour": recoloured_frames,
}


def split_clip(name: str, decoded: np.ndarray, segments: int, frames: int) -> list[SegmentFrames]:
    """A clip's decoded frames [2*T*segments, h, w, 3] -> its segments, each with all four altered copies."""
    if decoded.shape[0] != 2 * frames * segments:
        raise ValueError(f"{name}: expected {2 * frames * segments} decoded frames, got {decoded.shape[0]}")
    videos = []
    for segment in range(segments):
        original, shifted = segment_positions(segment, segments, frames)
        video = SegmentFrames(f"{name}/{segment}", decoded[original])
        video.altered["temporal_shift"] = decoded[shifted]
        for alteration, change in FRAME_ALTERATIONS.items():
            video.altered[alteration] = change(video.frames)
        videos.append(video)
    return videos
