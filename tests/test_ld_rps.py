"""LD-RPS (docs/method.md §13): the eight identities of §13.7 on tiny random models, offline, ``feature_net=None``.

1. unguided pass 0 (and the re-noised pass 1) equals a diffusers ``DDIMScheduler`` loop; ``clip_quantile`` clamps
   at max(1, q); 2. guidance is exactly zero for free chains and above t1, decoder VJPs = S_g; 3. no leakage across
   calls or across the images of a batch; 4. parameter counts and the 9×9 receptive field; 5. grids; 6. quality terms
   on constant images; 7. closed-form guidance for ψ = identity; 8. VJP vs central differences, no cross-sample
   gradient, a monotone prox. Plus: batched Adam = torch.optim.Adam per sample, the cost counters, CFG, task and
   feature-network errors, and ``freeze``.
"""

import inspect
import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler

from ud2m.operators import Denoising, NonlinearOperator
from ud2m.operators.learned import AdamState, LearnedDegradation, adam_step, physical_psi
from ud2m.operators.simulate import Grayscale, PixelScale
from ud2m.priors.tiny import tiny_pixel_prior
from ud2m.solvers.ld_rps import (
    REFERENCE_TASK_DEFAULTS,
    CFGCondition,
    colour_loss,
    exposure_loss,
    ld_rps,
    learned_degradation,
    num_steps_total,
    opponent_metric,
    predict_x0_cfg,
    preset_for,
    resolve_threshold,
    restart_index,
    start_index,
    task_defaults,
    threshold_x0,
    timestep_grid,
)
from ud2m.utils import randn

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def prior():
    return tiny_pixel_prior(sample_size=16)


def small_op(**kw):
    """A narrow ψ and discriminators (the architecture is width-generic; test 4 checks w = 64)."""
    return LearnedDegradation(**{"width": 8, "disc_width": 8, **kw})


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def measurement(seed, B=1, size=16):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


# ---------------------------------------------------------------------------------------------------- 1. DDIM
def ddim_scheduler(prior, threshold):
    """diffusers DDIM with the SD settings of §13.7 (leading, steps_offset = 1, set_alpha_to_one = False, η = 0)."""
    config = {**prior.scheduler_config, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}
    config.update(timestep_spacing="leading", thresholding=threshold is not None)
    config.update(dynamic_thresholding_ratio=0.995, sample_max_value=100.0)
    sched = DDIMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    sched.set_timesteps(10)
    assert [int(t) for t in sched.timesteps] == timestep_grid(10)
    return sched


def ddim(prior, sched, z, timesteps):
    for t in timesteps:
        z = sched.step(prior.net(z, torch.full((len(z),), t)).sample, t, z, eta=0.0).prev_sample
    return z


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("threshold", [None, ("dynamic", 0.995, 1.0, 100.0)])
def test_unguided_passes_equal_diffusers_ddim(prior, threshold):
    y, op, seen = measurement(0, B=2), small_op(), {}
    xs, _ = ld_rps(
        prior,
        op,
        y,
        num_recurrences=1,
        guidance_scale=0.0,
        num_steps=10,
        t1=400,
        free_chains=0,
        adapt=False,
        threshold=threshold,
        generator=gens(1, 2),
        on_step=lambda d: seen.setdefault((d["r"], d["i"]), d["z"]),
    )
    g = gens(1, 2)  # per image: state, then z, then ε_1 (§13.3)
    op.init_state(y, generator=g)
    z, eps = randn((2, 3, 16, 16), g), randn((2, 3, 16, 16), g)
    assert torch.equal(seen[(0, 0)], z)
    grid, k, sched = timestep_grid(10), restart_index(10, 0.5), ddim_scheduler(prior, threshold)
    # step by step (free of the amplification of round-off by the dynamic threshold's division) ...
    for r, indices in ((0, range(10)), (1, range(k, 10))):
        for i in indices:
            expected = ddim(prior, sched, seen[(r, i)], [grid[i]])
            actual = seen[(r, i + 1)] if i + 1 < 10 else xs[r]
            assert relative_error(actual, expected if i + 1 < 10 else expected.clamp(-1, 1)) <= 1e-6
    # ... and whole passes: pass 1 = add_noise(pass 0's latent, ε_1, τ_k) + the loop from τ_k
    z0 = ddim(prior, sched, z, grid)
    z1 = sched.add_noise(ddim(prior, sched, seen[(0, 9)], grid[9:]), eps, torch.tensor([grid[k]]))
    assert relative_error(seen[(1, k)], z1) <= 1e-6
    tol = 1e-5 if threshold is None else 1e-4  # the dynamic rule divides by s_q at every step: round-off grows
    assert relative_error(xs[0], z0.clamp(-1, 1)) <= tol
    assert relative_error(xs[1], ddim(prior, sched, z1, grid[k:]).clamp(-1, 1)) <= tol


