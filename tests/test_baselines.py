"""Baselines (ud2m.solvers.baselines) and the TV/PDHG kernels (ud2m.solvers.tv), checked against derived identities:
Tikhonov = exact Gaussian posterior mean; exact adjoint of D; PDHG = prox for lam_tv = 0 and a vanishing duality
gap otherwise; DPS's gradient = its closed form for the affine Gaussian denoiser; DPS/DiffPIR sample means equal the
exact mean of their affine recursions and move toward the exact posterior mean; NFE and seeding; DiffPIR's quad
grid = the reference formula; DPS's step-count scaling of zeta; every operator family runs through the tiny pixel and
latent priors."""

import itertools
import math

import numpy as np
import pytest
import torch

from ud2m.operators import (
    JPEG,
    Denoising,
    GaussianBlur,
    Inpainting,
    PerFrame,
    RandomInpainting,
    SuperResolution,
    TemporalAveragePool,
    measure,
    sigma_internal,
)
from ud2m.priors.gaussian import GaussianPrior, operator_matrix
from ud2m.schedules import quadratic_skip_grid, uniform_grid
from ud2m.solvers.baselines import (
    diffpir_gamma,
    dps_guidance,
    solve_diffpir,
    solve_dps,
    solve_tikhonov,
    solve_total_variation,
)
from ud2m.solvers.tv import (
    data_step_pdhg,
    diff_norm_sq_bound,
    forward_diff,
    forward_diff_adjoint,
    pdhg_solve,
    primal_dual_gap,
    project_dual,
    reg_weights,
    tv_norm,
)
from ud2m.utils import batch_dot

F64 = torch.float64
SHAPE = (1, 4, 4)  # d = 16: dense posteriors are exact and cheap


def _ops(H: int, g: torch.Generator) -> dict:
    """The linear operator families on H x H images."""
    mask = (torch.rand(1, 1, H, H, generator=g) < 0.5).float()
    return {
        "blur": GaussianBlur(1.0, 3),
        "inpainting": Inpainting(mask),
        "sr2": SuperResolution(2, torch.ones(2, 2) / 4),
        "denoising": Denoising(),
    }


def _gaussian_problem(op, rng, sigma_y=0.02, batch=1):
    """Analytic prior N(mu, s^2 I) on SHAPE, a draw x, and y = A x + sigma_n n (float64)."""
    mu = 0.3 * torch.randn(SHAPE, generator=rng, dtype=F64)
    prior = GaussianPrior(mu, 0.3)
    x = prior.sample(batch, rng)
    Ax = op.A(x)
    y = Ax + sigma_internal(sigma_y) * torch.randn(Ax.shape, generator=rng, dtype=F64)
    mask = op.observed_mask(y)
    return prior, y if mask is None else y * mask


# ---------------------------------------------------------------------------------------------- Tikhonov
@pytest.mark.parametrize("name", ["blur", "inpainting", "sr2", "denoising"])
def test_tikhonov_is_the_exact_gaussian_posterior_mean(name, rng):
    """MAP under N(0, s0^2 I) with Gaussian noise = posterior mean (s0^-2 I + A^T A/sigma_n^2)^-1 A^T y/sigma_n^2."""
    op = _ops(SHAPE[-1], rng)[name]
    sigma_y, s0 = 0.03, 0.5
    y = op.A(torch.rand(2, *SHAPE, generator=rng, dtype=F64) * 2 - 1)
    x = solve_tikhonov(op, y, sigma_y=sigma_y, s0=s0)
    mean, _ = GaussianPrior(torch.zeros(SHAPE, dtype=F64), s0).posterior(op, y, sigma_internal(sigma_y))
    torch.testing.assert_close(x, mean, rtol=1e-9, atol=1e-9)
    # per-sample noise levels: each sample equals its own solve
    x_b = solve_tikhonov(op, y, sigma_y=torch.tensor([0.03, 0.1], dtype=F64), s0=s0)
    torch.testing.assert_close(x_b[1:], solve_tikhonov(op, y[1:], sigma_y=0.1, s0=s0))


