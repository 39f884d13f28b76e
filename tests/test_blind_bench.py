"""benchmarks/blind.py's bookkeeping: a run of some tasks keeps the other tasks' rows and says which run made them."""


def test_a_run_of_some_tasks_keeps_the_runs_behind_the_other_rows(benchmark_script):
    bench = benchmark_script("blind")
    full = {"tasks": ["low-light", "haze", "noise", "colour"], "wall_seconds": 3600.0}
    noise = {"tasks": ["noise"], "wall_seconds": 60.0}
    runs = bench.merge_runs([full], noise)
    ran = full["tasks"]  # what the first run's wall time covered, kept when later runs replace some of its rows
    assert runs == [{**full, "tasks": ["low-light", "haze", "colour"], "ran": ran}, noise]
    again = {"tasks": ["noise", "colour"], "wall_seconds": 90.0}
    merged = bench.merge_runs(runs, again)
    assert merged == [{**full, "tasks": ["low-light", "haze"], "ran": ran}, again]  # noise's run: gone
    meta = {"partial_runs": merged}
    for r in meta["partial_runs"]:
        r.update(load_average_start=[1.0, 1.0, 1.0], load_average_end=[2.0, 2.0, 2.0])
    assert bench._timing(meta).startswith(
        "rows from 2 runs: low-light and haze (from a run of low-light, haze, noise and colour): 60.0 min"
    )
    assert "; noise and colour: 1.5 min" in bench._timing(meta)
    # runs that record their thread count (since 2026-12-06) say it: runs of some tasks may use other counts
    meta["partial_runs"][0]["threads"], meta["partial_runs"][1]["threads"] = 1, 2
    assert "(from a run of low-light, haze, noise and colour): 60.0 min on 1 thread(s), load" in bench._timing(meta)
    assert "; noise and colour: 1.5 min on 2 thread(s), load" in bench._timing(meta)
    assert bench._run_cost({"threads": 2, **full, "load_average_start": [], "load_average_end": []})["threads"] == 2
    # one run behind the rows: its count is in _timing, not in the header
    one = {"partial_runs": [{**merged[1], "threads": 2}], "threads": 2, "mode": "full", "crops": [], "seeds": [0]}
    assert "1.5 min on 2 thread(s)" in bench._timing(one)


def test_cost_table_lists_every_task_and_step_count(benchmark_script):
    bench = benchmark_script("blind")
    row = {"psnr": {"mean": 30.0, "std": 1.0}, "ssim": {"mean": 0.8, "std": 0.1}, "steps": 13, "nfe": 26}
    data = {
        "meta": {"crops": ["a", "b"], "threads": 2, "load_average_start": [1.0, 1.0, 1.0], "date": "today"},
        "tasks": {"noise": {"450": {**row, "seconds_per_image": 2.5}, "50": {**row, "seconds_per_image": 0.25}}},
    }
    lines = bench.cost_text(data).splitlines()
    assert lines[-2:] == [
        "| noise | 450 | 13 | 26 | 30.00 ± 1.00 | 0.800 ± 0.100 | 2.5 |",
        "| noise | 50 | 13 | 26 | 30.00 ± 1.00 | 0.800 ± 0.100 | 0.2 |",
    ]
    assert "2 held-out crops, 2 thread(s)" in lines[0]


def test_a_task_whose_preset_takes_fewer_steps_runs_at_them(benchmark_script, monkeypatch):
    """run_task runs colour at its preset N = 50 when the protocol's N is larger (never above the protocol's: the
    quick run's 20 stays 20), and the report header names it."""
    import argparse

    import pytest

    from ud2m.solvers.ld_rps import task_defaults

    class Stop(Exception):
        pass

    def stop(task, x, keys):
        raise Stop

    bench = benchmark_script("blind")
    printed = []
    monkeypatch.setattr(bench, "simulate", stop)
    monkeypatch.setattr(bench, "print", lambda *a, **k: printed.append(a[0]), raising=False)
    for n, expected in ((200, 50), (20, 20)):
        with pytest.raises(Stop):
            bench.run_task(None, "colour", None, [], None, [], argparse.Namespace(num_steps=n))
        assert printed[-1] == f"colour (N = {expected})"
    assert task_defaults("colour").steps() == 50 and task_defaults("noise").steps() == 450
    assert task_defaults("colour").steps(7) == 7
    assert (
        bench._preset_steps(200, ["low-light", "haze", "colour"])
        == " (haze at its preset N = 100, colour at its preset N = 50, §13.13)"
    )
    assert bench._preset_steps(20, ["colour"]) == ""


def test_mean_of_chains_row_scores_the_mean_and_its_first_chain_is_the_one_chain_run(benchmark_script, monkeypatch):
    """ld_rps_row(chains=M) runs M independent chains per image in one batch: chain 0 is the one-chain row's run
    (same generators), the row scores the mean of the chains, and the table counts every chain's network calls."""
    import argparse

    import pytest
    import torch

    import ud2m.solvers.ld_rps as solver
    from ud2m.metrics import psnr
    from ud2m.priors.tiny import tiny_pixel_prior

    bench = benchmark_script("blind")
    prior = tiny_pixel_prior(sample_size=16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = [(0, 0), (0, 1)]
    p = bench.simulate("colour", x, keys)
    args = argparse.Namespace(num_steps=4, guidance_scaling="steps")
    results, original = [], solver.ld_rps

    def spy(*a, **k):  # ld_rps_row imports the solver when called: keep what it returned
        passes, info = original(*a, **k)
        results.append(passes[-1])
        return passes, info

    monkeypatch.setattr(solver, "ld_rps", spy)
    rows = {
        m: bench.ld_rps_row(
            prior, "colour", "row", solver.learned_degradation("colour"), p.y, x, p.truth_Ax, keys, args, chains=m
        )
        for m in (1, 4)
    }
    one, four = results
    assert "chains" not in rows[1] and rows[4]["chains"] == 4 and four.shape[0] == 8
    torch.testing.assert_close(four[:2], one, rtol=0, atol=1e-5)  # chain 0 = the one-chain run
    assert not torch.allclose(four[:2], four[2:4])  # the other chains are other draws
    mean = four.view(4, 2, 3, 16, 16).mean(0)
    assert rows[4]["psnr"]["values"] == pytest.approx(psnr(mean, x).tolist(), abs=1e-4)
    assert rows[1]["psnr"]["values"] == pytest.approx(psnr(one, x).tolist(), abs=1e-4)
    from ud2m.operators.simulate import KnownDegradation

    with pytest.raises(ValueError, match="chains > 1 needs a learned ψ without base"):  # per-image parameters
        bench.ld_rps_row(prior, "colour", "row", KnownDegradation(p.simulator), p.y, x, p.truth_Ax, keys, args,
                         adapt=False, chains=2)  # fmt: skip
    nfe = rows[4]["costs"]["nfe_paper"]
    assert f"| {4 * nfe} (4 × {nfe}) |" in bench.task_table({"row": rows[4]})[-1]
    assert f"| {rows[1]['costs']['nfe_paper']} |" in bench.task_table({"row": rows[1]})[-1]
