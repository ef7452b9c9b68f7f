"""The cluster configs parse, and every job command they carry is accepted by the job's own parser."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfig

INFRA = Path(__file__).resolve().parents[2] / "infra"
ENTRY = "python jobs/compress_corpus.py"


def job_commands(text: str) -> list[list[str]]:
    """Argument lists of every `python jobs/compress_corpus.py ...` in a file, comments and continuations included."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(m.group(1)) for m in re.finditer(re.escape(ENTRY) + r"([^\n]*)", joined)]


def assert_flags_exist(argv: list[str]) -> None:
    config = JobConfig.from_args(argv)  # exits with status 2 on an unknown flag or a bad value
    assert config.input or config.sample_clips


def test_kuberay_rayjob_parses_and_runs_the_job_entry_point():
    manifest = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob"
    entrypoint = manifest["spec"]["entrypoint"]
    assert entrypoint.startswith(ENTRY)
    assert_flags_exist(shlex.split(entrypoint[len(ENTRY):]))
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_cluster_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema: raises on unknown or missing fields
    commands = job_commands((INFRA / "cluster.yaml").read_text())
    assert commands
    for argv in commands:
        assert_flags_exist(argv)


@pytest.mark.parametrize("name", ["cluster.yaml", "ray_head.sh"])
def test_every_job_command_in_infra_uses_existing_flags(name):
    commands = job_commands((INFRA / name).read_text())
    assert commands
    for argv in commands:
        assert_flags_exist(argv)


def test_job_command_extraction_catches_a_wrong_flag():
    (argv,) = job_commands("# ray job submit -- \\\n#   python jobs/compress_corpus.py --input x --no-such-flag 1\n")
    with pytest.raises(SystemExit):
        JobConfig.from_args(argv)


def test_ray_head_script_usage():
    result = subprocess.run(["bash", str(INFRA / "ray_head.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "start|stop|status" in result.stdout
