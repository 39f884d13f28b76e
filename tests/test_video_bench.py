"""benchmarks/video.py's measurement files: a run over some problems adds to the file instead of erasing the rest."""

import json


def test_a_subset_of_problems_keeps_the_other_rows_and_says_when_they_were_measured(benchmark_script):
    bench = benchmark_script("video")
    first = bench.write_measurement("video_ablation.json", {"A": {"released": 1.0}, "C": {"released": 2.0}}, clips=8)
    second = bench.write_measurement("video_ablation.json", {"C": {"released": 3.0}}, clips=8)
    on_disk = json.loads((bench.RESULTS / "video_ablation.json").read_text())
    assert on_disk == second and on_disk["problems"] == {"A": {"released": 1.0}, "C": {"released": 3.0}}
    assert on_disk["earlier"] == {"A": first["date"]}  # C is this run's; A keeps its own date
    third = bench.write_measurement("video_ablation.json", {"A": {"released": 4.0}}, clips=8)
    assert third["earlier"] == {"C": second["date"]} and third["problems"]["C"] == {"released": 3.0}
    fresh = bench.write_measurement("video_ablation.json", {"A": {"x": 0}, "C": {"x": 0}}, clips=8)
    assert fresh["earlier"] == {}
