"""The settings contract of an output: what every video row in it was made with.

The job records it at the output root as `settings.json` (written whole, before the first video row is committed):

    {"schema_version": 1,
     "settings": {"decoder": "decord", "frames": 16, "encoder": "efficientnet-lite0", "layer": null, "k": 32,
                  "seed": 0, "base_dtype": "float16"},
     "encoder": {"name": "efficientnet-lite0", "layer": null, "dim": 1280},
     "recorded_by_run": "20260101T000000-abcdef", "recorded_at": "2026-01-01T00:00:00Z"}

`settings` is `JobConfig.output_settings()` of the run that recorded it (sampling is `frames`, or `fps` with
`max_frames`; K is `k`, or `k` = 0 with `k_min`, `k_max`, `k_rule` and, for the fidelity rule, `target_fidelity`);
`encoder` is what the encoder resolved to: its name as the rows record it, the hidden layer used, the token width.

A run whose settings differ is refused before it touches the output (`check_run`). Readers (search, the training
cache) take the settings from here (`read_contract`), never from the last run.json. Outputs written before
settings.json existed are adopted from their rows and run.json when those agree on everything (`adopt_legacy`);
otherwise they are refused with the reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from pipeline.store.contract_fields import CONTRACT_DEFAULTS, compress_kwargs, decode_kwargs, settings_with_defaults
from pipeline.store.schema import SCHEMA_VERSION, SchemaVersionError
from pipeline.store.storage import OutputStore

_BASE_DTYPES = {pa.float16(): "float16", pa.float32(): "float32"}
HOW_TO_PROCEED = ("Write to another --output, or re-run with --rebuild to delete what this output holds and start "
                  "it over with this run's settings.")


class RunSettings(Protocol):
    """What the store needs of a run's configuration (pipeline.job.config.JobConfig)."""

    def output_settings(self) -> dict[str, Any]: ...


class ContractError(ValueError):
    """The output's settings and the caller's cannot be reconciled; the message says why and what to do."""


class SettingsMismatch(ContractError):
    """A run asks for other settings than the output's rows were made with."""


class SettingsUnknown(ContractError):
    """The output holds rows but what they were made with cannot be told for sure."""


@dataclass(frozen=True)
class OutputContract:
    """What every video row of one output was made with."""

    settings: dict[str, Any]  # JobConfig.output_settings() of the runs that wrote the output
    encoder: str  # the encoder's name as the rows record it
    layer: int | None  # the hidden-state index used (None for efficientnet-lite0)
    dim: int  # D, the token width
    adopted: bool = False  # read from an output's rows and run.json, not from settings.json

    # ---- views of the settings ---------------------------------------------------------------------------------
    @property
    def frames(self) -> int | None:
        return self.settings.get("frames")

    @property
    def fps(self) -> float | None:
        return self.settings.get("fps")

    @property
    def max_frames(self) -> int | None:
        return self.settings.get("max_frames")

    @property
    def k(self) -> int | None:
        """The fixed token-base size, None for adaptive K."""
        return self.settings["k"] or None

    @property
    def k_min(self) -> int | None:
        return self.settings.get("k_min")

    @property
    def k_max(self) -> int | None:
        return self.settings.get("k_max")

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def decoder(self) -> str:
        return self.settings["decoder"]

    @property
    def base_dtype(self) -> str:
        return self.settings["base_dtype"]

    def decode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of pipeline.job.decode.decode_video that sample a video as this output's videos were."""
        return decode_kwargs(self.settings)

    def compress_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of tokendyn.compress that compress a video as this output's videos were."""
        return compress_kwargs(self.settings)

    # ---- settings.json -----------------------------------------------------------------------------------------
    def as_json(self, run_id: str) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "settings": self.settings,
                "encoder": {"name": self.encoder, "layer": self.layer, "dim": self.dim},
                "recorded_by_run": run_id, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    @classmethod
    def from_json(cls, recorded: dict[str, Any], where: str) -> OutputContract:
        version = recorded.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(f"{where} holds schema version {version}, this pipeline reads and writes "
                                     f"version {SCHEMA_VERSION}. Write to a new --output, or convert the old output "
                                     "first.")
        encoder = recorded["encoder"]
        return cls(settings=recorded["settings"], encoder=encoder["name"], layer=encoder["layer"],
                   dim=encoder["dim"])

    # ---- comparing -----------------------------------------------------------------------------------------------
    def differences(self, settings: dict[str, Any]) -> list[str]:
        """'name: recorded -> asked' for every setting that differs (including ones only one side has)."""
        names = [*self.settings, *(name for name in settings if name not in self.settings)]
        missing = "(not set)"
        return [f"{name}: {self.settings.get(name, missing)!r} -> {settings.get(name, missing)!r}" for name in names
                if not _same_setting(name, self.settings.get(name, missing), settings.get(name, missing))]


def _same_setting(name: str, recorded: Any, asked: Any) -> bool:
    if name == "encoder" and isinstance(recorded, str) and isinstance(asked, str):
        return same_encoder(recorded, asked)
    return recorded == asked


def same_encoder(a: str, b: str) -> bool:
    """Same name, or two spellings of the same local checkpoint directory."""
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------------------------------------------------
# reading, checking and recording


