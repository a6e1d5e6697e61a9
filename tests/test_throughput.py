"""`vidtok bench` with batch_sizes: throughput rows, their ratios, the one-video rows (tiny toy geometry)."""

import json

import pytest

from vidtok.cli import main
from vidtok.harness.bench import BenchConfig

CONFIG = {"name": "tput", "main": {"toy": "test"}, "guide": {"toy": "test", "share_vision": True}, "frames": 4,
          "runs": [{"method": "full"}, {"method": "visionzip", "guide": "assistant", "retentions": [0.25]}],
          "batch_sizes": [1, 2], "questions_per_video": 3, "repeats": 1, "warmup": 0, "decode_tokens": 1}


def test_throughput_rows_are_measured_side_by_side(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = report["throughput"]
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0 and "q/s" in printed
    # every configuration at every batch size, plus 3 questions on one video and on 3 videos for full and the guided row
    assert sorted((r["method"], r["batch_size"], r["videos"]) for r in rows) == sorted(
        [(m, b, "a video each") for m in ("full", "visionzip") for b in (1, 2, 3)] + [(m, 3, "one video, a question each") for m in ("full", "visionzip")])
    for r in rows:
        assert r["questions_per_s"] == pytest.approx(r["batch_size"] / r["seconds"])
        alone = next(a for a in rows if a["description"] == r["description"] and a["batch_size"] == 1)
        assert r["speedup_over_batch_1"] == pytest.approx(r["questions_per_s"] / alone["questions_per_s"])
        full = next(f for f in rows if f["method"] == "full" and f["batch_size"] == r["batch_size"] and f["videos"] == r["videos"])
        assert r["llm_side_speedup_per_question"] == pytest.approx(full["llm_side_seconds_per_question"] / r["llm_side_seconds_per_question"])
    shared = next(r for r in rows if r["method"] == "visionzip" and r["videos"].startswith("one video"))
    assert shared["guide_shared"]["questions"] == 3 and shared["guide_shared"]["prefix_tokens"] > 4 * 16
    assert next(r for r in rows if r["method"] == "visionzip" and r["batch_size"] == 3 and r["videos"] == "a video each")["guide_shared"] is None


@pytest.mark.parametrize("change, message", [
    ({"batch_sizes": [0]}, "batch_sizes[0] 0 in"),
    ({"batch_sizes": []}, "batch_sizes [] in"),
    ({"batch_sizes": None, "questions_per_video": 3}, "it is a throughput setting: add batch_sizes"),
    ({"questions_per_video": [2, 0]}, "questions_per_video[1] 0 in"),
    ({"sweep_frames": [4, 8]}, "batch_sizes measures throughput at one length"),
])
def test_throughput_settings_are_checked(tmp_path, change, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**CONFIG, **change}))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BenchConfig.load(path)
