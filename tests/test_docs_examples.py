"""The worked examples of docs/ run end to end: the custom operator of docs/operators.md (and its prox is right),
the Python API page of the README."""

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


def test_python_api_example_restores_digits_with_both_priors(tmp_path):
    """docs/examples/python_api.py (the README's Python API page) runs offline, and LATINO on either shipped prior
    (the DDPM and its consistency model) is far better than the bilinear lift of the measurement."""
    spec = importlib.util.spec_from_file_location("python_api_example", EXAMPLE.parent / "python_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    assert set(result) == {"A^T y (bilinear lift)", "LATINO-8 on digits", "LATINO-8 on digits-cm"}
    for name in ("LATINO-8 on digits", "LATINO-8 on digits-cm"):
        assert result[name] > result["A^T y (bilinear lift)"] + 3, name
    files = module.restore_files(tmp_path / "out")  # the sample.py job with a typed method object
    assert files["run"]["method"] == "latino" and len(files["run"]["settings"]["timesteps"]) == 8
    assert files["images"][0]["nfe"] == 8 and (tmp_path / "out" / "camera_std.png").is_file()
