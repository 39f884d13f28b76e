"""benchmarks/consistency.py report: the UD2M reference rows come from the K × N grid's results when the table is
written, not from copies stored when LATINO ran (which went stale whenever the grid was re-run)."""

import json


def _cell(psnr: float) -> dict:
    return {
        "nfe": 8,
        "psnr_mean": {"mean": psnr},
        "psnr_sample": {"mean": psnr - 3.0},
        "cfid": 0.05,
        "fid": 0.02,
        "coverage_calibration_error": 0.1,
    }


def test_report_reads_the_grid_cells_when_it_writes_the_table(benchmark_script):
    consistency = benchmark_script("consistency")
    results = consistency.RESULTS
    meta = {"command": "cmd", "threads": 1, "load_average": [1.0]}
    (results / "consistency_uncond.json").write_text(
        json.dumps({"num": 4, "meta": meta, "rows": {"teacher DDIM, 50 steps": {"nfe": 50, "fid": 0.5}}})
    )
    stale = {"LATINO-8 on digits": _cell(26.0), "UD2M K = 4, N = 2 (quality grid)": _cell(11.11)}
    (results / "consistency_posterior.json").write_text(json.dumps({"samples": 8, "meta": meta, "rows": stale}))
    grid = {"cells": {"2": {"4": _cell(22.22)}, "4": {"2": _cell(33.33), "8": _cell(44.44)}}}
    (results / "quality_grid.json").write_text(json.dumps(grid))
    text = consistency.report()
    assert "| LATINO-8 on digits | 8 | 26.00 |" in text
    assert "| UD2M K = 4, N = 2 (quality grid) | 8 | 33.33 |" in text and "11.11" not in text
    assert "| UD2M K = 2, N = 4 (quality grid) | 8 | 22.22 |" in text
    assert "K = 8, N = 1" not in text and "44.44" not in text  # only the cells of about 8 NFE
    assert "33.33" in consistency.README.read_text()
    # a grid drawn with another sample count than LATINO's says so in its rows
    (results / "quality_grid.json").write_text(json.dumps({**grid, "samples_per_observation": 16}))
    text = consistency.report()
    assert "| UD2M K = 4, N = 2 (quality grid, 16 samples) | 8 | 33.33 |" in text
    (results / "quality_grid.json").write_text(json.dumps({**grid, "samples_per_observation": 8}))
    assert "| UD2M K = 4, N = 2 (quality grid) | 8 | 33.33 |" in consistency.report()
