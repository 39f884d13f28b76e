"""Contract tests for the image operators (docs/method.md §2, house-style L): every identity is derived, none recorded.

Each operator in ``OPERATORS`` must have an exact adjoint, a prox equal to the dense solution of
(I + γAᵀA)x = z + γAᵀy that satisfies the optimality condition, a closed form equal to CG, a projection for γ = ∞
and gradients that flow (gradcheck in float64).
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ud2m.operators import (
    BoxInpainting,
    Compose,
    Denoising,
    GaussianBlur,
    Inpainting,
    KernelBlur,
    LinearOperator,
    RandomInpainting,
    SuperResolution,
    UniformBlur,
    conjugate_gradient,
    measure,
    sigma_internal,
)
from ud2m.operators.kernels import bicubic_kernel
from ud2m.operators.noise import measurement_to_internal

B, C, H = 2, 2, 8


def _rand_kernels(n, k, seed):
    return torch.rand(n, 1, k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05


OPERATORS = {
    "gaussian_blur": lambda: GaussianBlur(1.2, 5),
    "anisotropic_blur": lambda: GaussianBlur(1.5, 5, sigma2=0.6, angle=0.7),
    "uniform_blur": lambda: UniformBlur(3),
    "per_sample_kernel": lambda: KernelBlur(_rand_kernels(B, 4, 1)),
    "sr2_bicubic": lambda: SuperResolution(2, "bicubic"),
    "sr4_box": lambda: SuperResolution(4, "box"),
    "sr2_gaussian": lambda: SuperResolution(2, "gaussian", gaussian_sigma=1.0, gaussian_size=5),
    "sr2_per_sample": lambda: SuperResolution(2, _rand_kernels(B, 3, 2)),
    "sr2_reflect": lambda: SuperResolution(2, "bicubic", padding="reflect"),
    "sr2_reflect_per_sample": lambda: SuperResolution(2, _rand_kernels(B, 3, 3), padding="reflect"),
    "inpaint_random": lambda: RandomInpainting(H, 0.5, batch_size=B, seed=1),
    "inpaint_box": lambda: BoxInpainting(H, 4, position="random", batch_size=B, seed=2),
    "denoising": lambda: Denoising(),
    "compose_sr_blur": lambda: Compose(SuperResolution(2, "box"), GaussianBlur(1.0, 3)),
}
CLOSED_FORM = [k for k in OPERATORS if k not in ("sr2_reflect", "sr2_reflect_per_sample", "compose_sr_blur")]


def make(name):
    op = OPERATORS[name]().double()
    op.cg_rtol, op.cg_max_iter = 1e-12, 2000  # identities below are asserted to ~1e-8, tighter than the default 1e-5
    return op


def dense_matrix(op, x_shape):
    """Block-diagonal Jacobian of the (linear) batched map, ``(B*m, B*d)``."""
    x = torch.zeros(x_shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(op.A, x)
    m = J.shape[: J.ndim - len(x_shape)].numel()
    return J.reshape(m, -1)


def dense_prox(op, z, y, gamma):
    """(I + ΓAᵀA)⁻¹(z + ΓAᵀy) by a dense solve; Γ repeats each sample's γ over its d entries."""
    J = dense_matrix(op, z.shape)
    d = z[0].numel()
    G = torch.diag(gamma.repeat_interleave(d))
    lhs = torch.eye(J.shape[1], dtype=torch.float64) + G @ J.T @ J
    rhs = z.flatten() + G @ J.T @ y.flatten()
    return torch.linalg.solve(lhs, rhs).reshape(z.shape)


@pytest.fixture
def data(rng):
    x = torch.randn(B, C, H, H, generator=rng, dtype=torch.float64)
    z = torch.randn(B, C, H, H, generator=rng, dtype=torch.float64)
    gamma = torch.tensor([0.7, 5.0], dtype=torch.float64)
    return x, z, gamma


