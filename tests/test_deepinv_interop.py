"""Agreement of ud2m operators with deepinv's physics, and the deepinv wrapper ``as_operator`` (§2.2).

Everything runs in float64. Closed forms must agree to rounding error (1e-12). Where a prox goes through CG on
either side, both solvers are run to a relative residual of 1e-12 (deepinv's CG with ``eps=0``: its default
``eps=1e-8`` in the step-size denominators makes it stall near 1e-7). The matrix :math:`I + \\gamma A^\\top A` has
eigenvalues in :math:`[1, 1 + \\gamma\\|A\\|^2]`, so a residual :math:`r` means an error at most :math:`\\|r\\| \\le
10^{-12}\\|b\\|`: the tolerance 1e-9 below is a derived bound with a wide margin.

Kernel convention: tap ``(k // 2, k // 2)`` is the origin in both libraries, for odd and even kernels. The even
4s-tap bicubic SR filter therefore introduces the same half-pixel shift in both; no relative shift exists, and any
would make the ``A`` comparisons below fail by O(1).
"""

import math

import pytest
import torch

deepinv = pytest.importorskip("deepinv")
from deepinv.physics.functional import bicubic_filter, gaussian_blur  # noqa: E402

from ud2m.operators import GaussianBlur, Inpainting, KernelBlur, SuperResolution, measure  # noqa: E402
from ud2m.operators.interop import DeepinvOperator, as_operator  # noqa: E402
from ud2m.operators.kernels import bicubic_kernel, gaussian_kernel  # noqa: E402

DT = torch.float64
EXACT = {"atol": 1e-12, "rtol": 0.0}
CG = {"atol": 1e-9, "rtol": 0.0}


def _data(rng, shape, y_shape=None):
    x = torch.randn(shape, generator=rng, dtype=DT)
    z = torch.randn(shape, generator=rng, dtype=DT)
    v = torch.randn(y_shape or shape, generator=rng, dtype=DT)
    return x, z, v


def _random_kernel(rng, b, k):
    h = torch.rand(b, 1, k, k, generator=rng, dtype=DT)
    return h / h.sum(dim=(-2, -1), keepdim=True)


def _assert_same_maps(ours, theirs, x, v):
    torch.testing.assert_close(ours.A(x), theirs.A(x), **EXACT)
    torch.testing.assert_close(ours.A_adjoint(v), theirs.A_adjoint(v), **EXACT)


# ---------------------------------------------------------------------------------------------------- blur
@pytest.mark.parametrize("k", [5, 4])
@pytest.mark.parametrize("num_kernels", [1, 2])
def test_kernel_blur_matches_blur_fft(rng, k, num_kernels):
    """Odd and even, shared and per-sample kernels: A, A_adjoint and the closed-form prox agree."""
    h = _random_kernel(rng, num_kernels, k)
    x, z, v = _data(rng, (2, 3, 16, 12))
    ours, theirs = KernelBlur(h), deepinv.physics.BlurFFT(img_size=(3, 16, 12), filter=h)
    _assert_same_maps(ours, theirs, x, v)
    y = theirs.A(x)
    torch.testing.assert_close(ours.prox_l2(z, y, 0.7), theirs.prox_l2(z, y, 0.7), **EXACT)


@pytest.mark.parametrize("k", [5, 4])
def test_kernel_blur_matches_circular_blur(rng, k):
    """deepinv's direct-convolution ``Blur(padding="circular")``: same maps; its CG prox equals our closed form."""
    h = _random_kernel(rng, 1, k)
    x, z, v = _data(rng, (2, 3, 16, 16))
    ours = KernelBlur(h)
    theirs = deepinv.physics.Blur(filter=h, padding="circular", max_iter=1000, tol=1e-12)
    _assert_same_maps(ours, theirs, x, v)
    y = theirs.A(x)
    torch.testing.assert_close(ours.prox_l2(z, y, 0.7), theirs.prox_l2(z, y, 0.7, eps=0.0), **CG)