def test_clip_quantile_clamps_without_rescaling():
    M = 201
    base = torch.arange(M, dtype=torch.float32) / (M - 1)  # |x| quantile 0.995 = 199/200 (linear interpolation)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.arange(M) % 2 == 0, 1.0, -1.0)
    x = torch.stack([3.0 * base[perm] * signs, 0.5 * base[perm] * signs]).view(2, 1, 1, M)
    s = torch.tensor([max(1.0, 3.0 * 199 / 200), max(1.0, 0.5 * 199 / 200)]).view(2, 1, 1, 1)
    torch.testing.assert_close(threshold_x0(x, ("clip_quantile", 0.995, 1.0, 100.0)), x.clamp(-s, s))
    torch.testing.assert_close(threshold_x0(x, ("dynamic", 0.995, 1.0, 100.0)), x.clamp(-s, s) / s)
    assert threshold_x0(x, None) is x


def test_threshold_auto_clamps_pixel_priors_to_their_data_range(prior):
    """``"auto"`` [ours]: a pixel prior's ẑ0 is clamped to [-1, 1] (its data range), a latent prior and the analytic
    Gaussian keep the reference's quantile rule; the default of ``ld_rps`` is ``"auto"``; bad names are refused."""
    from ud2m.priors.gaussian import GaussianPrior
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import tiny_pipeline
    from ud2m.solvers.ld_rps import DEFAULT_THRESHOLD

    rule = resolve_threshold("auto", prior)
    x = torch.linspace(-60, 60, 101).view(1, 1, 1, 101)
    torch.testing.assert_close(threshold_x0(x, rule), x.clamp(-1, 1))
    assert resolve_threshold("data", prior) == rule and resolve_threshold("reference", prior) == DEFAULT_THRESHOLD
    latent = LatentConsistencyPrior.from_pipeline(tiny_pipeline("lcm"))
    assert resolve_threshold("auto", latent) == DEFAULT_THRESHOLD
    assert resolve_threshold("auto", GaussianPrior(torch.zeros(1, 2, 2), 1.0)) == DEFAULT_THRESHOLD
    assert resolve_threshold(None, prior) is None
    with pytest.raises(ValueError, match="threshold"):
        resolve_threshold("clip", prior)
    assert inspect.signature(ld_rps).parameters["threshold"].default == "auto"


# ---------------------------------------------------------------------------------------------------- 2. zero guidance
def record_steps(store):
    return lambda d: store.append({k: d[k] for k in ("r", "i", "t", "g", "z", "guided")})


def test_zero_guidance_where_reference_has_none(prior):
    y, steps, unguided, vjps = measurement(1), [], [], []
    decode = prior.decode
    prior.decode = lambda z0: vjps.append(z0.requires_grad) or decode(z0)  # count decoder calls with a graph
    try:
        kw = dict(num_recurrences=1, num_steps=20, t1=500, free_chains=2)
        _, info = ld_rps(
            prior, small_op(lambda_a=1e-2), y, guidance_scale=1e3, generator=gens(3), on_step=record_steps(steps), **kw
        )
    finally:
        del prior.decode
    ld_rps(prior, small_op(), y, guidance_scale=0.0, generator=gens(3), on_step=record_steps(unguided), **kw)
    grid = timestep_grid(20)
    s_g = sum(t < 500 for t in grid) + sum(t < 500 for t in grid[restart_index(20, 0.5) :])
    assert info["guided_steps"] == info["decoder_vjps"] == sum(vjps) == s_g
    g_plus_nonzero = 0
    for step, free in zip(steps, unguided, strict=True):
        g = step["g"].view(1, 3, 3, 16, 16)
        assert torch.equal(g[:, 1:], torch.zeros_like(g[:, 1:]))  # free chains: bitwise 0
        if step["t"] >= 500:
            assert not step["guided"] and torch.equal(g, torch.zeros_like(g))
        g_plus_nonzero += bool(g[:, 0].abs().max() > 0)
        # the free chains' trajectories do not see the guidance at all
        assert torch.equal(step["z"].view(1, 3, 3, 16, 16)[:, 1:], free["z"].view(1, 3, 3, 16, 16)[:, 1:])
    assert g_plus_nonzero == s_g


