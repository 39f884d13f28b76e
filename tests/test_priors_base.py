"""Prior contract (docs/method.md §1.2, §3.1): VP tables and their continuous extension, boundary scalings, output
conversions, add_noise marginals, time broadcasting, NFE counting, frozen eval-mode base, conditioning containers.
"""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler
from torch import nn

from ud2m.priors import (
    ClassCondition,
    FlowMatchingSchedule,
    Prior,
    TextCondition,
    VPSchedule,
    as_denoiser,
    cm_boundary_scalings,
    x0_from_prediction,
)

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]


class ConvPrior(Prior):
    """A toy ε-prior around a 1x1 convolution (exercises the default ``_predict_x0`` hook)."""

    def __init__(self, boundary="none", prediction_type="epsilon", dtype=torch.float32):
        net = nn.Conv2d(3, 3, 1).to(dtype)
        schedule = VPSchedule.from_config(SCHEDULES[1])
        super().__init__(net, schedule=schedule, prediction_type=prediction_type, boundary=boundary, latent_channels=3)

    def _network(self, z_in, t, cond):
        return self.net(z_in) * (1 + t.to(z_in.dtype)[:, None, None, None] / 1000)


# ------------------------------------------------------------------------------------------- VP schedule
@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c["beta_schedule"])
def test_vp_integer_table_matches_diffusers(config):
    ref = DDPMScheduler(**config).alphas_cumprod.double()  # (1000,)
    sched = VPSchedule.from_config(config)
    t = torch.arange(1000, dtype=torch.float64)
    a_t, b_t = sched.scales(t)
    torch.testing.assert_close(a_t**2, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(b_t**2, 1 - ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sched.sigma(t), ((1 - ref) / ref).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c["beta_schedule"])
def test_vp_continuous_time_interpolates_log_snr_and_inverts(config, rng):
    ref = DDPMScheduler(**config).alphas_cumprod.double()
    lam_ref = torch.log(ref / (1 - ref))
    sched = VPSchedule.from_config(config)
    t = torch.rand(64, generator=rng, dtype=torch.float64) * 999
    i, w = t.floor().long(), t - t.floor()
    lam = (1 - w) * lam_ref[i] + w * lam_ref[(i + 1).clamp(max=999)]
    a_t, _ = sched.scales(t)
    torch.testing.assert_close(a_t**2, torch.sigmoid(lam), rtol=1e-12, atol=0)
    # inverse: t_of_sigma(sigma(t)) == t, on random floats and on integers (incl. both ends)
    for tt in (t, torch.tensor([0.0, 1.0, 500.0, 998.0, 999.0], dtype=torch.float64)):
        torch.testing.assert_close(sched.t_of_sigma(sched.sigma(tt)), tt, rtol=0, atol=1e-9)


def test_vp_sigma_and_inverse_are_differentiable():
    sched = VPSchedule.from_config(SCHEDULES[1])
    t = torch.tensor([12.3, 400.7, 870.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: sched.scales(u)[0], (t,))
    s = torch.tensor([0.1, 1.3, 7.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sched.t_of_sigma, (s,))


def test_vp_float_input_gives_float32_and_range_is_checked():
    sched = VPSchedule.from_config(SCHEDULES[0])
    a_t, b_t = sched.scales(500)
    assert a_t.dtype == torch.float32 and a_t.shape == ()
    torch.testing.assert_close(a_t**2 + b_t**2, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\[0.0, 999.0\]"):
        sched.scales(1000.0)
    with pytest.raises(ValueError, match="zero"):
        VPSchedule.from_config(dict(SCHEDULES[0], rescale_betas_zero_snr=True))


def test_flow_schedule_is_exact_and_inverts():
    sched = FlowMatchingSchedule()
    t = torch.tensor([0.0, 125.0, 757.0, 999.0], dtype=torch.float64)
    a_t, b_t = sched.scales(t)
    torch.testing.assert_close(a_t, 1 - t / 1000)
    torch.testing.assert_close(b_t, t / 1000)
    torch.testing.assert_close(sched.t_of_sigma(sched.sigma(t)), t)
    # docs/method.md §3.2c: VP-equivalent s_t of the LVTINO grid
    torch.testing.assert_close(sched.sigma(757.0), torch.tensor(0.757 / 0.243))


# ------------------------------------------------------------------------------------------- pure functions
def test_cm_boundary_condition_and_diffusers_parity():
    c_skip, c_out = cm_boundary_scalings(0.0)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    sched = LCMScheduler()
    for t in (0, 3, 19, 124, 999):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        c_skip, c_out = cm_boundary_scalings(torch.tensor(float(t), dtype=torch.float64))
        assert math.isclose(c_skip.item(), float(ref_skip), rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(c_out.item(), float(ref_out), rel_tol=1e-6)
    # constants are arguments, not hard-coded: kappa = 1, sigma_d = 1 at t = 1 gives c_skip = 1/2
    assert cm_boundary_scalings(1.0, timestep_scaling=1.0, sigma_data=1.0).c_skip.item() == 0.5


def test_x0_from_prediction_inverts_each_parametrisation(rng):
    z0 = torch.randn(3, 2, 4, 4, generator=rng, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=rng, dtype=torch.float64)
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    b = (1 - a**2).sqrt()
    ad, bd = a[:, None, None, None], b[:, None, None, None]
    z_t = ad * z0 + bd * eps
    torch.testing.assert_close(x0_from_prediction(z_t, eps, a, b, "epsilon"), z0)
    torch.testing.assert_close(x0_from_prediction(z_t, ad * eps - bd * z0, a, b, "v_prediction"), z0)
    torch.testing.assert_close(x0_from_prediction(z_t, z0, a, b, "sample"), z0)
    sigma_fm = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    z_fm = (1 - sigma_fm)[:, None, None, None] * z0 + sigma_fm[:, None, None, None] * eps
    torch.testing.assert_close(x0_from_prediction(z_fm, eps - z0, 1 - sigma_fm, sigma_fm, "flow"), z0)
    with pytest.raises(ValueError, match="prediction_type"):
        x0_from_prediction(z_t, eps, a, b, "score")


# ------------------------------------------------------------------------------------------- the wrapper
def test_add_noise_marginals(rng):
    prior = ConvPrior()
    t = torch.tensor([0.0, 250.5, 500.0, 999.0])
    c = torch.tensor([1.0, -0.5, 2.0, 0.3])
    n = 64 * 64
    z0 = c[:, None, None, None].expand(4, 1, 64, 64)
    eps = torch.randn(4, 1, 64, 64, generator=rng, dtype=torch.float64)
    z_t = prior.add_noise(z0.double(), t.double(), eps).reshape(4, -1)
    a_t, b_t = prior.scales(t.double())
    se_mean = 5 * b_t / math.sqrt(n)  # 5 standard errors
    se_var = 5 * b_t**2 * math.sqrt(2 / (n - 1))
    assert ((z_t.mean(1) - a_t * c.double()).abs() <= se_mean).all()
    assert ((z_t.var(1) - b_t**2).abs() <= se_var).all()


def test_float_t_equals_tensor_t_and_nfe_counts_calls(rng):
    prior = ConvPrior(boundary="lcm")
    z = torch.randn(4, 3, 8, 8, generator=rng)
    out_float = prior.predict_x0(z, 37.5)
    out_tensor = prior.predict_x0(z, torch.full((4,), 37.5))
    out_one = prior.predict_x0(z, torch.tensor([37.5]))
    assert torch.equal(out_float, out_tensor) and torch.equal(out_float, out_one)
    # per-sample t: row i equals the single-sample call at t_i
    t = torch.tensor([0.0, 10.0, 300.0, 999.0])
    out = prior.predict_x0(z, t)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], prior.predict_x0(z[i : i + 1], t[i].item()))
    assert prior.nfe == 4 + 4
    assert prior.reset_nfe() == 8 and prior.nfe == 0


def test_lcm_boundary_gives_identity_at_t0(rng):
    prior = ConvPrior(boundary="lcm")
    z = torch.randn(2, 3, 8, 8, generator=rng)
    assert torch.equal(prior.predict_x0(z, 0.0), z)
    assert not torch.allclose(ConvPrior(boundary="none").predict_x0(z, 0.0), z)


def test_frozen_base_stays_in_eval_and_casts_dtype(rng):
    prior = ConvPrior(dtype=torch.bfloat16)
    assert all(not p.requires_grad for p in prior.parameters())
    prior.train()
    assert not prior.training and not prior.net.training
    assert prior.dtype == torch.bfloat16
    out = prior.predict_x0(torch.randn(2, 3, 8, 8, generator=rng), 500)
    assert out.dtype == torch.float32
    z64 = torch.randn(2, 3, 8, 8, generator=rng, dtype=torch.float64)
    assert ConvPrior().predict_x0(z64, 500).dtype == torch.float64


def test_gradients_reach_inputs_and_time(rng):
    prior = ConvPrior()
    z = torch.randn(2, 3, 8, 8, generator=rng, requires_grad=True)
    t = torch.tensor([100.3, 700.8], requires_grad=True)
    prior.predict_x0(z, t).square().sum().backward()
    assert z.grad is not None and t.grad is not None and torch.isfinite(t.grad).all()


def test_validation_errors_are_explicit(rng):
    prior = ConvPrior()
    with pytest.raises(ValueError, match="3 channels"):
        prior.predict_x0(torch.randn(2, 4, 8, 8), 10)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        prior.predict_x0(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="unconditional"):
        prior.encode_prompt("a cat")
    assert prior.encode_prompt(None) is None
    with pytest.raises(ValueError, match="channels"):
        prior.latent_shape((1, 1, 8, 8))
    with pytest.raises(ValueError, match="prediction_type"):
        ConvPrior(prediction_type="score")


def test_conditions_expand_and_move():
    cond = TextCondition(prompt_embeds=torch.randn(1, 7, 5), pooled=torch.randn(1, 3), time_ids=torch.ones(1, 6))
    big = cond.expand(4)
    assert big.prompt_embeds.shape == (4, 7, 5) and big.pooled.shape == (4, 3) and big.timestep_cond is None
    assert torch.equal(big.prompt_embeds[3], cond.prompt_embeds[0]) and big.batch_size == 4
    assert big.expand(4).prompt_embeds is big.prompt_embeds  # already batch 4: no copy
    with pytest.raises(ValueError, match="cannot expand"):
        big.expand(3)
    half = cond.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == torch.float16 and half.time_ids.dtype == torch.float16
    labels = ClassCondition(torch.tensor([3])).to(dtype=torch.float16).expand(2)
    assert labels.class_labels.dtype == torch.int64 and labels.class_labels.tolist() == [3, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cond.pooled = None


def test_docs_worked_example_subclass(rng):
    """The "plug in a new prior" example of docs/priors.md runs and obeys the contract."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "priors.md").read_text()
    namespace = {}
    exec(re.findall(r"```python\n(.*?)```", text, re.S)[-1], namespace)

    class Shrink(nn.Module):  # exact x0-predictor of x = z0 + s·ε for z0 ~ N(0, I): x/(1+s²)
        def forward(self, x, s):
            return x / (1 + s[:, None, None, None] ** 2)

    prior = namespace["EDMPrior"](Shrink())
    x = torch.randn(2, 3, 8, 8, generator=rng)
    sigma = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(as_denoiser(prior)(x, sigma), x / (1 + sigma[:, None, None, None] ** 2))
    assert prior.nfe == 1 and not prior.training


def test_public_api_names_import_from_their_packages():
    """Everything the docs name imports from its package (issue [api] "Public API")."""
    import ud2m
    import ud2m.priors
    import ud2m.solvers

    for package in (ud2m, ud2m.priors, ud2m.solvers):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    from ud2m import UnfoldedSampler, sample_ud2m  # noqa: F401
    from ud2m.priors import LatentConsistencyPrior, VideoFlowPrior  # noqa: F401
    from ud2m.solvers import consistency_sampling, latino, latino_pro  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute"):
        _ = ud2m.solvers.not_a_solver
