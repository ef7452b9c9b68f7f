"""jobs/ask.py end to end: compress real clips from a manifest with question-answer list columns (the real job),
train on the questions (jobs/train_from_cache.py, a tiny LLM that overfits on purpose), then ask.

Users rely on: the trained model answers its training videos' questions as trained; a video gives the same tokens
and the same answer from the cache and as a raw file; tokens made with other settings are refused with a clear
error; a multiple-choice set is scored; a batch run to Parquet resumes after kill -9 with every video answered
once and no half-written file left, and to S3 through a store that fails a quarter of its requests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.readers.answering import AnswerFiles, VideoAnswerer
from pipeline.readers.cache import CachedTokenDataset
from pipeline.readers.checkpoint import CheckpointMismatch, check_cache, latest_checkpoint, read_checkpoint
from pipeline.testing.s3_faults import FaultPlan, FaultyS3Proxy
from job_scripts import load_job_script
from test_crash_resume import job_env, kill_driver_when, short_temp_dir

REPO = Path(__file__).resolve().parents[2]
CLIPS = {  # clip -> [(question, answer)]
    "bigbuckbunny": [("What animal is it?", "a rabbit"), ("Where is it?", "a meadow")],
    "bikes": [("What animal is it?", "none"), ("Where is it?", "a street")],
    "carphone_pristine": [("What animal is it?", "a man"), ("Where is it?", "a car")],
}
FLAGS = ["--frames", "4", "--k", "6"]
STEPS = 250

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qa_cache(tmp_path_factory, run_job_on, sample_clip_paths, tiny_siglip_dir) -> Path:
    """The job's output of three real clips from a JSON Lines manifest with list columns of questions/answers."""
    root = tmp_path_factory.mktemp("qa")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({
        "uri": str(sample_clip_paths[name]), "video_id": name, "caption": f"a clip called {name}",
        "questions": [q for q, _ in pairs], "answers": [a for _, a in pairs]}) + "\n" for name, pairs in CLIPS.items()))
    summary = run_job_on(manifest, root / "cache", "--encoder", str(tiny_siglip_dir), *FLAGS)
    assert summary.ok == len(CLIPS), summary
    return root / "cache"


@pytest.fixture(scope="module")
def checkpoints(qa_cache, tmp_path_factory, tiny_llm_dir) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    train = load_job_script("train_from_cache")
    result = train.run(train.parse_args([
        "--cache", str(qa_cache), "--checkpoint-dir", str(folder), "--steps", str(STEPS), "--batch-size", "3",
        "--save-every", str(STEPS), "--raw-steps", "0", "--video-heads", "4", "--llm", str(tiny_llm_dir),
        "--llm-train", "full", "--lr", "3e-3", "--question-column", "questions", "--answer-column", "answers"]))
    assert result["losses"][-1] < 0.02 * result["losses"][0], result["losses"][::10]  # overfit: exact answers
    return folder


def ask(*argv: str) -> int:
    return load_job_script("ask").main([str(arg) for arg in argv])


def test_the_checkpoint_records_how_its_tokens_and_prompts_were_made(checkpoints, qa_cache):
    state = read_checkpoint(latest_checkpoint(checkpoints))
    assert state["step"] == STEPS
    assert state["video"]["settings"]["k"] == 6 and state["video"]["settings"]["frames"] == 4
    assert state["architecture"]["prompt_format"]["caption_question"] == "Describe the video."


def test_it_answers_its_training_questions_as_trained(checkpoints, qa_cache, capsys):
    for name, pairs in CLIPS.items():
        for question, answer in pairs:
            assert ask("--checkpoint", checkpoints, "--cache", qa_cache, "--id", name, "--question", question) == 0
            assert capsys.readouterr().out.strip() == answer, (name, question)


