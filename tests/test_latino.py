"""LATINO / LATINO-PRO (docs/method.md §4, §5, §10.5) and their data-weight rules.

* Analytic Gaussian prior (float64): every LATINO stage is affine-Gaussian, so the exact law of the implemented
  algorithm is propagated with dense matrices and the sampler is checked against it (means within 5 standard
  errors, covariance within 5x the Wishart RMS error); the law is then compared with the exact posterior in W2
  against bounds derived from theory (contraction to the stationary law of a constant schedule; the covariance
  ordering and mean recursion of the default grid).
* Tiny latent models: every operator family runs with exactly N NFE and the promised data consistency; LATINO-PRO
  has 16 forwards / 6 backwards with num_outer = 2, moves only unfrozen rows inside the balls, and its gradient
  estimator matches central finite differences of the transition log-density in float64.
* Weight rules: the table formula, the discrepancy target, its bounds and its CG fallback.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ud2m.operators import (
    JPEG,
    Compose,
    Denoising,
    GaussianBlur,
    Inpainting,
    LinearOperator,
    SuperResolution,
    measure,
    sigma_internal,
)
from ud2m.operators.presets import list_presets, load_preset
from ud2m.priors.gaussian import GaussianPrior, gaussian_w2, operator_matrix
from ud2m.schedules import DMD2_4, LATINO_SDXL, LCM_8
from ud2m.solvers.latino_algorithms import (
    box_average,
    fill_holes,
    latino,
    latino_posterior,
    latino_pro,
    latino_pro_chain,
    load_condition,
    normalise_tokens,
    project_to_balls,
    sapg_step_size,
    save_condition,
    transition_log_density,
)
from ud2m.solvers.steps import wiener_init
from ud2m.solvers.weights import (
    ConstantGamma,
    DiscrepancyWeights,
    TableWeights,
    WeightRule,
    has_closed_form_prox,
    preset_rules,
)

SIGMA_Y = 0.05
SIGMA_N = sigma_internal(SIGMA_Y)
SHAPE = (1, 8, 8)  # one Gaussian image, d = 64
D = 64


# ---------------------------------------------------------------------------------------------------- Gaussian prior
def _gaussian_ops() -> dict[str, LinearOperator]:
    g = torch.Generator().manual_seed(3)
    return {
        "inpainting": Inpainting((torch.rand(8, 8, generator=g) < 0.5).float()),
        "sr_x2": SuperResolution(2, filter="bicubic", padding="circular"),
        "blur": GaussianBlur(1.0, 5),
        "denoising": Denoising(),
    }


GAUSSIAN_OPS = _gaussian_ops()


def _gaussian_prior(uniform_s: bool) -> GaussianPrior:
    g = torch.Generator().manual_seed(1)
    mu = (torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5) * 0.6  # |mu| <= 0.3
    s = 0.1 if uniform_s else 0.06 + 0.04 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
    return GaussianPrior(mu, s)


def _observation(prior: GaussianPrior, op: LinearOperator) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return measure(op, prior.sample(1, g), SIGMA_Y, g).double()  # (1, ...)


def _sae_coefficients(prior: GaussianPrior, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k a, 1 - k a, k b) of u = (1 - k a) mu + k a x + k b eps, with (a_t, b_t) exactly as the solver forms them
    (float32 time -> float32 scales -> float64), k = a s^2 / (a^2 s^2 + b^2) from GaussianPrior's predictor."""
    a, b = (v.double() for v in prior.scales(torch.tensor([float(t)], dtype=torch.float32)))
    s2 = prior.s.reshape(-1) ** 2
    k = a * s2 / (a**2 * s2 + b**2)
    return k * a, 1 - k * a, k * b


