"""Simulated degradations of docs/method.md §13.8 (``ud2m.operators.simulate``): identities derived by hand, the
operator contract (adjoint, prox optimality, projection, pseudo-inverse), per-sample seeding, replay, and clear errors.

Expected values: Haze at t = 1 is the identity and at t = 0 the airlight 2A − 1 (internal scale); the luma of a grey
image is its grey level (Σw = 1) and the lift of a luma is the grey image; x ↦ g ⊙ x + b is inverted by (y − b)/g;
low light with γ = e = 1 is the identity, and e·x₀₁^γ is inverted by (y₀₁/e)^{1/γ} on [0, 1].
"""

import math

import pytest
import torch

from ud2m.operators import Denoising, measure
from ud2m.operators.simulate import (
    LUMA_WEIGHTS,
    Grayscale,
    Haze,
    KnownDegradation,
    LowLight,
    PixelAffine,
    PixelScale,
    depth_proxy,
    gaussian_blur_fft,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(B=2, C=3, H=8, W=8, seed=0, dtype=torch.float32):
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def prox_residual(op, x, z, y, gamma):
    """Optimality of argmin γ/2‖Ax − y‖² + ½‖x − z‖²: γAᵀ(Ax − y) + (x − z) = 0 (linear ops)."""
    return gamma * op.A_adjoint(op.A(x) - y) + (x - z)


# ---------------------------------------------------------------------------------------------------- Haze
def test_haze_identity_at_full_transmission_and_airlight_at_zero():
    x, B = images(), 2
    depth = torch.ones(B, 1, 8, 8)
    clear = Haze(depth, beta=torch.zeros(B), airlight=torch.tensor([0.8, 0.9]))  # t = exp(0) = 1
    torch.testing.assert_close(clear.A(x), x)
    opaque = Haze(depth, beta=torch.full((B,), 1e4), airlight=torch.tensor([0.8, 0.9]))  # t = exp(-1e4) = 0
    assert float(opaque.transmission.max()) == 0.0
    expected = (2 * torch.tensor([0.8, 0.9]) - 1).view(B, 1, 1, 1).expand_as(x)  # 2A − 1
    torch.testing.assert_close(opaque.A(x), expected)


def test_haze_is_the_scattering_model_on_unit_scale_and_lift_inverts_it():
    x = images(B=3, H=16, W=16)
    op = Haze.random(3, 16, gens(1, 2, 3))
    t, A = op.transmission, op.airlight.view(3, 1, 1, 1)
    x01 = (x + 1) / 2
    torch.testing.assert_close((op.A(x) + 1) / 2, x01 * t + A * (1 - t))  # I = J t + A (1 − t)
    torch.testing.assert_close(op.lift(op.A(x)), x, atol=1e-5, rtol=0)  # exact inverse (t ≥ e^{-1.6})
    y = op.A(x)
    torch.testing.assert_close(op.linear.A(x), op.remove_offset(y))  # y′ = y − (1 − t)(2A − 1) = t ⊙ x
    torch.testing.assert_close(op.remove_offset(y), y - (1 - t) * (2 * A - 1))


def test_haze_draws_in_range_and_depth_proxy():
    op = Haze.random(64, 16, torch.Generator().manual_seed(0))
    assert float(op.beta.min()) >= 0.8 and float(op.beta.max()) < 1.6
    assert float(op.airlight.min()) >= 0.75 and float(op.airlight.max()) < 0.95
    t = op.transmission
    assert t.shape == (64, 1, 16, 16)
    assert float(t.min()) >= math.exp(-1.6) - 1e-6 and float(t.max()) <= 1.0
    d = depth_proxy(4, (16, 12), gens(0, 1, 2, 3))
    assert d.shape == (4, 1, 16, 12) and float(d.min()) >= 0 and float(d.max()) <= 1 + 1e-6
    ramp = depth_proxy(2, 5, gens(0, 1), ramp_weight=1.0)  # w = 1: the ramp alone, 1 at the top, 0 at the bottom
    torch.testing.assert_close(ramp[0, 0, :, 0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur_fft(noise, 3.0).mean((-2, -1)), noise.mean((-2, -1)), atol=1e-6, rtol=0)


def test_haze_prox_is_exact_and_at_size_resamples():
    x, z = images(B=2, H=16, W=16, seed=1), images(B=2, H=16, W=16, seed=2)
    op = Haze.random(2, 16, gens(4, 5))
    y = op.A(x)
    gamma = torch.tensor([0.5, 3.0])
    p = op.prox_l2(z, y, gamma)
    g = gamma.view(2, 1, 1, 1)
    torch.testing.assert_close(g * op.A_vjp(p, op.A(p) - y) + (p - z), torch.zeros_like(p), atol=1e-5, rtol=0)
    torch.testing.assert_close(op.prox_l2(z, y, math.inf), x, atol=1e-5, rtol=0)  # projection = the inverse
    small = op.at_size((8, 8))
    assert small.depth.shape == (2, 1, 8, 8) and torch.equal(small.beta, op.beta) and op.at_size((16, 16)) is op


# ---------------------------------------------------------------------------------------------------- Grayscale
@pytest.mark.parametrize("c", [1, 3])
def test_grayscale_of_a_grey_image_is_itself(c):
    level = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grey = level.expand(-1, 3, -1, -1)
    op = Grayscale(out_channels=c)
    torch.testing.assert_close(op.A(grey), level.expand(-1, c, -1, -1))  # Σw = 1
    torch.testing.assert_close(op.lift(op.A(grey)), grey)  # the lift is the grey image
    x = images()
    torch.testing.assert_close(op.A(op.lift(op.A(x))), op.A(x))  # an exact right inverse
    w = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    torch.testing.assert_close(op.A(x), (w * x).sum(1, keepdim=True).expand(-1, c, -1, -1))


@pytest.mark.parametrize("c", [1, 3])
def test_grayscale_contract_closed_forms_match_cg(c):
    op = Grayscale(out_channels=c).double()
    x, z = images(dtype=torch.float64), images(seed=3, dtype=torch.float64)
    assert float(op.adjointness_test(x, torch.Generator().manual_seed(0))) < 1e-12
    y = op.A(images(seed=4, dtype=torch.float64))
    gamma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    p = op.prox_l2(z, y, gamma)
    torch.testing.assert_close(prox_residual(op, p, z, y, gamma.view(2, 1, 1, 1)), torch.zeros_like(p))
    torch.testing.assert_close(p, op.prox_l2_cg(z, y, gamma, rtol=1e-12, max_iter=500))
    proj = op.prox_l2(z, y, math.inf)
    torch.testing.assert_close(op.A(proj), y)
    torch.testing.assert_close(proj - z, op.A_dagger(y - op.A(z), eps=0.0))  # minimal change lies in range(Aᵀ)
    base = super(Grayscale, op).A_dagger  # the CG default of LinearOperator
    torch.testing.assert_close(op.A_dagger(y, eps=0.1), base(y, eps=0.1), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- PixelScale
def test_pixel_scale_and_affine_inverse_recover_x():
    x = images(B=2, C=3)
    gain = torch.tensor([[0.3, 0.5, 0.9], [0.2, 1.0, 0.7]]).view(2, 3, 1, 1)  # per sample and channel
    op = PixelScale(gain)
    torch.testing.assert_close(op.A(x), gain * x)
    torch.testing.assert_close(op.lift(op.A(x)), x)  # y/g
    affine = PixelAffine(gain, offset=torch.full((2, 1, 8, 8), -0.25))
    torch.testing.assert_close(affine.lift(affine.A(x)), x)  # (y − b)/g
    torch.testing.assert_close(affine.A(x), gain * x - 0.25)
    zero = PixelScale(torch.tensor([0.0, 2.0]))  # a zero gain observes nothing: lift 0, mask 0
    y = zero.A(x)
    assert torch.equal(zero.lift(y)[0], torch.zeros_like(x[0]))
    torch.testing.assert_close(zero.lift(y)[1], x[1])
    assert zero.observed_mask(y)[0].sum() == 0 and PixelScale(2.0).observed_mask(y) is None


def test_pixel_scale_contract():
    gain = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    op = PixelScale(gain).double()
    x, z = images(dtype=torch.float64), images(seed=5, dtype=torch.float64)
    assert float(op.adjointness_test(x, torch.Generator().manual_seed(0))) < 1e-12
    y, gamma = op.A(x), torch.tensor([0.5, 4.0], dtype=torch.float64)
    p = op.prox_l2(z, y, gamma)
    torch.testing.assert_close(prox_residual(op, p, z, y, gamma.view(2, 1, 1, 1)), torch.zeros_like(p))
    torch.testing.assert_close(op.prox_l2(z, y, math.inf), x)
    torch.testing.assert_close(op.A_dagger(y, eps=0.01), gain * y / (gain**2 + 0.01))
    assert (
        PixelScale(gain).at_size((4, 4)).gain.shape == (2, 1, 4, 4)
        and PixelScale(0.5).at_size((4, 4)).gain.numel() == 1
    )


# ---------------------------------------------------------------------------------------------------- LowLight
def test_low_light_model_identity_and_oracle_inverse():
    x = images(B=3)
    torch.testing.assert_close(LowLight(1.0, 1.0).A(x), x)  # γ = e = 1
    op = LowLight(torch.tensor([1.5, 2.0, 2.5]), torch.tensor([0.2, 0.35, 0.5]))
    x01 = (x + 1) / 2
    expected01 = op.exposure.view(3, 1, 1, 1) * x01 ** op.gamma.view(3, 1, 1, 1)  # y₀₁ = e·x₀₁^γ
    torch.testing.assert_close((op.A(x) + 1) / 2, expected01)
    torch.testing.assert_close(op.lift(op.A(x)), x, atol=2e-5, rtol=0)
    assert float(op.lift(torch.full_like(x, -1.5)).max()) == -1.0  # noise below black clips at 0
    xd = x.double().requires_grad_(True)  # A_vjp by autograd is finite at black (γ > 1)
    v = torch.ones_like(xd)
    g = op.double().A_vjp(torch.full_like(xd, -1.0), v)
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


def test_low_light_draws_are_per_sample_seeded_and_replayable():
    batch = LowLight.random(3, gens(10, 11, 12))
    alone = LowLight.random(1, gens(11))  # sample 1 depends only on its own generator
    assert torch.equal(batch.gamma[1:2], alone.gamma) and torch.equal(batch.exposure[1:2], alone.exposure)
    again = LowLight.random(3, gens(10, 11, 12))
    assert all(torch.equal(a, b) for a, b in zip(batch.params().values(), again.params().values(), strict=True))
    assert len(set(batch.gamma.tolist())) == 3  # independent draws differ
    assert float(batch.gamma.min()) >= 1.5 and float(batch.gamma.max()) < 2.5
    wide = LowLight.random(200, torch.Generator().manual_seed(0))
    assert 0.2 <= float(wide.exposure.min()) and float(wide.exposure.max()) < 0.5
    x = images(B=3)
    replay = LowLight.from_params(**batch.params())
    torch.testing.assert_close(replay.A(x), batch.A(x))
    loaded = LowLight(torch.ones(3), torch.ones(3))
    loaded.load_state_dict(batch.state_dict())  # parameters are buffers: state_dict saves them
    torch.testing.assert_close(loaded.A(x), batch.A(x))


def test_haze_and_pixel_scale_draws_are_per_sample():
    batch, alone = Haze.random(3, 16, gens(7, 8, 9)), Haze.random(1, 16, gens(8))
    for name, value in alone.params().items():  # the noise draws are equal; the batched FFT blur to round-off
        torch.testing.assert_close(batch.params()[name][1:2], value, atol=1e-6, rtol=0)
    assert not torch.equal(batch.depth[0], batch.depth[1])
    replay = Haze.from_params(**batch.params())
    x = images(B=3, H=16, W=16)
    assert torch.equal(replay.A(x), batch.A(x))
    s_batch, s_alone = PixelScale.random(3, gens(1, 2, 3), channels=3), PixelScale.random(1, gens(2), channels=3)
    assert torch.equal(s_batch.gain[1:2], s_alone.gain) and s_batch.gain.shape == (3, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------- noise, errors
def test_measure_adds_noise_after_the_map():
    x = images(B=2, H=32, W=32)
    for op in (LowLight.random(2, gens(0, 1)), Haze.random(2, 32, gens(0, 1))):
        assert torch.equal(measure(op, x, 0.0), op.A(x))
        residual = measure(op, x, 0.05, torch.Generator().manual_seed(0)) - op.A(x)
        assert abs(float(residual.std()) - 0.1) < 0.01  # σ_n = 2σ_y; 6,144 draws: std of the std ≈ 0.0009


def test_bad_channel_counts_and_batches_raise_clearly():
    with pytest.raises(ValueError, match=r"Grayscale: expected RGB images with 3 channels, got 1"):
        Grayscale().A(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Grayscale: expected measurements with 3 channels, got 1"):
        Grayscale(out_channels=3).lift(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"out_channels must be 1 or 3, got 2"):
        Grayscale(out_channels=2)
    with pytest.raises(ValueError, match=r"LowLight: expected images with 3 channels, got 1"):
        LowLight(2.0, 0.3).A(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Haze: expected images with 3 channels, got 4"):
        Haze.random(1, 8).A(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"PixelScale: the gain has channel count 3, the images have 4"):
        PixelScale(torch.ones(1, 3, 1, 1)).A(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"PixelScale: the gain has batch size 2, the images have 3"):
        PixelScale(torch.ones(2)).A(torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"LowLight: 2 gamma values for a batch of 3"):
        LowLight(torch.full((2,), 2.0), 0.3).A(torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"gamma_range: expected a range"):
        LowLight.random(2, gamma_range=(2.5, 1.5))
    with pytest.raises(ValueError, match=r"Haze: the gain has height 8, the images have 16"):
        Haze.random(1, 8).A(torch.zeros(1, 3, 16, 16))
    assert LowLight(2.0, 0.3, channels=None).A(torch.zeros(1, 1, 4, 4)).shape == (1, 1, 4, 4)


# ---------------------------------------------------------------------------------------------------- known operator
def test_known_degradation_fidelity_and_ld_rps_interface():
    x = images(B=2, H=16, W=16)
    op = Haze.random(2, 16, gens(0, 1))
    known = KnownDegradation(op)
    y = op.A(x)
    x01 = (x + 1) / 2
    assert float(known.fidelity(x01, y).abs().max()) < 1e-12  # the truth fits exactly
    shifted = (x01 + 0.1).requires_grad_(True)
    expected = ((op.A(2 * shifted - 1) - y) / 2).square().flatten(1).mean(1)  # MSE on [0, 1]
    torch.testing.assert_close(known.fidelity(shifted, y), expected)
    torch.testing.assert_close(expected, (0.1 * op.transmission).square().expand(2, 3, 16, 16).flatten(1).mean(1))
    assert known.init_state(y) is None and known.adapt(x01, y, None) == (None, {}) and known.freeze() is op
    assert KnownDegradation(Grayscale()).image_shape(Grayscale().A(x)) == (2, 3, 16, 16)  # lift's shape

    from ud2m.priors.tiny import tiny_pixel_prior
    from ud2m.solvers.ld_rps import ld_rps

    prior = tiny_pixel_prior(sample_size=16)
    kw = dict(num_recurrences=1, guidance_scale=1.0, num_steps=4, t1=600, free_chains=0, adapt=False)
    passes, info = ld_rps(prior, KnownDegradation(Denoising()), x, generator=gens(0, 1), **kw)
    assert len(passes) == 2 and passes[-1].shape == x.shape and info["psi_steps"] == 0
    gray = KnownDegradation(Grayscale(out_channels=1))  # a 1-channel y: the images are RGB (image_shape)
    passes, _ = ld_rps(prior, gray, Grayscale().A(x), generator=gens(0, 1), **kw)
    assert passes[-1].shape == (2, 3, 16, 16)


def test_simulate_task_is_the_protocol_per_task_and_refuses_bad_input():
    """simulate_task = the task's random operator then ``measure``, per-sample generators; colour measures the
    one-channel luma and replicates it; unknown tasks and grey images for colour are refused by name."""
    from ud2m.operators.simulate import TASK_SIGMA_Y, simulate_task

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def gens(seed):
        return [torch.Generator().manual_seed(seed + b) for b in range(2)]

    sim = simulate_task("low-light", x, gens(10), gens(20))
    op = LowLight.random(2, gens(10))
    assert torch.equal(sim.y, measure(op, x, TASK_SIGMA_Y["low-light"], gens(20)))
    assert torch.equal(sim.op.gamma, op.gamma) and sim.measured[0] is sim.op and sim.sigma_y == 0.01
    haze = simulate_task("haze", x, gens(10), gens(20))
    op = Haze.random(2, (16, 16), gens(10))
    assert torch.equal(haze.y, measure(op, x, 0.01, gens(20))) and torch.equal(haze.op.depth, op.depth)
    quiet = simulate_task("haze", x, gens(10), gens(20), sigma_y=0.0)
    torch.testing.assert_close(quiet.y, quiet.op.A(x))  # sigma_y overrides the task's
    noise = simulate_task("noise", x, None, gens(20))
    assert isinstance(noise.op, Denoising) and noise.sigma_y == 0.1
    colour = simulate_task("colour", x, None, gens(20))
    grey, y1 = colour.measured
    assert torch.equal(y1, measure(Grayscale(1), x, 0.01, gens(20)))
    assert y1.shape == (2, 1, 16, 16) and torch.equal(colour.y, y1.expand(-1, 3, -1, -1))
    torch.testing.assert_close(colour.op.A(x), grey.A(x).expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"unknown task 'blur'.*low-light, haze, noise, colour"):
        simulate_task("blur", x)
    with pytest.raises(ValueError, match=r"colour needs RGB images \(3 channels\), got shape \(2, 1, 16, 16\)"):
        simulate_task("colour", x[:, :1])