def test_a_raw_video_gives_the_cached_tokens_and_the_same_answer(checkpoints, qa_cache, sample_clip_paths,
                                                                   tiny_llm_dir, capsys):
    answerer = VideoAnswerer(str(checkpoints), question="Where is it?")
    cached = {item["video_id"]: item for item in CachedTokenDataset(str(qa_cache), rank=0, world_size=1)}
    for name in CLIPS:
        fresh = answerer.item_from_uri({"video_id": name, "uri": str(sample_clip_paths[name])})
        for key in ("base", "dynamics", "cluster_sizes"):
            assert torch.equal(fresh[key], cached[name][key]), (name, key)
        assert answerer.answer([fresh]) == answerer.answer([cached[name]])
    # and through the script: the new file's answer is the trained one
    assert ask("--checkpoint", checkpoints, "--input", sample_clip_paths["bikes"], "--question", "Where is it?") == 0
    assert capsys.readouterr().out.strip() == "a street"


def test_tokens_made_otherwise_are_refused(checkpoints, qa_cache, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(qa_cache, other)
    settings = json.loads((other / "settings.json").read_text())
    settings["settings"]["k"] = 4
    (other / "settings.json").write_text(json.dumps(settings))
    assert ask("--checkpoint", checkpoints, "--cache", other) == 2
    error = capsys.readouterr().err
    assert "trained on tokens made with other settings" in error and "k: 6 -> 4" in error
    # resuming training on it is refused too, and leaves the checkpoints as they were
    copied = tmp_path / "checkpoints"
    shutil.copytree(checkpoints, copied)
    train = load_job_script("train_from_cache")
    assert train.main(["--cache", str(other), "--checkpoint-dir", str(copied), "--steps", str(STEPS + 5),
                       "--raw-steps", "0", "--question-column", "questions", "--answer-column", "answers"]) == 2
    assert "k: 6 -> 4" in capsys.readouterr().err
    assert sorted(path.name for path in copied.iterdir()) == sorted(path.name for path in checkpoints.iterdir())
    # a cache of another width is refused before any settings are compared
    state = read_checkpoint(latest_checkpoint(checkpoints))
    with pytest.raises(CheckpointMismatch, match="reads 32-dim video tokens; .* holds 64-dim"):
        check_cache(state, Path("ck.pt"), None, 64, "a cache")


def test_training_refuses_to_resume_beside_a_pickled_checkpoint(checkpoints, qa_cache, tmp_path, capsys):
    copied = tmp_path / "checkpoints"
    shutil.copytree(checkpoints, copied)
    (copied / "checkpoint-00000001.pt").write_bytes(b"a pickle of an earlier version")
    before = sorted(path.name for path in copied.iterdir())
    train = load_job_script("train_from_cache")
    assert train.main(["--cache", str(qa_cache), "--checkpoint-dir", str(copied), "--steps", str(STEPS + 5),
                       "--raw-steps", "0", "--question-column", "questions", "--answer-column", "answers"]) == 2
    error = capsys.readouterr().err
    assert "pickled checkpoint" in error and "convert_checkpoint.py" in error
    assert sorted(path.name for path in copied.iterdir()) == before


def test_a_multiple_choice_set_is_scored(checkpoints, qa_cache, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    answers = sorted({answer for pairs in CLIPS.values() for _, answer in pairs if "Where" in _})
    mc.write_text("".join(json.dumps({"video_id": name, "question": "Where is it?", "options": answers,
                                      "answer": answers.index(dict(pairs)["Where is it?"])}) + "\n"
                          for name, pairs in CLIPS.items()))
    assert ask("--checkpoint", checkpoints, "--cache", qa_cache, "--mc", mc) == 0
    out = capsys.readouterr().out
    assert "3 questions" in out
    for score in ("likelihood", "mean-likelihood", "exact-match"):
        assert f"{score} " in out and "1.000" in out.split(score)[1].splitlines()[0], out


def test_a_killed_batch_run_resumes_and_answers_each_video_once(checkpoints, qa_cache, tmp_path, ray_local):
    output = tmp_path / "answers"
    ray_tmp = short_temp_dir()
    logs = tmp_path / "logs" / "ask"
    logs.parent.mkdir()
    args = ["--checkpoint", checkpoints, "--cache", qa_cache, "--output", output, "--batch-size", "1",
            "--flush-every", "1"]
    with open(logs.with_suffix(".out"), "wb") as stdout, open(logs.with_suffix(".err"), "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "ask.py"), *map(str, args)], cwd=REPO,
                                env=job_env(ray_tmp), stdout=stdout, stderr=stderr)
    try:
        kill_driver_when(proc, lambda: any(output.glob("part-*.parquet")), ray_tmp, logs)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    before = AnswerFiles(str(output)).read()
    assert 1 <= before.num_rows <= len(CLIPS)
    (output / "part-leftover.parquet.partial").write_bytes(b"half a file")  # as a kill mid-write leaves one

    assert ask(*args) == 0
    after = AnswerFiles(str(output)).read()
    assert sorted(after.column("video_id").to_pylist()) == sorted(CLIPS)  # each once
    assert not list(output.glob("*.partial"))
    assert set(after.column("checkpoint_step").to_pylist()) == {STEPS}
    # what the killed run wrote is kept as it was
    kept = {row["video_id"]: row["answer"] for row in before.to_pylist()}
    assert {row["video_id"]: row["answer"] for row in after.to_pylist() if row["video_id"] in kept} == kept
    assert ask(*args) == 0  # nothing left to do: no new rows
    assert AnswerFiles(str(output)).read().num_rows == len(CLIPS)


def test_help_and_bad_arguments(capsys):
    script = load_job_script("ask")
    with pytest.raises(SystemExit) as exited:
        script.parse_args(["--help"])
    assert exited.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    for argv in (["--checkpoint", "c"], ["--checkpoint", "c", "--cache", "a", "--input", "b"],
                 ["--checkpoint", "c", "--input", "b", "--id", "x"]):
        with pytest.raises(SystemExit) as exited:
            script.parse_args(argv)
        assert exited.value.code == 2
    assert script.main(["--checkpoint", "/nonexistent", "--input", "/nonexistent.mp4"]) == 2


def test_batch_answers_of_new_videos_keep_going_past_a_bad_one(checkpoints, sample_clip_paths, corrupt_video_path,
                                                               tmp_path, ray_local):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_clip_paths["bikes"], videos / "bikes.mp4")
    shutil.copy(corrupt_video_path, videos / "corrupt.mp4")
    output = tmp_path / "answers"
    assert ask("--checkpoint", checkpoints, "--input", videos, "--output", output, "--question", "Where is it?") == 1
    rows = {Path(row["uri"]).name: row for row in AnswerFiles(str(output)).read().to_pylist()}
    assert rows["bikes.mp4"]["answer"] == "a street" and rows["bikes.mp4"]["error"] is None  # as trained
    assert rows["corrupt.mp4"]["answer"] is None and "DecodeError" in rows["corrupt.mp4"]["error"]
    assert {row["question"] for row in rows.values()} == {"Where is it?"}


def test_batch_answers_go_to_a_flaky_s3_and_resume_there(checkpoints, qa_cache, s3_bucket, moto_s3_endpoint,
                                                         s3_client, ray_local):
    output = f"s3://{s3_bucket}/answers"
    with FaultyS3Proxy(moto_s3_endpoint, FaultPlan(slowdown=0.08, error=0.06, reset_before=0.05, reset_after=0.06,
                                                   stall=0.02, stall_s=30, seed=2)) as proxy:
        common = ["--checkpoint", checkpoints, "--cache", qa_cache, "--output", output,
                  "--s3-endpoint-url", proxy.endpoint, "--question", "What animal is it?", "--flush-every", "2"]
        assert ask(*common, "--id", "bikes") == 0
        assert ask(*common) == 0  # the rest; bikes is not asked again
    assert sum(count for fault, count in proxy.counts.items() if fault != "forwarded"), proxy.counts
    rows = AnswerFiles(output, s3_endpoint_url=moto_s3_endpoint).read().to_pylist()
    assert sorted(row["video_id"] for row in rows) == sorted(CLIPS)
    assert {row["video_id"]: row["answer"] for row in rows} == {name: dict(pairs)["What animal is it?"]
                                                                 for name, pairs in CLIPS.items()}
    keys = [item["Key"] for item in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    parts = [key for key in keys if key != "answers/"]  # the folder's marker object
    assert parts and all(key.startswith("answers/part-") and key.endswith(".parquet") for key in parts)