def test_gaussian_blur_matches_deepinv(rng):
    """Same kernels (size rule 2 floor(sigma/0.3 + 1) + 1) and the same operator.

    Anisotropic convention: deepinv's ``gaussian_blur(sigma=(s1, s2), angle=t)`` (degrees) equals our
    ``gaussian_kernel((s2, s1), angle=-radians(t))``.
    """
    for sigma in (1.0, 2.0, 3.0):
        theirs = gaussian_blur(sigma=(sigma, sigma))
        assert theirs.shape == GaussianBlur(sigma).kernel.shape
        torch.testing.assert_close(GaussianBlur(sigma).kernel, theirs, atol=1e-7, rtol=0)
    theirs = gaussian_blur(sigma=(1.0, 2.5), angle=30.0)
    ours = gaussian_kernel((2.5, 1.0), theirs.shape[-1], angle=-math.radians(30.0))
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=0)
    x, _, v = _data(rng, (1, 3, 16, 16))
    op = GaussianBlur(2.0)
    phys = deepinv.physics.BlurFFT(img_size=(3, 16, 16), filter=op.kernel.to(DT))
    _assert_same_maps(op, phys, x, v)


# ---------------------------------------------------------------------------------------------------- SR
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("padding", ["circular", "reflect"])
def test_superresolution_matches_downsampling(rng, factor, padding):
    """Bicubic SR: identical 4s-tap filters, maps and proxes (closed form for circular, CG for reflect).

    Even filters: no half-pixel shift between the libraries (both put tap 2s at the origin); a shift would make
    the ``A`` comparison fail by O(1).
    """
    assert torch.equal(bicubic_filter(factor), bicubic_kernel(factor))
    H = W = 16
    x, z, v = _data(rng, (2, 3, H, W), (2, 3, H // factor, W // factor))
    ours = SuperResolution(factor, "bicubic", padding=padding)
    theirs = deepinv.physics.Downsampling(
        img_size=(3, H, W),
        filter=bicubic_filter(factor).to(DT),
        factor=factor,
        padding=padding,
        max_iter=1000,
        tol=1e-12,
    )
    _assert_same_maps(ours, theirs, x, v)
    y = theirs.A(x)
    if padding == "circular":
        torch.testing.assert_close(ours.prox_l2(z, y, 0.7), theirs.prox_l2(z, y, 0.7), **EXACT)
    else:
        ours_x = ours.prox_l2_cg(z, y, 0.7, rtol=1e-12, max_iter=1000)
        torch.testing.assert_close(ours_x, theirs.prox_l2(z, y, 0.7, eps=0.0), **CG)


# ---------------------------------------------------------------------------------------------------- inpainting
def test_inpainting_matches_deepinv(rng):
    """Per-sample masks: A, A_adjoint and the closed-form prox agree."""
    mask = (torch.rand(2, 1, 16, 16, generator=rng) < 0.4).to(DT)
    x, z, v = _data(rng, (2, 3, 16, 16))
    ours, theirs = Inpainting(mask), deepinv.physics.Inpainting(img_size=(3, 16, 16), mask=mask)
    _assert_same_maps(ours, theirs, x, v)
    y = theirs.A(x)
    torch.testing.assert_close(ours.prox_l2(z, y, 0.7), theirs.prox_l2(z, y, 0.7), **EXACT)


# ---------------------------------------------------------------------------------------------------- wrapper
def _dense_prox(op, z, y, gamma):
    r"""Dense :math:`(I + \gamma_b A^\top A)^{-1}(z_b + \gamma_b A^\top y_b)` per sample, A built column by column."""
    n = z[0].numel()
    basis = torch.eye(n, dtype=DT).reshape(n, *z.shape[1:])
    out = []
    for b in range(z.shape[0]):  # a loop over two samples in a test reference, not in library code
        A = op.A(basis).reshape(n, -1).T  # (m, n): column j is A e_j
        M = torch.eye(n, dtype=DT) + gamma[b] * A.T @ A
        rhs = z[b].flatten() + gamma[b] * A.T @ y[b].flatten()
        out.append(torch.linalg.solve(M, rhs).reshape(z.shape[1:]))
    return torch.stack(out)


PHYSICS = {
    # name: (factory of a physics on 8x8 images with a 3x3 kernel h, prox delegated to deepinv under "auto")
    "Blur": (lambda h: deepinv.physics.Blur(filter=h, padding="circular"), False),
    "BlurFFT": (lambda h: deepinv.physics.BlurFFT(img_size=(1, 8, 8), filter=h), True),
    "Downsampling": (
        lambda h: deepinv.physics.Downsampling(img_size=(1, 8, 8), filter=h, factor=2, padding="circular"),
        True,
    ),
}


@pytest.mark.parametrize("name", list(PHYSICS))
def test_as_operator_wraps_linear_physics(rng, name):
    """A wrapped physics works with ``measure``, ``adjointness_test`` and ``prox_l2`` against a dense solve, for a
    scalar gamma (deepinv's closed form where one exists) and a per-sample gamma (our CG)."""
    make, delegates = PHYSICS[name]
    h = _random_kernel(rng, 1, 3)
    x, z, _ = _data(rng, (2, 1, 8, 8))
    ours = KernelBlur(h.float()) if name != "Downsampling" else SuperResolution(2, h.float())
    y = measure(as_operator(make(h.float())), x.float(), 0.05, torch.Generator().manual_seed(3))  # fp32, as §1.4
    y_ref = measure(ours, x.float(), 0.05, torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)  # same A, same noise draw
    op = as_operator(make(h), cg_rtol=1e-12, cg_max_iter=1000)
    assert isinstance(op, DeepinvOperator) and op.delegate_prox == delegates
    assert op.adjointness_test(x) < 1e-12
    y = op.A(x) + 0.1 * torch.randn(op.A(x).shape, generator=rng, dtype=DT)
    for gamma in (torch.tensor([0.7, 0.7], dtype=DT), torch.tensor([0.3, 5.0], dtype=DT)):
        tol = EXACT if delegates and gamma[0] == gamma[1] else CG
        torch.testing.assert_close(op.prox_l2(z, y, gamma), _dense_prox(op, z, y, gamma), **tol)


def test_deepinv_operator_prox_modes(rng):
    """``prox="deepinv"``/``"cg"`` force or forbid delegation; a forced CG prox equals deepinv's closed form."""
    h = _random_kernel(rng, 1, 3)
    assert DeepinvOperator(deepinv.physics.Blur(filter=h, padding="circular"), prox="deepinv").delegate_prox
    phys = deepinv.physics.BlurFFT(img_size=(1, 8, 8), filter=h)
    cg, closed = DeepinvOperator(phys, prox="cg", cg_rtol=1e-12), DeepinvOperator(phys)
    assert not cg.delegate_prox and closed.delegate_prox
    x, z, _ = _data(rng, (2, 1, 8, 8))
    torch.testing.assert_close(cg.prox_l2(z, phys.A(x), 2.0), closed.prox_l2(z, phys.A(x), 2.0), **CG)
    with pytest.raises(ValueError, match="prox must be one of"):
        DeepinvOperator(phys, prox="lsqr")


def test_as_operator_inpainting_measure_masks_noise(rng):
    """A wrapped deepinv Inpainting exposes its mask, so ``measure`` leaves missing entries exactly 0."""
    mask = (torch.rand(2, 1, 8, 8, generator=rng) < 0.5).float()
    op = as_operator(deepinv.physics.Inpainting(img_size=(3, 8, 8), mask=mask))
    y = measure(op, torch.randn(2, 3, 8, 8, generator=rng), 0.05, rng)
    missing = torch.broadcast_to(mask == 0, y.shape)
    assert bool((y[missing] == 0).all()) and bool((y[~missing] != 0).all())
    torch.testing.assert_close(op.num_observed(y), 3 * mask.flatten(1).sum(1))


def test_as_operator_passthrough_and_type_error():
    """ud2m operators pass through unchanged; anything else, nonlinear deepinv physics included, is a TypeError."""
    op = KernelBlur(torch.ones(3, 3))
    assert as_operator(op) is op
    with pytest.raises(TypeError, match="Linear"):
        as_operator(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Physics"):
        as_operator(deepinv.physics.Physics(A=lambda x: x**2))
