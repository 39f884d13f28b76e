"""Distribution metrics in an embedding space (docs/method.md §10.3, §10.4: ``sqrtm_psd``, ``bures``,
``frechet_distance``, ``cfid``, ``coverage``) and the digits VAE embedding (:mod:`ud2m.embedding`).

Expected values are closed forms or independent computations (scipy's Schur ``sqrtm``, ``scipy.stats.chi``, numpy
re-implementations, ``torch.distributions``); statistical tolerances are derived from the sample sizes in comments.
"""

import hashlib
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import chi

from ud2m.embedding import DIGITS_VAE, WEIGHTS, DigitsVAE, digits_crops, load_digits_embedding, save_digits_vae
from ud2m.metrics import bures, cfid, coverage, frechet_distance, sqrtm_psd

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers


def _orthogonal(g: torch.Generator, d: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Q


def _spd(g: torch.Generator, d: int, lo: float, span: float) -> torch.Tensor:
    """Random SPD matrix, eigenvalues uniform on [lo, lo + span], random eigenbasis."""
    Q = _orthogonal(g, d)
    w = lo + span * torch.rand(d, generator=g, dtype=F64)
    return (Q * w) @ Q.T


def _gauss(g: torch.Generator, n: int, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """n draws of N(mean, cov), ``(n, d)`` fp64."""
    return mean + torch.randn(n, mean.shape[0], generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T


def _np_sqrtm(C) -> np.ndarray:
    """Principal square root by scipy's Schur method (independent of the library's eigh)."""
    return np.real(scipy.linalg.sqrtm(np.asarray(C, dtype=np.float64)))


def _bures_ref(C1, C2) -> float:
    C1, C2 = np.asarray(C1, dtype=np.float64), np.asarray(C2, dtype=np.float64)
    r = _np_sqrtm(C1)
    return float(np.trace(C1) + np.trace(C2) - 2 * np.trace(_np_sqrtm(r @ C2 @ r)))


def _bures_sigma(C1, C2, n: int) -> float:
    """Delta-method std of Bures(Ĉ1, Ĉ2) for independent sample covariances of n Gaussian points each.

    ∂Bures/∂C1 = I − T and ∂Bures/∂C2 = I − T⁻¹ with T = C1^{-1/2} (C1^{1/2} C2 C1^{1/2})^{1/2} C1^{-1/2} the optimal
    transport map C1 → C2 (scalar check: a + b − 2√(ab) has ∂_a = 1 − √(b/a)). For symmetric G,
    Var tr(G Ĉ) = 2 tr(G C G C) / n (Wishart: Cov(Ĉ_ij, Ĉ_kl) = (C_ik C_jl + C_il C_jk) / n).
    """
    C1, C2 = np.asarray(C1, dtype=np.float64), np.asarray(C2, dtype=np.float64)
    r = _np_sqrtm(C1)
    r_inv = np.linalg.inv(r)
    T = r_inv @ _np_sqrtm(r @ C2 @ r) @ r_inv
    eye = np.eye(C1.shape[0])
    G1, G2 = eye - T, eye - np.linalg.inv(T)
    return math.sqrt(2 / n * (np.trace(G1 @ C1 @ G1 @ C1) + np.trace(G2 @ C2 @ G2 @ C2)))


# ------------------------------------------------------------------------------------------------ sqrtm_psd


def test_sqrtm_psd_squares_back_to_an_spd_matrix(rng):
    B = torch.randn(6, 6, generator=rng, dtype=F64)
    C = B @ B.T + 0.1 * torch.eye(6, dtype=F64)
    S = sqrtm_psd(C)
    assert S.dtype == F64 and S.shape == (6, 6)
    torch.testing.assert_close(S @ S, C, rtol=0, atol=1e-12 * float(C.norm()))
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-14 * float(S.norm()))
    assert float(torch.linalg.eigvalsh(S).min()) > 0  # the principal (PSD) root, not another one
    np.testing.assert_allclose(S.numpy(), _np_sqrtm(C.numpy()), rtol=0, atol=1e-10)


def test_sqrtm_psd_of_float32_input_is_float64(rng):
    B = torch.randn(4, 4, generator=rng)
    C = B @ B.T + torch.eye(4)
    S = sqrtm_psd(C)
    assert S.dtype == F64
    torch.testing.assert_close(S @ S, C.double(), rtol=0, atol=1e-5 * float(C.norm()))  # fp32 input round-off


def test_sqrtm_psd_symmetrises_its_input(rng):
    """eigh reads one triangle only: an antisymmetric perturbation must be averaged away, not half-used."""
    C = _spd(rng, 5, 0.5, 2.0)
    K = torch.randn(5, 5, generator=rng, dtype=F64)
    E = 1e-3 * (K - K.T)
    torch.testing.assert_close(sqrtm_psd(C + E), sqrtm_psd(C), rtol=0, atol=1e-13)


def test_sqrtm_psd_clips_round_off_negative_eigenvalues(rng):
    Q = _orthogonal(rng, 4)
    w = torch.tensor([2.0, 0.5, 0.0, -1e-12], dtype=F64)  # a PSD rank-2 matrix plus round-off
    C = (Q * w) @ Q.T
    assert float(torch.linalg.eigvalsh(C).min()) < 0  # really indefinite: an unclipped sqrt would give NaN
    S = sqrtm_psd(C)
    assert torch.isfinite(S).all()
    torch.testing.assert_close(S, S.T, rtol=0, atol=1e-14)
    # eigenvalues of size ~1e-12 (and their ~1e-16 eigh error) contribute at most sqrt(1e-12) = 1e-6 to the root
    expected = (Q * w.clamp_min(0).sqrt()) @ Q.T
    torch.testing.assert_close(S, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(S @ S, C, rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------------------ bures / Fréchet


@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "commuting"])
def test_bures_commuting_closed_form(rng, rotate):
    """Commuting C1 = Q diag(a) Qᵀ, C2 = Q diag(b) Qᵀ: Bures = Σ (√a_i − √b_i)²."""
    a = 0.1 + 3 * torch.rand(5, generator=rng, dtype=F64)
    b = 0.1 + 3 * torch.rand(5, generator=rng, dtype=F64)
    Q = _orthogonal(rng, 5) if rotate else torch.eye(5, dtype=F64)
    C1, C2 = (Q * a) @ Q.T, (Q * b) @ Q.T
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert float(bures(C1, C2)) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(bures(C1, C1)) == pytest.approx(0, abs=1e-12)


def test_bures_non_commuting_matches_independent_formulas(rng):
    C1, C2 = _spd(rng, 4, 0.2, 2.0), _spd(rng, 4, 0.2, 2.0)
    ref = _bures_ref(C1, C2)
    # second independent route: C1 C2 is similar to C1^{1/2} C2 C1^{1/2}, so tr(...)^{1/2} = Σ sqrt(eig(C1 C2))
    ev = np.linalg.eigvals(C1.numpy() @ C2.numpy()).real
    assert ref == pytest.approx(float(torch.trace(C1) + torch.trace(C2)) - 2 * float(np.sqrt(ev).sum()), rel=1e-10)
    assert ref > 0.01  # genuinely different covariances
    assert float(bures(C1, C2)) == pytest.approx(ref, rel=1e-10)
    assert float(bures(C2, C1)) == pytest.approx(ref, rel=1e-10)  # W2 is symmetric


def test_frechet_distance_of_identical_and_translated_sets(rng):
    e = torch.randn(500, 4, generator=rng, dtype=F64) @ torch.randn(4, 4, generator=rng, dtype=F64)
    scale = float(torch.cov(e.T).trace())
    assert abs(frechet_distance(e, e)) < 1e-10 * scale
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    # translation changes only the mean term: ‖shift‖² exactly (up to fp)
    assert frechet_distance(e, e + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_distance_uses_unbiased_sample_moments(rng):
    a = _gauss(rng, 300, torch.zeros(3, dtype=F64), _spd(rng, 3, 0.5, 1.0))
    b = _gauss(rng, 500, torch.ones(3, dtype=F64), _spd(rng, 3, 0.5, 1.0))
    an, bn = a.numpy(), b.numpy()
    dm = an.mean(0) - bn.mean(0)
    expected = float(dm @ dm) + _bures_ref(np.cov(an.T, ddof=1), np.cov(bn.T, ddof=1))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)  # fp32 input, fp64 maths


def test_frechet_distance_recovers_the_gaussian_w2_of_large_samples():
    """n = 200k draws of N(m1, C1), N(m2, C2): the estimate is the analytic W2² up to a few standard errors."""
    g = torch.Generator().manual_seed(123)
    n = 200_000
    m1 = torch.tensor([0.5, -0.2, 0.1], dtype=F64)
    m2 = torch.tensor([-0.3, 0.4, 0.6], dtype=F64)
    C1, C2 = _spd(g, 3, 0.5, 2.0), _spd(g, 3, 0.5, 2.0)
    dm = m1 - m2
    analytic = float(dm @ dm) + _bures_ref(C1, C2)
    # Delta method: m̂1 − m̂2 = dm + δ, δ ~ N(0, (C1 + C2)/n), so ‖·‖² has std 2 sqrt(dmᵀ(C1 + C2)dm / n); the
    # Bures part as in _bures_sigma (means and covariances of Gaussian samples are independent: variances add).
    # Bias is O(d²/n) ~ 1e-4. 5 sigma: a false failure has probability ~1e-6.
    sigma = math.sqrt(4 * float(dm @ (C1 + C2) @ dm) / n + _bures_sigma(C1, C2, n) ** 2)
    estimate = frechet_distance(_gauss(g, n, m1, C1), _gauss(g, n, m2, C2))
    assert abs(estimate - analytic) < 5 * sigma + 1e-3, (estimate, analytic, sigma)
    assert 5 * sigma < 0.05 * analytic  # the test is sharp: the tolerance is a few % of the value


# ------------------------------------------------------------------------------------------------ CFID


def test_cfid_of_identical_estimates_is_zero(rng):
    y = torch.randn(400, 3, generator=rng, dtype=F64)
    x = y @ torch.randn(3, 5, generator=rng, dtype=F64) + torch.randn(400, 5, generator=rng, dtype=F64)
    assert abs(cfid(x, x, y)) < 1e-10
    assert cfid(x, x + 0.1 * torch.randn(400, 5, generator=rng, dtype=F64), y) > 1e-4  # and not always 0


def _linear_gaussian_problem():
    g = torch.Generator().manual_seed(7)
    d_y, d_x = 3, 4
    mu_y = torch.tensor([0.3, -0.5, 0.2], dtype=F64)
    C_y = _spd(g, d_y, 0.5, 2.0)
    A, A2 = 0.5 * torch.randn(d_x, d_y, generator=g, dtype=F64), 0.5 * torch.randn(d_x, d_y, generator=g, dtype=F64)
    b, b2 = 0.3 * torch.randn(d_x, generator=g, dtype=F64), 0.3 * torch.randn(d_x, generator=g, dtype=F64)
    S, S2 = _spd(g, d_x, 0.2, 1.0), _spd(g, d_x, 0.2, 1.0)
    return mu_y, C_y, A, b, S, A2, b2, S2


@pytest.mark.parametrize("case", ["generic", "same_marginal"])
def test_cfid_matches_the_expected_conditional_w2_of_a_linear_gaussian_model(case):
    r"""y ~ N(μ_y, C_y), x = A y + b + N(0, Σ), x̂ = A' y + b' + N(0, Σ').

    Given y, p(x | y) = N(A y + b, Σ) and p(x̂ | y) = N(A' y + b', Σ'): Gaussians with constant covariances, so
    W2²(p(x|y), p(x̂|y)) = ‖(A − A') y + b − b'‖² + Bures(Σ, Σ'), and with dA = A − A', E_y over y ~ N(μ_y, C_y):

        E_y W2² = ‖dA μ_y + b − b'‖² + tr(dA C_y dAᵀ) + Bures(Σ, Σ')

    (μ_y = 0 gives ‖b − b'‖² + tr[(A − A') C_y (A − A')ᵀ] + Bures(Σ, Σ')). "same_marginal": x̂ ignores y
    (A' = 0, b' = A μ_y + b, Σ' = A C_y Aᵀ + Σ): x̂ and x have the same marginal law (Fréchet ≈ 0), CFID does not.
    """
    mu_y, C_y, A, b, S, A2, b2, S2 = _linear_gaussian_problem()
    if case == "same_marginal":
        A2, b2, S2 = torch.zeros_like(A), A @ mu_y + b, A @ C_y @ A.T + S
    dA, Se = A - A2, S + S2
    dm = dA @ mu_y + b - b2
    analytic = float(dm @ dm + torch.trace(dA @ C_y @ dA.T)) + _bures_ref(S, S2)

    n = 200_000
    g = torch.Generator().manual_seed(2024)
    y = _gauss(g, n, mu_y, C_y)
    x = y @ A.T + _gauss(g, n, b, S)
    x_hat = y @ A2.T + _gauss(g, n, b2, S2)
    estimate = cfid(x, x_hat, y)

    # Tolerance (first-order delta method; ε = noise_x − noise_x̂ has covariance Σ + Σ', independent of y):
    #  * mean term: m̂_x − m̂_x̂ = dm + dA(ȳ − μ_y) + ε̄, so ‖·‖² has variance 4 dmᵀ(dA C_y dAᵀ + Σ + Σ')dm / n;
    #  * Ĉ_xy − Ĉ_x̂y = dA Ĉ_yy + Ĉ_εy, so tr(D Ĉ_yy⁻¹ Dᵀ) = tr(M Ĉ_yy) + 2 tr(dA Ĉ_yε) + O(1/n), M = dAᵀ dA:
    #    Var tr(M Ĉ_yy) = 2 tr(M C_y M C_y) / n (Wishart) and Var tr(dA Ĉ_yε) = tr(dA C_y dAᵀ (Σ + Σ')) / n;
    #  * the conditional covariances are residual covariances of the two independent noises: _bures_sigma(Σ, Σ').
    # The four are uncorrelated at first order (Gaussian means ⟂ covariances, y ⟂ noise), so variances add; the
    # O(d_x d_y / n) ~ 1e-4 bias is covered by the 1e-3 slack. 5 sigma: false failure probability ~1e-6.
    M = dA.T @ dA
    var = (
        4 * float(dm @ (dA @ C_y @ dA.T + Se) @ dm) / n
        + 2 * float(torch.trace(M @ C_y @ M @ C_y)) / n
        + 4 * float(torch.trace(dA @ C_y @ dA.T @ Se)) / n
        + _bures_sigma(S, S2, n) ** 2
    )
    tol = 5 * math.sqrt(var) + 1e-3
    assert abs(estimate - analytic) < tol, (estimate, analytic, tol)
    assert tol < 0.06 * analytic  # sharp: a wrong term (e.g. dropping the trace or the Bures part) is caught
    if case == "same_marginal":
        # the marginals agree (FID-type distance ~ 0) although the conditionals are far apart
        assert frechet_distance(x, x_hat) < 0.05 * analytic


def _small_cfid_problem(rng, n=2000):
    y = torch.randn(n, 3, generator=rng, dtype=F64)
    x = y @ torch.randn(3, 4, generator=rng, dtype=F64) + torch.randn(n, 4, generator=rng, dtype=F64)
    x_hat = y @ torch.randn(3, 4, generator=rng, dtype=F64) + 0.5 * torch.randn(n, 4, generator=rng, dtype=F64)
    return x, x_hat, y


def test_cfid_is_invariant_to_affine_reparametrisations_of_e_y(rng):
    x, x_hat, y = _small_cfid_problem(rng)
    ref = cfid(x, x_hat, y)
    M = torch.randn(3, 3, generator=rng, dtype=F64)
    assert float(torch.linalg.cond(M)) < 1e3  # invertible, well conditioned
    c = torch.tensor([5.0, -3.0, 100.0], dtype=F64)
    assert cfid(x, x_hat, y + c) == pytest.approx(ref, rel=1e-9)
    assert cfid(x, x_hat, y @ M.T) == pytest.approx(ref, rel=1e-9)
    assert cfid(x, x_hat, y @ M.T + c) == pytest.approx(ref, rel=1e-9)
    # and it does depend on e_y: conditioning on an unrelated variable gives a different value
    assert abs(cfid(x, x_hat, torch.randn(y.shape, generator=rng, dtype=F64)) - ref) > 0.1 * ref


def test_cfid_uses_the_pseudo_inverse_of_a_singular_c_yy(rng):
    x, x_hat, y = _small_cfid_problem(rng)
    ref = cfid(x, x_hat, y)
    # redundant columns make C_yy singular; they carry no extra information about x
    assert cfid(x, x_hat, torch.cat([y, y[:, :1]], 1)) == pytest.approx(ref, rel=1e-9)
    w = torch.randn(3, 2, generator=rng, dtype=F64)
    assert cfid(x, x_hat, torch.cat([y, 10 * y @ w], 1)) == pytest.approx(ref, rel=1e-9)
    # a constant e_y: C_yy = 0, C_yy⁺ = 0, the conditionals are the marginals and CFID is the Fréchet distance
    const = torch.full((y.shape[0], 2), 3.0, dtype=F64)
    assert cfid(x, x_hat, const) == pytest.approx(frechet_distance(x, x_hat), rel=1e-12)


@pytest.mark.parametrize(
    ("shape_x", "shape_x_hat", "shape_y"),
    [
        ((50, 3), (50, 2), (50, 2)),  # estimate and truth of different dimension
        ((50, 3), (49, 3), (50, 2)),  # unpaired estimate
        ((50, 3), (50, 3), (40, 2)),  # unpaired observation
        ((50,), (50,), (50, 2)),  # not (n, d)
        ((50, 3, 1), (50, 3, 1), (50, 2)),
    ],
)
def test_cfid_rejects_bad_shapes(shape_x, shape_x_hat, shape_y):
    with pytest.raises(ValueError, match="cfid"):
        cfid(torch.zeros(shape_x), torch.zeros(shape_x_hat), torch.zeros(shape_y))


@pytest.mark.parametrize("shape_y", [(50,), (50, 2, 2)])
def test_cfid_rejects_e_y_that_is_not_a_matrix(shape_y):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=F64)
    with pytest.raises(ValueError, match="cfid"):
        cfid(x, x + 1, torch.randn(shape_y, generator=g, dtype=F64))


# ------------------------------------------------------------------------------------------------ coverage

N_OBS, N_SAMPLES, DIM = 2000, 200, 4


def _coverage_data(sample_std: float, seed: int):
    """Per observation i a centre c_i, S samples c_i + sample_std·N(0, I) and the truth c_i + N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    c = 2 * torch.randn(N_OBS, 1, DIM, generator=g, dtype=F64)
    samples = c + sample_std * torch.randn(N_OBS, N_SAMPLES, DIM, generator=g, dtype=F64)
    truth = c[:, 0] + torch.randn(N_OBS, DIM, generator=g, dtype=F64)
    return samples, truth


def test_coverage_of_a_calibrated_sampler_is_close_to_the_diagonal():
    r"""Truth exchangeable with the samples: Coverage(α) ≈ α.

    Bound. Write e_s = c + ε_s, x = c + ε_x. The sample radii ‖ε_s − ε̄‖ are N(0, (1 − 1/S) I) norms and the truth
    radius ‖ε_x − ε̄‖ an N(0, (1 + 1/S) I) norm independent of them (Gaussian mean ⟂ residuals): the truth is a sample
    radius inflated by ρ = sqrt((S + 1)/(S − 1)) ≈ 1 + 1/S. Bias of E Coverage(α) − α:
      * order statistics: for S + 1 exchangeable radii P(truth ≤ X_(k)) = k/(S + 1), and the linear-interpolation
        quantile lies between X_(k) and X_(k+1), k = ⌊α(S − 1)⌋ + 1: at most ~2/S (plus O(1/S) for the residuals'
        weak dependence);
      * the inflation ρ shifts the probability by ≤ max_r r f_χd(r) (ρ − 1) ≈ 1.08/S for d = 4
        (r f_χ4(r) = r⁴ e^{−r²/2}/2, maximal 8 e^{−2} at r = 2).
    So |bias| ≤ 4/S = 0.02. Noise: Coverage(α) = F_N(α), the empirical CDF of the i.i.d. U_i = inf{α: i covered}, so
    by the Dvoretzky–Kiefer–Wolfowitz inequality sup_α |F_N − F| ≤ sqrt(ln(2/δ) / 2N) with probability 1 − δ
    (0.044 for δ = 1e-3, N = 2000). calibration_error ≤ 0.02 + 0.044.
    """
    bound = 4 / N_SAMPLES + math.sqrt(math.log(2 / 1e-3) / (2 * N_OBS))
    out = coverage(*_coverage_data(1.0, seed=0))
    assert out["calibration_error"] < bound
    # negative controls: over-confident (std 0.8) and under-confident (std 1.25) samplers exceed the bound
    assert coverage(*_coverage_data(0.8, seed=1))["calibration_error"] > bound
    assert coverage(*_coverage_data(1.25, seed=2))["calibration_error"] > bound


def test_coverage_of_an_over_confident_sampler():
    """Sample std 0.5, truth std 1 (d = 4): Coverage(0.5) = P(‖truth − ē‖ ≤ median of the sample radii).

    Sample radii are 0.5 sqrt(1 − 1/S) χ_4, the truth radius is sqrt(1 + 0.25/S) χ_4 (ē has covariance 0.25/S I), so
    Coverage(0.5) → F_χ4(0.5 sqrt(1 − 1/S) median(χ_4) / sqrt(1 + 0.25/S)) ≈ 0.066, far below 0.5. Tolerance: a mean
    of N independent indicators (binomial std sqrt(p(1 − p)/N) ≈ 0.0056), 5 sigma, plus 0.002 for the second-order
    effect of the noisy per-observation median (½ F'' Var ≈ 3e-4) and O(1/S) dependence of the residuals.
    """
    S = N_SAMPLES
    p = float(chi.cdf(0.5 * math.sqrt(1 - 1 / S) * chi.median(DIM) / math.sqrt(1 + 0.25 / S), DIM))
    out = coverage(*_coverage_data(0.5, seed=3), alphas=torch.tensor([0.5]))
    assert out["alpha"] == [0.5] and len(out["coverage"]) == 1
    assert out["coverage"][0] == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / N_OBS) + 0.002)
    assert out["coverage"][0] < 0.15  # far below the nominal 0.5
    assert out["calibration_error"] == pytest.approx(abs(out["coverage"][0] - 0.5), abs=1e-12)


def test_coverage_curve_structure_and_independent_reimplementation(rng):
    N, S, d = 60, 30, 3
    samples = torch.randn(N, S, d, generator=rng, dtype=F64) * torch.rand(N, 1, 1, generator=rng, dtype=F64)
    truth = 0.8 * torch.randn(N, d, generator=rng, dtype=F64)
    out = coverage(samples, truth)
    assert set(out) == {"alpha", "coverage", "calibration_error"}
    assert len(out["alpha"]) == len(out["coverage"]) == 100
    np.testing.assert_allclose(out["alpha"], np.arange(1, 101) / 100, rtol=0, atol=1e-15)
    cov = np.asarray(out["coverage"])
    assert np.all(np.diff(cov) >= 0)  # radii grow with α
    assert np.all((cov >= 0) & (cov <= 1))

    # numpy re-implementation: r_α = linear-interpolation quantile of the sample radii around the sample mean
    s, x = samples.numpy(), truth.numpy()
    centre = s.mean(1)
    radii = np.linalg.norm(s - centre[:, None], axis=2)  # (N, S)
    dist = np.linalg.norm(x - centre, axis=1)  # (N,)
    alphas = np.arange(1, 101) / 100
    r = np.quantile(radii, alphas, axis=1, method="linear")  # (A, N)
    expected = (dist[None] <= r).mean(1)
    np.testing.assert_allclose(cov, expected, rtol=0, atol=1e-12)
    assert cov[-1] == pytest.approx(float(np.mean(dist <= radii.max(1))), abs=1e-12)  # α = 1: inside the max radius
    assert 0 < cov[-1] < 1  # the data make the α = 1 check non-trivial
    assert out["calibration_error"] == pytest.approx(float(np.abs(expected - alphas).mean()), abs=1e-12)

    # the documented rule is "covered iff ‖e_x − ē‖ ≤ r_α": a truth exactly on the farthest sample is covered at α = 1
    far = samples[0, int(np.argmax(radii[0]))]
    assert coverage(samples[:1], far[None], alphas=torch.tensor([1.0]))["coverage"] == [1.0]

    custom = coverage(samples, truth, alphas=torch.tensor([0.1, 0.9]))
    assert custom["alpha"] == pytest.approx([0.1, 0.9]) and len(custom["coverage"]) == 2
    np.testing.assert_allclose(custom["coverage"], [expected[9], expected[89]], rtol=0, atol=1e-12)


def test_coverage_of_embeddings_on_any_device(device, rng):
    """The quantile levels are moved beside the embeddings (on CUDA they stayed on the CPU and quantile failed)."""
    samples, truth = torch.randn(8, 5, 3, generator=rng), torch.randn(8, 3, generator=rng)
    on_device = coverage(samples.to(device), truth.to(device), alphas=torch.tensor([0.5, 1.0]))
    assert on_device == coverage(samples, truth, alphas=torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("shape_samples", "shape_truth"),
    [
        ((10, 3), (10, 3)),  # samples not (N, S, d)
        ((10, 20, 3), (9, 3)),  # wrong N
        ((10, 20, 3), (10, 4)),  # wrong d
        ((10, 20, 3), (10, 3, 1)),
        ((10, 20, 3, 1), (10, 3)),
    ],
)
def test_coverage_rejects_bad_shapes(shape_samples, shape_truth):
    with pytest.raises(ValueError, match="coverage"):
        coverage(torch.zeros(shape_samples), torch.zeros(shape_truth))


# ------------------------------------------------------------------------------------------------ digits embedding


def _vae(latent_dim: int, **kwargs) -> DigitsVAE:
    """A seeded DigitsVAE whose initialisation leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DigitsVAE(latent_dim, **kwargs)


def test_crop01_is_the_centre_28x28_crop_on_unit_range(rng):
    model = _vae(3, hidden=8)
    x = 2 * torch.rand(3, 1, 32, 32, generator=rng) - 1
    out = model.crop01(x)
    assert out.shape == (3, 784)
    torch.testing.assert_close(out, ((x[:, 0, 2:30, 2:30] + 1) / 2).reshape(3, 784), rtol=0, atol=0)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # out-of-range library images are clamped to [-1, 1] first
    wide = model.crop01(3 * x)
    torch.testing.assert_close(wide, ((3 * x[:, 0, 2:30, 2:30]).clamp(-1, 1) + 1).reshape(3, 784) / 2)
    assert float(wide.min()) == 0 and float(wide.max()) == 1


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 32, 32), (2, 1, 20, 32)], ids=["rgb", "no-channel", "small"])
def test_crop01_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="gray digits"):
        _vae(3, hidden=8).crop01(torch.zeros(shape))


