"""benchmarks/posterior.py: the spread ratio against its derivation, and the report from a results file alone."""

import json

import pytest
import torch


@pytest.fixture
def posterior(benchmark_script):
    """The benchmark module with RESULTS and README redirected into ``tmp_path`` (conftest.benchmark_script)."""
    return benchmark_script("posterior")


@pytest.mark.parametrize(("spread", "expected"), [(1.0, 1.0), (1 / 3, 1 / 9), (2.0, 4.0)])
def test_spread_ratio_is_the_variance_ratio_of_a_gaussian_sampler(posterior, spread, expected):
    """Truths x0 = m + σ ε and samples x_s = m + c σ ε_s (independent given m, the posterior mean): E[v] = c² σ² d
    and E[e] = E‖x̄ − x0‖² − E[v]/S = σ² d (1 + c²/S) − c² σ² d/S = σ² d, so the ratio is c²: 1 for a calibrated
    sampler, whatever S; below 1 for an over-confident one."""
    g = torch.Generator().manual_seed(0)
    images, samples, d, sigma = 4000, 4, 64, 0.3
    m = torch.randn(images, 1, 8, 8, generator=g, dtype=torch.float64)
    x0 = m + sigma * torch.randn(m.shape, generator=g, dtype=torch.float64)
    xs = m[:, None] + spread * sigma * torch.randn(images, samples, 1, 8, 8, generator=g, dtype=torch.float64)
    v, e = posterior.spread_and_error(xs, x0)
    assert float(v.mean()) == pytest.approx(spread**2 * sigma**2 * d, rel=0.02)
    assert float(e.mean()) == pytest.approx(sigma**2 * d, rel=0.03)
    assert float(v.sum() / e.sum()) == pytest.approx(expected, rel=0.04)


def test_pixel_metrics_of_a_calibrated_sampler_lose_3_db_per_sample(posterior):
    """A calibrated sampler's one sample has twice the error of the posterior mean: the mean of many samples is
    10·log10(2) ≈ 3 dB better than one sample (PSNR on [-1, 1] images, range 2)."""
    g = torch.Generator().manual_seed(1)
    m = 0.5 * torch.rand(200, 1, 16, 16, generator=g) - 0.25
    x0 = m + 0.05 * torch.randn(m.shape, generator=g)
    xs = m[:, None] + 0.05 * torch.randn(200, 64, 1, 16, 16, generator=g)
    out = posterior.pixel_metrics(xs, x0, seconds=1.0)
    gap = out["psnr_mean"]["mean"] - out["psnr_sample"]["mean"]
    assert gap == pytest.approx(10 * torch.log10(torch.tensor(2 / (1 + 1 / 64))).item(), abs=0.1)
    for k in (2, 4, 8, 16, 32):  # the mean of k samples: error (1 + 1/k) times the posterior mean's
        expected = out["psnr_sample"]["mean"] + 10 * torch.log10(torch.tensor(2 / (1 + 1 / k))).item()
        assert out["psnr_mean_of"][str(k)] == pytest.approx(expected, abs=0.1)
    assert "64" not in out["psnr_mean_of"]  # that is psnr_mean
    assert out["spread_ratio"] == pytest.approx(1.0, rel=0.05)


