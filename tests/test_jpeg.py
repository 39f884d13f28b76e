"""Tests of the differentiable JPEG operator (docs/method.md §2.6): codec pieces, agreement with libjpeg (Pillow),
rounding modes and their gradients, ``measure`` semantics, shapes and the gradient-step prox."""

import io

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from ud2m.operators.jpeg import (
    CHROMINANCE_BASE,
    JPEG,
    LUMINANCE_BASE,
    dct_matrix,
    jpeg_01,
    quantization_tables,
    rgb_to_ycbcr,
    round_cubic,
    ycbcr_to_rgb,
)
from ud2m.operators.noise import measure, sigma_internal
from ud2m.utils import randn


def photo(name: str, top: int, left: int, h: int, w: int) -> np.ndarray:
    """A uint8 crop of a photograph shipped with scikit-image (HWC for colour, HW for gray)."""
    return getattr(data, name)()[top : top + h, left : left + w]


def to_tensor(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """uint8 HWC/HW array -> (1, C, H, W) on [-1, 1]."""
    t = torch.from_numpy(a.astype(np.float64) / 255.0).to(dtype)
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    return 2 * t[None] - 1


def pil_jpeg(a: np.ndarray, quality: int) -> tuple[np.ndarray, dict]:
    """Pillow (libjpeg) encode with 4:2:0 subsampling, then decode; returns [0, 1] pixels and the written tables."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    im = Image.open(buf)
    return np.asarray(im).astype(np.float64) / 255.0, im.quantization


def mid_range(x: torch.Tensor) -> torch.Tensor:
    """Compress the range of an image on [-1, 1] to [-0.5, 0.5] so that no clamp of the codec is active."""
    return 0.5 * x


# ---------------------------------------------------------------------------------------------- building blocks
def test_dct_matrix_is_orthonormal_dct_ii():
    C = dct_matrix(8)
    torch.testing.assert_close(C @ C.T, torch.eye(8, dtype=torch.float64), atol=1e-14, rtol=0)
    reference = scipy.fft.dct(np.eye(8), type=2, norm="ortho", axis=0)  # columns are DCT-II of unit vectors
    np.testing.assert_allclose(C.numpy(), reference, atol=1e-14, rtol=0)


def test_ycbcr_round_trip_and_jfif_coefficients(rng):
    x = 255 * torch.rand(2, 3, 5, 7, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=1e-11, rtol=0)
    torch.testing.assert_close(rgb_to_ycbcr(ycbcr_to_rgb(x)), x, atol=1e-11, rtol=0)
    # The JFIF equations as published (6 decimals).
    R, G, B = x.unbind(1)
    jfif = torch.stack(
        [
            0.299 * R + 0.587 * G + 0.114 * B,
            128 - 0.168736 * R - 0.331264 * G + 0.5 * B,
            128 + 0.5 * R - 0.418688 * G - 0.081312 * B,
        ],
        dim=1,
    )
    torch.testing.assert_close(rgb_to_ycbcr(x), jfif, atol=1e-3, rtol=0)


def test_ycbcr_matches_pillow_within_integer_rounding():
    a = photo("astronaut", 100, 200, 32, 32)
    pil = np.asarray(Image.fromarray(a).convert("YCbCr")).astype(np.float64)
    ours = rgb_to_ycbcr(torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - pil).max() < 1.25  # Pillow uses fixed-point arithmetic and truncates
    assert np.abs(ours - pil).mean() < 0.75


def test_quantization_tables_at_50_are_the_annex_k_tables():
    Q_lum, Q_chrom = quantization_tables(50)
    assert torch.equal(Q_lum[0], torch.tensor(LUMINANCE_BASE, dtype=torch.float64))
    assert torch.equal(Q_chrom[0], torch.tensor(CHROMINANCE_BASE, dtype=torch.float64))
    assert Q_lum[0, 0, 0] == 16 and Q_chrom[0, 7, 7] == 99  # T.81 Tables K.1 and K.2


def test_quantization_tables_are_monotone_in_quality_and_in_range():
    Q_lum, Q_chrom = quantization_tables(torch.arange(1, 101))  # (100, 8, 8)
    for Q in (Q_lum, Q_chrom):
        assert Q.shape == (100, 8, 8)
        assert bool((Q[1:] <= Q[:-1]).all()), "tables must not grow with the quality factor"
        assert bool((Q >= 1).all() and (Q <= 255).all())
        assert bool((Q[0] == 255).any()) and bool((Q[-1] == 1).all())  # QF 1 saturates, QF 100 is lossless-ish


def test_quantization_tables_equal_those_libjpeg_writes():
    blank = np.zeros((16, 16, 3), np.uint8)
    for quality in range(1, 101):
        _, written = pil_jpeg(blank, quality)
        Q_lum, Q_chrom = quantization_tables(quality)
        np.testing.assert_array_equal(np.array(written[0]).reshape(8, 8), Q_lum[0].numpy(), err_msg=f"QF {quality}")
        np.testing.assert_array_equal(np.array(written[1]).reshape(8, 8), Q_chrom[0].numpy(), err_msg=f"QF {quality}")


def test_cubic_rounding_value_and_gradient(rng):
    v = 10 * torch.randn(1000, generator=rng, dtype=torch.float64, requires_grad=True)
    r = torch.round(v.detach())
    out = round_cubic(v)
    torch.testing.assert_close(out.detach(), r + (v.detach() - r) ** 3)
    (grad,) = torch.autograd.grad(out.sum(), v)
    torch.testing.assert_close(grad, 3 * (v.detach() - r) ** 2)


# ---------------------------------------------------------------------------------------------- agreement with libjpeg
@pytest.mark.parametrize("quality", [10, 50])
@pytest.mark.parametrize(
    "crop",
    [("astronaut", 100, 200, 128, 128), ("chelsea", 50, 150, 64, 64), ("astronaut", 30, 250, 72, 104)],
    ids=["astronaut128", "chelsea64", "astronaut72x104"],
)
def test_close_to_pillow_jpeg_colour(crop, quality):
    """libjpeg differs slightly (fixed-point colour conversion and DCT, integer output, fancy chroma upsampling at
    decode), so equality is not expected; our output must be far closer to Pillow's than the input is."""
    a = photo(*crop)
    reference, _ = pil_jpeg(a, quality)
    ours = (JPEG(quality, rounding="exact").A(to_tensor(a)) + 1) / 2
    ours = ours[0].permute(1, 2, 0).numpy()
    mse_ours = np.mean((ours - reference) ** 2)
    mse_input = np.mean((a / 255.0 - reference) ** 2)
    assert mse_ours < 0.25 * mse_input, (mse_ours, mse_input)


@pytest.mark.parametrize("quality", [10, 50])
def test_close_to_pillow_jpeg_gray(quality):
    a = photo("camera", 100, 100, 64, 80)
    reference, _ = pil_jpeg(a, quality)
    ours = ((JPEG(quality, rounding="exact").A(to_tensor(a)) + 1) / 2)[0, 0].numpy()
    assert np.mean((ours - reference) ** 2) < 0.1 * np.mean((a / 255.0 - reference) ** 2)


# ---------------------------------------------------------------------------------------------- rounding modes
def chroma_smoothing(x01: torch.Tensor) -> torch.Tensor:
    """The codec with rounding replaced by the identity, derived by hand: DCT, D/Q*Q and inverse DCT cancel
    (C orthonormal), leaving only 4:2:0 chroma pooling/upsampling between the colour transforms."""
    ycc = rgb_to_ycbcr(255 * x01)
    chroma = F.avg_pool2d(ycc[:, 1:], 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    return (ycbcr_to_rgb(torch.cat([ycc[:, :1], chroma], 1)) / 255).clamp(0, 1)


def test_identity_rounding_gives_chroma_smoothing():
    x01 = (mid_range(to_tensor(photo("astronaut", 100, 200, 32, 48))) + 1) / 2
    torch.testing.assert_close(jpeg_01(x01, 10.0, round_fn=lambda v: v), chroma_smoothing(x01), atol=1e-11, rtol=0)


def test_ste_forward_is_exact_and_cubic_is_not():
    x = to_tensor(photo("chelsea", 50, 150, 32, 32))
    exact = JPEG(10, rounding="exact").A(x)
    assert torch.equal(JPEG(10, rounding="ste").A(x), exact)
    assert not torch.allclose(JPEG(10, rounding="cubic").A(x), exact, atol=1e-3)


@pytest.mark.parametrize("shape", [(32, 48), (24, 40)])
def test_ste_vjp_equals_vjp_without_rounding(shape, rng):
    x = mid_range(to_tensor(photo("astronaut", 100, 200, *shape)))
    v = torch.randn(x.shape, generator=rng, dtype=x.dtype)
    op = JPEG(50, rounding="ste")
    for out in (op.A(x), 2 * jpeg_01((x + 1) / 2, 50.0, round_fn=lambda t: t) - 1):
        assert bool((out.abs() < 1).all()), "precondition: the output clamp is inactive"
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(2 * jpeg_01((xg + 1) / 2, 50.0, round_fn=lambda t: t) - 1, xg, v)
    torch.testing.assert_close(op.A_vjp(x, v), expected, atol=1e-12, rtol=0)


def test_ste_vjp_of_gray_jpeg_is_identity(rng):
    x = mid_range(to_tensor(photo("camera", 100, 100, 40, 24)))  # gray: no chroma smoothing, J' = I under STE
    v = torch.randn(x.shape, generator=rng, dtype=x.dtype)
    torch.testing.assert_close(JPEG(10).A_vjp(x, v), v, atol=1e-12, rtol=0)
    assert torch.count_nonzero(JPEG(10, rounding="exact").A_vjp(x, v)) == 0  # exact rounding: zero gradient


# ---------------------------------------------------------------------------------------------- measure
def test_measure_without_noise_is_exact_jpeg(device):
    x = to_tensor(photo("astronaut", 100, 200, 32, 48), torch.float32).to(device)
    exact = JPEG(10, rounding="exact").to(device).A(x)
    for rounding in ("ste", "cubic"):
        assert torch.equal(measure(JPEG(10, rounding=rounding).to(device), x, 0.0), exact)


def test_measure_adds_noise_before_compression():
    x = to_tensor(photo("chelsea", 50, 150, 32, 32), torch.float32)
    op, sigma_y = JPEG(30), 0.05
    y = measure(op, x, sigma_y, torch.Generator().manual_seed(3))
    n = randn(x.shape, torch.Generator().manual_seed(3))
    expected = JPEG(30, rounding="exact").A((x + sigma_internal(sigma_y) * n).clamp(-1, 1))
    assert torch.equal(y, expected)
    assert not torch.allclose(y, JPEG(30, rounding="exact").A(x) + sigma_internal(sigma_y) * n, atol=1e-3)


# ------------------------------------------------------------------------------------------ shapes, batching, errors
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_not_multiple_of_16_are_padded_by_replication_and_cropped(channels, device):
    x = to_tensor(photo("astronaut", 10, 20, 27, 35))[:, :channels].to(device)
    out = JPEG(20, rounding="exact").to(device).A(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (0, 48 - 35, 0, 32 - 27), mode="replicate")  # next multiples of 16
    expected = JPEG(20, rounding="exact").to(device).A(padded)[..., :27, :35]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_gray_equals_colour_jpeg_of_a_gray_rgb_image():
    x = to_tensor(photo("camera", 100, 100, 32, 48))  # (1, 1, H, W)
    # R = G = B gives Cb = Cr = 128 exactly, so the chroma coefficients quantise to 0 and RGB = Y.
    colour = JPEG(10, rounding="exact").A(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(colour, JPEG(10, rounding="exact").A(x).expand(-1, 3, -1, -1), atol=1e-9, rtol=0)


def test_per_sample_quality_equals_separate_runs():
    x = torch.cat([to_tensor(photo("astronaut", 100, 200, 32, 32)), to_tensor(photo("chelsea", 50, 150, 32, 32))])
    joint = JPEG([10, 75], rounding="exact").A(x)
    separate = torch.cat([JPEG(10, rounding="exact").A(x[:1]), JPEG(75, rounding="exact").A(x[1:])])
    torch.testing.assert_close(joint, separate, atol=1e-12, rtol=0)
    assert not torch.allclose(joint, JPEG(10, rounding="exact").A(x), atol=1e-3)


@pytest.mark.parametrize(
    ("make", "shape", "match"),
    [
        (lambda: JPEG(10), (1, 4, 16, 16), "1 \\(gray\\) or 3 \\(RGB\\) channels, got 4"),
        (lambda: JPEG(10), (3, 16, 16), "expected a 4-D batch"),
        (lambda: JPEG([10, 20]), (3, 3, 16, 16), "2 quality values for a batch of 3"),
        (lambda: JPEG(0), None, "quality must lie in \\[1, 100\\], got \\[0.0\\]"),
        (lambda: JPEG([50, 101]), None, "quality must lie in \\[1, 100\\], got \\[101.0\\]"),
        (lambda: JPEG(float("nan")), None, "quality must lie in \\[1, 100\\]"),
        (lambda: JPEG(10, rounding="floor"), None, "rounding must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().A(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------- prox
def jpeg_problem():
    """Two real photographs, their exact JPEG-10 measurements, and noisy starting points z (float32)."""
    x = torch.cat([to_tensor(photo("astronaut", 100, 200, 48, 48)), to_tensor(photo("chelsea", 50, 150, 48, 48))])
    x = x.float()
    y = measure(JPEG(10), x, 0.0)
    z = (x + 0.2 * randn(x.shape, torch.Generator().manual_seed(1))).clamp(-1, 1)
    return x, y, z


@pytest.mark.parametrize("rounding", ["ste", "cubic"])
def test_prox_decreases_objective(rounding):
    _, y, z = jpeg_problem()
    gamma = torch.tensor([5.0, 50.0])
    exact = JPEG(10, rounding="exact")

    def objective(x):  # (B,), with the exact JPEG model
        return gamma / 2 * (exact.A(x) - y).square().flatten(1).sum(1) + 0.5 * (x - z).square().flatten(1).sum(1)

    x_hat = JPEG(10, rounding=rounding).prox_l2(z, y, gamma)
    assert bool((objective(x_hat) < 0.5 * objective(z)).all()), (objective(x_hat), objective(z))
    assert bool((x_hat.abs() <= 1).all())


def test_prox_under_inference_mode_matches_autograd_mode():
    _, y, z = jpeg_problem()
    op = JPEG(10)
    with torch.inference_mode():
        x_inf = op.prox_l2(z, y, 10.0)
    with torch.inference_mode():
        op_inf = JPEG(10)  # buffers created under inference mode must not break the autograd inside the prox
    zg = z.clone().requires_grad_(True)
    x_grad = op_inf.prox_l2(zg, y, 10.0)
    torch.testing.assert_close(x_inf, x_grad.detach(), atol=0, rtol=0)
    x_grad.square().sum().backward()
    assert zg.grad is not None and bool(torch.isfinite(zg.grad).all()) and zg.grad.abs().sum() > 0


def test_prox_gradient_through_unrolled_steps_gray():
    """Gray image, STE, clamps inactive: J' = I, so each step x <- x - eta[gamma (J(x) - y) + x - z] has Jacobian
    1 - eta (gamma + 1) = 0 in x (only if A_vjp keeps its graph; a detached vjp gives 1 - eta), eta in z and
    eta gamma in y, eta = 1 / (1 + gamma). Hence d x_hat / d z = 1 / (1 + gamma), d x_hat / d y = gamma / (1 + gamma).
    """
    x = mid_range(to_tensor(photo("camera", 100, 100, 32, 32)))
    x = torch.cat([x, mid_range(to_tensor(photo("camera", 300, 200, 32, 32)))])
    y = JPEG(50, rounding="exact").A(x).requires_grad_(True)
    z = (x + 0.05 * randn(x.shape, torch.Generator().manual_seed(2), dtype=x.dtype)).requires_grad_(True)
    gamma = torch.tensor([2.0, 20.0], dtype=x.dtype)
    w = randn(x.shape, torch.Generator().manual_seed(4), dtype=x.dtype)
    x_hat = JPEG(50, rounding="ste", prox_steps=3).prox_l2(z, y, gamma)
    assert bool((x_hat.abs() < 1).all())
    grad_z, grad_y = torch.autograd.grad((w * x_hat).sum(), (z, y))
    eta = (1 / (1 + gamma))[:, None, None, None]
    torch.testing.assert_close(grad_z, eta * w, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad_y, eta * gamma[:, None, None, None] * w, atol=1e-10, rtol=0)
