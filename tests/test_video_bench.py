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


def test_overhead_splits_the_time_outside_the_networks(benchmark_script):
    """``overhead`` times the data steps and the Wiener start apart: both ran, the parts fit inside the wall time,
    and the glue overhead is the wall time without them over the network time, per run."""
    bench = benchmark_script("video")
    bench.main(["overhead", "--problems", "B", "--clips", "1", "--repeats", "1"])
    row = json.loads((bench.RESULTS / "video_overhead.json").read_text())["problems"]["B"]
    ((wall, net, data, wiener),) = row["runs"]
    assert data > 0 and wiener > 0 and net > 0 and net + data + wiener <= wall
    assert row["glue_overhead"] == (wall - data - wiener) / net < row["overhead"] == wall / net
    assert row["data_steps_s"] == data and row["wiener_s"] == wiener
