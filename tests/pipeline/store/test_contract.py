"""pipeline.store.contract: comparing settings, adopting outputs written before settings were recorded."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from pipeline.job.config import JobConfig
from pipeline.store.contract import (SettingsMismatch, SettingsUnknown, check_rows, check_run, contract_of_rows,
                               read_contract)
from pipeline.store.storage import OutputStore
from test_storage import DIM, video_table  # rows of K = 4, 3 frames, encoder "test-encoder", D = 16


def job(**values) -> JobConfig:
    return JobConfig(**{"input": "unused", "encoder": "test-encoder", "frames": 3, "k": 4, **values})


def legacy_output(root, run_config: JobConfig | None, *tables: pa.Table) -> OutputStore:
    """An output as written before settings.json existed: rows, and run.json's config of the last run."""
    store = OutputStore(str(root))
    for table in tables:
        store.write_videos(table)
    if run_config is not None:
        store.write_run_summary({"config": dataclasses.asdict(run_config)})
    return store


def test_each_differing_setting_is_named_old_to_new(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    table = video_table(["a"])
    store.write_settings(contract_of_rows(job(), table).as_json("run"))
    assert check_run(store, job()).dim == DIM
    with pytest.raises(SettingsMismatch) as error:
        check_run(store, job(k=0, k_min=2, k_max=6, seed=1, fps=2.0))
    message = str(error.value)
    for difference in ("frames: 3 -> '(not set)'", "k: 4 -> 0", "seed: 0 -> 1", "k_min: '(not set)' -> 2",
                       "fps: '(not set)' -> 2.0", "max_frames: '(not set)' -> 256", "--rebuild", "--output"):
        assert difference in message
    with pytest.raises(SettingsMismatch, match="checkpoint changed"):
        check_rows(read_contract(store), table.set_column(table.schema.get_field_index("dim"), "dim",
                                                          pa.array([DIM + 1], pa.int32())), store.root)


def test_an_old_output_is_adopted_when_its_rows_and_run_json_agree(tmp_path):
    store = legacy_output(tmp_path / "out", job(base_dtype="float32"), video_table(["a", "b"]))
    contract = read_contract(store)
    assert contract.adopted and (contract.encoder, contract.dim, contract.k, contract.frames) == (
        "test-encoder", DIM, 4, 3)
    assert contract.settings == job(base_dtype="float32").output_settings()


@pytest.mark.parametrize("run_config, tables, reason", [
    (None, [["a"]], "no run.json"),
    (job(k=8, base_dtype="float32"), [["a"]], "k=8, the rows hold K up to 4"),
    (job(frames=5, base_dtype="float32"), [["a"]], r"frames=5, the rows hold \[3\] frames"),
    (job(base_dtype="float16"), [["a"]], "base dtype float16, the rows hold float32"),
    (job(base_dtype="float32"), [["a"], ["b", "float16"]], "several base types"),
])
def test_an_old_output_whose_settings_cannot_be_told_is_refused(tmp_path, run_config, tables, reason):
    written = [video_table(ids[:1], base_dtype=ids[1] if len(ids) > 1 else "float32") for ids in tables]
    store = legacy_output(tmp_path / "out", run_config, *written)
    with pytest.raises(SettingsUnknown, match=reason):
        read_contract(store)


def test_the_input_size_is_part_of_the_contract(tmp_path):
    assert "input_size" not in job().output_settings()  # the encoder's own size: outputs made before agree
    assert job(input_size=448).output_settings()["input_size"] == 448
    store = OutputStore(str(tmp_path / "out"))
    store.write_settings(contract_of_rows(job(), video_table(["a"])).as_json("run"))
    with pytest.raises(SettingsMismatch, match="input_size: '\\(not set\\)' -> 448"):
        check_run(store, job(input_size=448))
    fine = OutputStore(str(tmp_path / "fine"))
    fine.write_settings(contract_of_rows(job(input_size=448), video_table(["a"])).as_json("run"))
    assert check_run(fine, job(input_size=448)).settings["input_size"] == 448
    with pytest.raises(SettingsMismatch, match="input_size: 448 -> 224"):
        check_run(fine, job(input_size=224))


def test_keyframe_sampling_is_part_of_the_contract_and_exact_sampling_records_nothing(tmp_path):
    assert "sample" not in job().output_settings()  # outputs made before the setting existed agree
    assert job(sample="keyframes").output_settings()["sample"] == "keyframes"
    assert contract_of_rows(job(sample="keyframes"), video_table(["a"])).decode_kwargs()["sample"] == "keyframes"
    store = OutputStore(str(tmp_path / "out"))
    store.write_settings(contract_of_rows(job(), video_table(["a"])).as_json("run"))
    with pytest.raises(SettingsMismatch, match="sample: '\\(not set\\)' -> 'keyframes'"):
        check_run(store, job(sample="keyframes"))
    assert check_run(store, job()).decode_kwargs()["sample"] == "exact"
