r"""Image and video restoration metrics (algorithms.md §10.1, §10.2) and posterior-sample statistics (§8).

PSNR and SSIM (Wang et al., 2004) are computed per image on [0, 1] after clamping, from library images on [-1, 1];
videos ``(B, C, T, H, W)`` are scored per frame and averaged, plus a clip-global PSNR. The data-consistency ratio
:math:`r = \|A\hat x - y\| / (\sqrt m\,\sigma_n)` replaces the reference's "OBS-PSNR". LPIPS is only reported with a
real (pretrained) backbone, whose name is recorded. :class:`Welford` accumulates pixelwise posterior mean and
unbiased std over samples. Every function returns per-image values ``(B,)``; callers average.

Metrics take operators duck-typed (``A``, ``num_observed``) and never import solvers.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ud2m.losses import make_lpips
from ud2m.utils import Welford, batch_scalar  # Welford lives in utils so solvers can use it too

# ------------------------------------------------------------------------------------------------ PSNR / SSIM


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, float64 (metrics accumulate in fp64)."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B*T, C, H, W)``; images pass through."""
    if x.ndim == 5:
        return x.transpose(1, 2).flatten(0, 1)
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W) or videos (B, C, T, H, W), got shape {tuple(x.shape)}")
    return x


def _per_frame(fn, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply an image metric per frame and average over frames for videos; ``(B,)``."""
    if x_hat.shape != x.shape:
        raise ValueError(f"metric: x_hat has shape {tuple(x_hat.shape)}, x has {tuple(x.shape)}")
    values = fn(_frames(x_hat), _frames(x))  # (B,) or (B*T,)
    return values.reshape(x.shape[0], -1).mean(1)


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mse = (_unit(x_hat) - _unit(x)).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(1 / mse.clamp_min(1e-20))).float()  # identical images: 200 dB, not inf


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Per-image PSNR :math:`10\log_{10}(1/\mathrm{MSE})` on [0, 1] after clamping; inputs on [-1, 1] (§10.1).

    Videos ``(B, C, T, H, W)`` give the mean of the per-frame PSNRs (see :func:`video_psnr_global`). Identical images
    give a large finite value (200 dB) instead of ``inf``.

    Returns:
        ``(B,)`` float32.
    """
    return _per_frame(_psnr, x_hat, x)


def video_psnr_global(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Clip-global PSNR of videos ``(B, C, T, H, W)``: one MSE over all frames (LVTINO reference's figure); ``(B,)``."""
    if x_hat.shape != x.shape or x.ndim != 5:
        raise ValueError(
            f"video_psnr_global: expected two (B, C, T, H, W) videos, got {tuple(x_hat.shape)}, {tuple(x.shape)}"
        )
    return _psnr(x_hat, x)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian window, float64 ``(size,)`` (the separable SSIM window)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def _ssim(x_hat: torch.Tensor, x: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    a, b = _unit(x_hat), _unit(x)
    B, C, H, W = a.shape
    if min(H, W) < size:
        raise ValueError(f"ssim: images must be at least {size}x{size}, got {H}x{W}")
    w = gaussian_window(size, sigma).to(a.device)
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1).flatten(0, 1).unsqueeze(1)  # (B*5C, 1, H, W)
    stack = F.conv2d(F.conv2d(stack, w.view(1, 1, size, 1)), w.view(1, 1, 1, size))  # valid: no border effects
    mu_a, mu_b, s_aa, s_bb, s_ab = stack.view(B, 5, C, *stack.shape[-2:]).unbind(1)
    var_a, var_b, cov = s_aa - mu_a**2, s_bb - mu_b**2, s_ab - mu_a * mu_b
    C1, C2 = 0.01**2, 0.03**2  # (k1 L)^2, (k2 L)^2 with data range L = 1
    S = (2 * mu_a * mu_b + C1) * (2 * cov + C2) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))
    return S.flatten(1).mean(1).float()  # mean over channels and valid pixels


def ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Per-image SSIM (Wang et al., 2004) on [0, 1] after clamping; inputs on [-1, 1] (§10.1).

    .. math:: \mathrm{SSIM} = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}{(\mu_a^2 + \mu_b^2 + C_1)
       (\sigma_a^2 + \sigma_b^2 + C_2)},\quad C_1 = (0.01)^2,\ C_2 = (0.03)^2,

    with 11×11 Gaussian (σ = 1.5) local moments (population covariance), averaged over the valid (unpadded) pixels and
    the channels; equal to ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``. Videos: per frame, averaged over frames.

    Returns:
        ``(B,)`` float32.
    """
    return _per_frame(_ssim, x_hat, x)


# ------------------------------------------------------------------------------------------------ data consistency


def data_consistency(op, x_hat: torch.Tensor, y: torch.Tensor, sigma_n: float | torch.Tensor) -> torch.Tensor:
    r"""Data-consistency ratio :math:`r = \|A\hat x - y\| / (\sqrt m\,\sigma_n)` (§10.1); ≈ 1 for a consistent estimate.

    For :math:`y = Ax + \sigma_n n`, :math:`r^2 m` at the true ``x`` is :math:`\chi^2_m`, so :math:`r^2` has mean 1
    and std :math:`\sqrt{2/m}`.

    Args:
        op: any operator with ``A(x)`` and ``num_observed(y) -> (B,)`` (missing entries of ``A x`` and ``y`` are 0).
        x_hat: estimate on [-1, 1].
        y: measurement on the internal scale.
        sigma_n: internal noise std (``sigma_internal(sigma_y)``), a float or ``(B,)``.

    Returns:
        ``(B,)`` float32.
    """
    residual = (op.A(x_hat).double() - y.double()).flatten(1)  # (B, m_total)
    m = op.num_observed(y).double()  # (B,)
    sigma_n = batch_scalar(sigma_n, y.shape[0], device=y.device, dtype=torch.float64, name="sigma_n")
    return (residual.norm(dim=1) / (m.sqrt() * sigma_n)).float()


# ------------------------------------------------------------------------------------------------ LPIPS


class LPIPSMetric(nn.Module):
    """LPIPS per image with a real (pretrained) backbone only (§10.2); inputs on [-1, 1], clamped.

    The backbone comes from :func:`ud2m.losses.make_lpips` (torchvision cache or a local ``weights`` path; no
    network). A module built elsewhere may be passed as ``perceptual``; one with ``random_backbone = True`` is refused.
    Grayscale is repeated to 3 channels; videos are scored per frame and averaged.

    Args:
        net: ``"vgg"`` (default), ``"alex"`` or ``"squeeze"`` (UD2M-table parity).
        weights: optional local path of the torchvision backbone state dict.
        perceptual: optional prebuilt :class:`ud2m.losses.Perceptual`.

    Attributes:
        backbone: the backbone name, to record with every result.
    """

    def __init__(
        self, net: str = "vgg", weights: str | os.PathLike | None = None, perceptual: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.perceptual = make_lpips(net, weights) if perceptual is None else perceptual
        self.backbone = getattr(self.perceptual, "backbone", net)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """LPIPS ``(B,)`` float32; raises ``RuntimeError`` for a random backbone."""
        if getattr(self.perceptual, "random_backbone", False):
            raise RuntimeError(
                f"LPIPSMetric: the {self.backbone} backbone is random; random-backbone LPIPS is never reported "
                "(provide the torchvision weights, see ud2m.losses.make_lpips)"
            )
        return _per_frame(self._lpips, x_hat, x)

    def _lpips(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b = x_hat.float().clamp(-1, 1), x.float().clamp(-1, 1)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        with torch.autocast(device_type=a.device.type, enabled=False):
            return self.perceptual(a, b).reshape(a.shape[0])


# ------------------------------------------------------------------------------------------------ Welford


__all__ = [
    "LPIPSMetric",
    "Welford",
    "data_consistency",
    "gaussian_window",
    "psnr",
    "ssim",
    "video_psnr_global",
]
