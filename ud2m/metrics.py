r"""Image and video restoration metrics (docs/method.md §10.1, §10.2), distribution metrics in an embedding space
(Fréchet distance, conditional W2 / CFID, coverage: §10.3, §10.4) and posterior-sample statistics (§8).

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

from ud2m.perceptual import make_lpips
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


def flicker(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""Temporal flicker of the error of videos ``(B, C, T, H, W)`` (issue [video], docs/video.md §5):
    :math:`\operatorname{mean}|e_{t+1} - e_t|` over pixels, channels and the T - 1 frame pairs, with
    :math:`e_t = \hat x_t - x_t` on [0, 1] (``x_hat`` clamped): 0 for an error constant in time, so it measures the
    temporal inconsistency of the restoration, not the motion of the clip; ``(B,)``, as a fraction of the range."""
    if x_hat.shape != x.shape or x.ndim != 5:
        raise ValueError(f"flicker: expected two (B, C, T, H, W) videos, got {tuple(x_hat.shape)}, {tuple(x.shape)}")
    e = (x_hat.clamp(-1, 1) - x) / 2
    return (e[:, :, 1:] - e[:, :, :-1]).abs().flatten(1).mean(1)


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

    The backbone comes from :func:`ud2m.perceptual.make_lpips` (torchvision cache or a local ``weights`` path; no
    network). A module built elsewhere may be passed as ``perceptual``; one with ``random_backbone = True`` is refused.
    Grayscale is repeated to 3 channels; videos are scored per frame and averaged.

    Args:
        net: ``"vgg"`` (default), ``"alex"`` or ``"squeeze"`` (UD2M-table parity).
        weights: optional local path of the torchvision backbone state dict.
        perceptual: optional prebuilt :class:`ud2m.perceptual.Perceptual`.

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
                "(provide the torchvision weights, see ud2m.perceptual.make_lpips)"
            )
        return _per_frame(self._lpips, x_hat, x)

    def _lpips(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b = x_hat.float().clamp(-1, 1), x.float().clamp(-1, 1)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        with torch.autocast(device_type=a.device.type, enabled=False):
            return self.perceptual(a, b).reshape(a.shape[0])


# ------------------------------------------------------------------------------------------------ distribution metrics


def _moments(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Centred cross-covariance (1/(n − 1)) Σ (a_i − m_a)(b_i − m_b)ᵀ in fp64 (§10.3)."""
    a = a.double() - a.double().mean(0)
    b = a if b is None else b.double() - b.double().mean(0)
    return a.T @ b / (a.shape[0] - 1)


def sqrtm_psd(C: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0; fp64)."""
    C = 0.5 * (C + C.T)
    w, V = torch.linalg.eigh(C.double())
    return (V * w.clamp_min(0).sqrt()) @ V.T


def bures(C1: torch.Tensor, C2: torch.Tensor) -> torch.Tensor:
    r"""tr C₁ + tr C₂ − 2 tr (C₁^{1/2} C₂ C₁^{1/2})^{1/2}: the covariance part of W2² between Gaussians."""
    r = sqrtm_psd(C1)
    return torch.trace(C1) + torch.trace(C2) - 2 * torch.trace(sqrtm_psd(r @ C2.double() @ r))


def frechet_distance(e_a: torch.Tensor, e_b: torch.Tensor) -> float:
    r"""FID-type distance ‖m_a − m_b‖² + Bures(C_a, C_b) between two embedding sets ``(n, d)`` (the squared W2 of
    their Gaussian fits, §10.3 "FID in the same space")."""
    if e_a.ndim != 2 or e_b.ndim != 2 or e_a.shape[1] != e_b.shape[1] or min(len(e_a), len(e_b)) < 2:
        raise ValueError(f"frechet_distance: expected two (n >= 2, d) sets, got {tuple(e_a.shape)}, {tuple(e_b.shape)}")
    m = e_a.double().mean(0) - e_b.double().mean(0)
    return float(m @ m + bures(_moments(e_a), _moments(e_b)))


def cfid(e_x: torch.Tensor, e_x_hat: torch.Tensor, e_y: torch.Tensor) -> float:
    r"""Conditional Fréchet distance (CFID, §10.3) with centred moments, in fp64.

    .. math::
        \mathrm{CFID} = \|m_x - m_{\hat x}\|^2 + \operatorname{tr}[(C_{xy} - C_{\hat xy}) C_{yy}^+ (C_{xy} -
        C_{\hat xy})^\top] + \mathrm{Bures}(C_{x|y}, C_{\hat x|y}),\quad C_{x|y} = C_{xx} - C_{xy} C_{yy}^+ C_{xy}^\top

    For jointly Gaussian (x, y) and (x̂, y) this is E_y W2²(p(x | y), p(x̂ | y)): the first two terms are the mean
    squared distance between the two conditional means (linear in y), the last the distance of the conditional
    covariances (constant in y). With S samples per observation, pass each sample with a repeated (x, y).

    Args:
        e_x, e_x_hat, e_y: ``(n, d_x)``, ``(n, d_x)``, ``(n, d_y)`` paired embeddings of ground truth, estimate and
            observation.
    """
    if not e_x.shape == e_x_hat.shape or e_x.ndim != 2 or e_y.ndim != 2 or e_x.shape[0] != e_y.shape[0] or len(e_x) < 2:
        raise ValueError(f"cfid: expected (n, d) pairs, got {tuple(e_x.shape)}, {tuple(e_x_hat.shape)}, "
                         f"{tuple(e_y.shape)}")  # fmt: skip
    C_yy_pinv = torch.linalg.pinv(_moments(e_y), hermitian=True)
    C_xy, C_hy = _moments(e_x, e_y), _moments(e_x_hat, e_y)
    C_x_y = _moments(e_x) - C_xy @ C_yy_pinv @ C_xy.T
    C_h_y = _moments(e_x_hat) - C_hy @ C_yy_pinv @ C_hy.T
    m = e_x.double().mean(0) - e_x_hat.double().mean(0)
    D = C_xy - C_hy
    return float(m @ m + torch.trace(D @ C_yy_pinv @ D.T) + bures(C_x_y, C_h_y))


def coverage(e_samples: torch.Tensor, e_x: torch.Tensor, alphas: torch.Tensor | None = None) -> dict:
    r"""Coverage of posterior samples in an embedding space (§10.4).

    For each observation with S sample embeddings e_s: ē = mean_s e_s, d_s = ‖e_s − ē‖, r_α = α-quantile of {d_s}
    (linear interpolation); covered at level α iff ‖e_x − ē‖ ≤ r_α. A calibrated sampler gives Coverage(α) ≈ α.

    Args:
        e_samples: ``(N, S, d)`` sample embeddings per observation.
        e_x: ``(N, d)`` embeddings of the ground truths.
        alphas: levels (default 0.01, 0.02, ..., 1.00).

    Returns:
        ``{"alpha": [...], "coverage": [...], "calibration_error": mean_α |Coverage(α) − α|}``.
    """
    if e_samples.ndim != 3 or e_x.shape != (e_samples.shape[0], e_samples.shape[2]):
        raise ValueError(f"coverage: expected (N, S, d) samples and (N, d) truths, got {tuple(e_samples.shape)}, "
                         f"{tuple(e_x.shape)}")  # fmt: skip
    alphas = torch.arange(1, 101, dtype=torch.float64) / 100 if alphas is None else alphas.double().reshape(-1)
    alphas = alphas.to(e_samples.device)  # quantile's levels live beside its input
    center = e_samples.double().mean(1, keepdim=True)  # (N, 1, d)
    d_s = (e_samples.double() - center).norm(dim=2)  # (N, S)
    r = torch.quantile(d_s, alphas, dim=1)  # (A, N)
    covered = ((e_x.double() - center[:, 0]).norm(dim=1) <= r).double().mean(1)  # (A,)
    return {
        "alpha": alphas.tolist(),
        "coverage": covered.tolist(),
        "calibration_error": float((covered - alphas).abs().mean()),
    }


# ------------------------------------------------------------------------------------------------ Welford


__all__ = [
    "LPIPSMetric",
    "Welford",
    "bures",
    "cfid",
    "coverage",
    "data_consistency",
    "flicker",
    "frechet_distance",
    "gaussian_window",
    "psnr",
    "sqrtm_psd",
    "ssim",
    "video_psnr_global",
]