def test_negative_elbo_matches_a_hand_computation(rng):
    model = _vae(3, hidden=16).double()
    x01 = torch.rand(5, 784, generator=rng, dtype=F64)
    x01[0] = (x01[0] > 0.5).double()  # a binary image too
    seed = 11
    with torch.no_grad():
        got = model.negative_elbo(x01, generator=torch.Generator().manual_seed(seed))
        # hand computation with torch.distributions: one reparameterised draw z = μ + σ ε, same ε stream
        h = model.encoder(x01)
        mu, logvar = h[:, :3], h[:, 3:]
        std = (0.5 * logvar).exp()
        eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
        logits = model.decoder(mu + std * eps)
        bernoulli = torch.distributions.Bernoulli(logits=logits, validate_args=False)  # soft targets allowed
        rec = -bernoulli.log_prob(x01).sum(1)
        q = torch.distributions.Normal(mu, std)
        prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(std))
        kl = torch.distributions.kl_divergence(q, prior).sum(1)
    assert got.shape == (5,)
    torch.testing.assert_close(got, rec + kl, rtol=1e-12, atol=1e-9)
    assert bool((kl > 0).all())
    # the draw matters (a different ε gives a different value), so the shared-generator check is not vacuous
    with torch.no_grad():
        other = model.negative_elbo(x01, generator=torch.Generator().manual_seed(seed + 1))
    assert not torch.allclose(other, got)


