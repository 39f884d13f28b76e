"""The UD2M sampler's noise rule, discriminator conditioning and consistency loss (issue [sampler]; docs/method.md
§7.1, §7.4 and §7.5 revisions).

Identities asserted: with the default ``noise_rule="prior"`` the re-noise time t_z of the untrained sampler on the
shipped digits prior is non-decreasing in the outer time and stays below the cap's time; ``noise_rule="reference"``
reproduces σ_e = rho_sigma_scale·σ_n exactly; the discriminator receives the very same conditioning tensor for real
and fake; every learnable gets a gradient under every option; manifests written before the revision (no
``noise_rule``) load with the reference rule; the energy score is minimised by the true law, not by its mean.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from ud2m.discriminator import ConditionalDiscriminator, conditioning
from ud2m.losses import energy_score
from ud2m.operators import SuperResolution, measure, sigma_internal
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.priors.tiny import tiny_pixel_prior
from ud2m.schedules import quadratic_grid
from ud2m.solvers.steps import rho_zero
from ud2m.training.module import UnfoldedDistillation
from ud2m.unfolded import UnfoldedSampler, sample_ud2m

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "ud2m" / "assets" / "priors" / "digits"


def t_z_along_the_grid(model, prior, sigma_y: float, num_steps: int = 8) -> list[float]:
    """t_z of block 0 at every grid time of the N-step sampler (one digit-shaped observation)."""
    op = SuperResolution(4, "gaussian", gaussian_sigma=math.sqrt(3.0), gaussian_size=3)
    y = torch.zeros(1, 1, 8, 8)
    seen = []
    with torch.no_grad():
        sample_ud2m(
            model, op, y, sigma_y, x_shape=(1, 1, 32, 32), num_steps=num_steps,
            generator=torch.Generator().manual_seed(0),
            callback=lambda info: seen.append(float(info["blocks"][0]["t_z"][0])),
        )  # fmt: skip
    return seen


@pytest.mark.parametrize("sigma_y", [0.01, 0.05])
def test_prior_rule_t_z_follows_the_outer_time_below_the_cap(sigma_y):
    prior = PixelDiffusionPrior.from_pretrained(DIGITS)
    model = UnfoldedSampler(prior, num_blocks=1)
    assert model.noise_rule == "prior" and model.sigma_cap == 1.0
    t_z = t_z_along_the_grid(model, prior, sigma_y)
    grid = [float(t) for t in quadratic_grid(8)]
    ordered = sorted(zip(grid, t_z, strict=True))  # increasing outer time
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(ordered)), ordered
    t_cap = float(prior.t_of_sigma(torch.tensor(1.0)))
    assert all(tz < t_cap for tz in t_z) and all(tz <= t for t, tz in zip(grid, t_z, strict=True))
    assert max(t_z) - min(t_z) > 0.5 * t_cap  # it really moves with t (the reference rule's t_z is ~constant)


def test_reference_rule_is_blind_to_the_outer_time_and_reproduces_sigma_e():
    prior = PixelDiffusionPrior.from_pretrained(DIGITS)
    model = UnfoldedSampler(prior, num_blocks=1, noise_rule="reference", rho_sigma_scale=2.0)
    sigma_n = sigma_internal(torch.tensor([0.05]))
    assert torch.equal(model.sigma_e(sigma_n), 2.0 * sigma_n)
    t_z = t_z_along_the_grid(model, prior, 0.05)
    s = prior.sigma(torch.tensor(quadratic_grid(8), dtype=torch.float32))
    expected = prior.t_of_sigma(rho_zero(s, 2.0 * sigma_n))  # ρ₀ ≤ σ_e: t_z bounded by t(σ_e) for every t_n
    torch.testing.assert_close(torch.tensor(t_z), expected.float(), rtol=1e-4, atol=1e-3)


def test_rho_sigma_scale_with_the_prior_rule_is_refused():
    with pytest.raises(ValueError, match="noise_rule='reference'"):
        UnfoldedSampler(tiny_pixel_prior(), rho_sigma_scale=13.0)
    with pytest.raises(ValueError, match="noise_rule"):
        UnfoldedSampler(tiny_pixel_prior(), noise_rule="nope")


def make_module(condition, consistency_loss, noise_rule):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kw = {"noise_rule": noise_rule}
        sampler = UnfoldedSampler(tiny_pixel_prior(), num_blocks=2, tied_scalars=False, **kw)
        D = None if condition is None else ConditionalDiscriminator(3, 16, condition=condition)
        return UnfoldedDistillation(
            sampler, D, operator=SuperResolution(2, "box"), sigma_y=0.05, omega_lpips=0.0,
            omega_adv=0.1 if D is not None else 0.0, consistency_loss=consistency_loss,
        )  # fmt: skip


@pytest.mark.parametrize("condition", [("y",), ("y", "x_t", "t"), None])
@pytest.mark.parametrize("consistency_loss", ["energy", "l2"])
@pytest.mark.parametrize("noise_rule", ["prior", "reference"])
def test_every_learnable_gets_a_gradient_and_d_sees_one_condition(condition, consistency_loss, noise_rule, rng):
    """One generator loss and one discriminator loss by hand (the module's own functions): every trainable tensor
    of G (LoRA B, the scalars) and of D gets a non-zero gradient; D's conditioning is one tensor for real and fake."""
    module = make_module(condition, consistency_loss, noise_rule)
    x0 = torch.rand(2, 3, 16, 16, generator=rng) * 2 - 1
    op = module.operator
    y = measure(op, x0, 0.05, rng)
    t = torch.tensor([700.0, 40.0])
    x_t = module.sampler.prior.add_noise(x0, t, torch.randn(x0.shape, generator=rng))
    samples = [module.sampler(x_t, t, y, op, 0.05, generator=rng) for _ in range(1 + (consistency_loss == "energy"))]
    c = module._d_condition(op, y, x_t, t, x0)
    seen = []
    if module.discriminator is not None:
        real_forward = module.discriminator.forward
        module.discriminator.forward = lambda x, cc: seen.append(cc) or real_forward(x, cc)
    logs = {}
    samples = (samples[0], samples[1] if len(samples) > 1 else None)
    loss = module._generator_loss(x0, samples, c, t, module.discriminator is not None, logs)
    loss.backward()
    grads = {n: p.grad for n, p in module.sampler.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)  # A's gradient is 0 while B = 0
    if module.discriminator is None:
        return
    assert ("energy" in logs) == (consistency_loss == "energy")
    d_real, d_fake = module._discriminator(x0, c), module._discriminator(samples[0].detach(), c)
    from ud2m.losses import discriminator_loss

    discriminator_loss(d_real, d_fake).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.discriminator.parameters())
    assert len(seen) == 3 and all(s is c for s in seen)  # G's adversarial term, then D on real and on fake
    expected = conditioning(condition, lift_y=op.lift(y), x_t=x_t, t=t, size=(16, 16))
    assert torch.equal(c, expected) and c.shape[1] == module.discriminator.cond_channels
    if "x_t" in condition:
        assert torch.equal(c[:, 3:6], x_t) and torch.equal(c[:, 6, 0, 0], t / 1000)


