r"""Classical blind estimates of a degradation from the measurement alone (docs/method.md §13.11, docs/blind.md).

The single-image methods a blind solver has to beat, on [0, 1] images ``(B, C, H, W)``, batched, per sample, with
no randomness and no network:

* **haze**: the dark channel prior (He, Sun & Tang, CVPR 2009, "Single image haze removal using dark channel
  prior"): in haze-free patches some channel is nearly black, so the patch minimum of I/A measures the haze,
  :math:`\tilde t = 1 - \omega\,\min_{\text{patch}}\min_c I_c/A_c`; the airlight A is the mean colour of the
  brightest 1 % of the dark channel; :func:`dehaze` inverts :math:`I = Jt + A(1 - t)`.
* **low light**: a grey-world exposure with a display gamma: :math:`y = g\,x^{\gamma_0}` with
  :math:`\gamma_0` = 2.2 (sRGB's display gamma) and g chosen so that the inverse :math:`(y/g)^{1/\gamma_0}`
  (:func:`brighten`) has mean ``mean_level`` (0.45, mid-grey).
* **noise**: the noise level σ of additive white Gaussian noise (Immerkær, CVIU 1996, "Fast noise variance
  estimation"): the 3×3 mask N = L₁ − L₂ of two Laplacians annihilates every locally planar image, so on noise
  alone N∗y has standard deviation 6σ (‖N‖₂ = 6) and :math:`\hat\sigma = \sqrt{\pi/2}\,\overline{|N * y|}/6`
  (:func:`noise_level`); image texture adds a small positive bias.

``benchmarks/blind.py`` scores them as the rows "dark channel prior" and "grey-world exposure". Used as the start of
LD-RPS's physical ψ they did not help (the paired fit washes the start out; measured in docs/method.md §13.11).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

DCP_PATCH = 7  # at 64² (He et al.: 15 px on ~600 px images); 5-9 scored within 0.7 dB on the training crops
DCP_OMEGA = 0.8  # fraction of the haze removed (He et al.: 0.95, which scored lower on our training crops)
DCP_T_MIN = 0.1  # lower bound of the transmission (He et al.)
DCP_TOP = 0.01  # fraction of pixels (brightest dark channel) whose mean colour is the airlight
DISPLAY_GAMMA = 2.2
MID_GREY = 0.45


class HazeEstimate(NamedTuple):
    """``transmission`` ``(B, 1, H, W)`` in [t_min, 1] and ``airlight`` ``(B, C)`` in (0, 1]."""

    transmission: torch.Tensor
    airlight: torch.Tensor


def dark_channel(x01: torch.Tensor, patch: int = DCP_PATCH) -> torch.Tensor:
    """Minimum over the channels and a ``patch``×``patch`` window (same size, borders use the window inside the
    image), ``(B, 1, H, W)``."""
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"dark_channel: patch must be an odd integer >= 1, got {patch}")
    m = x01.amin(1, keepdim=True)
    return -F.max_pool2d(-m, patch, stride=1, padding=patch // 2)  # max_pool2d pads with -inf: a min inside


def estimate_haze(
    y01: torch.Tensor, *, patch: int = DCP_PATCH, omega: float = DCP_OMEGA, t_min: float = DCP_T_MIN
) -> HazeEstimate:
    r"""Dark-channel-prior transmission and airlight of hazy images ``y01`` (module docstring)."""
    if y01.ndim != 4:
        raise ValueError(f"estimate_haze: expected (B, C, H, W) images on [0, 1], got shape {tuple(y01.shape)}")
    B, C, H, W = y01.shape
    dark = dark_channel(y01, patch).flatten(1)  # (B, H·W)
    k = max(1, round(DCP_TOP * H * W))
    brightest = dark.topk(k, dim=1).indices  # (B, k)
    airlight = y01.flatten(2).gather(2, brightest[:, None].expand(B, C, k)).mean(2).clamp(1e-3, 1.0)  # (B, C)
    normalised = y01 / airlight[:, :, None, None]
    transmission = (1 - omega * dark_channel(normalised, patch)).clamp(t_min, 1.0)
    return HazeEstimate(transmission, airlight)


def dehaze(y01: torch.Tensor, estimate: HazeEstimate) -> torch.Tensor:
    r"""Inverse of the scattering model :math:`I = J t + A(1 - t)`: :math:`J = (I - A(1 - t))/t` (unclamped)."""
    t, a = estimate.transmission, estimate.airlight[:, :, None, None]
    return (y01 - a * (1 - t)) / t


def estimate_exposure(
    y01: torch.Tensor, *, gamma: float = DISPLAY_GAMMA, mean_level: float = MID_GREY, floor: float = 1e-3
) -> torch.Tensor:
    r"""Gain g ``(B,)`` of :math:`\psi(u) = g\,u^{\gamma}` such that the inverse :math:`(y/g)^{1/\gamma}` has mean
    ``mean_level``: :math:`g = (\overline{y^{1/\gamma}}/m)^{\gamma}` (grey world, one gain for every channel)."""
    if not gamma > 0 or not 0 < mean_level < 1:
        raise ValueError(f"estimate_exposure: expected gamma > 0 and 0 < mean_level < 1, got {gamma}, {mean_level}")
    root_mean = y01.clamp(min=floor).pow(1 / gamma).flatten(1).mean(1)
    return (root_mean / mean_level).pow(gamma)


def brighten(y01: torch.Tensor, gain: torch.Tensor, *, gamma: float = DISPLAY_GAMMA, floor: float = 1e-3):
    r"""Inverse of the tone curve :math:`u = (y/g)^{1/\gamma}` (unclamped above)."""
    return (y01.clamp(min=floor) / gain.reshape(-1, *([1] * (y01.ndim - 1)))).pow(1 / gamma)


IMMERKAER_MASK = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))  # ‖N‖₂ = 6


def noise_level(y: torch.Tensor) -> torch.Tensor:
    r"""Immerkær's estimate of the standard deviation of additive white Gaussian noise in ``y`` ``(B, C, H, W)``
    (module docstring), ``(B,)``: the mean over channels of :math:`\sqrt{\pi/2}\,\overline{|N * y_c|}/6` over
    the valid (H−2)×(W−2) positions. Linear in the scale: the σ of ``2y − 1`` is twice that of ``y``."""
    if y.ndim != 4 or min(y.shape[-2:]) < 3:
        raise ValueError(f"noise_level: expected (B, C, H, W) images with H, W >= 3, got shape {tuple(y.shape)}")
    B, C, H, W = y.shape
    mask = torch.tensor(IMMERKAER_MASK, dtype=y.dtype, device=y.device)[None, None]
    response = F.conv2d(y.reshape(B * C, 1, H, W), mask).abs().flatten(1).mean(1)  # (B·C,)
    return (math.sqrt(math.pi / 2) / 6 * response).view(B, C).mean(1)


__all__ = [
    "HazeEstimate",
    "brighten",
    "dark_channel",
    "dehaze",
    "estimate_exposure",
    "estimate_haze",
    "noise_level",
]
