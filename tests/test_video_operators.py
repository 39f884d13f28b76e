"""Tests of the video operators (docs/method.md §2.5, §2.8 LVTINO rows): every identity is derived, none recorded.

Videos are (B, C, T, H, W) in float64 with T not a multiple of the pooling factor, so the replicate-padded last group
is always exercised. Each operator and composition must have an exact adjoint (also against a dense Jacobian), a
prox equal to the dense solve and to CG, the optimality condition, a projection for γ = ∞, and gradients that flow.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import ud2m.operators.base as base
from ud2m.operators import Compose, Inpainting, LinearOperator, NonlinearOperator, SuperResolution
from ud2m.operators.compose import CLOSED_FORM_PROX
from ud2m.operators.video import (
    PerFrame,
    PerFrameNonlinear,
    TemporalAveragePool,
    TemporalBlur,
    lvtino_problem_a,
    lvtino_problem_b,
    lvtino_problem_c,
    prox_blur_frames,
    prox_pool_frames,
)

DT = torch.float64
SHAPE = (2, 3, 10, 16, 16)  # T = 10 = 2*4 + 2: pooling x4 pads the last group (r = 2 real frames)
TINY = (2, 1, 5, 8, 8)  # dense-matrix size; pooling x2 pads the last group (r = 1)
PRESETS = Path(__file__).resolve().parents[1] / "ud2m" / "assets" / "operators" / "lvtino"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny FFTs are slow on shared threads


def _kernels(n, k, seed):
    return torch.rand(n, 1, k, k, generator=torch.Generator().manual_seed(seed), dtype=DT) + 0.05


def _sr(padding="circular", per_sample=True):
    return SuperResolution(2, _kernels(2, 5, 1) if per_sample else "bicubic", padding=padding)


def _pool(T):
    return TemporalAveragePool(4 if T >= 8 else 2, T)


def _mask(shape):
    B, _, _, H, W = shape
    return (torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(3)) < 0.5).to(DT)


OPERATORS = {
    "pool": lambda s: _pool(s[2]),
    "temporal_blur_uniform": lambda s: TemporalBlur(5),
    "temporal_blur_gaussian": lambda s: TemporalBlur(4, "gaussian", sigma=1.2),
    "per_frame_sr_circular": lambda s: PerFrame(_sr()),
    "per_frame_sr_reflect": lambda s: PerFrame(_sr("reflect", per_sample=False)),
    "per_frame_inpainting": lambda s: PerFrame(Inpainting(_mask(s))),
    "pool_then_sr": lambda s: Compose(PerFrame(_sr()), _pool(s[2])),
    "sr_then_pool": lambda s: Compose(_pool(s[2]), PerFrame(_sr())),
    "blur_then_sr": lambda s: Compose(PerFrame(_sr()), TemporalBlur(3)),
    "sr_then_blur": lambda s: Compose(TemporalBlur(4), PerFrame(_sr())),  # 4 taps: a complex OTF
    "pool_then_sr_reflect": lambda s: Compose(PerFrame(_sr("reflect")), _pool(s[2])),
    "sr_reflect_then_blur": lambda s: Compose(TemporalBlur(4), PerFrame(_sr("reflect"))),  # complex OTF
    "blur_then_inpainting": lambda s: Compose(PerFrame(Inpainting(_mask(s))), TemporalBlur(5)),
    "inpainting_then_pool": lambda s: Compose(_pool(s[2]), PerFrame(Inpainting(_mask(s)))),
}
COMPOSITIONS = ["pool_then_sr", "sr_then_pool", "blur_then_sr", "sr_then_blur"]


def make(name, shape=SHAPE):
    op = OPERATORS[name](shape).double()
    for m in op.modules():  # identities below are asserted to ~1e-9, tighter than the CG default 1e-5
        if isinstance(m, LinearOperator):
            m.cg_rtol, m.cg_max_iter = 1e-13, 2000
    return op


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def problem(op, shape=SHAPE):
    z, x = rand(shape, 10), rand(shape, 11)
    y = op.A(x) + 0.1 * rand(op.A(x).shape, 12)
    return z, y, torch.tensor([0.7, 3.0], dtype=DT)


def dense_matrix(op, x_shape):
    """Block-diagonal Jacobian of the batched linear map, ``(B*m, B*d)``."""
    J = torch.autograd.functional.jacobian(op.A, torch.zeros(x_shape, dtype=DT), vectorize=True)
    return J.reshape(-1, torch.Size(x_shape).numel())


# ---------------------------------------------------------------------------------------------- adjoints
@pytest.mark.parametrize("name", OPERATORS)
def test_adjointness(name, rng):
    op = make(name)
    assert op.adjointness_test(rand(SHAPE, 0), rng) < 1e-10


@pytest.mark.parametrize("name", OPERATORS)
def test_adjoint_equals_dense_transpose(name):
    op = make(name, TINY)
    J = dense_matrix(op, TINY)
    v = rand(op.A(torch.zeros(TINY, dtype=DT)).shape, 1)
    torch.testing.assert_close(op.A_adjoint(v).flatten(), J.T @ v.flatten(), rtol=0, atol=1e-12)
    x = rand(TINY, 2)
    torch.testing.assert_close(op.A(x).flatten(), J @ x.flatten(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- proxes
def dense_prox(op, z, y, gamma):
    """(I + ΓAᵀA)⁻¹(z + ΓAᵀy) by a dense solve; Γ repeats each sample's γ over its d entries."""
    J = dense_matrix(op, z.shape)
    G = torch.diag(gamma.repeat_interleave(z[0].numel()))
    lhs = torch.eye(J.shape[1], dtype=DT) + G @ J.T @ J
    return torch.linalg.solve(lhs, z.flatten() + G @ J.T @ y.flatten()).reshape(z.shape)