def propagate(prior, A, y, x0, timesteps, gamma):
    """Exact law of LATINO's iterates: x^(0) = x0 (a point), then m <- M m + c, C <- M C M^T + Q per step.

    Returns the list of (mean (d,), cov (d, d)) for k = 0..N.
    """
    P = torch.linalg.inv(torch.eye(D, dtype=torch.float64) + gamma * A.T @ A)  # (I + gamma A^T A)^-1
    data = P @ (gamma * A.T @ y.reshape(-1))
    mu = prior.mu.reshape(-1)
    m, C = x0.reshape(-1).clone(), torch.zeros(D, D, dtype=torch.float64)
    laws = [(m, C)]
    for t in timesteps:
        ka, one_minus_ka, kb = _sae_coefficients(prior, t)
        m_u, C_u = one_minus_ka * mu + ka * m, ka[:, None] * C * ka[None, :] + torch.diag(kb**2)  # SAE step
        m, C = P @ m_u + data, P @ C_u @ P.T  # prox
        laws.append((m, C))
    return laws


def _dense(op: LinearOperator) -> torch.Tensor:
    return operator_matrix(op, SHAPE)


@pytest.mark.parametrize("name", list(GAUSSIAN_OPS))
def test_latino_matches_propagated_gaussian_law(name):
    """Implementation vs exact law: S = 4096 samples, mean within 5 SE per pixel, Frobenius covariance error
    below 5 sqrt((tr C^2 + tr(C)^2)/(S-1)) (the RMS error of an unbiased Gaussian sample covariance)."""
    op, prior, S, gamma = GAUSSIAN_OPS[name], _gaussian_prior(uniform_s=False), 4096, 30.0
    y = _observation(prior, op)
    seen = []
    x = latino(
        prior,
        op,
        y.expand(S, *y.shape[1:]).contiguous(),
        timesteps=LATINO_SDXL,
        weights=ConstantGamma(gamma),
        sigma_y=SIGMA_Y,
        generator=torch.Generator().manual_seed(0),
        callback=lambda d: seen.append(max(d["x"].abs().max(), d["x_prior"].abs().max())),
    )
    assert max(seen) < 1, "a clamp was active: the affine-Gaussian propagation would not be exact"
    x0 = wiener_init(op, y, SIGMA_N)[0]
    m, C = propagate(prior, _dense(op), y, x0, LATINO_SDXL, gamma)[-1]
    X = x.reshape(S, D)
    se = (torch.diag(C) / S).sqrt()
    assert ((X.mean(0) - m).abs() <= 5 * se).all(), f"max |mean err|/SE = {((X.mean(0) - m).abs() / se).max():.2f}"
    C_hat = torch.cov(X.T)
    bound = 5 * math.sqrt((torch.trace(C @ C) + torch.trace(C) ** 2) / (S - 1))
    assert torch.linalg.matrix_norm(C_hat - C) <= bound


def test_constant_schedule_contracts_to_stationary_law():
    """Theory (synchronous coupling): with a constant (t, gamma) the chain is x' = M x + c + noise, M = P diag(ka),
    so W2(law_{K+1}, pi) <= ||M||_2 W2(law_K, pi) for the stationary law pi: more steps never hurt, and
    W2(law_K, posterior) <= W2(pi, posterior) + ||M||^K W2(law_0, pi)."""
    op, prior, gamma, t, K = GAUSSIAN_OPS["blur"], _gaussian_prior(uniform_s=True), 1.0, 20, 8
    A, y = _dense(op), _observation(prior, op)
    x0 = torch.zeros(D, dtype=torch.float64)
    laws = propagate(prior, A, y, x0, (t,) * K, gamma)
    ka, _, _ = _sae_coefficients(prior, t)
    P = torch.linalg.inv(torch.eye(D, dtype=torch.float64) + gamma * A.T @ A)
    M = P * ka[None, :]
    rho = torch.linalg.matrix_norm(M, ord=2).item()
    assert 0.3 < rho < 1  # a configuration where the steps matter
    m_pi, C_pi = propagate(prior, A, y, x0, (t,) * 400, gamma)[-1]  # rho^400 < 1e-60: the fixed point
    w_pi = [gaussian_w2(m, C, m_pi, C_pi).item() for m, C in laws]
    for k in range(K):
        assert w_pi[k + 1] <= rho * w_pi[k] + 1e-9
    post_m, post_C = prior.posterior(A, y, SIGMA_N)
    w_post = [gaussian_w2(m, C, post_m, post_C).item() for m, C in laws]
    w_pi_post = gaussian_w2(m_pi, C_pi, post_m, post_C).item()
    for k in range(K + 1):
        assert w_post[k] <= w_pi_post + rho**k * w_pi[0] + 1e-9
    assert math.isfinite(w_pi_post)


