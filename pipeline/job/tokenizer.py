"""One video -> its compressed tokens, made exactly as an output's rows are: the one place that runs
decode -> encode -> compress.

The settings come from the record every output stores (`JobConfig.output_settings()`, kept in settings.json as
`OutputContract.settings`): sampling (frames, or fps with max_frames), encoder, layer and input size, K (fixed, or the adaptive
rule with its range) and the seed. Only runtime choices that change how, not what, are given apart: the device,
the S3 endpoint, a decode timeout and (search, training) another decoder.

The Ray stages call the steps separately (decode in the decode actors, encode and compress of a batch in the
encoder actors); everything else calls `tokenize` for one whole video.

Readers (pipeline.readers) reach the job only through this module. Besides VideoTokenizer it gives them
`DecodeError` (what decoding a video that cannot be read raises), `list_videos` (the videos under an input: a
folder, an S3 prefix or a manifest) and `load_encoder` (an encoder by name, as VideoTokenizer loads it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import tokendyn
from pipeline.job.decode import DecodedClip, DecodeError, VideoSource, decode_video
from pipeline.job.encoders import Encoder, encoder_input_size, load_encoder
from pipeline.job.sources import list_videos
from pipeline.job.watchdog import TimeLimitedRunner
from pipeline.store.contract_fields import compress_kwargs, decode_kwargs

__all__ = ["VideoTokenizer", "DecodeError", "list_videos", "load_encoder"]

if TYPE_CHECKING:
    from pipeline.store.contract import OutputContract


class VideoTokenizer:
    """decode -> encode -> compress with one output's settings. The encoder loads on first use (or is given)."""

    def __init__(self, settings: OutputContract | dict[str, Any], *, device: str = "cpu",
                 s3_endpoint_url: str | None = None, decode_timeout_s: float | None = None,
                 decoder: str | None = None, encoder: Encoder | None = None,
                 input_size: tuple[int, int] | None = None) -> None:
        """settings: an output's contract or its settings dict (JobConfig.output_settings()). A contract's
        resolved layer is used for the encoder. decoder: another decoder than the recorded one (same frames).
        decode_timeout_s: decode in a child process that is killed after this long (pipeline.job.watchdog).
        encoder, input_size: an encoder already loaded, or its input size (decoding then needs no encoder)."""
        contract = None if isinstance(settings, dict) else settings  # the contract's layer is the resolved one
        self.settings = dict(contract.settings if contract else settings)
        self.layer = contract.layer if contract else self.settings.get("layer")
        self.device = device
        self.s3_endpoint_url = s3_endpoint_url
        self.decode_timeout_s = decode_timeout_s
        self.decode_kwargs = {**decode_kwargs(self.settings), **({"decoder": decoder} if decoder else {})}
        self.compress_kwargs = compress_kwargs(self.settings)
        self._encoder = encoder
        self._input_size = input_size
        self._runner: TimeLimitedRunner | None = None

    # ---- the steps ------------------------------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.settings["encoder"], layer=self.layer, device=self.device,
                                         input_size=self.settings.get("input_size"))
        return self._encoder

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) frames are decoded at: the encoder's input, read without loading it when not loaded."""
        if self._input_size is None:
            self._input_size = tuple(self._encoder.input_size if self._encoder is not None
                                     else encoder_input_size(self.settings["encoder"],
                                                             self.settings.get("input_size")))
        return self._input_size

    def decode(self, source: VideoSource) -> DecodedClip:
        """Sample and decode the frames of one video at the encoder's input size."""
        kwargs = dict(**self.decode_kwargs, size=self.input_size, s3_endpoint_url=self.s3_endpoint_url)
        if self.decode_timeout_s is None:
            return decode_video(source, **kwargs)
        if self._runner is None:
            self._runner = TimeLimitedRunner()
        return self._runner.call(decode_video, source, timeout_s=self.decode_timeout_s, **kwargs)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [N, h, w, 3] (one video's, or a batch's back to back) -> tokens [N, gh, gw, D]."""
        with torch.inference_mode():
            return self.encoder.encode(frames)

    def compress(self, tokens: torch.Tensor) -> tokendyn.CompressedVideo:
        """One video's tokens [T, gh, gw, D] -> its base and dynamics map."""
        return tokendyn.compress(tokens, **self.compress_kwargs)

    def compress_batch(self, videos: list[torch.Tensor]) -> list[tokendyn.CompressedVideo]:
        """Several videos' tokens in one batched fit, each result identical to `compress` of the video alone."""
        return tokendyn.compress_batch(videos, **self.compress_kwargs)

    # ---- the whole sequence ---------------------------------------------------------------------------------------
    def tokenize(self, source: VideoSource, marks: dict[str, float] | None = None
                 ) -> tuple[DecodedClip, tokendyn.CompressedVideo]:
        """One video, decoded, encoded and compressed -> (its decoded clip, its compressed tokens).
        marks: when given, gets time.perf_counter() at the end of each step ("decode_s", "encode_s", "compress_s")."""
        marks = {} if marks is None else marks
        clip = self.decode(source)
        marks["decode_s"] = time.perf_counter()
        tokens = self.encode(clip.frames)
        marks["encode_s"] = time.perf_counter()
        video = self.compress(tokens)
        marks["compress_s"] = time.perf_counter()
        return clip, video

    def close(self) -> None:
        """Stop the decode child process, if one was started."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None
