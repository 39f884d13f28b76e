"""The worked custom-operator example of docs/operators.md works end to end and is mathematically right."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "colorization.py"


def load_example():
    spec = importlib.util.spec_from_file_location("colorization_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_operator_prox_equals_sherman_morrison(rng):
    op = load_example().Grayscale().double()
    x = torch.randn(2, 3, 8, 8, generator=rng, dtype=torch.float64)
    z = torch.randn(2, 3, 8, 8, generator=rng, dtype=torch.float64)
    y = op.A(x)
    gamma = torch.tensor([0.5, 20.0], dtype=torch.float64)
    assert op.adjointness_test(x, rng) < 1e-12
    # (I + γwwᵀ)⁻¹(z + γw y) = z + γw(y − wᵀz)/(1 + γ‖w‖²) per pixel (Sherman–Morrison)
    w = op.w
    g = gamma.view(-1, 1, 1, 1)
    expected = z + g * w * (y - (w * z).sum(1, keepdim=True)) / (1 + g * (w**2).sum())
    assert torch.allclose(op.prox_l2(z, y, gamma), expected, atol=1e-6)
    assert torch.allclose(
        op.prox_l2(z, y, float("inf")), z + w * (y - (w * z).sum(1, keepdim=True)) / (w**2).sum(), atol=1e-6
    )


def test_custom_operator_example_runs_on_a_real_photo(capsys):
    load_example().main()
    out = capsys.readouterr().out
    assert "prox output (1, 3, 512, 512)" in out