@pytest.mark.parametrize("name", list(GAUSSIAN_OPS))
def test_default_grid_law_versus_exact_posterior(name):
    """LATINO_SDXL grid, uniform s, gamma = s^2/sigma_n^2 (then the prox is the posterior precision's split):
    the propagated covariance satisfies C_N <= Sigma_post (induction: C <= s^2 P), hence
    W2^2 <= ||m_N - m_post||^2 + tr(Sigma_post - C_N); the mean obeys m_N - m_post = k a P (m_{N-1} - mu)
    and ends closer to the posterior mean than the Wiener start."""
    op, prior = GAUSSIAN_OPS[name], _gaussian_prior(uniform_s=True)
    gamma = 0.1**2 / SIGMA_N**2
    A, y = _dense(op), _observation(prior, op)
    x0 = wiener_init(op, y, SIGMA_N)[0].reshape(-1)
    laws = propagate(prior, A, y, x0, LATINO_SDXL, gamma)
    (m_prev, _), (m, C) = laws[-2], laws[-1]
    post_m, post_C = prior.posterior(A, y, SIGMA_N)
    post_m = post_m.reshape(-1)
    assert torch.linalg.eigvalsh(post_C - C).min() >= -1e-12
    w2 = gaussian_w2(m, C, post_m, post_C).item()
    bound = math.sqrt((m - post_m).square().sum() + torch.trace(post_C - C))
    assert w2 <= bound + 1e-9, f"W2 = {w2:.4g} > derived bound {bound:.4g}"
    ka, _, _ = _sae_coefficients(prior, LATINO_SDXL[-1])
    P = torch.linalg.inv(torch.eye(D, dtype=torch.float64) + gamma * A.T @ A)
    torch.testing.assert_close(m - post_m, P @ (ka * (m_prev - prior.mu.reshape(-1))))
    assert (m - post_m).norm() < (x0 - post_m).norm()
    assert w2 < gaussian_w2(x0, torch.zeros_like(C), post_m, post_C).item()