def test_load_digits_embedding_names_the_missing_file(tmp_path):
    # the library's own message (safetensors would also raise FileNotFoundError, without the retrain hint)
    with pytest.raises(FileNotFoundError, match="digits embedding weights not found") as info:
        load_digits_embedding(tmp_path)
    assert str(tmp_path / WEIGHTS) in str(info.value)
    assert "python -m ud2m.embedding" in str(info.value)


def test_save_then_load_round_trip(tmp_path, rng):
    model = _vae(5).eval()  # default width: the loader rebuilds 784-512-512-2d and infers d from the weights
    out = save_digits_vae(model, tmp_path / "vae", {"name": "test", "seed": 3})
    assert out == tmp_path / "vae"
    loaded = load_digits_embedding(out)
    assert loaded.latent_dim == 5 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.cat([digits_crops("val")[:3], 2 * torch.rand(2, 1, 32, 32, generator=rng) - 1])
    with torch.no_grad():
        expected = model.embed(x)
    assert expected.shape == (5, 5)
    assert torch.equal(loaded.embed(x), expected)
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "test" and card["seed"] == 3
    assert card["sha256"] == hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()


def _nearest_centroid_accuracy(e_train, y_train, e_val, y_val) -> float:
    centroids = torch.stack([e_train[y_train == k].mean(0) for k in range(10)])  # (10, d)
    return float((torch.cdist(e_val, centroids).argmin(1) == y_val).double().mean())