@pytest.mark.parametrize("name", OPERATORS)
def test_prox_equals_dense_solve(name):
    op = make(name, TINY)
    z, y, gamma = problem(op, TINY)
    torch.testing.assert_close(op.prox_l2(z, y, gamma), dense_prox(op, z, y, gamma), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", OPERATORS)
def test_prox_equals_cg_and_is_optimal(name):
    op = make(name)
    z, y, gamma = problem(op)
    x = op.prox_l2(z, y, gamma)
    torch.testing.assert_close(x, op.prox_l2_cg(z, y, gamma, rtol=1e-12, max_iter=2000), rtol=0, atol=1e-9)
    g = gamma[:, None, None, None, None]
    residual = g * op.A_adjoint(op.A(x) - y) + (x - z)  # ∇ of γ/2‖Ax − y‖² + ½‖x − z‖²
    assert residual.abs().max() < 1e-9


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_slice_reduction_equals_circular_closed_form(name):
    """The per-slice reduction (the frame operator's own prox per pooled frame / temporal frequency), which serves
    every frame operator, equals the Woodbury closed form of the circular SR on the same instance."""
    op = make(name)
    z, y, gamma = problem(op)
    temporal, frame = (op.outer, op.inner) if isinstance(op.inner, PerFrame) else (op.inner, op.outer)
    reduce = prox_pool_frames if isinstance(temporal, TemporalAveragePool) else prox_blur_frames
    fn = CLOSED_FORM_PROX[(type(op.outer), type(op.inner))]
    torch.testing.assert_close(reduce(temporal, frame, z, y, gamma), fn(op, z, y, gamma), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["pool_then_sr_reflect", "sr_reflect_then_blur", "blur_then_inpainting"])
def test_composition_prox_never_runs_whole_video_cg(name, monkeypatch):
    """Reflect-padded SR or inpainting per frame: the composition's prox and pseudo-inverse go through the
    per-slice reduction, never through CG on the whole video (which hit its cap on LVTINO problem B)."""
    op = make(name)
    z, y, gamma = problem(op)
    assert op.has_closed_form_prox()
    monkeypatch.setattr(Compose, "prox_l2_cg", lambda *a, **k: pytest.fail("whole-video CG prox"))
    monkeypatch.setattr(base, "conjugate_gradient", lambda *a, **k: pytest.fail("whole-video CG pseudo-inverse"))
    x = op.prox_l2(z, y, gamma)
    residual = gamma[:, None, None, None, None] * op.A_adjoint(op.A(x) - y) + (x - z)
    assert residual.abs().max() < 1e-9
    assert op.A_dagger(y, 0.05).shape == z.shape


@pytest.mark.parametrize(
    "name", ["pool", "temporal_blur_uniform", "per_frame_sr_circular", "pool_then_sr", "sr_reflect_then_blur"]
)
def test_projection_and_pseudo_inverse(name, monkeypatch):
    op = make(name, TINY)
    z, y, _ = problem(op, TINY)
    y = op.A(rand(TINY, 5))  # in the range of A (the uniform blur has OTF zeros)
    x = op.prox_l2(z, y, float("inf"))
    torch.testing.assert_close(op.A(x), y, rtol=0, atol=1e-9)
    J = dense_matrix(op, TINY)
    eps = 0.05
    if isinstance(op, Compose) and op.has_closed_form_prox():  # A_dagger goes through the exact prox, not CG
        monkeypatch.setattr(base, "conjugate_gradient", lambda *a, **k: pytest.fail("CG used for a closed form"))
    expected = J.T @ torch.linalg.solve(J @ J.T + eps * torch.eye(J.shape[0], dtype=DT), y.flatten())
    torch.testing.assert_close(op.A_dagger(y, eps).flatten(), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "name",
    ["pool_then_sr", "blur_then_sr", "per_frame_sr_reflect", "pool", "pool_then_sr_reflect", "sr_reflect_then_blur"],
)
def test_prox_gradcheck(name):
    shape = (2, 1, 5, 6, 6)
    op = make(name, shape)
    z, y, gamma = problem(op, shape)
    inputs = tuple(t.clone().requires_grad_(True) for t in (z, y, gamma))
    assert torch.autograd.gradcheck(lambda *a: op.prox_l2(*a), inputs, fast_mode=True)


# ---------------------------------------------------------------------------------------------- definitions
@pytest.mark.parametrize(("T", "f"), [(10, 4), (9, 3), (5, 2), (1, 4), (7, 8), (12, 5)])
def test_pool_matches_replicate_pad_and_gains(T, f):
    op = TemporalAveragePool(f, T).double()
    x = rand((2, 3, T, 4, 4), 0)
    T_lr = -(-T // f)
    padded = torch.cat([x, x[:, :, -1:].expand(-1, -1, T_lr * f - T, -1, -1)], dim=2)
    torch.testing.assert_close(op.A(x), F.avg_pool3d(padded, (f, 1, 1)), rtol=0, atol=1e-14)
    P = dense_matrix(op, (1, 1, T, 1, 1))  # (T_lr, T)
    torch.testing.assert_close(P @ P.T, torch.diag(op.frame_gains(dtype=DT)), rtol=0, atol=1e-14)
    lifted = op.lift(op.A(x))  # nearest-frame upsampling: frame t shows pooled frame t // f
    torch.testing.assert_close(lifted, op.A(x)[:, :, torch.arange(T) // f])


@pytest.mark.parametrize(("K", "kind", "sigma"), [(7, "uniform", None), (4, "uniform", None), (5, "gaussian", 0.8)])
def test_temporal_blur_is_circular_convolution(K, kind, sigma):
    op = TemporalBlur(K, kind, sigma).double()
    x = rand((2, 3, 9, 4, 4), 0)
    # tap j sits at offset j - K//2: y[t] = Σ_j h[j] x[t - j + K//2]
    expected = sum(op.kernel[j] * torch.roll(x, j - K // 2, dims=2) for j in range(K))
    torch.testing.assert_close(op.A(x), expected, rtol=0, atol=1e-14)
    assert abs(op.kernel.sum().item() - 1) < 1e-6


def test_per_frame_equals_loop_over_samples_and_frames():
    """Per-sample kernels and masks are applied to every frame of their own sample only."""
    kernels, mask = _kernels(2, 5, 1), _mask(SHAPE)
    x, gamma = rand(SHAPE, 0), torch.tensor([0.7, 3.0], dtype=DT)
    for op in (PerFrame(SuperResolution(2, kernels)), PerFrame(Inpainting(mask))):
        op = op.double()
        y = op.A(rand(SHAPE, 1))
        prox = op.prox_l2(x, y, gamma)
        for b in range(2):
            single = type(op.op)(2, kernels[b : b + 1]) if isinstance(op.op, SuperResolution) else Inpainting(mask[b])
            single = single.double()
            for t in range(SHAPE[2]):
                frame = x[b : b + 1, :, t]
                torch.testing.assert_close(op.A(x)[b, :, t], single.A(frame)[0], rtol=0, atol=1e-13)
                expected = single.prox_l2(frame, y[b : b + 1, :, t], gamma[b])[0]
                torch.testing.assert_close(prox[b, :, t], expected, rtol=0, atol=1e-12)
        assert op.op.kernel.shape[0] == 2 if isinstance(op.op, SuperResolution) else op.op.mask.shape[0] == 2


def test_per_frame_observed_mask():
    mask = _mask(SHAPE)
    op = PerFrame(Inpainting(mask)).double()
    y = op.A(rand(SHAPE, 0))
    expected = mask[:, :, None].expand(-1, -1, SHAPE[2], -1, -1)
    torch.testing.assert_close(torch.broadcast_to(op.observed_mask(y), y.shape)[:, :1], expected)
    torch.testing.assert_close(op.num_observed(y), mask.flatten(1).sum(1).float() * SHAPE[1] * SHAPE[2])
    assert PerFrame(_sr()).observed_mask(y) is None


def test_temporal_and_frame_operators_commute():
    x, v = rand(SHAPE, 0), rand((2, 3, 3, 8, 8), 1)
    a, b = make("pool_then_sr"), make("sr_then_pool")
    torch.testing.assert_close(a.A(x), b.A(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(a.A_adjoint(v), b.A_adjoint(v), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------- nonlinear frames
class _Squash(NonlinearOperator):
    """Channel-mixing nonlinear image map with a per-sample scale ``(B,)``, to test the frame-wise lift."""

    def __init__(self, scale):
        super().__init__(prox_steps=3)
        self.register_buffer("scale", scale)

    def A(self, x):
        return torch.tanh(self.scale[:, None, None, None] * x) + x.mean(1, keepdim=True)


def test_per_frame_nonlinear_equals_loop():
    scale = torch.tensor([0.5, 2.0], dtype=DT)
    op = PerFrameNonlinear(_Squash(scale))
    x, z, v = rand(SHAPE, 0), rand(SHAPE, 1), rand(SHAPE, 2)
    y, gamma = op.A(rand(SHAPE, 3)), torch.tensor([0.7, 3.0], dtype=DT)
    fx, prox = op.A(x), op.prox_l2(z, y, gamma)
    for b in range(2):
        single = _Squash(scale[b : b + 1])
        for t in (0, SHAPE[2] - 1):
            torch.testing.assert_close(fx[b, :, t], single.A(x[b : b + 1, :, t])[0], rtol=0, atol=1e-14)
            expected = single.prox_l2(z[b : b + 1, :, t], y[b : b + 1, :, t], gamma[b])[0]
            torch.testing.assert_close(prox[b, :, t], expected, rtol=0, atol=1e-13)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(op.A(xg), xg, v)
    torch.testing.assert_close(op.A_vjp(x, v), grad, rtol=0, atol=1e-13)
    assert op.noise_before_forward and op.prox_steps == 3


def test_per_frame_jpeg():
    jpeg = pytest.importorskip("ud2m.operators.jpeg")
    op = PerFrameNonlinear(jpeg.JPEG([10, 50]))
    x = rand((2, 3, 3, 16, 16), 0).float().clamp(-1, 1)
    out = op.simulate(x)
    for b, q in enumerate((10, 50)):
        torch.testing.assert_close(out[b, :, 1], jpeg.JPEG(q).simulate(x[b : b + 1, :, 1])[0])


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    pool = TemporalAveragePool(4, 10)
    with pytest.raises(ValueError, match="5-D"):
        pool.A(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="9 frames, expected 10"):
        pool.A(torch.zeros(1, 3, 9, 4, 4))
    with pytest.raises(ValueError, match="4 frames, expected 3"):
        pool.A_adjoint(torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 7 frames, got T=5"):
        TemporalBlur(7).A(torch.zeros(1, 3, 5, 4, 4))
    with pytest.raises(ValueError, match="5-D"):
        TemporalBlur(3).A(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="5-D"):
        PerFrame(_sr()).A(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="3 per-sample entries for a batch of 2"):
        PerFrame(SuperResolution(2, _kernels(3, 3, 0))).A(torch.zeros(2, 3, 4, 8, 8, dtype=DT))
    for bad in (lambda: TemporalAveragePool(0, 10), lambda: TemporalAveragePool(2, 0)):
        with pytest.raises(ValueError, match="positive integer"):
            bad()
    with pytest.raises(ValueError, match="needs a positive sigma"):
        TemporalBlur(5, "gaussian")
    with pytest.raises(ValueError, match="'uniform' or 'gaussian'"):
        TemporalBlur(5, "box")
    with pytest.raises(TypeError, match="PerFrameNonlinear"):
        PerFrame(_Squash(torch.ones(1)))
    with pytest.raises(TypeError, match="NonlinearOperator"):
        PerFrameNonlinear(_sr())


# ---------------------------------------------------------------------------------------------- LVTINO presets
def _load(path):
    from jsonargparse import ArgumentParser

    data = yaml.safe_load(path.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--operator", type=LinearOperator | NonlinearOperator)
    return parser.instantiate(parser.parse_object({"operator": data["operator"]})).operator, data


@pytest.mark.parametrize(
    ("name", "build", "frames"), [("A", lvtino_problem_a, 25), ("B", lvtino_problem_b, 25), ("C", lvtino_problem_c, 81)]
)
def test_lvtino_presets_match_constructors(name, build, frames):
    op, data = _load(PRESETS / f"{name}.yaml")
    ref = build(frames) if build is not lvtino_problem_b else build()
    assert data["num_frames"] == frames and data["image_size"] == [768, 1280] and data["sigma_y"] == 0.001
    assert type(op.outer) is type(ref.outer) is PerFrame and type(op.inner) is type(ref.inner)
    assert (op.outer.op.factor, op.outer.op.padding) == (ref.outer.op.factor, "reflect")
    torch.testing.assert_close(op.outer.op.kernel, ref.outer.op.kernel)
    torch.testing.assert_close(op.inner.state_dict(), ref.inner.state_dict())
    if isinstance(op.inner, TemporalAveragePool):
        assert (op.inner.factor, op.inner.num_frames) == (ref.inner.factor, frames)


def test_lvtino_jpeg_preset():
    pytest.importorskip("ud2m.operators.jpeg")
    op, data = _load(PRESETS / "jpeg.yaml")
    assert isinstance(op, PerFrameNonlinear) and type(op.op).__name__ == "JPEG"
    assert op.op.quality.tolist() == [10.0] and op.noise_before_forward and data["sigma_y"] == 0.01


@pytest.mark.parametrize(
    ("build", "lr_frames", "s"), [(lvtino_problem_a, 3, 4), (lvtino_problem_b, 9, 8), (lvtino_problem_c, 2, 8)]
)
def test_lvtino_constructors_small(build, lr_frames, s, rng):
    op = (build(9) if build is not lvtino_problem_b else build()).double()
    x = rand((1, 3, 9, 32, 32), 0)
    assert op.A(x).shape == (1, 3, lr_frames, 32 // s, 32 // s)
    assert op.adjointness_test(x, rng) < 1e-10
    circular = (build(9, padding="circular") if build is not lvtino_problem_b else build(padding="circular")).double()
    z, y, gamma = x, circular.A(rand(x.shape, 1)), torch.tensor([2.0], dtype=DT)
    expected = circular.prox_l2_cg(z, y, gamma, rtol=1e-12, max_iter=2000)
    torch.testing.assert_close(circular.prox_l2(z, y, gamma), expected, rtol=0, atol=1e-9)


def test_device_and_float32(device):
    """Buffers follow ``.to()``; float32 in gives float32 out, equal to the float64 CPU result to fp32 accuracy."""
    op64 = make("pool_then_sr")
    z, y, gamma = problem(op64)
    op = make("pool_then_sr").to(device=device, dtype=torch.float32)
    x = op.prox_l2(*(t.to(device, torch.float32) for t in (z, y, gamma)))
    assert x.dtype == torch.float32 and x.device.type == device.type
    torch.testing.assert_close(x.cpu().double(), op64.prox_l2(z, y, gamma), rtol=0, atol=1e-4)


@pytest.mark.parametrize("build", [lvtino_problem_a, lvtino_problem_b, lvtino_problem_c])
def test_closed_form_prox_is_accurate_in_float32_at_large_gamma(build):
    """The circular closed-form proxes in float32 agree with float64 at γ up to 3.5e9 (DiffPIR's first steps at
    σ_y = 0.001): the Woodbury form z + γAᵀ(I + γAAᵀ)⁻¹(y − Az) has no cancellation (the earlier r − γAᵀ(...)Ar form
    was off by 256 at γ = 3.5e9)."""
    op = build(9, padding="circular") if build is not lvtino_problem_b else build(padding="circular")
    z, x = rand((1, 3, 9, 32, 32), 0).float(), rand((1, 3, 9, 32, 32), 1).float()
    y = op.A(x)
    for gamma in (1.0, 1e6, 3.5e9):
        g = torch.tensor([gamma])
        exact = op.double().prox_l2(z.double(), y.double(), g.double())
        got = op.float().prox_l2(z, y, g)
        assert (got.double() - exact).abs().max() < 1e-4, gamma
