"""Analytic Gaussian prior (docs/method.md §3.2d, §10.5): exact x0 predictor vs joint-Gaussian conditioning, exact
posteriors in information form vs Kalman (Woodbury) form, UD2M's p(x0 | y, x_t), W2 identities, samplers.
"""

import math

import pytest
import torch

from ud2m.operators import Inpainting
from ud2m.priors import GaussianPrior, as_denoiser, gaussian_w2, operator_matrix, sample_gaussian

SHAPE = (1, 4, 4)
D = 16


@pytest.fixture
def prior(rng):
    mu = torch.randn(SHAPE, generator=rng, dtype=torch.float64)
    s = 0.2 + torch.rand(SHAPE, generator=rng, dtype=torch.float64)
    return GaussianPrior(mu, s)


class AvgPool2:
    """Duck-typed operator (only ``A``): 2x2 average pooling."""

    def A(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)


def kalman_posterior(mu, S0, H, R, obs):
    """Covariance form: m = μ + S0 Hᵀ (H S0 Hᵀ + R)⁻¹ (obs − Hμ), C = S0 − S0 Hᵀ (H S0 Hᵀ + R)⁻¹ H S0."""
    G = H @ S0 @ H.T + R
    K = torch.linalg.solve(G, H @ S0).T  # S0 Hᵀ G⁻¹ (G, S0 symmetric)
    return mu + (obs - mu @ H.T) @ K.T, S0 - K @ H @ S0


def test_predict_x0_equals_joint_gaussian_conditional_mean(prior, rng):
    t = torch.tensor([0.0, 3.5, 200.0, 999.0], dtype=torch.float64)
    z = torch.randn(4, *SHAPE, generator=rng, dtype=torch.float64)
    out = prior.predict_x0(z, t)
    a_t, b_t = prior.scales(t)
    S0 = prior.covariance()
    mu = prior.mu.reshape(-1)
    for i in range(4):
        # x0 ~ N(μ, S0), z = a x0 + b ε: E[x0|z] = μ + a S0 (a² S0 + b² I)⁻¹ (z − a μ), dense algebra
        cov_zz = a_t[i] ** 2 * S0 + b_t[i] ** 2 * torch.eye(D, dtype=torch.float64)
        ref = mu + a_t[i] * S0 @ torch.linalg.solve(cov_zz, z[i].reshape(-1) - a_t[i] * mu)
        torch.testing.assert_close(out[i].reshape(-1), ref, rtol=1e-10, atol=1e-10)
    assert prior.nfe == 1