def test_report_writes_the_tables_into_the_readme_section(posterior, tmp_path):
    row = {"nfe": 9, "psnr_mean": {"mean": 27.5, "std": 1}, "psnr_sample": {"mean": 24.25, "std": 1}}
    data = {
        "meta": {
            "samples": 8,
            "images": {"digits": 90, "photos": 16},
            "threads": 1,
            "load_average": [1.5, 1, 1],
            "command": "python benchmarks/posterior.py run --samples 8",
        },
        "suites": {
            "digits": {
                "sr_x4": {
                    "UD2M x": {
                        **row,
                        "spread_ratio": 0.9,
                        "cfid": 0.05,
                        "coverage_calibration_error": 0.1,
                        "psnr_mean_of": {"2": 26.0, "4": 27.0},
                    }
                }
            },
            "photos": {"inpaint_box": {"DiffPIR y": {**row, "nfe": 100, "spread_ratio": 0.125}}},
        },
    }
    (tmp_path / "results" / "posterior.json").write_text(json.dumps(data))
    text = posterior.report(tmp_path / "results" / "posterior.json")
    readme = (tmp_path / "README.md").read_text()
    assert text in readme and "old" not in readme and readme.endswith("tail\n")
    assert "| method | NFE per sample | PSNR: one sample | mean of 2 | mean of 4 | mean of 8 | spread ratio |" in text
    assert "| UD2M x | 9 | 24.25 | 26.00 | 27.00 | 27.50 | 0.90 | 0.050 | 0.100 |" in text
    assert "| DiffPIR y | 100 | 24.25 | – | – | 27.50 | 0.12 |" in text  # a row recorded without the counts
    assert "**Photos, inpaint_box, σ_y = 0.025 (16 held-out crops): 8 samples per observation**" in text
    assert (tmp_path / "results" / "posterior.md").read_text() == text + "\n"
    assert text.endswith("*python benchmarks/posterior.py run --samples 8 (1 thread(s), load average 1.5).*")
    # a partial run (some rows) names the run that left the other rows, first
    partial = "python benchmarks/posterior.py run --rows UD2M"
    data["meta"] = {**data["meta"], "command": partial, "earlier": [data["meta"]]}
    (tmp_path / "results" / "posterior.json").write_text(json.dumps(data))
    text = posterior.report(tmp_path / "results" / "posterior.json")
    assert text.endswith(
        "*python benchmarks/posterior.py run --samples 8 (1 thread(s), load average 1.5); then "
        f"{partial} (1 thread(s), load average 1.5): later runs replace the rows they name.*"
    )
    # a note on the results (say, which rows came from older exports) is printed once, also after a later run
    data["meta"]["earlier"][0]["note"] = "Rows marked 'former' came from older exports."
    data["meta"] = {**data["meta"], "earlier": [{**data["meta"], "earlier": []}, *data["meta"]["earlier"]]}
    (tmp_path / "results" / "posterior.json").write_text(json.dumps(data))
    text = posterior.report(tmp_path / "results" / "posterior.json")
    assert text.endswith("rows they name.*\n*Rows marked 'former' came from older exports.*")
    assert text.count("older exports") == 1


@pytest.mark.parametrize(
    ("settings", "methods"),
    [
        ({"t_start": 500}, {"t_start": 500, "residual_renoise": None}),
        ({"t_start": 300, "residual_renoise": True}, {"t_start": 300, "residual_renoise": True}),
        ({"t_start": 999, "residual_renoise": False}, {"t_start": 999, "residual_renoise": False}),
    ],
)
def test_ud2m_rows_use_the_settings_the_quality_benchmark_tuned(posterior, benchmark_script, settings, methods):
    """The quality benchmark's row name (its ``_ud2m_settings``) is parsed back into the start and re-noise rule of
    the UD2M samplers drawn here; a result without a tuned row keeps the export's defaults."""
    quality = benchmark_script("quality")
    prefix = "UD2M (1,000 steps)"
    rows = {f"{prefix}, N x K = 3 x 3, tuned start ({quality._ud2m_settings(settings)})": {}}
    tuned = posterior._ud2m_tuned_start(rows, prefix)
    assert tuned == settings
    drawn = posterior.tuned_methods(rows, [("x", None, tuned)])
    assert len(drawn) == 2
    for n in (3, 4):
        [(method, nfe, _)] = [v for k, v in drawn.items() if f"N x K = {n} x 3" in k]
        assert nfe == 3 * n and {k: getattr(method, k) for k in methods} == methods
    assert posterior._ud2m_tuned_start({f"{prefix}, N x K = 3 x 3": {}}, prefix) == {}
