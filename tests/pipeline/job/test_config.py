import dataclasses

import pytest

from pipeline.job.config import JobConfig


def test_every_field_is_a_flag_with_help_and_default():
    parser = JobConfig.parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(JobConfig)}
    for f in dataclasses.fields(JobConfig):
        assert actions[f.name].help, f.name
        assert actions[f.name].default == f.default, f.name


def test_parses_typed_values():
    config = JobConfig.from_args(["--input", "videos", "--k", "16", "--fps", "2.5", "--overwrite",
                                  "--gpus-per-worker", "0.5", "--decoder", "pyav"])
    assert (config.input, config.k, config.fps, config.overwrite) == ("videos", 16, 2.5, True)
    assert (config.gpus_per_worker, config.decoder) == (0.5, "pyav")
    assert not config.adaptive
    assert JobConfig.from_args(["--input", "v", "--k", "0"]).adaptive


@pytest.mark.parametrize("argv", [
    [],  # no input
    ["--input", "v", "--sample-clips"],
    ["--input", "v", "--k", "-3"],
    ["--input", "v", "--k-min", "9", "--k-max", "4"],
    ["--input", "v", "--frames", "0"],
    ["--input", "v", "--max-error-rate", "2"],
    ["--input", "v", "--decoder", "opencv"],
    ["--input", "v", "--frames", "many"],
])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        JobConfig.from_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_contract_fields_are_the_stores_with_its_defaults():
    """The store tells an output's settings without the job (pipeline.store.contract_fields): JobConfig's contract
    fields are exactly its fields, in its order (the order of a settings dict), with its defaults."""
    from pipeline.job.packaged_dinov2 import PACKAGED_DINOV2
    from pipeline.store.contract_fields import CONTRACT_DEFAULTS, DEFAULT_ENCODER, settings_with_defaults

    contract = [f for f in dataclasses.fields(JobConfig) if f.metadata["contract"]]
    assert [f.name for f in contract] == list(CONTRACT_DEFAULTS)
    assert {f.name: f.default for f in contract} == CONTRACT_DEFAULTS
    assert DEFAULT_ENCODER == PACKAGED_DINOV2 == JobConfig().encoder
    for values in ({}, {"k": 0, "k_rule": "elbow"}, {"fps": 2.0, "input_size": 448}, {"k": None, "frames": 4}):
        assert list(settings_with_defaults(**values).items()) == list(JobConfig(**values).output_settings().items())
    with pytest.raises(TypeError, match="workers"):
        settings_with_defaults(workers=2)
