"""Super-resolution: anti-aliasing filter then s-fold decimation ``x[..., ::s, ::s]`` (docs/method.md §2.2).

With circular padding the prox is the exact decimation-aware Fourier solution (Zhao et al. 2016, USRNet),
two FFTs and differentiable; with reflect padding (paper presets) the prox goes through CG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ud2m.operators.base import LinearOperator
from ud2m.operators.blur import check_batch, check_image_batch
from ud2m.operators.kernels import (
    OTFCache,
    as_kernel,
    average_pool_kernel,
    bicubic_kernel,
    gaussian_kernel,
)
from ud2m.utils import append_dims, broadcast_eps

PADDINGS = ("circular", "reflect")


def sr_filter(
    factor: int,
    filter: str | torch.Tensor,
    gaussian_sigma: float | None = None,
    gaussian_size: int | None = None,
) -> torch.Tensor:
    """Anti-aliasing kernel: ``"bicubic"`` (4s taps), ``"box"`` (exact average pooling), ``"gaussian"``
    (std ``gaussian_sigma``, default ``factor`` as in deepinv; size ``gaussian_size``) or a user kernel tensor."""
    if torch.is_tensor(filter):
        return as_kernel(filter, name="SR filter")
    if filter == "bicubic":
        return bicubic_kernel(factor)
    if filter == "box":
        return average_pool_kernel(factor)
    if filter == "gaussian":
        return gaussian_kernel(float(factor if gaussian_sigma is None else gaussian_sigma), gaussian_size)
    raise ValueError(f"SuperResolution: filter must be 'bicubic', 'box', 'gaussian' or a tensor, got {filter!r}")


def mean_blocks(X: torch.Tensor, s: int) -> torch.Tensor:
    """Average the s x s blocks of an ``(..., H, W)`` spectrum: ``(..., H/s, W/s)`` (F(Sx) = mean_b(Fx))."""
    H, W = X.shape[-2:]
    return X.reshape(*X.shape[:-2], s, H // s, s, W // s).mean(dim=(-4, -2))


def blocks(X: torch.Tensor, s: int) -> torch.Tensor:
    """View an ``(..., H, W)`` spectrum as ``(..., s, H/s, s, W/s)``: block (i, j) holds frequencies
    ``(k1 + i H/s, k2 + j W/s)``."""
    H, W = X.shape[-2:]
    return X.reshape(*X.shape[:-2], s, H // s, s, W // s)


def tile_blocks(X: torch.Tensor, s: int) -> torch.Tensor:
    """Repeat an ``(..., h, w)`` spectrum s x s times (F(S^T u) = tile(F u))."""
    return X.repeat(*([1] * (X.ndim - 2)), s, s)


def reflect_pad_adjoint(g: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Adjoint of ``F.pad(x, pad, mode="reflect")`` on the last two dims; ``pad = (left, right, top, bottom)``."""
    left, right, top, bottom = pad
    g = _reflect_adjoint_1d(g, left, right, dim=-1)
    return _reflect_adjoint_1d(g, top, bottom, dim=-2)


def _reflect_adjoint_1d(g: torch.Tensor, left: int, right: int, dim: int) -> torch.Tensor:
    n = g.shape[dim] - left - right
    core = g.narrow(dim, left, n).clone()
    if left:
        # padded[i] = x[left - i] for i < left
        core.narrow(dim, 1, left).add_(g.narrow(dim, 0, left).flip(dim))
    if right:
        # padded[left + n + j] = x[n - 2 - j] for j < right
        core.narrow(dim, n - 1 - right, right).add_(g.narrow(dim, left + n, right).flip(dim))
    return core