# ---------------------------------------------------------------------------------------------------- 3. no leakage
def run_small(prior, y, seeds):
    states = []
    xs, _ = ld_rps(
        prior,
        small_op(lambda_a=1e-2),
        y,
        num_recurrences=1,
        guidance_scale=50.0,
        num_steps=8,
        t1=600,
        generator=gens(*seeds),
        on_pass=lambda r, x, s: states.append(s),
    )
    return xs[-1], states[-1]


def test_no_leakage_between_calls_or_batch_entries():
    # float64 (network included): the UNet's float32 round-off depends on the batch size, and ẑ0 = (z − bε)/a
    # amplifies it by 1/a at early steps; in float64 the batch-[A, B] vs single-run gap is round-off only
    prior = tiny_pixel_prior(sample_size=16).to(torch.float64)
    yA, yB = measurement(2).double(), measurement(3).double()
    torch.use_deterministic_algorithms(True)
    try:
        xB_alone, sB = run_small(prior, yB, [11])
        run_small(prior, yA, [10])
        xB_again, sB_again = run_small(prior, yB, [11])
        xA_alone, sA = run_small(prior, yA, [10])
        x_batch, s_batch = run_small(prior, torch.cat([yA, yB]), [10, 11])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(xB_alone, xB_again)  # B after A = B alone, bitwise: nothing persists between calls
    assert all(torch.equal(sB.psi.params[k], sB_again.psi.params[k]) for k in sB.psi.params)
    assert relative_error(x_batch, torch.cat([xA_alone, xB_alone])) <= 1e-5
    for part, ref_a, ref_b in ((s_batch.psi, sA.psi, sB.psi), (s_batch.d2, sA.d2, sB.d2)):
        for k in part.params:
            assert relative_error(part.params[k], torch.cat([ref_a.params[k], ref_b.params[k]])) <= 1e-5
    assert int(s_batch.d2.step[0]) > 0