# ---------------------------------------------------------------------------------------------- TV operator
@pytest.mark.parametrize(
    "shape, reg", [((2, 3, 6, 7), "tv2"), ((2, 2, 5, 6, 7), "tv3"), ((2, 2, 5, 6, 7), "tv_t"), ((1, 1, 3, 4, 5), "tv2")]
)
def test_forward_difference_adjoint_and_norm_bound(shape, reg, rng):
    """<Dx, q> = <x, D^T q> to rounding; ||D||^2 (power iteration on D^T D) stays below 4 sum(lambda_k^2)."""
    weights = reg_weights(reg, len(shape), alpha=2.5)
    x = torch.randn(shape, generator=rng, dtype=F64)
    Dx = forward_diff(x, weights)
    q = torch.randn(Dx.shape, generator=rng, dtype=F64)
    lhs, rhs = batch_dot(Dx, q), batch_dot(x, forward_diff_adjoint(q, weights))
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12 * Dx.numel())
    assert Dx.shape[1] == sum(w != 0 for w in weights)
    v = x
    for _ in range(200):
        v = forward_diff_adjoint(forward_diff(v / v.norm(), weights), weights)
    assert v.norm() <= diff_norm_sq_bound(weights) * (1 + 1e-12)


@pytest.mark.parametrize("shape", [(2, 2, 5, 6, 7), (1, 2, 2, 1, 3), (1, 1, 1, 2, 1)])
def test_forward_difference_fast_and_autograd_paths_agree(shape, rng):
    """Without autograd D and D^T run one-pass out= kernels, with it the differentiable ones: equal results, on any
    length (1 and 2 included), and D^T's gradient under autograd is D."""
    weights = reg_weights("tv3", 5, alpha=2.5)
    x = torch.randn(shape, generator=rng, dtype=F64)
    Dx = forward_diff(x, weights)
    q = torch.randn(Dx.shape, generator=rng, dtype=F64)
    xt, qt = x.clone().requires_grad_(), q.clone().requires_grad_()
    assert torch.equal(forward_diff(xt, weights).detach(), Dx)
    adjoint = forward_diff_adjoint(qt, weights)
    torch.testing.assert_close(adjoint.detach(), forward_diff_adjoint(q, weights), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(batch_dot(adjoint, x).sum(), qt)
    torch.testing.assert_close(grad, Dx)


def test_forward_difference_matches_definition_and_tv3(rng):
    """D has components lambda_k D_k x, zero at the last index; TV3 = sum sqrt(a Dt^2 + Dh^2 + Dv^2)."""
    x = torch.randn(2, 3, 4, 5, 6, generator=rng, dtype=F64)
    alpha = 3.0
    Dx = forward_diff(x, reg_weights("tv3", 5, alpha))
    pad = torch.nn.functional.pad
    dh = pad(x[..., 1:] - x[..., :-1], (0, 1))
    dv = pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    dt = pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 0, 1))
    torch.testing.assert_close(Dx, torch.stack([dh, dv, math.sqrt(alpha) * dt], dim=1))
    expected = (alpha * dt**2 + dh**2 + dv**2).sqrt().flatten(1).sum(1)
    torch.testing.assert_close(tv_norm(x, reg_weights("tv3", 5, alpha)), expected)


@pytest.mark.parametrize("K", [1, 3])
def test_dual_projection_is_the_nearest_point_of_the_lambda_ball(K, rng):
    """project_dual: each voxel's K-vector moves to the nearest point of the ball of radius lambda (per sample; the
    K = 1 clip of TV_t and the K = 3 scaling of TV3 alike): inside points stay, outside ones land on the sphere
    along their own direction, and lambda = 0 gives 0."""
    q = 2 * torch.randn(3, K, 2, 4, 5, 6, generator=rng, dtype=F64)
    lam = torch.tensor([0.5, 1.5, 0.0], dtype=F64)
    out = project_dual(q, lam)
    norm, lam_b = q.norm(dim=1, keepdim=True), lam.view(3, 1, 1, 1, 1, 1)
    expected = torch.where(norm <= lam_b, q, q / norm * lam_b)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    assert (out.norm(dim=1) <= lam.view(3, 1, 1, 1, 1) * (1 + 1e-12)).all() and not out[2].any()


# ---------------------------------------------------------------------------------------------- PDHG
def _video_op():
    return TemporalAveragePool(2, 5)