@pytest.mark.parametrize("name", OPERATORS)
def test_adjointness(name, data, rng):
    op = make(name)
    x, _, _ = data
    assert op.adjointness_test(x, rng) < 1e-12
    # and against the dense Jacobian, which tests A_adjoint independently of A's implementation
    J = dense_matrix(op, x.shape)
    y = op.A(x)
    v = torch.randn(y.shape, generator=rng, dtype=torch.float64)
    assert torch.allclose(op.A_adjoint(v).flatten(), J.T @ v.flatten(), atol=1e-12)


@pytest.mark.parametrize("name", OPERATORS)
def test_prox_matches_dense_solve_and_optimality(name, data):
    op = make(name)
    x, z, gamma = data
    y = op.A(x) + 0.1
    if op.observed_mask(y) is not None:
        y = y * op.observed_mask(y)
    p = op.prox_l2(z, y, gamma)
    assert torch.allclose(p, dense_prox(op, z, y, gamma), atol=1e-8 if name not in CLOSED_FORM else 1e-10)
    # optimality: γAᵀ(Ax̂ − y) + (x̂ − z) = 0
    g = gamma.view(-1, 1, 1, 1)
    residual = g * op.A_adjoint(op.A(p) - y) + (p - z)
    assert residual.abs().max() < (1e-8 if name not in CLOSED_FORM else 1e-10)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_equals_cg(name, data):
    op = make(name)
    x, z, gamma = data
    y = op.A(x)
    closed = op.prox_l2(z, y, gamma)
    cg = op.prox_l2_cg(z, y, gamma, rtol=1e-13, max_iter=2000)
    assert torch.allclose(closed, cg, atol=1e-9)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_pseudo_inverse_equals_cg(name, data):
    op = make(name)
    x, _, _ = data
    y = op.A(x)
    eps = 0.05
    closed = op.A_dagger(y, eps)
    cg = LinearOperator.A_dagger(op, y, eps)
    assert torch.allclose(closed, cg, atol=1e-8)


@pytest.mark.parametrize("name", OPERATORS)
def test_projection_is_consistent_and_closest(name, data):
    op = make(name)
    x, z, _ = data
    y = op.A(x)  # consistent data
    p = op.prox_l2(z, y, float("inf"))
    assert torch.allclose(op.A(p), y, atol=1e-6)
    # p − z lies in range(Aᵀ), so p is the closest consistent point: <p − z, x − p> = 0 for consistent x
    assert abs(torch.sum((p - z) * (x - p)).item()) < 1e-5
    # mixed finite / infinite gamma per sample
    mixed = op.prox_l2(z, y, torch.tensor([float("inf"), 2.0], dtype=torch.float64))
    assert torch.allclose(mixed[0], p[0], atol=1e-8)
    assert torch.allclose(mixed[1], op.prox_l2(z, y, 2.0)[1], atol=1e-8)


GRADCHECK = ["uniform_blur", "sr2_gaussian", "inpaint_random", "sr2_reflect_per_sample", "compose_sr_blur"]


@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck_through_prox(name, rng):
    op = make(name)
    op.cg_rtol, op.cg_max_iter = 1e-10, 200  # 16 unknowns: CG is exact after at most 16 iterations
    shape = (2, 1, 6, 6) if name in CLOSED_FORM else (2, 1, 4, 4)
    shape = (2, 1, H, H) if name.startswith("inpaint") else shape  # masks are built for H x H
    x = torch.randn(shape, generator=rng, dtype=torch.float64)
    z = torch.randn(shape, generator=rng, dtype=torch.float64, requires_grad=True)
    y = op.A(x).detach().requires_grad_(True)
    gamma = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, y, g: op.prox_l2(z, y, g), (z, y, gamma), atol=1e-6)