def _check_digits_embedding(path) -> tuple[float, float]:
    """Card hash; nearest-class-centroid accuracy on the 90 held-out digits (centroids from digits:train) in the
    embedding and, as a reference, in the 784-pixel crops the encoder sees."""
    from sklearn.datasets import load_digits

    from ud2m.io import digits_names

    card = json.loads((path / "card.json").read_text())
    assert card["sha256"] == hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    model = load_digits_embedding(path)
    labels = torch.from_numpy(load_digits().target)
    train_idx = [int(name.split(":")[1]) for name in digits_names("train")]
    val_idx = [int(name.split(":")[1]) for name in digits_names("val")]
    assert len(val_idx) == 90 and not set(train_idx) & set(val_idx)
    x_train, x_val = digits_crops("train"), digits_crops("val")
    y_train, y_val = labels[train_idx], labels[val_idx]
    with torch.no_grad():
        embedded = _nearest_centroid_accuracy(model.embed(x_train), y_train, model.embed(x_val), y_val)
    pixels = _nearest_centroid_accuracy(model.crop01(x_train), y_train, model.crop01(x_val), y_val)
    return embedded, pixels


def test_shipped_digits_embedding_separates_the_held_out_classes():
    card = json.loads((DIGITS_VAE / "card.json").read_text())
    assert hashlib.sha256((DIGITS_VAE / WEIGHTS).read_bytes()).hexdigest() == card["sha256"]
    accuracy, pixel_accuracy = _check_digits_embedding(DIGITS_VAE)
    assert accuracy > 0.5, f"nearest-centroid accuracy {accuracy:.2f} (chance 0.10)"
    # A VAE trained on these digits keeps most of the class information of its input pixels; > 0.5 alone would also
    # pass an untrained encoder (random 784-512-512-24 MLPs keep enough structure for ~0.55-0.70 on these 90 digits).
    assert accuracy > pixel_accuracy - 0.1, f"embedding {accuracy:.2f} vs pixels {pixel_accuracy:.2f}"
