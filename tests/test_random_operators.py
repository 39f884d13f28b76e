"""Random operator generators (docs/method.md §2.7) and motion-blur kernels: seeding, ranges, statistics, and the
operator identities (adjointness, prox optimality) of what they return.

Statistical tolerances are derived in each test (binomial / DKW / Wishart-type bounds at a family-wise error
probability of about 1e-6); the seeds are fixed, so a failure is a real regression, not bad luck.
"""

import math
from statistics import NormalDist

import pytest
import torch

from ud2m.operators import Inpainting, KernelBlur, SuperResolution, measure
from ud2m.operators.kernels import gaussian_kernel
from ud2m.operators.motion import (
    MotionBlur,
    fit_to_support,
    gp_trajectory,
    motion_kernel_gp,
    motion_kernel_walk,
    se_cholesky,
    splat_bilinear,
)
from ud2m.operators.random import (
    RandomBoxMask,
    RandomGaussianBlur,
    RandomInpaintingMask,
    RandomMotionBlur,
    RandomOperatorMix,
    RandomSuperResolution,
    RandomUniformBlur,
    gaussian_kernels,
    sample_sigma_y,
)

SIZE = (32, 32)
B = 4
ALPHA = 1e-6  # family-wise error probability of each statistical assertion


def _make(name):
    """name -> (generator, two seeds give different operators)."""
    return {
        "gaussian": (RandomGaussianBlur(), True),
        "gaussian_aniso": (RandomGaussianBlur(size=15, anisotropic=True), True),
        "motion_gp": (RandomMotionBlur(size=15, kind="gp", num_points=300), True),
        "motion_walk": (RandomMotionBlur(size=15, kind="walk"), True),
        "uniform": (RandomUniformBlur(5), False),
        "inpaint": (RandomInpaintingMask(), True),
        "box": (RandomBoxMask(), True),
        "sr_bicubic": (RandomSuperResolution(factors=(2, 4)), False),  # draws only the factor: seeds may agree
        "sr_gaussian": (RandomSuperResolution(factors=(2, 4), filter=RandomGaussianBlur(size=7)), True),
        "mix": (RandomOperatorMix([RandomGaussianBlur(size=7), RandomInpaintingMask()], weights=[1.0, 2.0]), True),
    }[name]


BLURS = ["gaussian", "gaussian_aniso", "motion_gp", "motion_walk", "uniform"]
NAMES = [*BLURS, "inpaint", "box", "sr_bicubic", "sr_gaussian", "mix"]


def _draw(gen, seed, batch_size=B):
    return gen(batch_size, SIZE, torch.Generator().manual_seed(seed))


def _state(op):
    """Everything that defines a drawn operator: its type, SR factor and buffers."""
    return type(op), getattr(op, "factor", None), {k: v.clone() for k, v in op.named_buffers()}


def _same(a, b):
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def second_moments(kernels):
    """Mean ``(B, 2)`` and second-moment matrix ``(B, 2, 2)`` of kernels seen as distributions over (row, col)."""
    k = kernels.shape[-1]
    r = torch.arange(k, dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)  # (k*k, 2)
    w = kernels.double().flatten(1)
    mu = w @ pos
    d = pos[None] - mu[:, None]
    return mu, torch.einsum("bn,bni,bnj->bij", w, d, d)


# ---------------------------------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("name", NAMES)
def test_generators_are_reproducible(name):
    """Same seed -> identical operator; a different seed -> a different one (for generators that draw)."""
    gen, random = _make(name)
    first = _state(_draw(gen, 5))
    assert _same(first, _state(_draw(gen, 5)))
    if random:
        assert not _same(first, _state(_draw(gen, 6)))


@pytest.mark.parametrize("name", ["gaussian_aniso", "motion_walk", "box", "sr_gaussian", "inpaint"])
def test_generators_honour_device(name, device):
    """``device=`` puts the operator's buffers there; the draws (from a CPU generator) are those of a CPU call."""
    gen, _ = _make(name)
    op = gen(B, SIZE, torch.Generator().manual_seed(0), device=device)
    ref = dict(_draw(gen, 0).named_buffers())
    for key, buf in op.named_buffers():
        assert buf.device.type == device.type
        torch.testing.assert_close(buf.cpu(), ref[key])


@pytest.mark.parametrize("name", [*BLURS, "sr_gaussian"])
def test_kernels_are_normalised_and_per_sample(name):
    """Kernels are non-negative, sum to 1 and, when random, differ between every pair of samples."""
    gen, random = _make(name)
    kernel = _draw(gen, 0).kernel
    assert kernel.shape[:2] == (B, 1)
    assert bool((kernel >= 0).all())
    torch.testing.assert_close(kernel.sum(dim=(-2, -1)), torch.ones(B, 1), atol=1e-5, rtol=0)
    if random:
        flat = kernel.flatten(1)
        assert bool((torch.cdist(flat, flat) + torch.eye(B) > 0).all())