@pytest.mark.parametrize("name", ["blur", "inpainting", "sr2", "video_pool"])
def test_pdhg_without_tv_is_the_prox(name, rng):
    """lam_tv = 0: argmin 1/2||Au - y||^2 + 1/(2 gamma)||u - x~||^2 is (I + gamma A^T A)^-1 (x~ + gamma A^T y), which is
    op.prox_l2(x~, y, gamma) (multiply by gamma); per-sample gamma."""
    if name == "video_pool":
        op, shape = _video_op(), (2, 2, 5, 6, 6)
    else:
        op, shape = _ops(8, rng)[name], (2, 3, 8, 8)
    x_tilde = torch.randn(shape, generator=rng, dtype=F64)
    y = op.A(torch.randn(shape, generator=rng, dtype=F64))
    gamma = torch.tensor([0.5, 4.0], dtype=F64)
    reg = "tv2" if len(shape) == 4 else "tv3"
    u = data_step_pdhg(op, x_tilde, y, gamma=gamma, lam_tv=0.0, reg=reg, iters=600, clamp=False)
    torch.testing.assert_close(u, op.prox_l2(x_tilde, y, gamma), rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape, reg", [((2, 3, 8, 8), "tv2"), ((2, 2, 5, 6, 6), "tv3"), ((2, 2, 5, 6, 6), "tv_t")])
def test_pdhg_duality_gap_vanishes(shape, reg, rng):
    """With TV the gap P(u) - D(p, q) >= 0 certifies optimality; it decreases to ~0 (relative to P)."""
    op = GaussianBlur(1.0, 3) if len(shape) == 4 else PerFrame(GaussianBlur(1.0, 3))
    x_tilde = torch.randn(shape, generator=rng, dtype=F64)
    y = op.A(torch.randn(shape, generator=rng, dtype=F64))
    kw = dict(gamma=torch.tensor([1.0, 5.0], dtype=F64), lam_tv=torch.tensor([0.05, 0.2], dtype=F64), reg=reg)
    gaps = [primal_dual_gap(op, pdhg_solve(op, x_tilde, y, iters=n, **kw), x_tilde, y, **kw) for n in (20, 1000)]
    assert (gaps[0] >= -1e-10).all() and (gaps[1] >= -1e-10).all()
    # PDHG with theta = 1 converges sublinearly here (TV* is not strongly convex): ask for 3 decades, not machine zero
    assert (gaps[1] <= 1e-3 * gaps[0] + 1e-12).all() and (gaps[1] < 1e-3).all()


@pytest.mark.parametrize("shape, reg", [((2, 3, 8, 8), "tv2"), ((2, 2, 5, 6, 6), "tv_t")])
def test_over_relaxed_pdhg_reaches_the_same_minimiser_faster(shape, reg, rng):
    """relaxation = 1.5 (Condat 2013): the same unique minimiser (finite gamma: strongly convex), a vanishing gap,
    and a smaller gap than the plain iteration after the same number of iterations (near 2 it can oscillate in
    the first tens of iterations of such a fast-converging problem)."""
    op = GaussianBlur(1.0, 3) if len(shape) == 4 else PerFrame(GaussianBlur(1.0, 3))
    x_tilde = torch.randn(shape, generator=rng, dtype=F64)
    y = op.A(torch.randn(shape, generator=rng, dtype=F64))
    kw = dict(gamma=torch.tensor([1.0, 5.0], dtype=F64), lam_tv=torch.tensor([0.05, 0.2], dtype=F64), reg=reg)
    plain, relaxed = (pdhg_solve(op, x_tilde, y, iters=2000, relaxation=r, **kw).u for r in (1.0, 1.5))
    torch.testing.assert_close(relaxed, plain, rtol=0, atol=1e-5)  # both within ~1e-6 of the minimiser
    gap = {r: primal_dual_gap(op, pdhg_solve(op, x_tilde, y, iters=60, relaxation=r, **kw), x_tilde, y, **kw)
           for r in (1.0, 1.5)}  # fmt: skip
    assert (gap[1.5] >= -1e-10).all() and (gap[1.5] < gap[1.0]).all()
    with pytest.raises(ValueError, match="relaxation"):
        pdhg_solve(op, x_tilde, y, iters=1, relaxation=2.0, **kw)


@pytest.mark.parametrize("gamma", [3.0, math.inf])
def test_relaxed_pdhg_at_rho_one_is_the_plain_iteration(gamma, rng):
    """The relaxed loop (primal first, plus a closing primal step) with rho = 1 makes the same n dual and n primal
    updates as the plain loop: the same iterates, so `iters` counts the same work in both."""
    from ud2m.solvers.tv import _pdhg_relaxed, forward_diff, reg_weights

    op = _video_op()
    x_tilde = torch.randn(2, 2, 5, 6, 6, generator=rng, dtype=F64)
    y = op.A(torch.randn(x_tilde.shape, generator=rng, dtype=F64))
    plain = pdhg_solve(op, x_tilde, y, gamma=gamma, lam_tv=0.1, reg="tv_t", iters=7, tau=0.3, sigma=0.3)
    weights = reg_weights("tv_t", x_tilde.ndim, 1.0)
    step = torch.full((2, 1, 1, 1, 1), 0.3, dtype=F64)
    relaxed = _pdhg_relaxed(
        op, x_tilde, y, torch.zeros_like(y), torch.zeros_like(forward_diff(x_tilde, weights)),
        torch.full((2,), 0.1, dtype=F64), weights, step, step, step[..., None], step / gamma, 7, 1.0,
    )  # fmt: skip
    for a, b in zip(relaxed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_pdhg_is_per_sample_and_supports_gamma_inf(rng):
    """A batch with gamma = [inf, 3] and different lam_tv equals the two problems solved separately."""
    op = _video_op()
    x_tilde = torch.randn(2, 2, 5, 6, 6, generator=rng, dtype=F64)
    y = op.A(torch.randn(x_tilde.shape, generator=rng, dtype=F64))
    gamma, lam = torch.tensor([math.inf, 3.0], dtype=F64), torch.tensor([0.1, 0.02], dtype=F64)
    u = pdhg_solve(op, x_tilde, y, gamma=gamma, lam_tv=lam, reg="tv_t", iters=50).u
    for i in range(2):
        u_i = pdhg_solve(op, x_tilde[i : i + 1], y[i : i + 1], gamma=gamma[i], lam_tv=lam[i], reg="tv_t", iters=50).u
        torch.testing.assert_close(u[i : i + 1], u_i, rtol=1e-12, atol=1e-12)
    clamped = data_step_pdhg(op, 3 * x_tilde, y, gamma=gamma, lam_tv=lam, reg="tv_t", iters=5)
    assert clamped.abs().max() <= 1.0


def test_pdhg_rejects_bad_arguments(rng):
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="video"):
        pdhg_solve(Denoising(), x, x, gamma=1.0, lam_tv=0.1, reg="tv3")
    with pytest.raises(ValueError, match="LinearOperator"):
        pdhg_solve(JPEG(10), x, x, gamma=1.0, lam_tv=0.1)
    with pytest.raises(ValueError, match="gamma > 0"):
        pdhg_solve(Denoising(), x, x, gamma=0.0, lam_tv=0.1)


def test_total_variation_minimises_its_objective(rng):
    """The TV baseline's output is a minimiser of 1/(2 sigma_n^2)||Ax - y||^2 + lam TV(x): random perturbations and
    the Tikhonov solution never do better (data kept inside [-1, 1] so the final clamp is inactive)."""
    op, sigma_y, lam = GaussianBlur(1.0, 3), 0.05, 4.0
    x = 0.4 * torch.rand(2, 1, 8, 8, generator=rng, dtype=F64) - 0.2
    y = measure(op, x, sigma_y, rng).to(F64)
    weights = reg_weights("tv2", 4)

    def objective(u):
        data = (op.A(u) - y).flatten(1).norm(dim=1) ** 2 / (2 * sigma_internal(sigma_y) ** 2)
        return data + lam * tv_norm(u, weights)

    x_hat = solve_total_variation(op, y, sigma_y=sigma_y, lam=lam, iters=3000)
    assert x_hat.abs().max() < 1
    f_hat = objective(x_hat)
    assert (f_hat < objective(solve_tikhonov(op, y, sigma_y=sigma_y))).all()
    for _ in range(10):
        delta = 1e-3 * torch.randn(x_hat.shape, generator=rng, dtype=F64)
        assert (objective(x_hat + delta) >= f_hat - 1e-9).all()


# ---------------------------------------------------------------------------------------------- DPS / DiffPIR, Gaussian
def _scales(prior, t):
    if t is None:
        return 1.0, 0.0
    a, b = prior.scales(torch.tensor(float(t), dtype=F64))
    return a, b


def _exact_mean(method, prior, op, y, grid, *, sigma_y=None, zeta, lambda_=None, eta=1.0):
    """Exact mean of the solver's output for the Gaussian prior, by dense matrices, independently of the solver code.

    Every step is affine in the state and in the fresh noise (x0_hat = mu + k (z - a mu) is affine, the prox is
    (I + gamma A^T A)^-1(. + gamma A^T y), the DDIM step and the squared-loss DPS gradient are affine), so the mean
    follows the noise-free recursion, started from E[z_T] = 0 (no x_init)."""
    A = operator_matrix(op, SHAPE)  # (m, d)
    mu, s2 = prior.mu.reshape(-1), prior.s.reshape(-1) ** 2
    Y = y.reshape(y.shape[0], -1)  # (B, m)
    m = torch.zeros(y.shape[0], mu.numel(), dtype=F64)
    for k, t in enumerate(grid):
        a, b = _scales(prior, t)
        a1, b1 = _scales(prior, grid[k + 1] if k + 1 < len(grid) else None)
        kt = a * s2 / (a**2 * s2 + b**2)
        x0_hat = mu + kt * (m - a * mu)
        if method == "diffpir":
            gamma = (b / a) ** 2 / (lambda_ * sigma_internal(sigma_y) ** 2)
            P = torch.linalg.inv(torch.eye(mu.numel(), dtype=F64) + gamma * A.T @ A)
            x0 = (x0_hat + gamma * Y @ A) @ P.T
            if k + 1 == len(grid):
                return x0.reshape(y.shape[0], *SHAPE)
            m = a1 * x0 + b1 * math.sqrt(1 - zeta) * (m - a * x0) / b
        else:  # DPS, squared loss: grad = -2 k A^T (y - A x0_hat)
            varsigma = eta * (b1 / b) * math.sqrt(max(0.0, 1 - a**2 / a1**2))
            grad = -2 * kt * ((Y - x0_hat @ A.T) @ A)
            m = a1 * x0_hat + math.sqrt(b1**2 - varsigma**2) * (m - a * x0_hat) / b - zeta * grad
    return m.reshape(y.shape[0], *SHAPE)


METHODS = {
    "dps_norm": (solve_dps, dict(zeta=0.3, num_steps=100)),
    "dps_squared": (solve_dps, dict(zeta=0.9, step_rule="squared", num_steps=100)),
    "diffpir": (solve_diffpir, dict(lambda_=7.0, zeta=0.3, num_steps=50)),
}


@pytest.mark.parametrize("name", ["blur", "inpainting"])
@pytest.mark.parametrize("method", list(METHODS))
def test_gaussian_prior_mean_moves_toward_posterior(method, name, rng):
    """Over S chains, the sample mean is closer to the exact posterior mean than the prior mean is, by more than
    5 Monte-Carlo standard errors of the sample mean (so the solver's true mean is closer, not just this draw).
    For the affine methods the sample mean also matches the exact mean of the recursion within 5 standard errors."""
    op = _ops(SHAPE[-1], rng)[name]
    sigma_y, S = 0.02, 2000
    prior, y = _gaussian_problem(op, rng, sigma_y)
    m_post, _ = prior.posterior(op, y, sigma_internal(sigma_y))
    fn, kw = METHODS[method]
    out = fn(prior, op, y.expand(S, *y.shape[1:]), sigma_y=sigma_y, generator=torch.Generator().manual_seed(1), **kw)
    m_hat, var = out.mean(0), out.var(0)
    se_norm = (var.sum() / S).sqrt()  # E||m_hat - E m_hat||^2 = tr(Cov)/S
    assert (m_hat - m_post[0]).norm() + 5 * se_norm < (prior.mu - m_post[0]).norm()
    if method != "dps_norm":
        grid = (quadratic_skip_grid if method == "diffpir" else uniform_grid)(kw["num_steps"])  # each solver's default
        rule = dict(lambda_=kw.get("lambda_"), sigma_y=sigma_y)
        m_exact = _exact_mean(method.split("_")[0], prior, op, y, grid, zeta=kw["zeta"], **rule)[0]
        assert ((m_hat - m_exact).abs() <= 5 * (var / S).sqrt() + 1e-12).all()


def test_dps_gradient_matches_closed_form(rng):
    """For the Gaussian prior x0_hat = mu + k_t (z - a_t mu), so d x0_hat/dz = diag(k_t) and
    grad_z ||y - A x0_hat|| = -k_t A^T (y - A x0_hat) / ||y - A x0_hat||, per sample; also under inference_mode."""
    op = GaussianBlur(1.0, 3)
    prior, y = _gaussian_problem(op, rng, batch=3)
    z = torch.randn(3, *SHAPE, generator=rng, dtype=F64)
    t = 400.0
    a, b = _scales(prior, t)
    k_t = a * prior.s**2 / (a**2 * prior.s**2 + b**2)
    x0_hat = prior.mu + k_t * (z - a * prior.mu)
    r = y - op.A(x0_hat)
    expected = -k_t * op.A_adjoint(r) / r.flatten(1).norm(dim=1)[:, None, None, None]
    g = dps_guidance(prior, op, y, z, t)
    torch.testing.assert_close(g.grad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.x0_hat, x0_hat)
    with torch.inference_mode():
        g_inf = dps_guidance(prior, op, y.clone(), z.clone(), t)
    torch.testing.assert_close(g_inf.grad, expected, rtol=1e-10, atol=1e-12)


def test_dps_last_step_is_guided_x0_hat(rng):
    """With one timestep the DDIM step lands on x0_hat (a' = 1, b' = 0), so the output is x0_hat - zeta * grad."""
    op = Inpainting((torch.rand(1, 1, 4, 4, generator=rng) < 0.5).float())
    prior, y = _gaussian_problem(op, rng, batch=2)
    x_init = torch.randn(2, *SHAPE, generator=rng, dtype=F64)
    seen = []
    out = solve_dps(prior, op, y, x_init, timesteps=(300,), zeta=0.7, generator=rng, callback=seen.append)
    assert len(seen) == 1
    # the callback's x is the returned state; recompute grad at the chain's start from the recorded x0_hat
    torch.testing.assert_close(out, seen[0]["x"])
    a, b = _scales(prior, 300)
    z = (seen[0]["x0_hat"] - prior.mu) / (a * prior.s**2 / (a**2 * prior.s**2 + b**2)) + a * prior.mu
    g = dps_guidance(prior, op, y, z, 300.0)
    torch.testing.assert_close(out, g.x0_hat - 0.7 * g.grad)


def test_diffpir_gamma_solves_the_papers_subproblem(rng):
    """prox with gamma_t = s_t^2/(lambda sigma_n^2) satisfies the normal equation of
    argmin ||y - Ax||^2 + rho_t ||x - x0||^2, rho_t = lambda sigma_n^2 / s_t^2: A^T(Ax - y) + rho_t (x - x0) = 0."""
    op = GaussianBlur(1.0, 3)
    x0 = torch.randn(2, *SHAPE, generator=rng, dtype=F64)
    y = op.A(torch.randn(2, *SHAPE, generator=rng, dtype=F64))
    s, sigma_n, lam = torch.tensor([0.3, 2.0], dtype=F64), torch.tensor([0.05, 0.1], dtype=F64), 7.0
    x = op.prox_l2(x0, y, diffpir_gamma(s, sigma_n, lam))
    rho = (lam * sigma_n**2 / s**2)[:, None, None, None]
    residual = op.A_adjoint(op.A(x) - y) + rho * (x - x0)
    assert residual.abs().max() < 1e-12


@pytest.mark.parametrize("method", ["dps_norm", "diffpir"])
def test_nfe_and_seeding(method, rng):
    """NFE = number of timesteps; same generator -> identical output; a list of generators makes each sample
    independent of the batch composition (§1.5)."""
    op = GaussianBlur(1.0, 3)
    prior, y = _gaussian_problem(op, rng, batch=3)
    fn, kw = METHODS[method]
    kw = {**kw, "num_steps": 7}
    prior.reset_nfe()
    out1 = fn(prior, op, y, sigma_y=0.02, generator=torch.Generator().manual_seed(5), **kw)
    assert prior.nfe == 7
    out2 = fn(prior, op, y, sigma_y=0.02, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(out1, out2)
    out3 = fn(prior, op, y, sigma_y=0.02, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(out1, out3)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = fn(prior, op, y, sigma_y=0.02, generator=gens, **kw)
    alone = fn(prior, op, y[2:], sigma_y=0.02, generator=[torch.Generator().manual_seed(12)], **kw)
    torch.testing.assert_close(batch[2:], alone, rtol=1e-12, atol=1e-12)
    prior.reset_nfe()
    fn(prior, op, y, timesteps=(900, 500, 100), sigma_y=0.02, generator=rng, **{**kw, "num_steps": 100})
    assert prior.nfe == 3


def test_baselines_reject_bad_arguments(rng):
    op = GaussianBlur(1.0, 3)
    prior, y = _gaussian_problem(op, rng)
    with pytest.raises(ValueError, match="strictly decreasing"):
        solve_dps(prior, op, y, timesteps=(100, 500))
    with pytest.raises(ValueError, match="step_rule"):
        solve_dps(prior, op, y, step_rule="adaptive")
    with pytest.raises(ValueError, match="zeta"):
        solve_diffpir(prior, op, y, sigma_y=0.01, zeta=1.5)
    with pytest.raises(ValueError, match="grid"):
        solve_diffpir(prior, op, y, sigma_y=0.01, grid="cosine")
    with pytest.raises(ValueError, match="repeat timesteps"):
        solve_diffpir(prior, op, y, sigma_y=0.01, num_steps=1000)  # quad has at most ~T/2 distinct steps
    with pytest.raises(ValueError, match="zeta_scaling"):
        solve_dps(prior, op, y, zeta_scaling="linear")


# ---------------------------------------------------------------------------------------------- grids and step sizes
def _reference_quad_grid(N: int, T: int = 1000) -> tuple[int, ...]:
    """DiffPIR's reference construction, written independently: an index seq = int(sqrt(linspace(0, T^2, N))) with
    seq[-1] -= 1 walks the noise levels from the noisiest, so the native time of step i is T - 1 - seq[i]."""
    seq = [int(v) for v in np.sqrt(np.linspace(0, T**2, N))]
    seq[-1] -= 1
    return tuple(T - 1 - j for j in seq)


@pytest.mark.parametrize("N", [2, 3, 7, 20, 50, 100, 501])
def test_quadratic_skip_grid_is_the_reference_grid(N):
    """N strictly decreasing integer times from 999 to 0 (the schedule's range), equal to the reference formula, and
    quadratic: step i sits at i/(N-1) ~ ((999 - t_i)/1000)^2, within one timestep of rounding."""
    grid = quadratic_skip_grid(N)
    assert len(grid) == N and grid == _reference_quad_grid(N)
    assert all(isinstance(t, int) for t in grid) and grid[0] == 999 and grid[-1] == 0
    assert all(t1 < t0 for t0, t1 in itertools.pairwise(grid))
    for i, t in enumerate(grid[:-1]):
        assert 999 - t <= 1000 * math.sqrt(i / (N - 1)) < 999 - t + 1
    assert quadratic_skip_grid(1) == (999,)
    with pytest.raises(ValueError, match="repeat timesteps"):
        quadratic_skip_grid(502)


def test_diffpir_grid_option(rng):
    """grid="uniform" reproduces the former default exactly (the explicit uniform_grid); the default walks the
    quad grid; explicit timesteps override both."""
    op = GaussianBlur(1.0, 3)
    prior, y = _gaussian_problem(op, rng, batch=2)

    def run(**kw):
        seen = []
        kw = dict(sigma_y=0.02, num_steps=9, generator=torch.Generator().manual_seed(3), callback=seen.append, **kw)
        return solve_diffpir(prior, op, y, **kw), tuple(c["t"] for c in seen)

    old, t_old = run(timesteps=uniform_grid(9))
    new, t_new = run(grid="uniform")
    assert torch.equal(old, new) and t_new == t_old == uniform_grid(9)
    assert run()[1] == quadratic_skip_grid(9)
    assert run(grid="uniform", timesteps=(700, 300, 20))[1] == (700, 300, 20)


@pytest.mark.parametrize("step_rule", ["norm", "squared"])
def test_dps_zeta_scaling_by_steps(step_rule, rng):
    """zeta_scaling="steps" applies zeta_eff = zeta * 1000 / N. On one timestep the DDIM step lands on x0_hat, so the
    output is x0_hat - zeta_eff * (gradient of the step rule's loss at the chain's start), with the gradient
    recomputed from the closed form of the Gaussian denoiser; on N steps the chain equals the unscaled ("none", the
    former behaviour) chain with zeta * 1000 / N."""
    op = Inpainting((torch.rand(1, 1, 4, 4, generator=rng) < 0.5).float())
    prior, y = _gaussian_problem(op, rng, batch=2)
    x_init = torch.randn(2, *SHAPE, generator=rng, dtype=F64)
    seen, zeta = [], 4e-4
    kw = dict(timesteps=(300,), zeta=zeta, zeta_scaling="steps", step_rule=step_rule, callback=seen.append)
    out = solve_dps(prior, op, y, x_init, generator=rng, **kw)
    a, b = _scales(prior, 300)
    k_t = a * prior.s**2 / (a**2 * prior.s**2 + b**2)
    z = (seen[0]["x0_hat"] - prior.mu) / k_t + a * prior.mu  # the start, from x0_hat = mu + k_t (z - a mu)
    g = dps_guidance(prior, op, y, z, 300.0)
    loss_scale = 1.0 if step_rule == "norm" else 2 * g.residual_norm[:, None, None, None]  # grad ||r||^2
    torch.testing.assert_close(out, g.x0_hat - 1000 * zeta * loss_scale * g.grad)
    for N in (10, 40):
        scaled = solve_dps(
            prior, op, y, num_steps=N, zeta=0.5, zeta_scaling="steps", step_rule=step_rule, generator=rng.manual_seed(1)
        )
        plain = solve_dps(prior, op, y, num_steps=N, zeta=500 / N, step_rule=step_rule, generator=rng.manual_seed(1))
        assert torch.equal(scaled, plain)


# ---------------------------------------------------------------------------------------------- tiny networks
@pytest.fixture(scope="module")
def tiny_priors():
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny import tiny_pixel_prior
    from ud2m.priors.tiny_latent import tiny_pipeline

    latent = LatentConsistencyPrior.from_pipeline(tiny_pipeline("lcm"))
    return {"pixel": (tiny_pixel_prior(), 16, None), "latent": (latent, 32, latent.encode_prompt(""))}


def _family(name: str, H: int):
    return {
        "sr": lambda: SuperResolution(2, "bicubic"),
        "blur": lambda: GaussianBlur(1.0, 5),
        "inpainting": lambda: RandomInpainting(H, 0.5),
        "jpeg": lambda: JPEG(10),
    }[name]()


@pytest.mark.parametrize("family", ["sr", "blur", "inpainting", "jpeg"])
@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_tiny_priors_run_every_operator_family(kind, family, tiny_priors, rng):
    """DPS and DiffPIR (under inference_mode, as sample.py calls them) give finite images of the right shape with
    exactly one network call per step; the prior-free baselines run on the same data."""
    prior, H, cond = tiny_priors[kind]
    op = _family(family, H)
    x = torch.rand(2, 3, H, H, generator=rng) * 2 - 1
    y = measure(op, x, 0.01, rng)
    for fn in (solve_dps, solve_diffpir):
        prior.reset_nfe()
        with torch.inference_mode():
            out = fn(prior, op, y, num_steps=2, cond=cond, sigma_y=0.01, generator=rng)
        assert out.shape == x.shape and torch.isfinite(out).all() and prior.nfe == 2
    assert solve_tikhonov(op, y, sigma_y=0.01).shape == x.shape
    if family != "jpeg":
        assert solve_total_variation(op, y, sigma_y=0.01, lam=1.0, iters=5).shape == x.shape


class _ClampedPrior(torch.nn.Module):
    """A prior whose x0-prediction is already clamped to [-1, 1] (what ``clip_x0`` must be equivalent to)."""

    def __init__(self, prior):
        super().__init__()
        self.inner = prior
        self.data_range, self.is_latent = None, False

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def predict_x0(self, z, t, cond=None):
        return self.inner.predict_x0(z, t, cond).clamp(-1, 1)


@pytest.mark.parametrize("fn", [solve_dps, solve_diffpir])
def test_clip_x0_equals_a_prior_with_clamped_estimates(fn, tiny_priors, rng):
    """``clip_x0=True`` (the default, the references' ``clip_denoised``) is the unclamped solver on a pixel prior
    whose x̂0 is clamped to its data range, gradients included (DPS differentiates through the clamp); the tiny
    random prior's early x̂0 leave [-1, 1], so clamping changes the result; the Gaussian prior (no data range) is
    untouched."""
    prior, H, _ = tiny_priors["pixel"]
    assert prior.data_range == (-1.0, 1.0) and not prior.is_latent
    op = SuperResolution(2, "bicubic")
    x = torch.rand(2, 3, H, H, generator=rng) * 2 - 1
    y = measure(op, x, 0.01, rng)
    kw = dict(sigma_y=0.01, num_steps=4)
    clipped = fn(prior, op, y, generator=torch.Generator().manual_seed(3), **kw)
    reference = fn(_ClampedPrior(prior), op, y, clip_x0=False, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(clipped, reference, rtol=1e-5, atol=1e-5)
    raw = fn(prior, op, y, clip_x0=False, generator=torch.Generator().manual_seed(3), **kw)
    assert (raw - clipped).abs().max() > 1e-3
    gop = GaussianBlur(1.0, 3)
    gprior, gy = _gaussian_problem(gop, rng, batch=2)
    assert gprior.data_range is None
    a = fn(gprior, gop, gy, generator=torch.Generator().manual_seed(4), **kw)
    b = fn(gprior, gop, gy, clip_x0=False, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [solve_dps, solve_diffpir])
def test_clip_x0_on_a_frame_wise_video_prior(fn, tiny_priors, rng):
    """A frame-wise pixel prior is not latent (its decode only moves the frame axis): DPS and DiffPIR clamp its x̂0
    in the prior's own layout, so every estimate they report lies in [-1, 1], and without the clamp it does not."""
    from ud2m.priors.stacked import FrameWisePrior

    image_prior, H, _ = tiny_priors["pixel"]
    prior = FrameWisePrior(image_prior, frame_batch=4)
    assert not prior.is_latent and prior.data_range == (-1.0, 1.0)
    op = PerFrame(SuperResolution(2, "bicubic"))
    x = torch.rand(1, 3, 3, H, H, generator=rng) * 2 - 1
    y = measure(op, x, 0.01, rng)
    for clip, inside in ((True, True), (False, False)):
        seen = []
        out = fn(prior, op, y, sigma_y=0.01, num_steps=3, clip_x0=clip, generator=torch.Generator().manual_seed(2),
                 callback=lambda info: seen.append(float(info["x0_hat"].abs().max())))  # fmt: skip
        assert out.shape == x.shape and torch.isfinite(out).all()
        if fn is solve_dps:  # DPS reports x̂0 itself; DiffPIR reports it after the data step, which may leave [-1, 1]
            assert (max(seen) <= 1.0 + 1e-6) == inside