# ---------------------------------------------------------------------------------------------------- 4. architecture
def test_architecture_counts_init_and_receptive_field():
    op = LearnedDegradation()  # w = 64
    y = torch.zeros(1, 3, 21, 21, dtype=torch.float64)
    state = op.init_state(y, generator=gens(0))
    assert (state.psi.numel("h1"), state.psi.numel("h2"), state.psi.numel("p")) == (1987, 371587, 3)
    assert state.psi.numel() == 373577
    assert state.d1.numel() == state.d2.numel() == 371073
    assert torch.equal(state.psi.params["p"], torch.ones(1, 3, dtype=torch.float64))
    u = torch.rand(1, 3, 21, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bump = torch.zeros_like(u)
    bump[..., 10, 10] = 1e-3
    changed = (op.psi(u + bump, state) - op.psi(u, state)).abs().sum(1)[0] > 0  # (21, 21)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 14, 6, 14)  # 9×9 centred on (10, 10)
    assert bool(changed[6:15, 6:15].all())


# ---------------------------------------------------------------------------------------------------- 5. grids
def test_grids(prior):
    grid = timestep_grid(450)
    assert grid == list(range(899, 0, -2))
    k = restart_index(450, 0.5)
    assert k + 1 == 226 and grid[k] == 449 and len(grid[k:]) == 225
    assert [num_steps_total(450, 0.5, R) for R in range(4)] == [450 + 225 * R for R in range(4)]
    assert sum(t >= 700 for t in grid) == 100
    a0, _ = prior.scales(0.0)  # the last step's level τ_{N+1}: ᾱ_0 = 1 − β_0 (linear β: β_0 = 1e-4)
    torch.testing.assert_close(a0.double() ** 2, torch.tensor(1 - 1e-4, dtype=torch.float64))
    assert timestep_grid(10, "trailing")[0] == 999
    with pytest.raises(ValueError, match="spacing"):
        timestep_grid(10, "linspace")


def test_last_step_reaches_level_zero_and_step_counts(prior):
    steps = []
    _, info = ld_rps(
        prior,
        small_op(),
        measurement(4),
        num_recurrences=2,
        guidance_scale=1.0,
        num_steps=6,
        generator=gens(0),
        on_step=lambda d: steps.append((d["r"], d["t"], d["t_next"])),
    )
    assert [t_next for r, t, t_next in steps if t == 1] == [0, 0, 0]
    assert info["steps"] == len(steps) == num_steps_total(6, 0.5, 2) == 6 + 2 * 3


# ---------------------------------------------------------------------------------------------------- 6. quality terms
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_quality_terms_on_constant_images(c):
    x = torch.full((2, 3, 16, 16), c, requires_grad=True)
    for P in (1, 2, 4, 8, 16):
        torch.testing.assert_close(exposure_loss(x, P), torch.full((2,), (c - 0.5) ** 2))
    q = colour_loss(x)
    assert torch.equal(q, torch.zeros(2))
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert torch.isfinite(grad).all() and torch.equal(grad, torch.zeros_like(grad))


def test_colour_loss_of_channel_constants():
    r, g, b = 0.8, 0.3, 0.1
    x = torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    expected = math.sqrt((r - g) ** 4 + (r - b) ** 4 + (g - b) ** 4)
    torch.testing.assert_close(colour_loss(x), torch.tensor([expected]))


# ---------------------------------------------------------------------------------------------------- 7. guidance
def identity_run(prior, y, **kw):
    """ψ = identity exactly: a known identity base with a zero-initialised residual, never adapted."""
    steps = []
    xs, _ = ld_rps(
        prior,
        small_op(base=Denoising()),
        y,
        num_recurrences=0,
        num_steps=6,
        t1=600,
        free_chains=1,
        adapt=False,
        generator=gens(5),
        on_step=record_zhat(steps),
        **kw,
    )
    return xs[0], steps


def record_zhat(store):
    return lambda d: store.append((d["guided"], d["zhat0"].view(1, 2, 3, 16, 16)[:, 0], d["g"].view(1, 2, 3, 16, 16)))


def test_closed_form_guidance_for_identity_psi(prior):
    y, N_y, s = measurement(6), 3 * 16 * 16, 50.0
    x_mean, steps_mean = identity_run(prior, y, guidance_scale=s, guidance_norm="mean")
    x_sum, steps_sum = identity_run(prior, y, guidance_scale=s / N_y, guidance_norm="sum")
    assert sum(guided for guided, _, _ in steps_mean) == sum(t < 600 for t in timestep_grid(6)) > 0
    for (guided, zhat, g), (_, zhat_s, g_s) in zip(steps_mean, steps_sum, strict=True):
        if guided:
            torch.testing.assert_close(g[:, 0], -s * (zhat - y) / (2 * N_y), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g_s[:, 0], -(s / N_y) * (zhat_s - y) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x_sum, x_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- 8. calculus
def test_vjp_matches_central_differences_float64():
    op = small_op()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=g) * 2 - 1
    v, delta = (torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g) for _ in range(2))
    state = op.init_state(x, generator=gens(0, 1))
    h = 1e-6
    fd = ((op.A(x + h * delta, state) - op.A(x - h * delta, state)) / (2 * h) * v).sum()
    vjp = (op.A_vjp(x, v, state) * delta).sum()
    assert abs(float(vjp - fd)) <= 1e-6 * abs(float(fd))