def test_discriminator_condition_mismatch_is_named():
    D = ConditionalDiscriminator(1, 16)
    with pytest.raises(ValueError, match=r"C_c\) = \(2, 3\)"):
        D(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))  # a y-only condition for a (y, x_t, t) D
    with pytest.raises(ValueError, match="must contain 'y'"):
        ConditionalDiscriminator(1, 16, condition=("x_t",))


def test_energy_score_is_minimised_by_the_law_not_by_its_mean():
    """For x0 ~ N(0, I_d) (d large, so norms concentrate): a sampler drawing from N(0, I) scores
    E‖X−x0‖ − ½E‖X−X'‖ ≈ √(2d) − ½√(2d); the mean (X = 0) scores √d. Both over √d: 0.707 against 1."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 1024, generator=g)
    law = energy_score(torch.randn(512, 1024, generator=g), torch.randn(512, 1024, generator=g), x0).mean()
    mean = energy_score(torch.zeros_like(x0), torch.zeros_like(x0), x0).mean()
    assert abs(law.item() - math.sqrt(2) / 2) < 0.01 and abs(mean.item() - 1.0) < 0.01
    with pytest.raises(ValueError, match="shapes differ"):
        energy_score(x0, x0[:, :3], x0)


def test_time_knots_start_as_constants_interpolate_and_train(rng):
    """time_knots > 1: zero tables equal the constant scalars (same output); a table is interpolated linearly in t
    between knots (exact at the knots); every knot that brackets a time in the batch gets a gradient."""
    torch.manual_seed(0)
    prior = tiny_pixel_prior()
    plain = UnfoldedSampler(prior, num_blocks=2)
    timed = UnfoldedSampler(prior, num_blocks=2, tied_scalars=False, time_knots=5)  # reuses the same adapter
    assert timed.log_lambda.shape == (2, 5) and plain.log_lambda.shape == (1,)
    op = SuperResolution(2, "box")
    x0 = torch.rand(2, 3, 16, 16, generator=rng) * 2 - 1
    y = measure(op, x0, 0.05, rng)
    t = torch.tensor([250.0, 600.0])
    x_t = prior.add_noise(x0, t, torch.randn(x0.shape, generator=rng))
    run = lambda m: m(x_t, t, y, op, 0.05, generator=torch.Generator().manual_seed(3))  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(run(timed), run(plain), rtol=0, atol=0)
        timed.log_rho_scale.copy_(torch.arange(10.0).view(2, 5))
    values = timed._scalar(timed.log_rho_scale, 1, torch.tensor([0.0, 250.0, 375.0, 1000.0]))
    torch.testing.assert_close(values, torch.tensor([5.0, 6.0, 6.5, 9.0]))  # knots at 0, 250, ..., 1000
    with torch.no_grad():
        timed.log_rho_scale.zero_()
    run(timed).square().mean().backward()
    g = timed.log_sigma_z_scale.grad  # t = 250 sits on knot 1; t = 600 between knots 2 and 3
    assert (g[:, [1, 2, 3]] != 0).all() and (g[:, [0, 4]] == 0).all()


def test_max_snr1_weighting_is_one_above_unit_noise_and_snr_below():
    from ud2m.losses import l2_weight

    w = l2_weight(torch.tensor([0.2, 0.5, 0.8]), "max_snr1")  # SNR = ᾱ/(1 − ᾱ) = 0.25, 1, 4
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 4.0]))