def read_contract(store: OutputStore) -> OutputContract | None:
    """The output's contract; None while it holds no videos. Raises SettingsUnknown for an old output whose rows
    and run.json do not tell its settings for sure."""
    recorded = store.read_settings()
    if recorded is not None:
        return OutputContract.from_json(recorded, f"{store.root}/{store.SETTINGS_FILE}")
    return adopt_legacy(store)


def check_run(store: OutputStore, config: RunSettings) -> OutputContract | None:
    """The output's contract after checking that `config` agrees with it; SettingsMismatch naming each difference
    otherwise. Reads only: a refused run leaves the output as it was."""
    contract = read_contract(store)
    if contract is None:
        return None
    differences = contract.differences(config.output_settings())
    if differences:
        raise SettingsMismatch(f"{store.root} holds videos made with other settings than this run's "
                               f"({'; '.join(differences)}). {HOW_TO_PROCEED}")
    return contract


def contract_of_rows(config: RunSettings, videos: pa.Table) -> OutputContract:
    """The contract of an output whose first rows are `videos`, made with `config`."""
    first = videos.slice(0, 1).select(["encoder", "encoder_layer", "dim"]).to_pylist()[0]
    return OutputContract(settings=config.output_settings(), encoder=first["encoder"], layer=first["encoder_layer"],
                          dim=first["dim"])


def check_rows(contract: OutputContract, videos: pa.Table, where: str) -> None:
    """Refuse rows whose encoder resolved otherwise than the contract's (e.g. a checkpoint changed in place)."""
    found = set(zip(*(videos.column(name).to_pylist() for name in ("encoder", "encoder_layer", "dim"))))
    differing = [row for row in found if not (same_encoder(row[0], contract.encoder) and row[1:] == (
        contract.layer, contract.dim))]
    if differing:
        encoder, layer, dim = differing[0]
        raise SettingsMismatch(
            f"{where} holds rows of encoder {contract.encoder!r} (layer {contract.layer}, {contract.dim} dims); this "
            f"run's encoder gives layer {layer}, {dim} dims ({encoder!r}): the checkpoint changed. {HOW_TO_PROCEED}")


# ---------------------------------------------------------------------------------------------------------------
# outputs written before settings.json existed


def adopt_legacy(store: OutputStore) -> OutputContract | None:
    """The contract an output without settings.json was written with, from its rows and run.json's config, when
    they agree on every setting; SettingsUnknown otherwise. None when the output holds no videos."""
    rows = store.read_videos(columns=["encoder", "encoder_layer", "dim", "k", "num_frames"])
    if rows is None or rows.num_rows == 0:
        return None

    def refuse(reason: str) -> SettingsUnknown:
        return SettingsUnknown(f"{store.root} holds videos but records no settings ({store.SETTINGS_FILE}), and "
                               f"{reason}. {HOW_TO_PROCEED}")

    config = (store.read_run_summary() or {}).get("config")
    if not config:
        raise refuse("it has no run.json saying how they were made (seed, decoder, sampling)")
    encoders = set(zip(*(rows.column(name).to_pylist() for name in ("encoder", "encoder_layer", "dim"))))
    if len(encoders) != 1:
        raise refuse(f"its rows come from several encoders {sorted(encoders, key=repr)}")
    base_dtypes = {_BASE_DTYPES.get(schema.field("base").type.value_type.value_type, "other")
                   for schema in store.video_file_schemas()}
    if len(base_dtypes) != 1:
        raise refuse(f"its Parquet files hold several base types {sorted(base_dtypes)}")

    # Before k_rule was recorded, adaptive K always used the elbow rule; other settings run.json lacks have their
    # defaults.
    values = {"k_rule": "elbow", **{name: config[name] for name in CONTRACT_DEFAULTS if name in config}}
    settings = settings_with_defaults(**values)
    encoder, layer, dim = encoders.pop()
    contract = OutputContract(settings=settings, encoder=encoder, layer=layer, dim=dim, adopted=True)

    ks, num_frames = set(rows.column("k").to_pylist()), set(rows.column("num_frames").to_pylist())
    disagreements = []
    if not same_encoder(settings["encoder"], encoder):
        disagreements.append(f"run.json names encoder {settings['encoder']!r}, the rows {encoder!r}")
    if base_dtypes != {settings["base_dtype"]}:
        disagreements.append(f"run.json names base dtype {settings['base_dtype']}, the rows hold {base_dtypes.pop()}")
    if contract.k is not None and max(ks) != contract.k:
        disagreements.append(f"run.json names k={contract.k}, the rows hold K up to {max(ks)}")
    if contract.k is None and not contract.k_min <= min(ks) <= max(ks) <= contract.k_max:
        disagreements.append(f"run.json names adaptive K in [{contract.k_min}, {contract.k_max}], the rows hold "
                             f"K in [{min(ks)}, {max(ks)}]")
    if contract.fps is None and num_frames != {contract.frames}:
        disagreements.append(f"run.json names frames={contract.frames}, the rows hold {sorted(num_frames)} frames")
    if contract.fps is not None and max(num_frames) > contract.max_frames:
        disagreements.append(f"the rows hold up to {max(num_frames)} frames, more than max_frames="
                             f"{contract.max_frames}")
    if disagreements:
        raise refuse("its rows and run.json (which describes the last run only) disagree: " + "; ".join(disagreements))
    return contract