def test_implicit_cg_backward_equals_closed_form_gradient(rng):
    op = make("sr2_bicubic")
    x = torch.randn(B, C, H, H, generator=rng, dtype=torch.float64)
    w = torch.randn(B, C, H, H, generator=rng, dtype=torch.float64)
    grads = []
    for prox in (op.prox_l2, lambda z, y, g: op.prox_l2_cg(z, y, g, rtol=1e-13, max_iter=2000)):
        z = x.clone().requires_grad_(True)
        y = op.A(x).detach().requires_grad_(True)
        gamma = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
        (prox(z, y, gamma) * w).sum().backward()
        grads.append((z.grad, y.grad, gamma.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-8)


def test_cg_per_sample_stopping(rng):
    """A well-conditioned sample stops early and is frozen while an ill-conditioned one iterates on."""
    d = torch.tensor([[1.0] * 8, [1.0, 10.0, 100.0, 1e3, 2.0, 3.0, 50.0, 7.0]], dtype=torch.float64)
    b = torch.randn(2, 8, generator=rng, dtype=torch.float64)
    res = conjugate_gradient(lambda v: d * v, b, rtol=1e-10, max_iter=50)
    assert res.iterations[0] == 1 and res.iterations[1] > 1
    assert res.converged.all()
    assert torch.allclose(res.x, b / d, atol=1e-8)
    zero = conjugate_gradient(lambda v: d * v, torch.zeros_like(b), torch.ones_like(b), rtol=1e-10)
    assert torch.equal(zero.x, torch.zeros_like(b))


def test_box_filter_is_exact_average_pooling(rng):
    x = torch.randn(2, 3, 16, 16, generator=rng, dtype=torch.float64)
    op = SuperResolution(4, "box").double()
    assert torch.allclose(op.A(x), F.avg_pool2d(x, 4), atol=1e-12)
    assert torch.allclose(SuperResolution(4, "box", padding="reflect").double().A(x), F.avg_pool2d(x, 4), atol=1e-12)


def test_bicubic_kernel_properties():
    for s in (2, 4, 8, 16, 32):
        k = bicubic_kernel(s)[0, 0].double()
        assert k.shape == (4 * s, 4 * s)
        assert abs(k.sum().item() - 1) < 1e-6
        assert torch.allclose(k, k.flip(0).flip(1)) and torch.allclose(k, k.T)


@pytest.mark.parametrize("name", ["gaussian_blur", "sr2_bicubic", "sr4_box", "sr2_reflect", "uniform_blur"])
def test_sum_one_kernels_preserve_constants_and_range_conversion(name, data):
    op = make(name)
    ones = torch.ones(B, C, H, H, dtype=torch.float64)
    assert torch.allclose(op.A(ones), torch.ones_like(op.A(ones)), atol=1e-10)
    x01 = torch.rand(B, C, H, H, dtype=torch.float64)
    y01 = op.A(x01)
    assert torch.allclose(measurement_to_internal(op, y01, x01.shape), op.A(2 * x01 - 1), atol=1e-10)


def test_measure_noise_statistics_and_masks():
    op = RandomInpainting(32, 0.5, seed=3)
    x = torch.zeros(4, 3, 32, 32)
    y = measure(op, x, 0.05, torch.Generator().manual_seed(0))
    m = op.mask.expand_as(y).bool()
    assert torch.equal(y[~m], torch.zeros_like(y[~m]))  # missing entries exactly 0
    n = m.sum().item()
    std = y[m].std().item()
    # sample std of n Gaussians has relative std ≈ 1/sqrt(2n); allow 6 of them
    assert abs(std / sigma_internal(0.05) - 1) < 6 / math.sqrt(2 * n)


def test_measure_generators_reproducible_and_batch_independent():
    op = GaussianBlur(1.0, 5)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    y_all = measure(op, x, torch.tensor([0.01, 0.02, 0.03]), gens())
    y_one = measure(op, x[1:2], 0.02, [torch.Generator().manual_seed(6)])
    assert torch.allclose(y_all[1:2], y_one, atol=1e-6)  # batched vs single FFT rounding only
    y1, y2 = (measure(op, x, 0.01, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(y1, y2)


def test_num_observed_and_lift():
    op = RandomInpainting(8, 0.5, batch_size=2, seed=0)
    y = op.A(torch.ones(2, 3, 8, 8))
    assert torch.equal(op.num_observed(y), op.mask.flatten(1).sum(1) * 3)
    sr = SuperResolution(4, "bicubic")
    assert sr.lift(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 16, 16)
    assert Denoising().num_observed(torch.zeros(2, 3, 4, 4)).tolist() == [48.0, 48.0]


# ---------------------------------------------------------------------------------------------- bad input
def test_reflect_padding_needs_large_enough_image():
    with pytest.raises(ValueError, match="reflect padding"):
        SuperResolution(2, "bicubic", padding="reflect").A(torch.zeros(1, 1, 4, 4))


def test_sr_size_not_divisible():
    with pytest.raises(ValueError, match=r"10x10 is not divisible by the SR factor 4"):
        SuperResolution(4).A(torch.zeros(1, 3, 10, 10))


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"mask is \(8, 8\) but the image is \(16, 16\)"):
        Inpainting(torch.ones(8, 8)).A(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="0 \\(missing\\) or 1"):
        Inpainting(torch.full((8, 8), 0.5))


def test_at_size_redraws_size_bound_masks_and_keeps_everything_else():
    random = RandomInpainting(256, p_obs=0.3, seed=7)
    assert torch.equal(random.at_size((32, 48)).mask, RandomInpainting((32, 48), p_obs=0.3, seed=7).mask)
    assert random.at_size((256, 256)) is random
    box = BoxInpainting(256, 128, position="center").at_size((32, 32)).mask[0, 0]
    assert torch.equal(box, BoxInpainting(32, 16, position="center").mask[0, 0])  # half the side at any size
    band = BoxInpainting(1024, (204, 822), position=(375, 101)).at_size((64, 64)).mask[0, 0]
    missing = (band == 0).nonzero()
    assert missing.min(0).values.tolist() == [23, 6] and (missing.max(0).values - missing.min(0).values).tolist() == [
        12,
        50,
    ]  # rows round(375/16) .. +round(204/16) - 1, columns round(101/16) .. +round(822/16) - 1
    fixed = Inpainting(torch.ones(8, 8))
    assert fixed.at_size((8, 8)) is fixed
    with pytest.raises(ValueError, match="fixed 8x8 asset and takes only 8x8 images, got 16x16"):
        fixed.at_size((16, 16))
    sr = SuperResolution(4)
    assert sr.at_size((64, 64)) is sr
    composed = Compose(RandomInpainting(8, seed=1), SuperResolution(2)).at_size((32, 32))
    assert composed.A(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 16, 16)
    assert torch.equal(composed.outer.mask, RandomInpainting(16, seed=1).mask)


def test_wrong_ndim_and_batch():
    with pytest.raises(ValueError, match=r"expected a 4-D batch \(B, C, H, W\), got shape \(3, 8, 8\)"):
        GaussianBlur(1.0, 3).A(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="3 kernels for a batch of 2"):
        KernelBlur(torch.rand(3, 1, 3, 3)).A(torch.zeros(2, 1, 8, 8))


def test_bad_kernels():
    with pytest.raises(ValueError, match="sum to a positive value"):
        KernelBlur(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="larger than the image"):
        GaussianBlur(3.0, 21).A(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        KernelBlur(torch.tensor([[float("nan"), 1.0]]))


def test_nan_measurement_is_reported():
    op = GaussianBlur(1.0, 3)
    y = torch.zeros(1, 1, 8, 8)
    y[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="measurement y contains 1 NaN/Inf"):
        op.check_measurement(y)
    with pytest.raises(ValueError, match=r"expected \(1, 1, 4, 4\)"):
        SuperResolution(2).check_measurement(torch.zeros(1, 1, 8, 8), (1, 1, 8, 8))


def test_kernel_and_mask_files(tmp_path):
    import numpy as np
    from PIL import Image

    k = np.random.default_rng(0).random((5, 5)).astype(np.float32)
    np.save(tmp_path / "k.npy", k)
    op = KernelBlur(str(tmp_path / "k.npy"))
    assert torch.allclose(op.kernel[0, 0], torch.from_numpy(k / k.sum()))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert Inpainting(str(tmp_path / "m.png")).mask.sum() == 32
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*missing\.png"):
        Inpainting(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read mask image"):
        Inpainting(str(tmp_path / "bad.png"))


@pytest.mark.parametrize("name", ["gaussian_blur", "sr2_bicubic", "sr2_reflect", "inpaint_random", "denoising"])
def test_pseudo_inverse_takes_one_eps_per_sample(name, data):
    """A (B,) eps regularises each sample with its own value: equal to running the samples one at a time."""
    op = make(name)
    x, _, _ = data
    y = op.A(x)
    eps = torch.tensor([1e-4, 0.3], dtype=torch.float64)
    both = op.A_dagger(y, eps)
    for i in range(2):
        alone = op.A_dagger(y, float(eps[i]))
        assert torch.allclose(both[i], alone[i], atol=1e-8)


def test_otf_cache_follows_the_kernel_and_inference_mode(rng):
    """The cached OTF is recomputed after an in-place kernel edit or a dtype change, and one computed under
    inference mode never enters an autograd graph."""
    op = GaussianBlur(1.0, 5)
    x = torch.randn(1, 1, 8, 8, generator=rng)
    with torch.inference_mode():
        op.A(x)
    z = x.clone().requires_grad_(True)
    op.prox_l2(z, op.A(x), 2.0).sum().backward()  # would raise if the inference-mode OTF were reused
    assert z.grad is not None
    before = op.A(x)
    op.kernel.mul_(0).add_(1 / 25)  # now a 5x5 box
    assert torch.allclose(op.A(x), UniformBlur(5).A(x), atol=1e-6) and not torch.allclose(op.A(x), before)
    assert op.double().A(x.double()).dtype == torch.float64


def test_operators_built_under_inference_mode_apply_and_follow_in_place_edits(rng):
    """A kernel created under ``inference_mode`` has no version counter: the operator must still work (the OTF is
    then recomputed every call, so an in-place edit is seen) and equal the same operator built normally."""
    x = torch.randn(2, 1, 16, 16, generator=rng)
    with torch.inference_mode():
        blur, sr = GaussianBlur(1.0, 5), SuperResolution(2, filter="gaussian", gaussian_sigma=1.0, gaussian_size=3)
        assert torch.equal(blur.A(x), GaussianBlur(1.0, 5).A(x))
        y = sr.A(x)
        assert torch.allclose(sr.prox_l2(x, y, 3.0), SuperResolution(2, filter="gaussian", gaussian_sigma=1.0,
                                                                      gaussian_size=3).prox_l2(x, y, 3.0))  # fmt: skip
        blur.kernel.mul_(0).add_(1 / 25)
        assert torch.allclose(blur.A(x), UniformBlur(5).A(x), atol=1e-6)


def test_every_shipped_preset_loads_from_the_package_with_its_weight_rules():
    """Presets are package data (ud2m/assets/operators, read through importlib.resources, so a wheel has them);
    each one builds its operator and the weight rules it declares (the rules live in the preset, not in a table
    keyed by preset name)."""
    from importlib import resources

    from ud2m.operators.presets import PRESET_DIR, list_presets, load_preset
    from ud2m.solvers.weights import preset_rules

    assert PRESET_DIR == Path(str(resources.files("ud2m"))) / "assets" / "operators"
    names = list_presets()
    assert len(names) == len(list(PRESET_DIR.rglob("*.yaml"))) > 20
    for name in names:
        preset = load_preset(name)
        assert isinstance(preset.operator, torch.nn.Module) and preset.sigma_y >= 0, name
        for method in preset.meta.get("solver") or {}:
            assert preset_rules(preset.meta, method), (name, method)
