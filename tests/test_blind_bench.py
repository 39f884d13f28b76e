"""benchmarks/blind.py's bookkeeping: a run of some tasks keeps the other tasks' rows and says which run made them."""


def test_a_run_of_some_tasks_keeps_the_runs_behind_the_other_rows(benchmark_script):
    bench = benchmark_script("blind")
    full = {"tasks": ["low-light", "haze", "noise", "colour"], "wall_seconds": 3600.0}
    noise = {"tasks": ["noise"], "wall_seconds": 60.0}
    runs = bench.merge_runs([full], noise)
    assert runs == [{**full, "tasks": ["low-light", "haze", "colour"]}, noise]
    again = {"tasks": ["noise", "colour"], "wall_seconds": 90.0}
    assert bench.merge_runs(runs, again) == [{**full, "tasks": ["low-light", "haze"]}, again]  # noise's run: gone
    meta = {"partial_runs": bench.merge_runs(runs, again)}
    for r in meta["partial_runs"]:
        r.update(load_average_start=[1.0, 1.0, 1.0], load_average_end=[2.0, 2.0, 2.0])
    assert bench._timing(meta).startswith("rows from 2 runs: low-light and haze: 60.0 min")
