"""jobs/train_from_cache.py on the four real sample clips: the loss falls, a re-run resumes, throughput is compared.

The cache is built as the job builds it (decode -> encode -> tokendyn.compress -> video_row -> OutputStore), with
a tiny vision tower so that it takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import tokendyn
from pipeline.job.config import JobConfig
from pipeline.job.decode import decode_video
from pipeline.job.encoders import load_encoder
from pipeline.job.sources import video_id_for
from pipeline.store.contract import contract_of_rows
from pipeline.store.schema import now_utc, video_row, video_schema
from pipeline.store.storage import OutputStore
from job_scripts import load_job_script

CAPTIONS = {
    "bigbuckbunny": "a big rabbit wakes up in a green meadow",
    "bikes": "cyclists ride past on a city street",
    "carphone_pristine": "a man talks on the phone in a car",
    "carphone_distorted": "a man talks on the phone in a car, blocky",
}
FRAMES, K = 4, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script():
    return load_job_script("train_from_cache")


@pytest.fixture(scope="module")
def captioned_cache(tmp_path_factory, sample_clip_paths, tiny_siglip_dir) -> str:
    encoder = load_encoder(str(tiny_siglip_dir))
    rows = []
    for name, path in sorted(sample_clip_paths.items()):
        clip = decode_video(path, num_frames=FRAMES, size=encoder.input_size)
        video = tokendyn.compress(encoder.encode(clip.frames), k=K, seed=0)
        rows.append({"video_id": video_id_for(str(path)), "uri": str(path), "caption": CAPTIONS[name],
                     **video_row(video, frame_indices=clip.frame_indices, fps=clip.fps,
                                 source_frames=clip.source_frames, encoder=encoder.name, encoder_layer=encoder.layer,
                                 base_dtype="float16", created_at=now_utc())})
    root = str(tmp_path_factory.mktemp("captioned_cache"))
    schema = video_schema(encoder.dim, "float16", [pa.field("caption", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    OutputStore(root).write_videos(table)
    # As the job records them: the raw-video comparison compresses with these settings.
    settings = JobConfig(input="unused", encoder=str(tiny_siglip_dir), frames=FRAMES, k=K)
    OutputStore(root).write_settings(contract_of_rows(settings, table).as_json("test"))
    return root


def arguments(cache: str, checkpoints: Path, steps: int, raw_steps: int = 0) -> list[str]:
    return ["--cache", cache, "--checkpoint-dir", str(checkpoints), "--steps", str(steps), "--batch-size", "4",
            "--save-every", "20", "--log-every", "10", "--raw-steps", str(raw_steps), "--video-heads", "4"]


def test_loss_falls_and_a_rerun_resumes_from_the_checkpoint(captioned_cache, tmp_path, capsys):
    script = load_script()
    first = script.run(script.parse_args(arguments(captioned_cache, tmp_path, steps=40, raw_steps=1)))
    out = capsys.readouterr().out
    assert first["start_step"] == 0 and len(first["losses"]) == 40
    assert first["losses"][-1] < 0.5 * first["losses"][0], first["losses"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000020.pt",
                                                                        "checkpoint-00000040.pt"]
    # the throughput comparison ran and printed its table
    assert first["raw"]["samples"] == 4 and first["cache"]["samples"] == 40 * 4
    assert first["ratios"]["tokens for a step"] > first["ratios"]["training (tokens + step)"] > 1
    assert "cache / raw" in out and "tokens for a step" in out

    second = script.run(script.parse_args(arguments(captioned_cache, tmp_path, steps=50)))
    out = capsys.readouterr().out
    assert "resuming from" in out and "(step 40)" in out
    assert second["start_step"] == 40 and len(second["losses"]) == 10
    # it carries on from the trained weights, not from scratch
    assert second["losses"][0] < 0.5 * first["losses"][0]
    assert (tmp_path / "checkpoint-00000050.pt").is_file()


def test_missing_caption_column_is_a_clear_error(captioned_cache, tmp_path):
    script = load_script()
    args = script.parse_args([*arguments(captioned_cache, tmp_path, steps=1), "--caption-column", "summary"])
    with pytest.raises(SystemExit, match="no column 'summary'"):
        script.run(args)


def test_empty_cache_is_a_clear_error(tmp_path, capsys):
    script = load_script()
    assert script.main(arguments(str(tmp_path / "empty"), tmp_path / "ckpt", steps=1)) == 2
    assert "no compressed videos" in capsys.readouterr().err


def test_help_describes_the_flags(capsys):
    with pytest.raises(SystemExit) as exit:
        load_script().parse_args(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--cache", "--caption-column", "--steps", "--batch-size", "--checkpoint-dir", "--raw-steps"):
        assert flag in out


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        load_script().parse_args(["--cache", "x", "--steps", "0"])
    assert exit.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
