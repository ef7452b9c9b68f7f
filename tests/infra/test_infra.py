"""The cluster configs parse, and every job command they carry is accepted by the job's own parser."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.job.config import JobConfig

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


def test_ray_head_script_join_needs_the_heads_token(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_HEAD_STATE": str(tmp_path / "state")}
    result = subprocess.run(["bash", str(INFRA / "ray_head.sh"), "join", "10.0.0.1:6379"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1 and "auth_token" in result.stdout
    assert not (tmp_path / "state" / "worker.pid").exists()


# ---- the image, the KubeRay manifest and the launcher config agree ----------------------------------------------

REPO = INFRA.parent
IMAGE = "ghcr.io/example/tokendyn-pipeline"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def dockerfile_values(instruction: str) -> dict[str, str]:
    """NAME=value pairs of the Dockerfile's ARG or ENV instructions."""
    pairs = {}
    for kind, args in dockerfile_instructions():
        if kind == instruction:
            pairs.update(pair.split("=", 1) for pair in shlex.split(args))
    return pairs


def built_tags() -> set[str]:
    """The image tags the Dockerfile's own build commands (in its header) produce."""
    return set(re.findall(rf"-t {re.escape(IMAGE)}:(\S+)", (REPO / "Dockerfile").read_text()))


def image_tag(image: str) -> str:
    name, tag = image.rsplit(":", 1)
    assert name == IMAGE
    return tag


def kuberay_manifest() -> dict:
    return yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())


def kuberay_containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_dockerfile_installs_with_make_install_only():
    runs = [args for kind, args in dockerfile_instructions() if kind == "RUN"]
    assert sum("make install" in run for run in runs) == 1
    assert not any("pip install" in run for run in runs)  # the Makefile is the one list of what to install
    (install,) = [run for run in runs if "make install" in run]
    assert 'TORCH="$TORCH"' in install and 'VENV="$VENV"' in install
    makefile_torch = re.search(r"^TORCH \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert dockerfile_values("ARG")["TORCH"] == makefile_torch
    env = dockerfile_values("ENV")
    assert env["PATH"].startswith(f"{env['VENV']}/bin:")  # `python` and `ray` are the installed ones


def test_images_working_dir_and_entry_point_agree():
    assert {"latest", "cuda"} <= built_tags()
    manifest = kuberay_manifest()
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    images = [c["image"] for c in kuberay_containers(manifest)] + [launcher["docker"]["image"],
                                                                   launcher["docker"]["worker_image"]]
    assert {image_tag(image) for image in images} <= built_tags()

    (workdir,) = [args for kind, args in dockerfile_instructions() if kind == "WORKDIR"]
    assert [args for kind, args in dockerfile_instructions() if kind == "COPY"] == [f". {workdir}"]
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    assert f"--workdir {workdir}" in launcher["docker"]["run_options"]

    # The entry point: the same script, run from the working directory, in the image and in every job command.
    assert (REPO / ENTRY.split()[1]).is_file()
    (command,) = [args for kind, args in dockerfile_instructions() if kind == "CMD"]
    assert " ".join(json.loads(command)).startswith(ENTRY)
    assert manifest["spec"]["entrypoint"].startswith(ENTRY)


def test_kuberay_and_launcher_run_the_job_with_the_same_flags_and_resources():
    manifest = kuberay_manifest()
    kuberay = JobConfig.from_args(shlex.split(manifest["spec"]["entrypoint"][len(ENTRY):]))
    (launcher_argv,) = job_commands((INFRA / "cluster.yaml").read_text())
    launcher = JobConfig.from_args(launcher_argv)
    resources = ("workers", "gpus_per_worker", "cpus_per_worker", "batch_size")
    assert {n: getattr(kuberay, n) for n in resources} == {n: getattr(launcher, n) for n in resources}
    # Each GPU worker pod fits one encoder actor.
    (worker,) = [c for c in kuberay_containers(manifest) if c["name"] == "ray-worker"]
    limits = worker["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= kuberay.gpus_per_worker and float(limits["cpu"]) >= kuberay.cpus_per_worker
    # KubeRay starts the Ray the image has installed.
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)\.\*"', (REPO / "pyproject.toml").read_text()).group(1)
    assert manifest["spec"]["rayClusterSpec"]["rayVersion"].startswith(ray_pin + ".")