def test_same_generator_and_batch_composition():
    """Same seed -> identical output; with a list of generators, sample i depends only on generator i."""
    op, prior = GAUSSIAN_OPS["blur"], _gaussian_prior(uniform_s=False)
    g = torch.Generator().manual_seed(5)
    x_true = prior.sample(3, g)
    y = measure(op, x_true, SIGMA_Y, g).double()
    run = dict(timesteps=DMD2_4, weights=DiscrepancyWeights(), sigma_y=SIGMA_Y)
    a = latino(prior, op, y, generator=torch.Generator().manual_seed(9), **run)
    b = latino(prior, op, y, generator=torch.Generator().manual_seed(9), **run)
    assert torch.equal(a, b)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = latino(prior, op, y, generator=gens([11, 12, 13]), **run)
    alone = latino(prior, op, y[1:2], generator=gens([12]), **run)
    swapped = latino(prior, op, y[[2, 1]], generator=gens([13, 12]), **run)
    torch.testing.assert_close(alone[0], full[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(swapped, full[[2, 1]], rtol=0, atol=1e-12)


def test_posterior_welford_statistics():
    """latino_posterior: chunked Welford mean/std equal the direct statistics of the kept samples, match the
    propagated law (std within 5 SE: SE(s) ~ sigma/sqrt(2(S-1))), and do not depend on the chunk size."""
    op, prior, S, gamma = GAUSSIAN_OPS["inpainting"], _gaussian_prior(uniform_s=False), 1024, 30.0
    g = torch.Generator().manual_seed(4)
    y = measure(op, prior.sample(2, g), SIGMA_Y, g).double()  # two observations
    run = dict(timesteps=DMD2_4, weights=ConstantGamma(gamma), sigma_y=SIGMA_Y)
    gens = [torch.Generator().manual_seed(i) for i in (0, 1)]
    mean, std, samples, nfe = latino_posterior(
        prior, op, y, num_samples=S, batch_size=300, generator=gens, keep_samples=True, **run
    )
    assert samples.shape == (2, S, *SHAPE) and nfe == S * len(DMD2_4)
    torch.testing.assert_close(mean, samples.mean(1))
    torch.testing.assert_close(std, samples.std(1))
    for i in range(2):
        m, C = propagate(prior, _dense(op), y[i : i + 1], wiener_init(op, y[i : i + 1], SIGMA_N)[0], DMD2_4, gamma)[-1]
        sd = torch.diag(C).sqrt()
        assert ((mean[i].reshape(-1) - m).abs() <= 5 * sd / math.sqrt(S)).all()
        assert ((std[i].reshape(-1) - sd).abs() <= 5 * sd / math.sqrt(2 * (S - 1))).all()
    gens = [torch.Generator().manual_seed(i) for i in (0, 1)]
    _, _, first, _ = latino_posterior(prior, op, y, num_samples=3, batch_size=1, generator=gens, **run)
    torch.testing.assert_close(first, samples[:, 0], rtol=0, atol=1e-12)


def test_fill_holes():
    """Separable box average == 2-D average over the in-image window; holes of a constant image fill exactly,
    observed pixels never move."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 24, generator=g, dtype=torch.float64)
    ref = F.avg_pool2d(x, 19, stride=1, padding=9, count_include_pad=False)
    torch.testing.assert_close(box_average(x, 19), ref)
    mask = (torch.rand(2, 1, 20, 24, generator=g) < 0.3).double()
    filled = fill_holes(0.7 * mask.expand(2, 3, 20, 24), mask, iters=300)
    torch.testing.assert_close(filled, torch.full_like(filled, 0.7), atol=1e-6, rtol=0)
    out = fill_holes(x, mask, iters=5)
    assert torch.equal(out * mask, x * mask)


# ---------------------------------------------------------------------------------------------------- tiny latent
@pytest.fixture(scope="module")
def lcm_prior():
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import tiny_pipeline

    prior = LatentConsistencyPrior.from_pipeline(tiny_pipeline("lcm"), boundary="lcm")
    return prior, prior.encode_prompt("")


@pytest.fixture(scope="module")
def sdxl_prior():
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import tiny_pipeline

    prior = LatentConsistencyPrior.from_pipeline(tiny_pipeline("sdxl"), boundary="none")
    return prior, prior.encode_prompt("a photo of a face", image_size=(32, 32))


def _latent_ops() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "blur": GaussianBlur(1.0, 5),
        "sr_x2": SuperResolution(2, padding="circular"),
        "inpainting": Inpainting((torch.rand(32, 32, generator=g) < 0.6).float()),
        "denoising": Denoising(),
        "jpeg": JPEG(50),
        "compose": Compose(SuperResolution(2, padding="circular"), GaussianBlur(1.0, 5)),
    }


LATENT_OPS = _latent_ops()


def _latent_problem(op, B=2):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(B, 3, 32, 32, generator=g) * 2 - 1) * 0.8
    return x, measure(op, x, SIGMA_Y, g)


@pytest.mark.parametrize("name", list(LATENT_OPS))
def test_latino_tiny_latent_nfe_and_data_consistency(lcm_prior, name):
    """Every operator family: shape, exactly N network calls, and the prox optimality condition
    gamma A^T (A x - y) + (x - u) = 0 against the last prior output u (linear operators)."""
    prior, cond = lcm_prior
    op = LATENT_OPS[name]
    x_true, y = _latent_problem(op)
    last = {}
    prior.reset_nfe()
    x, info = latino(
        prior,
        op,
        y,
        timesteps=LCM_8,
        cond=cond,
        weights=DiscrepancyWeights(),
        sigma_y=SIGMA_Y,
        generator=torch.Generator().manual_seed(0),
        callback=last.update,
        return_info=True,
        x_vae=True,
    )
    assert prior.nfe == len(LCM_8) == info["nfe"]
    assert x.shape == x_true.shape and info["x_vae"].shape == x.shape and info["gammas"].shape == (len(LCM_8), 2)
    assert torch.isfinite(x).all() and last["k"] == len(LCM_8) and torch.equal(last["x"], x)
    if isinstance(op, LinearOperator):
        u, gamma = last["x_prior"], last["gamma"]
        residual = gamma[:, None, None, None] * op.A_adjoint(op.A(x) - y) + (x - u)
        rtol = 1e-3 if name == "compose" else 1e-4  # CG prox (rtol 1e-5) vs closed forms
        assert residual.flatten(1).norm(dim=1).max() <= rtol * (x - u).flatten(1).norm(dim=1).max() + 1e-5


@pytest.mark.parametrize("name", ["inpainting", "sr_x2", "denoising"])
def test_latino_projection_is_exactly_data_consistent(lcm_prior, name):
    """gamma = inf: the output lies on {A x = y}."""
    prior, cond = lcm_prior
    op = LATENT_OPS[name]
    _, y = _latent_problem(op)
    x = latino(prior, op, y, timesteps=DMD2_4, cond=cond, weights=ConstantGamma(math.inf), sigma_y=SIGMA_Y)
    torch.testing.assert_close(op.A(x), y, atol=1e-5, rtol=1e-5)


def test_latino_hole_filling_init(lcm_prior):
    prior, cond = lcm_prior
    op = LATENT_OPS["inpainting"]
    _, y = _latent_problem(op)
    rule = preset_rules(load_preset("latino/inpaint_band").meta, "latino")["weights"]
    x = latino(prior, op, y, timesteps=DMD2_4, cond=cond, weights=rule, sigma_y=SIGMA_Y, fill_holes_iters=20)
    assert x.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="image-shaped observed mask"):
        latino(prior, Denoising(), y, cond=cond, weights=ConstantGamma(1.0), sigma_y=SIGMA_Y, fill_holes_iters=2)


def _pro(prior, cond, op, y, **kw):
    backward = [0]
    hook = prior.net.register_full_backward_pre_hook(lambda m, g: backward.__setitem__(0, backward[0] + 1))
    prior.reset_nfe()
    run = dict(num_outer=2, weights_inner=ConstantGamma(20.0), weights_final=ConstantGamma(20.0), sigma_y=SIGMA_Y)
    try:
        generator = torch.Generator().manual_seed(0)
        out = latino_pro(prior, op, y, cond=cond, generator=generator, return_info=True, **{**run, **kw})
    finally:
        hook.remove()
    return (*out, prior.nfe, backward[0])


def test_latino_pro_counts_frozen_rows_and_balls(sdxl_prior):
    """num_outer = 2: 2·4 + 8 forwards and 2·3 backwards; rows 0..3 never move; all rows stay in the balls."""
    prior, cond = sdxl_prior
    op = LATENT_OPS["blur"]
    _, y = _latent_problem(op)
    x, c, info, nfe, backward = _pro(prior, cond, op, y, radius=0.3)
    assert nfe == info["nfe"] == 2 * 4 + 8 and backward == info["backward"] == 2 * 3
    assert x.shape == (2, 3, 32, 32) and c.prompt_embeds.shape == (2, 16, 80)
    c0 = cond.prompt_embeds.expand(2, -1, -1)
    offset = (c.prompt_embeds - c0).norm(dim=-1)  # (B, L)
    assert torch.equal(c.prompt_embeds[:, :4], c0[:, :4])
    assert (offset[:, 4:] > 0).all() and (offset <= 0.3 + 1e-5).all()
    assert torch.equal(c.pooled, cond.pooled.expand(2, -1)) and torch.equal(c.time_ids, cond.time_ids.expand(2, -1))
    assert info["step_sizes"] == [sapg_step_size(0), sapg_step_size(1)]


def test_latino_pro_options_and_grad_modes(sdxl_prior, tmp_path):
    """direction="fresh" equals "cumulative" for one outer iteration and differs after two; Adam runs; works
    under no_grad, refuses inference_mode; the condition round-trips through safetensors."""
    prior, cond = sdxl_prior
    op = LATENT_OPS["sr_x2"]
    _, y = _latent_problem(op, B=1)
    one_cum, one_fresh = (_pro(prior, cond, op, y, num_outer=1, direction=d)[1] for d in ("cumulative", "fresh"))
    torch.testing.assert_close(one_cum.prompt_embeds, one_fresh.prompt_embeds, rtol=0, atol=0)
    with torch.no_grad():
        _, c_fresh, *_ = _pro(prior, cond, op, y, direction="fresh")
    _, c_cum, *_ = _pro(prior, cond, op, y)
    assert not torch.allclose(c_fresh.prompt_embeds, c_cum.prompt_embeds)
    _, c_adam, _, nfe, backward = _pro(prior, cond, op, y, optimizer="adam")
    assert nfe == 16 and backward == 6 and torch.equal(c_adam.prompt_embeds[:, :4], cond.prompt_embeds[:, :4])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        _pro(prior, cond, op, y)
    loaded = load_condition(save_condition(c_adam, tmp_path / "c.safetensors"))
    for f in dataclasses.fields(c_adam):
        a, b = getattr(c_adam, f.name), getattr(loaded, f.name)
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="direction"):
        _pro(prior, cond, op, y, direction="sideways")


def test_prompt_gradient_matches_finite_differences(sdxl_prior):
    """g_0 of the chain equals central differences of l_0(c) = -||z_1 - a_1 x0_hat(z_0, t_0; c)||^2 / (2 b_1^2),
    both on a coordinate of an unfrozen row and along a random direction (tiny SDXL UNet in float64)."""
    prior, cond = sdxl_prior
    prior = prior.to(torch.float64)
    try:
        op = LATENT_OPS["blur"]
        _, y = _latent_problem(op, B=1)
        rec = []
        x0 = torch.zeros(1, 3, 32, 32)
        run = dict(weights=ConstantGamma(20.0), sigma_y=SIGMA_Y, generator=torch.Generator().manual_seed(0))
        _, grads = latino_pro_chain(prior, op, y, x0, DMD2_4, cond=cond, callback=rec.append, **run)
        assert len(grads) == 3 and grads[0].shape == cond.prompt_embeds.shape
        z0, z1 = rec[0]["z"].double(), rec[1]["z"].double()

        def ell(c):
            z0_hat = prior.predict_x0(z0, float(DMD2_4[0]), dataclasses.replace(cond, prompt_embeds=c))
            return transition_log_density(prior, z1, z0_hat, float(DMD2_4[1])).sum()

        c, eps = cond.prompt_embeds.double(), 1e-5
        v = torch.randn(c.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        e = torch.zeros_like(c)
        e[0, 6, 5] = 1.0
        for direction in (e, v):
            fd = (ell(c + eps * direction) - ell(c - eps * direction)) / (2 * eps)
            ad = (grads[0].double() * direction).sum()
            assert abs(fd - ad) <= 1e-3 * abs(ad) + 1e-6, f"finite differences {fd:.6g} vs autograd {ad:.6g}"
    finally:
        prior.to(torch.float32)


def test_prompt_update_pieces():
    """Per-token normalisation gives unit rows; the projection keeps inner points and shrinks outer ones to the
    sphere; the step schedule is 0.08 until j = 10, then x0.9 per iteration, floored at 0.08e-3."""
    g = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(normalise_tokens(g).norm(dim=-1), torch.ones(2, 5))
    c0 = torch.zeros(2, 5, 7)
    p = project_to_balls(g, c0, 1.5)
    norms, new = g.norm(dim=-1), p.norm(dim=-1)
    torch.testing.assert_close(new, norms.clamp(max=1.5))
    torch.testing.assert_close(p / new[..., None], g / norms[..., None])
    assert [sapg_step_size(j) for j in (0, 10)] == [0.08, 0.08]
    assert sapg_step_size(11) == pytest.approx(0.072) and sapg_step_size(500) == pytest.approx(0.08e-3)


# ---------------------------------------------------------------------------------------------------- weight rules
def _blur_problem(u_kind: str, sigma_y: float = SIGMA_Y):
    op = GaussianBlur(1.5, 7)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = measure(op, x, sigma_y, g)
    u = torch.zeros_like(x) if u_kind == "zeros" else x
    return op, x, y, u


@pytest.mark.parametrize("per_sigma", [False, True])
def test_table_weights_formula(per_sigma):
    """gamma = c(t) (1 - alphabar_t) ||A u - y|| sqrt(m_ref/m) [/ sigma_n] / sigma_n^2, per sample."""
    prior = _gaussian_prior(uniform_s=True)  # linear VP schedule
    op, _, y, u = _blur_problem("zeros")
    t = torch.tensor([999.0, 400.0, 100.0])
    sigma_n = torch.tensor([0.1, 0.02, 0.05])
    rule = TableWeights(3e-3, 1e-3, 400, adaptive=True, per_sigma=per_sigma, m_ref=4096)
    gamma = rule(1, t, u, y, op, sigma_n, prior)
    nu = 1 - prior.schedule.alphas_cumprod[t.long()]
    R = (op.A(u) - y).flatten(1).double().norm(dim=1)
    c = torch.tensor([3e-3, 1e-3, 1e-3], dtype=torch.float64)
    delta = c * nu * R * math.sqrt(4096 / (3 * 32 * 32)) / (sigma_n.double() if per_sigma else 1)
    torch.testing.assert_close(gamma.double(), delta / sigma_n.double() ** 2, rtol=1e-5, atol=0)
    fixed = TableWeights(2.0, 2.0, None, adaptive=False)(1, t, u, y, op, sigma_n, prior)
    torch.testing.assert_close(fixed.double(), 2.0 * nu / sigma_n.double() ** 2, rtol=1e-5, atol=0)
    assert torch.isinf(fixed_at_zero := TableWeights(1.0, 1.0)(1, t, u, y, op, torch.zeros(3), prior)).all()
    assert fixed_at_zero.shape == (3,)


def test_discrepancy_weights_reach_target_and_bounds():
    prior = _gaussian_prior(uniform_s=True)
    t = torch.full((3,), 500.0)
    op, _, y, u = _blur_problem("zeros")
    sigma_n = torch.full((3,), SIGMA_N)
    gamma = DiscrepancyWeights()(1, t, u, y, op, sigma_n, prior)
    r = (op.A(op.prox_l2(u, y, gamma)) - y).flatten(1).double().square().sum(1)
    target = 3 * 32 * 32 * SIGMA_N**2
    assert ((r - target).abs() / target <= 1e-3).all(), f"relative misfit {((r - target).abs() / target).tolist()}"
    # unreachable from above: even gamma_max leaves a larger residual -> the upper bound
    capped = DiscrepancyWeights(bounds=(1e-6, 1e-3))(1, t, u, y, op, sigma_n, prior)
    torch.testing.assert_close(capped, torch.full_like(capped, 1e-3))
    # unreachable from below: u = x fits the noiseless data better than the noise level -> the lower bound
    op, _, y, u = _blur_problem("truth", sigma_y=0.0)
    low = DiscrepancyWeights()(1, t, u, y, op, sigma_n, prior)
    torch.testing.assert_close(low, torch.full_like(low, 1e-6))


def test_discrepancy_fallback_for_cg_and_nonlinear_operators():
    """CG-only (Compose of a pair with no closed form) and nonlinear operators use c = 1, non-adaptive."""
    prior = _gaussian_prior(uniform_s=True)
    t, sigma_n = torch.tensor([700.0, 200.0]), torch.full((2,), 0.1)
    nu = 1 - prior.schedule.alphas_cumprod[t.long()]
    assert has_closed_form_prox(GaussianBlur(1.0)) and not has_closed_form_prox(LATENT_OPS["compose"])
    assert not has_closed_form_prox(SuperResolution(2, padding="reflect")) and not has_closed_form_prox(JPEG(50))
    for name in ("compose", "jpeg"):
        op = LATENT_OPS[name]
        x, y = _latent_problem(op)
        gamma = DiscrepancyWeights()(1, t, x, y, op, sigma_n, prior)
        torch.testing.assert_close(gamma.double(), nu / 0.01, rtol=1e-5, atol=0)


def test_presets_carry_their_tuned_rules_as_rule_objects():
    """The weight rules tuned for the LATINO presets live in the preset files (``solver:`` blocks) and build to
    :class:`WeightRule` objects with the reference table's constants; LATINO-PRO's rules exist only where LATINO's
    do; a preset without a block gives no rule (the methods then use the discrepancy rule)."""
    for name in list_presets():
        meta = load_preset(name).meta
        latino_rules, pro_rules = preset_rules(meta, "latino"), preset_rules(meta, "latino_pro")
        assert all(isinstance(r, WeightRule) for r in (*latino_rules.values(), *pro_rules.values())), name
        assert set(latino_rules) <= {"weights"} and set(pro_rules) <= {"weights_inner", "weights_final"}, name
        assert not pro_rules or latino_rules, name
        assert bool(latino_rules) == name.startswith("latino/"), name
    sr16 = preset_rules(load_preset("latino/sr_x16").meta, "latino")["weights"]
    assert (sr16.c_hi, sr16.c_lo, sr16.t_switch, sr16.adaptive, sr16.m_ref) == (0.3, 0.2, 300, True, 3 * 64 * 64)
    with pytest.raises(ValueError, match=r"solver\.latino: not a valid set of weight rules"):
        preset_rules({"solver": {"latino": {"weights": {"class_path": "torch.nn.Linear"}}}}, "latino")


def test_prompt_ascent_adam_first_step_is_lr_times_the_sign():
    """optimizer="adam" (torch.optim.Adam on -sum_i l_i): Adam's first step is lr·sign(-G) on every free row (m̂/√v̂
    = G/|G|), frozen rows stay at c0, and the ball projection keeps every token within the radius."""
    from ud2m.solvers.latino_algorithms import PromptAscent

    g = torch.Generator().manual_seed(0)
    c0 = torch.randn(2, 6, 4, generator=g)
    grads = [torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)]
    ascent = PromptAscent(c0, optimizer="adam", adam_lr=0.02, frozen_tokens=2, radius=1e3)
    c1 = ascent.update(0, grads)
    G = -(grads[0] + grads[1])
    torch.testing.assert_close(c1[:, 2:], c0[:, 2:] - 0.02 * G[:, 2:].sign(), rtol=0, atol=1e-6)
    assert torch.equal(c1[:, :2], c0[:, :2])
    tight = PromptAscent(c0, optimizer="adam", adam_lr=5.0, frozen_tokens=0, radius=0.5)
    c = tight.update(0, grads)
    assert (c - c0).norm(dim=-1).max() <= 0.5 + 1e-5
    assert not torch.equal(tight.update(1, grads), c)  # moments carry over: the next step moves again