def test_as_denoiser_is_the_ve_tweedie_formula(prior, rng):
    x = torch.randn(3, *SHAPE, generator=rng, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    D_x = as_denoiser(prior)(x, sigma)
    s2, sig2 = prior.s**2, sigma[:, None, None, None] ** 2
    torch.testing.assert_close(D_x, prior.mu + s2 / (s2 + sig2) * (x - prior.mu), rtol=1e-9, atol=1e-9)


def test_posterior_information_form_equals_kalman_form(prior, rng):
    A = torch.randn(6, D, generator=rng, dtype=torch.float64)
    y = torch.randn(2, 6, generator=rng, dtype=torch.float64)
    sigma_n = 0.3
    mean, cov = prior.posterior(A, y, sigma_n)
    ref_mean, ref_cov = kalman_posterior(
        prior.mu.reshape(-1), prior.covariance(), A, sigma_n**2 * torch.eye(6, dtype=torch.float64), y
    )
    torch.testing.assert_close(mean.reshape(2, -1), ref_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-9)


def test_posterior_accepts_duck_typed_and_library_operators(prior, rng):
    pool = AvgPool2()
    A_pool = operator_matrix(pool, SHAPE)  # (4, 16)
    x = torch.randn(1, *SHAPE, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(A_pool @ x.reshape(-1), pool.A(x).reshape(-1))
    inpaint = Inpainting((torch.rand(4, 4, generator=rng) > 0.5).float())
    torch.testing.assert_close(operator_matrix(inpaint, SHAPE), torch.diag(inpaint.mask.reshape(-1).double()))
    for op in (pool, inpaint):
        y = op.A(x)
        m1, C1 = prior.posterior(op, y, 0.1)
        m2, C2 = prior.posterior(operator_matrix(op, SHAPE), y.reshape(1, -1), 0.1)
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(C1, C2)


def test_conditional_posterior_is_posterior_with_x_t_as_extra_measurement(prior, rng):
    A = torch.randn(5, D, generator=rng, dtype=torch.float64)
    y = torch.randn(3, 5, generator=rng, dtype=torch.float64)
    x_t = torch.randn(3, *SHAPE, generator=rng, dtype=torch.float64)
    t = torch.tensor([50.0, 400.0, 900.0], dtype=torch.float64)
    sigma_n = 0.2
    mean, cov = prior.conditional_posterior(A, y, sigma_n, x_t, t)
    assert cov.shape == (3, D, D)
    a_t, b_t = prior.scales(t)
    for i in range(3):
        # x_t / a = x0 + (b/a) ε: stack it under y with block-diagonal noise
        H = torch.cat([A, torch.eye(D, dtype=torch.float64)])
        R = torch.diag(torch.cat([torch.full((5,), sigma_n**2), torch.full((D,), (b_t[i] / a_t[i]).item() ** 2)]))
        obs = torch.cat([y[i], x_t[i].reshape(-1) / a_t[i]])
        ref_mean, ref_cov = kalman_posterior(prior.mu.reshape(-1), prior.covariance(), H, R.double(), obs)
        torch.testing.assert_close(mean[i].reshape(-1), ref_mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(cov[i], ref_cov, rtol=1e-8, atol=1e-8)
    # float t: one shared covariance, equal to the per-sample one
    _, cov_float = prior.conditional_posterior(A, y, sigma_n, x_t, 400.0)
    torch.testing.assert_close(cov_float, cov[1])
    with pytest.raises(ValueError, match="positive"):
        prior.conditional_posterior(A, y, 0.0)


def test_gaussian_w2_identities(rng):
    L = torch.randn(D, D, generator=rng, dtype=torch.float64)
    C = L @ L.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    m = torch.randn(D, generator=rng, dtype=torch.float64)
    dm = torch.randn(D, generator=rng, dtype=torch.float64)
    assert gaussian_w2(m, C, m, C).item() < 1e-6  # sqrt of a rounding-level W2²
    torch.testing.assert_close(gaussian_w2(m, C, m + dm, C), dm.norm(), rtol=1e-6, atol=1e-6)
    # commuting (diagonal) covariances: W2² = ‖dm‖² + Σ(√c1 − √c2)²
    c1 = torch.rand(D, generator=rng, dtype=torch.float64) + 0.1
    c2 = torch.rand(D, generator=rng, dtype=torch.float64) + 0.1
    ref = (dm.square().sum() + (c1.sqrt() - c2.sqrt()).square().sum()).sqrt()
    torch.testing.assert_close(gaussian_w2(m, torch.diag(c1), m + dm, torch.diag(c2)), ref, rtol=1e-10, atol=1e-10)
    # symmetric
    torch.testing.assert_close(gaussian_w2(m, C, m + dm, torch.diag(c2)), gaussian_w2(m + dm, torch.diag(c2), m, C))


def test_samplers_match_their_moments(prior, rng):
    n = 20000
    x = prior.sample(n, rng).reshape(n, -1)
    se = 5 * prior.s.reshape(-1) / math.sqrt(n)
    assert ((x.mean(0) - prior.mu.reshape(-1)).abs() <= se).all()
    A = torch.randn(6, D, generator=rng, dtype=torch.float64)
    mean, cov = prior.posterior(A, torch.randn(1, 6, generator=rng, dtype=torch.float64), 0.3)
    draws = sample_gaussian(mean.reshape(-1), cov, n, rng)
    se = 5 * cov.diagonal().sqrt() / math.sqrt(n)
    assert ((draws.mean(0) - mean.reshape(-1)).abs() <= se).all()
    # empirical vs target law: whitened, E W2² ≈ E‖dm‖² + ¼E‖ΔC‖_F² ≤ λ_max (d + d(d+1)/4)/n; 5× that (Markov, 80%)
    emp = gaussian_w2(draws.mean(0), torch.cov(draws.T), mean.reshape(-1), cov)
    lam_max = torch.linalg.eigvalsh(cov).max()
    assert emp < math.sqrt(5 * lam_max * (D + D * (D + 1) / 4) / n)


def test_shape_is_checked(prior):
    with pytest.raises(ValueError, match=r"\(B, 1, 4, 4\)"):
        prior.predict_x0(torch.zeros(2, 1, 8, 8, dtype=torch.float64), 10.0)
