"""jobs/bench/bench_encoders.py: encoders side by side on the same clips, with the input size setting the grid."""

from __future__ import annotations

import json

import pytest

from job_scripts import load_job_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_encoders_side_by_side_on_the_same_clips(tmp_path, capsys):
    script = load_job_script("bench/bench_encoders")
    rows = script.run(script.parse_args([
        "--workdir", str(tmp_path), "--clips", "4", "--frames", "3", "--k", "4", "--object-scales", "1,0.5",
        "--configs", "efficientnet-lite0@224,efficientnet-lite0@448"]))
    assert [(r["input_size"], r["grid"], r["object_scale"]) for r in rows] == [
        (224, (7, 7), 1.0), (448, (14, 14), 1.0), (224, (7, 7), 0.5), (448, (14, 14), 0.5)]
    for row in rows:
        assert row["clips"] == 4 and 0 <= row["follows"] <= 1 and row["encode_ms_per_frame"] > 0
        assert row["bytes_per_video"] == 4 * 1280 * 2 + 3 * row["grid"][0] * row["grid"][1]
    assert "| efficientnet-lite0 | 448 | 14×14 | ×0.5 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "encoders.json").read_text()) == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit):
        script.parse_args(["--configs", "dinov2-small"])