class SuperResolution(LinearOperator):
    r"""Blur with an anti-aliasing filter, then keep every ``factor``-th pixel: :math:`A = S\,H`.

    Args:
        factor: decimation factor s (2, 4, 8, 16, 32, ...); H and W must be divisible by it.
        filter: ``"bicubic"``, ``"box"``, ``"gaussian"`` or a kernel tensor (one per sample or shared).
        padding: ``"circular"`` (exact closed-form prox) or ``"reflect"`` (paper presets; CG prox).
        gaussian_sigma: std of the ``"gaussian"`` filter (default ``factor``).
        gaussian_size: size of the ``"gaussian"`` filter (default ``2 * floor(sigma / 0.3 + 1) + 1``).
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(
        self,
        factor: int,
        filter: str | torch.Tensor = "bicubic",
        *,
        padding: str = "circular",
        gaussian_sigma: float | None = None,
        gaussian_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"SuperResolution: factor must be a positive integer, got {factor}")
        if padding not in PADDINGS:
            raise ValueError(f"SuperResolution: padding must be one of {PADDINGS}, got {padding!r}")
        self.factor = int(factor)
        self.padding = padding
        self.register_buffer("kernel", sr_filter(self.factor, filter, gaussian_sigma, gaussian_size))
        self._otf_cache = OTFCache()

    # ------------------------------------------------------------------ checks and helpers
    def _check(self, x: torch.Tensor) -> None:
        check_image_batch(x, self)
        check_batch(self.kernel.shape[0], x.shape[0], self, "filter")
        H, W = x.shape[-2:]
        s = self.factor
        if H % s or W % s:
            raise ValueError(f"SuperResolution: image size {H}x{W} is not divisible by the SR factor {s}")

    def _otf(self, size: tuple[int, int], dtype: torch.dtype, *, onesided: bool = True) -> torch.Tensor:
        return self._otf_cache(self.kernel, tuple(size), dtype, onesided)

    def _grouped_weight(self, B: int, C: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """Flipped kernels as a grouped-conv weight, for inputs reshaped to ``(1, B*C, H, W)``."""
        w = self.kernel.to(dtype).flip(-2, -1).expand(B, -1, -1, -1)
        return w.repeat_interleave(C, dim=0), B * C

    def _pad(self) -> tuple[int, int, int, int]:
        k1, k2 = self.kernel.shape[-2:]
        return (k2 - 1 - k2 // 2, k2 // 2, k1 - 1 - k1 // 2, k1 // 2)

    # ------------------------------------------------------------------ the map
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`S(h \\circledast x)`, ``(B, C, H, W) -> (B, C, H/s, W/s)``."""
        self._check(x)
        s = self.factor
        if self.padding == "circular":
            blurred = torch.fft.irfft2(torch.fft.rfft2(x) * self._otf(x.shape[-2:], x.dtype), s=x.shape[-2:])
            return blurred[..., ::s, ::s]
        B, C, H, W = x.shape
        pad = self._pad()
        if max(pad[:2]) >= W or max(pad[2:]) >= H:
            raise ValueError(f"SuperResolution: reflect padding {pad} needs an image larger than {H}x{W}")
        w, groups = self._grouped_weight(B, C, x.dtype)
        xp = F.pad(x.reshape(1, B * C, H, W), pad, mode="reflect")
        return F.conv2d(xp, w, stride=s, groups=groups).reshape(B, C, H // s, W // s)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Exact adjoint: zero-filling upsampling then correlation (circular) or transposed conv (reflect)."""
        check_image_batch(y, self)
        B, C, h, w = y.shape
        s = self.factor
        H, W = h * s, w * s
        if self.padding == "circular":
            up = torch.zeros(B, C, H, W, dtype=y.dtype, device=y.device)
            up[..., ::s, ::s] = y
            return torch.fft.irfft2(torch.fft.rfft2(up) * self._otf((H, W), y.dtype).conj(), s=(H, W))
        weight, groups = self._grouped_weight(B, C, y.dtype)
        g = F.conv_transpose2d(y.reshape(1, B * C, h, w), weight, stride=s, groups=groups, output_padding=s - 1)
        return reflect_pad_adjoint(g, self._pad()).reshape(B, C, H, W)

    # ------------------------------------------------------------------ closed forms (circular only)
    def has_closed_form_prox(self) -> bool:
        """Circular padding only; reflect padding goes through CG."""
        return self.padding == "circular"

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r"""Exact decimation-aware prox (Woodbury on :math:`I + \gamma A^\top A`), circular padding.

        With :math:`x = r - \gamma A^\top(I + \gamma AA^\top)^{-1}A r`, :math:`r = z + \gamma A^\top y`, rewritten as
        :math:`x = z + A^\top \gamma (I + \gamma AA^\top)^{-1}(y - Az)` so that large :math:`\gamma` does not cancel
        two :math:`O(\gamma)` terms in fp32 (:math:`AA^\top` is diagonal in the LR Fourier basis):

        .. math:: \hat x = \hat z + \bar{\hat h}\,\mathrm{tile}\Big(
                  \frac{\gamma(\hat y - \mathrm{mean}_b(\hat h\hat z))}{1 + \gamma\,\mathrm{mean}_b(|\hat h|^2)}\Big)
        """
        if self.padding != "circular":
            return self.prox_l2_cg(z, y, gamma)
        self._check(z)
        s = self.factor
        H, W = z.shape[-2:]
        h = blocks(self._otf((H, W), z.dtype, onesided=False), s)  # (B|1, 1, s, H/s, s, W/s)
        Z = torch.fft.fft2(z)
        g = append_dims(gamma, z.ndim)
        # F(Az) = mean_b(ĥ ẑ); tile() and the s x s block split are views, never materialised
        residual = torch.fft.fft2(y) - (h * blocks(Z, s)).mean(dim=(-4, -2))
        U = g * residual / (1 + g * (h.abs() ** 2).mean(dim=(-4, -2)))
        X = Z + (h.conj() * U[..., None, :, None, :]).reshape(Z.shape)
        return torch.fft.ifft2(X).real

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        r""":math:`A^\top(AA^\top + \epsilon I)^{-1} y = F^{-1}[\bar{\hat h}\,\mathrm{tile}(\hat y / (\mathrm{mean}_b
        |\hat h|^2 + \epsilon))]` for circular padding; CG otherwise."""
        if self.padding != "circular":
            return super().A_dagger(y, eps)
        s = self.factor
        H, W = y.shape[-2] * s, y.shape[-1] * s
        h = self._otf((H, W), y.dtype, onesided=False)
        den = mean_blocks(h.abs() ** 2, s) + broadcast_eps(eps, y)
        Y = torch.where(den > 0, torch.fft.fft2(y) / den.clamp_min(1e-30), torch.zeros_like(den, dtype=h.dtype))
        return torch.fft.ifft2(h.conj() * tile_blocks(Y, s)).real

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.padding != "circular":
            return super()._project(z, y)
        return z + self.A_dagger(y - self.A(z), eps=0.0)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Bilinear upsampling of ``y`` to the image size (UD2M discriminator conditioning) [ref]."""
        return F.interpolate(y, scale_factor=self.factor, mode="bilinear", align_corners=False)