def test_gaussian_blur_params_and_kernels():
    """sigma in range, angle in [0, pi); the batched kernels equal ``kernels.gaussian_kernel`` sample by sample."""
    gen = RandomGaussianBlur(size=15, sigma_range=(0.5, 3.0), anisotropic=True)
    p = gen.sample_params(64, torch.Generator().manual_seed(0))
    assert bool(((p.sigma1 >= 0.5) & (p.sigma1 <= 3.0) & (p.sigma2 >= 0.5) & (p.sigma2 <= 3.0)).all())
    assert bool(((p.angle >= 0) & (p.angle < math.pi)).all())
    kernels = gaussian_kernels(p.sigma1[:3], p.sigma2[:3], p.angle[:3], 15)
    for b in range(3):
        sigma = (float(p.sigma1[b]), float(p.sigma2[b]))
        torch.testing.assert_close(kernels[b : b + 1], gaussian_kernel(sigma, 15, angle=float(p.angle[b])))
    iso = RandomGaussianBlur().sample_params(8, torch.Generator().manual_seed(0))
    assert torch.equal(iso.sigma1, iso.sigma2) and not bool(iso.angle.any())
    assert RandomGaussianBlur().size == 23  # 2 * floor(3.0 / 0.3 + 1) + 1


# ---------------------------------------------------------------------------------------------------- masks
def test_inpainting_mask_fraction_within_binomial_bound():
    r"""Each mask's observed count is Binomial(n, p_b) with the replayed p_b: with the normal approximation
    (n p (1 - p) >= 600 here) and a Bonferroni correction over the B samples,
    :math:`|\hat p_b - p_b| \le z_{1 - \alpha/(2B)} \sqrt{p_b(1 - p_b)/n}`."""
    gen, batch, size = RandomInpaintingMask((0.2, 0.5)), 16, (64, 64)
    p = gen.sample_params(batch, torch.Generator().manual_seed(1))
    mask = gen(batch, size, torch.Generator().manual_seed(1)).mask
    assert mask.shape == (batch, 1, *size) and bool(((mask == 0) | (mask == 1)).all())  # shared over channels
    assert bool(((p >= 0.2) & (p <= 0.5)).all()) and p.unique().numel() == batch
    n = size[0] * size[1]
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * batch))
    frac = mask.flatten(1).mean(1)
    assert bool(((frac - p).abs() <= z * torch.sqrt(p * (1 - p) / n)).all())


def test_box_mask_sizes_and_positions():
    """Sides in [round(0.25 H), round(0.5 H)], boxes inside the image, exactly side^2 missing pixels there, and
    positions spread over the whole range: with u = top / (H - side) ~ U[0, 1] (up to rounding),
    P(all 200 draws > 0.1) = 0.9^200 < 1e-9 (same for < 0.9 and for ``left``)."""
    gen, batch, (H, W) = RandomBoxMask((0.25, 0.5)), 200, (40, 48)
    p = gen.sample_params(batch, (H, W), torch.Generator().manual_seed(2))
    mask = gen(batch, (H, W), torch.Generator().manual_seed(2)).mask
    assert bool(((p.side >= round(0.25 * H)) & (p.side <= round(0.5 * H))).all())
    assert bool(((p.top >= 0) & (p.top + p.side <= H) & (p.left >= 0) & (p.left + p.side <= W)).all())
    torch.testing.assert_close((1 - mask).flatten(1).sum(1), (p.side**2).float())
    for b in range(3):  # the missing pixels are exactly the box
        box = mask[b, 0, p.top[b] : p.top[b] + p.side[b], p.left[b] : p.left[b] + p.side[b]]
        assert not bool(box.any())
    for u in (p.top / (H - p.side), p.left / (W - p.side)):
        assert float(u.min()) < 0.1 and float(u.max()) > 0.9


# ---------------------------------------------------------------------------------------------------- SR and mixtures
def test_superresolution_factor_and_filters():
    """One factor per call from ``factors`` (both seen in 40 calls: P(miss) = 2 * 0.5^40); per-sample kernels from
    a blur generator replay that generator's draws; an image size not divisible by the factor is an error."""
    gen = RandomSuperResolution(factors=(2, 4), filter=RandomGaussianBlur(size=7))
    g = torch.Generator().manual_seed(0)
    assert {gen.sample_factor(g) for _ in range(40)} == {2, 4}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    op = gen(B, SIZE, g1)
    assert isinstance(op, SuperResolution) and op.factor == gen.sample_factor(g2)
    torch.testing.assert_close(op.kernel, RandomGaussianBlur(size=7)(B, SIZE, g2).kernel)  # renormalised: ulps
    with pytest.raises(ValueError, match="not divisible"):
        RandomSuperResolution(factors=(8,))(B, (12, 12), g)


