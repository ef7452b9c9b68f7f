"""jobs/bench/bench_decode.py: every decoder and mode side by side on a corpus it makes, and the encoder beside it."""

from __future__ import annotations

import json

import pytest

from job_scripts import load_job_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_small_run_measures_every_mode_on_every_video(tmp_path, capsys):
    script = load_job_script("bench/bench_decode")
    results = script.run(script.parse_args(["--workdir", str(tmp_path), "--corpus", "small", "--repeats", "1",
                                            "--frames", "8", "--size", "32", "--encoder", "efficientnet-lite0"]))
    assert len(results["videos"]) == len(script.SMALL)
    for row in results["videos"]:
        modes = row["modes"]
        assert set(modes) == set(script.MODES), row["name"]
        for timing in modes.values():
            assert timing["cpu_s"] > 0 and timing["frames_decoded"] >= 1
        # Seeking never decodes more than a pass from the start; keyframes decode at most one frame per frame kept.
        assert modes["exact"]["frames_decoded"] <= modes["sequential"]["frames_decoded"]
        assert modes["keyframes"]["decoded_per_kept"] <= 1
        assert 0 <= row["keyframe_offset_s"] <= row["gop_s"]
    by_name = {row["name"]: row for row in results["videos"]}
    # A keyframe every second and B-frames: seeking skips what a pass from the keyframe decodes.
    h264 = by_name["h264-144p-20s-gop1s-b3"]["modes"]
    assert h264["exact"]["frames_decoded"] < h264["decord"]["frames_decoded"]
    assert results["encoder"]["videos_per_core_s"] > 0
    assert json.loads((tmp_path / "decode.json").read_text())["corpus"] == "small"
    assert "| h264-144p-20s-gop1s-b3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.parse_args(["--modes", "fastest"])
