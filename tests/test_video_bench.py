"""benchmarks/video.py's measurement files: a run over some problems adds to the file instead of erasing the rest."""

import itertools
import json


def test_a_subset_of_problems_keeps_the_other_rows_and_says_when_they_were_measured(benchmark_script, monkeypatch):
    bench = benchmark_script("video")
    dates = (f"run {i}" for i in itertools.count(1))
    monkeypatch.setattr(bench.time, "strftime", lambda *args: next(dates))

    def write(rows):
        return bench.write_measurement("video_ablation.json", rows, clips=8)

    first = write({"A": {"released": 1.0}, "C": {"released": 2.0}})
    second = write({"C": {"released": 3.0}})
    on_disk = json.loads((bench.RESULTS / "video_ablation.json").read_text())
    assert on_disk == second and on_disk["problems"] == {"A": {"released": 1.0}, "C": {"released": 3.0}}
    assert (first["date"], second["date"]) == ("run 1", "run 2") and second["earlier"] == {"A": "run 1"}
    assert write({"C": {"released": 4.0}})["earlier"] == {"A": "run 1"}  # still A's own date, not run 2's
    third = write({"A": {"released": 5.0}})
    assert third["earlier"] == {"C": "run 3"} and third["problems"]["C"] == {"released": 4.0}
    assert write({"A": {"x": 0}, "C": {"x": 0}})["earlier"] == {}
