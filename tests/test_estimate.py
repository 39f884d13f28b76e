"""Classical blind estimates (``ud2m.operators.estimate``): identities derived by hand.

Dark channel: a brute-force min over channels and the window (windows cut at the border) gives the same map. Dark
channel prior: a scene J with a black channel in every patch, seen through constant transmission t₀ next to a sky
region (t = 0, so I = A there) gives, with ω = 1, the airlight A exactly and, away from the sky border, t̃ = t₀ and
the dehazed image J. Grey world: y = g₀x^γ with the estimator's γ and the mean level set to mean(x) gives
g = g₀ and brightens back to x.
"""

import pytest
import torch

from ud2m.operators import estimate


def test_dark_channel_is_the_windowed_minimum_over_channels():
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    patch, r = 5, 2
    m = x.amin(1)  # (B, H, W)
    brute = torch.empty(2, 1, 9, 11)
    for i in range(9):
        for j in range(11):
            brute[:, 0, i, j] = m[:, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].amin((1, 2))
    assert torch.equal(estimate.dark_channel(x, patch), brute)
    assert torch.equal(estimate.dark_channel(x, 1), x.amin(1, keepdim=True))


def test_dark_channel_prior_recovers_airlight_transmission_and_scene():
    g = torch.Generator().manual_seed(1)
    B, H, W, patch = 2, 24, 24, 5
    J = torch.rand(B, 3, H, W, generator=g) * 0.9 + 0.05
    J[:, 0] = 0.0  # a black channel everywhere: the dark channel of J is 0 in every patch
    A = torch.tensor([[0.9, 0.85, 0.8], [0.7, 0.75, 0.95]])
    t0 = torch.tensor([0.6, 0.35])
    t = t0[:, None, None, None].expand(B, 1, H, W).clone()
    t[..., :6, :] = 0.0  # the sky: the top rows are pure airlight (I = A), the brightest dark channel
    I = J * t + A[:, :, None, None] * (1 - t)
    est = estimate.estimate_haze(I, patch=patch, omega=1.0, t_min=0.01)
    torch.testing.assert_close(est.airlight, A)
    interior = (..., slice(6 + patch // 2, None), slice(None))  # rows whose window does not reach the sky
    torch.testing.assert_close(est.transmission[interior], t[interior])
    torch.testing.assert_close(estimate.dehaze(I, est)[interior], J[interior])


def test_grey_world_exposure_inverts_a_known_tone_curve():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=g) * 0.65 + 0.3  # y stays above the estimator's floor (1e-3)
    g0 = torch.tensor([0.2, 0.35, 0.5])
    gamma = 2.2
    y = g0[:, None, None, None] * x.pow(gamma)
    for b in range(3):  # the mean level of each image is its own mean: then the estimate is exact
        gain = estimate.estimate_exposure(y[b : b + 1], gamma=gamma, mean_level=float(x[b].mean()))
        torch.testing.assert_close(gain, g0[b : b + 1])
        torch.testing.assert_close(estimate.brighten(y[b : b + 1], gain, gamma=gamma), x[b : b + 1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="odd"):
        estimate.dark_channel(torch.rand(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        estimate.estimate_haze(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="mean_level"):
        estimate.estimate_exposure(torch.rand(1, 3, 8, 8), mean_level=1.5)


def test_noise_level_is_unbiased_on_noisy_planes_and_zero_without_noise():
    """Immerkær's mask annihilates planes, so on a + b·i + c·j + σn the estimate measures σ alone: unbiased for
    Gaussian n (E|N∗n| = 6σ√(2/π)), 0 without noise; linear in the scale (the mask sums to 0)."""
    g = torch.Generator().manual_seed(2)
    B, C, H, W = 3, 3, 128, 128
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    coef = torch.rand(B, C, 3, generator=g) * 2 - 1
    plane = 0.5 + (coef[..., :1, None] * i + coef[..., 1:2, None] * j) / (4 * H) + 0.1 * coef[..., 2:, None]
    sigma = torch.tensor([0.01, 0.1, 0.3])
    noisy = plane + sigma[:, None, None, None] * torch.randn(B, C, H, W, generator=g)
    assert estimate.noise_level(plane).abs().max() < 1e-5
    torch.testing.assert_close(estimate.noise_level(noisy), sigma, rtol=0.05, atol=0.0)
    torch.testing.assert_close(estimate.noise_level(2 * noisy - 1), 2 * estimate.noise_level(noisy))
    with pytest.raises(ValueError, match=r"H, W >= 3, got shape \(1, 3, 2, 8\)"):
        estimate.noise_level(torch.zeros(1, 3, 2, 8))