def test_fidelity_has_no_cross_sample_gradient():
    op = small_op(lambda_a=0.5, lambda_p=0.3, feature_net=torch.tanh)
    y = measurement(8, B=2)
    state = op.init_state(y, generator=gens(0, 1))
    state, _ = op.adapt(torch.rand(2, 2, 3, 16, 16), y, state, guided=True)  # D2 and ψ moved once
    x_hat = torch.rand(2, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(op.fidelity(x_hat, y, state)[0], x_hat)
    assert grad[0].abs().max() > 0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_prox_is_monotone_and_exact_for_identity():
    op = small_op()
    y, z = measurement(9, B=2), measurement(10, B=2)
    state = op.init_state(y, generator=gens(0, 1))
    gamma = torch.tensor([0.5, 4.0])
    values = [op.prox_objective(op.prox_l2(z, y, gamma, state, n_iter=n), z, y, gamma, state) for n in range(6)]
    for before, after in itertools.pairwise(values):
        assert bool((after <= before).all())
    assert bool((values[-1] < values[0]).all())
    ident = small_op(base=Denoising())
    s_id = ident.init_state(y, generator=gens(0, 1))
    one = ident.prox_l2(z, y, gamma, s_id, n_iter=1)
    g = gamma.view(2, 1, 1, 1)
    torch.testing.assert_close(one, (z + g * y) / (1 + g), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- extras
def test_batched_adam_equals_torch_adam_per_sample():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, 5, generator=gen)
    grads = [torch.randn(3, 4, 5, generator=gen) for _ in range(3)]
    state = AdamState.fresh({"w": p0.clone()})
    for gr in grads:
        state = adam_step(state, {"w": gr}, lr=1e-2, weight_decay=1e-2)
    for b in range(3):
        w = torch.nn.Parameter(p0[b].clone())
        opt = torch.optim.Adam([w], lr=1e-2, weight_decay=1e-2)
        for gr in grads:
            w.grad = gr[b].clone()
            opt.step()
        torch.testing.assert_close(state.params["w"][b], w.detach(), rtol=1e-6, atol=1e-7)
    assert state.step.tolist() == [3, 3, 3]


def test_counters_equal_info_and_cost_formulas(prior):
    decodes = []
    decode = prior.decode
    prior.decode = lambda z0: decodes.append(z0.requires_grad) or decode(z0)
    nfe0, states = prior.nfe, []
    try:
        _, info = ld_rps(
            prior,
            small_op(lambda_a=1e-2),
            measurement(12),
            num_recurrences=2,
            guidance_scale=10.0,
            num_steps=10,
            t1=600,
            generator=gens(0),
            on_pass=lambda r, x, s: states.append(s),
        )
    finally:
        del prior.decode
    grid, k = timestep_grid(10), restart_index(10, 0.5)
    s_tot, s_g = 10 + 2 * (10 - k), sum(t < 600 for t in grid) + 2 * sum(t < 600 for t in grid[k:])
    assert info["steps"] == info["decoder_forwards"] == s_tot
    assert info["nfe"] == prior.nfe - nfe0 == s_tot  # one batched call per step
    assert info["nfe_paper"] == s_tot * 2  # F = 1, no CFG
    assert info["decoder_vjps"] == sum(decodes) == s_g
    assert info["output_decodes"] == 3 and len(decodes) - sum(decodes) == s_tot + 3
    state = states[-1]
    assert info["psi_steps"] == info["d1_steps"] == int(state.psi.step) == int(state.d1.step) == s_tot
    assert info["d2_steps"] == int(state.d2.step) == s_g


def test_latent_prior_with_cfg(tmp_path):
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    prior = LatentConsistencyPrior.from_pretrained(write_tiny_pipeline(tmp_path / "lcm", "lcm"))
    cond = CFGCondition(prior.encode_prompt("a photo"), prior.encode_prompt(""), 8.0)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    x0_c, x0_u = prior.predict_x0(z, t, cond.cond), prior.predict_x0(z, t, cond.uncond)
    torch.testing.assert_close(predict_x0_cfg(prior, z, t, cond), x0_u + 8.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-5)
    y = measurement(13, size=16)
    nfe0 = prior.nfe
    xs, info = ld_rps(prior, small_op(), y, cond=cond, num_recurrences=1, guidance_scale=10.0, num_steps=4)
    s_tot = num_steps_total(4, 0.5, 1)
    assert xs[-1].shape == y.shape and torch.isfinite(xs[-1]).all()
    assert info["nfe"] == prior.nfe - nfe0 == s_tot and info["nfe_paper"] == s_tot * 2 * 2
    assert info["decoder_vjps"] == info["guided_steps"] > 0


def test_task_defaults_and_errors(tmp_path):
    assert task_defaults("low-light").num_recurrences == 2 and task_defaults("haze").num_recurrences == 3
    kw = task_defaults("haze").solver_kwargs(guidance_norm="sum", image_size=64, psi="fpam")
    assert kw["guidance_scale"] == pytest.approx(2.5e4 / (3 * 512**2))
    x = torch.full((1, 3, 64, 64), 0.3)  # P = 64 at 512² -> 8 at 64²: constant image gives (c − 0.5)²
    assert float(kw["regularisers"][0][0](x)) == pytest.approx(0.04)
    assert learned_degradation("noise", psi="fpam").w_mse == 3.0
    assert learned_degradation("haze").arch == "scattering" and learned_degradation("colour").arch == "luma"
    assert learned_degradation("haze", base=Denoising()).w_adv == 0.0  # anchored at A₀ (§13.9)
    x[..., :32, :] = 0.7  # physical low-light preset: one global patch, so only the image mean counts
    (Q, _, t_j), *_ = task_defaults("low-light").solver_kwargs(image_size=64)["regularisers"]
    assert float(Q(x)) == pytest.approx(0.0, abs=1e-8) and t_j == 999.0  # fp32 mean of 0.3, 0.7
    with pytest.raises(ValueError, match="physical"):
        task_defaults("haze").degradation_kwargs("cnn")
    with pytest.raises(ValueError, match="low-light, haze, noise, colour"):
        task_defaults("deblur")
    missing = tmp_path / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LearnedDegradation(feature_net=missing)


def test_freeze_gives_an_operator_with_the_same_map():
    op = small_op()
    y = measurement(14, B=2)
    state = op.init_state(y, generator=gens(0, 1))
    state, _ = op.adapt(torch.rand(2, 2, 3, 16, 16), y, state, guided=False)
    frozen = op.freeze(state)
    assert isinstance(frozen, NonlinearOperator)
    x = measurement(15, B=2)
    assert torch.equal(frozen.A(x), op.A(x, state))
    torch.testing.assert_close(frozen.prox_l2(x, y, 2.0), op.prox_l2(x, y, 2.0, state))
    state.psi.params["p"].add_(1.0)  # the frozen operator holds its own copy
    assert not torch.equal(frozen.A(x), op.A(x, state))


# ---------------------------------------------------------------------------------------------------- §13.9 [ours]
def test_psi_started_at_base_and_fed_the_truth_stays_there():
    """ψ = A₀ + r, r = 0, fed the true x: the anchored preset (w_adv = 0) keeps ψ = A₀; D1's pull (w_adv of §13.4)
    moves it although ψ(x) already explains y (the drift of §13.9)."""
    x = measurement(20, B=2)
    A0 = PixelScale(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.2)
    y = A0.A(x) + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    x01 = torch.stack([(x + 1) / 2] * 2, 1)  # both chains see the truth
    for w_adv, stays in ((None, True), (0.8, False)):
        kw = {} if w_adv is None else {"w_adv": w_adv}
        op = learned_degradation("low-light", base=A0, width=8, disc_width=8, **kw)
        state = op.init_state(y, generator=gens(0, 1))
        for _ in range(10):
            state, _ = op.adapt(x01, y, state, guided=True)
        drift = float((op.A(x, state) - A0.A(x)).abs().max())
        assert (drift < 1e-5) == stays, drift


def test_physical_psi_identities():
    u = torch.rand(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.05  # (B, n, C, H, W)
    tone = {"log_gain": torch.zeros(2, 3), "log_gamma": torch.zeros(2, 3)}
    torch.testing.assert_close(physical_psi("tone", u, tone, 3), u)  # starts at the identity
    t, a = torch.tensor([0.3, 0.8]), torch.tensor([0.2, 0.9])
    haze = {"depth": (1 / t - 1).log()[:, None, None, None].expand(2, 1, 4, 4), "airlight": a.logit()[:, None]}
    haze["airlight"] = haze["airlight"].expand(2, 3)  # softplus⁻¹(−log t) = log(1/t − 1)
    expected = t.view(2, 1, 1, 1, 1) * u + a.view(2, 1, 1, 1, 1) * (1 - t.view(2, 1, 1, 1, 1))
    torch.testing.assert_close(physical_psi("scattering", u, haze, 3), expected)
    luma = physical_psi("luma", u, {"luma": torch.zeros(2, 3)}, 3)
    torch.testing.assert_close(luma, u.mean(2, keepdim=True).expand_as(u))


@pytest.mark.parametrize("task", ["low-light", "colour"])
def test_physical_psi_fitted_on_the_truth_recovers_the_degradation(task):
    """Fed the true x (guided chain), the paired fit of the physical ψ converges to the true map; unguided steps
    fit nothing (§13.9)."""
    x = measurement(21, B=2, size=8)
    x01 = (x + 1) / 2
    truth = Grayscale(3).A(x) if task == "colour" else 2 * 0.4 * x01.clamp(1e-3).pow(2.0) - 1
    op = learned_degradation(task)
    state = op.init_state(truth)
    chains = torch.stack([x01, x01.flip(-1)], 1)  # the free chain is not aligned with y
    unguided, logs = op.adapt(chains, truth, state, guided=False)
    assert all(torch.equal(unguided.psi.params[k], p) for k, p in state.psi.params.items())
    assert bool(torch.isnan(logs["psi"]).all()) and bool(torch.isnan(logs["d1"]).all())
    for _ in range(200):  # 200 adapt calls of 5 Adam steps
        state, logs = op.adapt(chains, truth, state, guided=True)
    err = float((op.A(x, state) - truth).abs().max())
    assert err < 0.02, err


def test_method_passes_its_guidance_factor_and_estimate_to_the_solver(monkeypatch):
    """LDRPS(guidance_factor, zhat_from): the solver gets the task's guidance scale times the factor and the chosen
    ẑ0 estimate; without them, the reference's scale and its default estimate; a factor <= 0 is refused."""
    import types

    import ud2m.solvers.ld_rps as module
    from ud2m.methods import LDRPS
    from ud2m.solvers.ld_rps import REFERENCE_PIXELS

    seen = {}

    class Captured(Exception):
        pass

    def fake(prior, op, y, **kw):
        seen.update(kw)
        raise Captured

    monkeypatch.setattr(module, "ld_rps", fake)
    problem = types.SimpleNamespace(prior=tiny_pixel_prior(), captions=None)
    y = torch.zeros(1, 3, 16, 16)
    s_sum = task_defaults("haze").guidance_scale / REFERENCE_PIXELS  # the resolution-independent "sum" scale
    n = task_defaults("haze").steps()  # the preset's N (100): 450/N times the per-step scale
    for method, scale, zhat, steps in [
        (LDRPS("haze", guidance_factor=0.3, zhat_from="z_t"), 0.3 * 450 / n * s_sum, "z_t", n),
        (LDRPS("haze"), 450 / n * s_sum, None, n),
        (LDRPS("haze", num_steps=150), 3 * s_sum, None, 150),  # 450/N: a pass's total guidance is the reference's
        (LDRPS("haze", num_steps=450), s_sum, None, 450),
    ]:
        seen.clear()
        with pytest.raises(Captured):
            method.restore(problem, y, None, torch.tensor([0]))
        assert seen["guidance_scale"] == pytest.approx(scale) and seen.get("zhat_from") == zhat
        assert seen["guidance_norm"] == "sum" and seen["num_steps"] == steps
    with pytest.raises(ValueError, match="guidance_factor must be > 0, got 0"):
        LDRPS("haze", guidance_factor=0)


# ---------------------------------------------------------------------------------------------------- start [ours]
def first_state(prior, y, **kw):
    """``(z at the first step (B, n, c, h, w), its time, info)`` of an unguided run with ``kw``."""
    steps = []
    _, info = ld_rps(prior, small_op(), y, guidance_scale=0.0, generator=gens(5), on_step=steps.append, **kw)
    return steps[0]["z"].view(len(y), -1, *y.shape[1:]), steps[0]["t"], info


def test_start_index_is_the_smallest_grid_time_at_or_above():
    grid = [900, 600, 300, 0]
    assert [start_index(grid, t) for t in (1000, 900, 899, 600, 400, 300, 1, 0)] == [0, 0, 0, 1, 1, 2, 2, 3]


def test_start_tops_the_noise_up_to_the_grid_time(prior):
    """z = a_τ·x_init + √(b_τ² − a_τ²σ²)·ε at τ_s for every chain: with σ = s(τ_s) no noise is added; the
    remainder z − a_τ x_init is the same draw scaled by the top-up for any x_init and σ."""
    y, x_init, N = measurement(20), measurement(21), 10
    grid = timestep_grid(N)
    i0 = max(i for i, t in enumerate(grid) if t >= 450)
    a, b = (float(v) for v in prior.scales(float(grid[i0])))
    kw = dict(num_recurrences=0, num_steps=N, free_chains=1)
    z, t, _ = first_state(prior, y, start="measurement", start_sigma=b / a, start_time=450, **kw)  # σ = s(τ_s)
    s_450 = float(prior.sigma(450.0))  # without start_time: the time of σ, rounded up to the grid
    assert t == grid[i0] == first_state(prior, y, start="measurement", start_sigma=s_450, **kw)[1]
    torch.testing.assert_close(z, a * y[:, None].expand_as(z), rtol=0, atol=1e-6)
    clean = first_state(prior, y, start=x_init, start_time=450, **kw)[0] - a * x_init[:, None]  # b·ε
    noisy = first_state(prior, y, start=y, start_sigma=0.3, start_time=450, **kw)[0] - a * y[:, None]
    torch.testing.assert_close(noisy, clean * math.sqrt(b**2 - a**2 * 0.09) / b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(clean[:, 0], clean[:, 1])  # each chain its own draw


@pytest.mark.parametrize("t_start", [100, 800])
def test_start_shortens_pass_zero_and_the_recurrences_restart_no_earlier(prior, t_start):
    N, R = 10, 1
    grid, k = timestep_grid(N), restart_index(N, 0.5)
    i0 = start_index(grid, t_start)
    _, _, info = first_state(prior, measurement(22), start="measurement", start_time=t_start, num_recurrences=R,
                             num_steps=N)  # fmt: skip
    assert info["steps"] == (N - i0) + R * (N - max(k, i0))
    assert info["guided_steps"] == info["decoder_vjps"] == 0  # s = 0: no guidance and no decoder VJP


def test_start_errors(prior, tmp_path):
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    y, kw = measurement(23), dict(num_recurrences=0, guidance_scale=1.0, num_steps=4)
    with pytest.raises(ValueError, match="'measurement' or an image tensor, got 'noise'"):
        ld_rps(prior, small_op(), y, start="noise", **kw)
    with pytest.raises(ValueError, match=r"start has shape \(1, 3, 8, 8\), the restored images have \(1, 3, 16, 16\)"):
        ld_rps(prior, small_op(), y, start=torch.zeros(1, 3, 8, 8), start_time=300, **kw)
    with pytest.raises(ValueError, match="needs start_time"):
        ld_rps(prior, small_op(), y, start=torch.zeros_like(y), **kw)
    with pytest.raises(ValueError, match="expected >= 0"):
        ld_rps(prior, small_op(), y, start="measurement", start_sigma=-0.1, **kw)
    latent = LatentConsistencyPrior.from_pretrained(write_tiny_pipeline(tmp_path / "lcm", "lcm"))
    with pytest.raises(ValueError, match="needs a pixel prior"):
        ld_rps(latent, small_op(), y, start="measurement", **kw)
    # so the noise preset on a latent prior is the reference's column, on a pixel prior the measurement start
    assert preset_for("noise", latent) is REFERENCE_TASK_DEFAULTS["noise"]
    assert preset_for("noise", prior) is task_defaults("noise") and preset_for("haze", latent) is task_defaults("haze")


def test_noise_preset_denoises_from_the_measurement(prior):
    """The noise task's preset [ours]: start at y's estimated noise level, no guidance, no recurrence."""
    kw = task_defaults("noise").solver_kwargs(guidance_norm="sum", image_size=16)
    assert kw["start"] == "measurement" and kw["guidance_scale"] == 0.0 and kw["num_recurrences"] == 0
    assert kw["free_chains"] == 0  # ψ is the identity: free chains would feed an adapt with nothing to fit
    assert all(task_defaults(t).start is None for t in ("low-light", "haze", "colour"))
    assert "free_chains" not in task_defaults("haze").solver_kwargs()
    y = measurement(25, B=2) + 0.2 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    op = learned_degradation("noise")
    runs = [ld_rps(prior, op, y, num_steps=10, generator=gens(6, 7), **{**kw, "free_chains": f})[0][-1] for f in (0, 1)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)  # chain 0 draws the same noise either way


# ---------------------------------------------------------------------------------------------------- opponent [ours]
def test_opponent_metric_is_spd_and_turns_luma_gradients_grey():
    basis = torch.eye(3).view(3, 3, 1, 1)
    M = opponent_metric(basis)[..., 0, 0]  # column j = M e_j
    torch.testing.assert_close(M, M.T)
    assert bool((torch.linalg.eigvalsh(M.double()) > 0).all())
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    r = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # a luma-only loss's residual
    torch.testing.assert_close(opponent_metric(w * r), r.expand(2, 3, 4, 4))  # M w = (1, 1, 1)
    with pytest.raises(ValueError, match=r"needs RGB pixels \(B, 3, H, W\), got \(1, 4, 2, 2\)"):
        opponent_metric(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("space", ["rgb", "opponent"])
def test_luma_fidelity_guides_along_luma_weights_or_grey(prior, space):
    """Given the grey conversion, the fidelity's gradient is w·r per pixel: ``"rgb"`` guides along w (green 0.587
    to red 0.299), ``"opponent"`` moves the three channels equally."""
    from ud2m.operators.simulate import KnownDegradation

    steps, y = [], Grayscale(3).A(measurement(24))
    ld_rps(prior, KnownDegradation(Grayscale(3)), y, num_recurrences=0, guidance_scale=1e3, num_steps=6, t1=999,
           adapt=False, guidance_space=space, on_step=steps.append)  # fmt: skip
    g = steps[-1]["g"].view(1, 2, 3, 16, 16)[:, 0]
    assert g.abs().max() > 0
    if space == "rgb":
        torch.testing.assert_close(g[:, 1] * 0.299, g[:, 0] * 0.587)
        torch.testing.assert_close(g[:, 2] * 0.299, g[:, 0] * 0.114)
    else:
        torch.testing.assert_close(g[:, 1], g[:, 0])
        torch.testing.assert_close(g[:, 2], g[:, 0])