def test_mix_picks_one_generator_with_the_given_weights():
    r"""Weights [1, 3]: the count of picks of generator 0 in N = 4000 calls is Binomial(N, 1/4); it lies within
    :math:`z_{1-\alpha/2}\sqrt{N p (1-p)}` of Np. A zero weight is never picked; the whole batch shares one family."""
    mix = RandomOperatorMix([RandomGaussianBlur(size=7), RandomInpaintingMask()], weights=[1.0, 3.0])
    g, N = torch.Generator().manual_seed(0), 4000
    picks = torch.tensor([mix.sample_index(g) for _ in range(N)])
    z = NormalDist().inv_cdf(1 - ALPHA / 2)
    assert abs(int((picks == 0).sum()) - N / 4) <= z * math.sqrt(N * 0.25 * 0.75)
    never = RandomOperatorMix([RandomGaussianBlur(size=7), RandomInpaintingMask()], weights=[0.0, 1.0])
    assert all(isinstance(never(B, SIZE, g), Inpainting) for _ in range(20))
    with pytest.raises(ValueError, match="weights"):
        RandomOperatorMix([RandomGaussianBlur()], weights=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------------- noise levels
def _ks_uniform(u):
    """Kolmogorov-Smirnov distance between the empirical CDF of ``u`` and U[0, 1]."""
    u, _ = torch.sort(u.double())
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


def test_sigma_y_log_uniform():
    r"""Range, and a KS test of :math:`u = \log(\sigma/\text{low}) / \log(\text{high}/\text{low})` against U[0, 1]:
    by the DKW inequality :math:`P(D_n > \epsilon) \le 2e^{-2n\epsilon^2}`, so :math:`\epsilon =
    \sqrt{\log(2/\alpha)/(2n)}`. Linearly uniform draws must fail that test (power check), and pass the linear one."""
    n, low, high = 20000, 0.001, 0.05
    eps = math.sqrt(math.log(2 / ALPHA) / (2 * n))
    s_log = sample_sigma_y(n, torch.Generator().manual_seed(0), low, high).double()
    s_lin = sample_sigma_y(n, torch.Generator().manual_seed(0), low, high, log_uniform=False).double()
    for s in (s_log, s_lin):
        assert s.shape == (n,) and bool(((s >= low * (1 - 1e-6)) & (s <= high * (1 + 1e-6))).all())
    to_log_u = lambda s: torch.log(s / low) / math.log(high / low)  # noqa: E731
    assert _ks_uniform(to_log_u(s_log)) <= eps
    assert _ks_uniform(to_log_u(s_lin)) > eps
    assert _ks_uniform((s_lin - low) / (high - low)) <= eps


# ---------------------------------------------------------------------------------------------- operator identities
@pytest.mark.parametrize("name", NAMES)
def test_generated_operators_are_consistent(name):
    r"""float64: adjointness, and the prox optimality condition :math:`\gamma A^\top(A\hat x - y) + \hat x - z = 0`
    with per-sample gamma; ``measure`` and ``lift`` give the expected shapes."""
    gen, _ = _make(name)
    op = _draw(gen, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, *SIZE, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert op.adjointness_test(x, g) < 1e-12
    y = op.A(x) + 0.1 * torch.randn(op.A(x).shape, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    x_hat = op.prox_l2(z, y, gamma)
    residual = gamma[:, None, None, None] * op.A_adjoint(op.A(x_hat) - y) + x_hat - z
    assert float(residual.norm() / z.norm()) < 1e-10
    y32 = measure(op, x.float(), sample_sigma_y(B, g), g)
    assert y32.shape == op.A(x).shape and bool(torch.isfinite(y32).all())
    assert op.lift(y32).shape == x.shape


# ---------------------------------------------------------------------------------------------------- motion blur
@pytest.mark.parametrize("kind", ["walk", "gp"])
def test_motion_blur_operator(kind):
    """Requested size and batch, replayable from its seed, different across seeds, normalised."""
    op = MotionBlur(21, 0.5, kind=kind, batch_size=3, seed=4)
    assert isinstance(op, KernelBlur) and op.kernel.shape == (3, 1, 21, 21)
    assert torch.equal(op.kernel, MotionBlur(21, 0.5, kind=kind, batch_size=3, seed=4).kernel)
    assert not torch.equal(op.kernel, MotionBlur(21, 0.5, kind=kind, batch_size=3, seed=5).kernel)
    torch.testing.assert_close(op.kernel.sum(dim=(-2, -1)), torch.ones(3, 1))
    with pytest.raises(ValueError, match="kind"):
        MotionBlur(21, kind="levin")


def test_zero_intensity_walk_is_a_line():
    r"""Bilinear splatting keeps each point's mean and adds a diagonal covariance with entries
    :math:`f(1-f) \le 1/4`. A straight path of unit-spaced points with bounding box side :math:`k - 1` has length
    :math:`L \ge k - 1` and variance :math:`\ge L^2/12` along it, none across it; so the kernel's second-moment
    matrix has :math:`\lambda_{max} \ge (k-1)^2/12` and :math:`\lambda_{min} \le 1/4`."""
    k = 31
    ev = torch.linalg.eigvalsh(second_moments(motion_kernel_walk(k, 0.0, 16, torch.Generator().manual_seed(0)))[1])
    assert bool((ev[:, 0] <= 0.25 + 1e-4).all()) and bool((ev[:, 1] >= (k - 1) ** 2 / 12).all())


def test_splatting_preserves_moments():
    r"""Kernel mean = trajectory mean; kernel covariance = trajectory covariance + diag(s_r, s_c) with
    :math:`0 \le s \le 1/4` (independent row/column bilinear splits)."""
    k = 25
    points = fit_to_support(gp_trajectory(400, 8, torch.Generator().manual_seed(0)), k, half_extent=1.0)
    mu_k, S_k = second_moments(splat_bilinear(points, k))
    mu_t = points.mean(1)
    d = points - mu_t[:, None]
    S_t = torch.einsum("bni,bnj->bij", d, d) / points.shape[1]
    tol = 1e-6 * k**2  # the kernel is stored in float32
    torch.testing.assert_close(mu_k, mu_t, atol=tol, rtol=0)
    torch.testing.assert_close(S_k[:, 0, 1], S_t[:, 0, 1], atol=tol, rtol=0)
    extra = torch.diagonal(S_k - S_t, dim1=1, dim2=2)
    assert bool(((extra >= -tol) & (extra <= 0.25 + tol)).all())


def test_gp_trajectory_covariance():
    r"""The empirical second moment of n = 2B independent GP coordinates matches
    :math:`K_{ij} = \sigma^2 e^{-(t_i - t_j)^2/(2l^2)}`: each entry has std at most :math:`\sigma^2\sqrt{2/n}`;
    6 std with a union bound over the 325 entries gives a family-wise error below 1e-6."""
    N, batch, l, std = 25, 4000, 0.1, 0.5
    g = gp_trajectory(N, batch, torch.Generator().manual_seed(0), length_scale=l, std=std)  # (B, N, 2)
    samples = g.permute(0, 2, 1).reshape(-1, N)  # (2B, N)
    K_hat = samples.T @ samples / samples.shape[0]
    t = torch.linspace(0, 1, N, dtype=torch.float64)
    K = std**2 * torch.exp(-((t[:, None] - t[None]) ** 2) / (2 * l**2))
    assert float((K_hat - K).abs().max()) <= 6 * std**2 * math.sqrt(2 / samples.shape[0])
    L = se_cholesky(N, l, std)
    torch.testing.assert_close(L @ L.T, K, atol=1e-5 * std**2, rtol=0)  # jitter 1e-6 sigma^2, maybe x10


@pytest.mark.parametrize("kind", ["walk", "gp"])
def test_motion_kernels_are_not_isotropic(kind):
    r"""Most kernels are elongated: :math:`\lambda_{min}/\lambda_{max} < 1/2` of the second-moment matrix for more
    than half of 64 draws (an isotropic blob has ratio 1, see the Gaussian control). From 256 reference draws the
    per-kernel probability is about 0.93 (walk, intensity 0.5) and 0.75 (GP); under Binomial(64, 0.75) a fraction
    below 1/2 is a 4.6-sigma event."""
    g = torch.Generator().manual_seed(0)
    kernels = motion_kernel_walk(31, 0.5, 64, g) if kind == "walk" else motion_kernel_gp(31, 64, g)
    ev = torch.linalg.eigvalsh(second_moments(kernels)[1])
    assert float((ev[:, 0] / ev[:, 1] < 0.5).double().mean()) > 0.5
    ev_iso = torch.linalg.eigvalsh(second_moments(gaussian_kernel(3.0, 31))[1])
    assert float(ev_iso[0, 0] / ev_iso[0, 1]) > 0.99
