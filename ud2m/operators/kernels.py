"""Blur and anti-aliasing kernels (docs/method.md §2.2, §2.7) and their optical transfer functions.

Kernels are ``(B or 1, 1, k1, k2)`` float tensors that sum to 1. The tap ``(k1 // 2, k2 // 2)`` is the origin
for every kernel, odd or even, in ``A``, ``A_adjoint`` and the prox alike (deepinv's convention).
"""

from __future__ import annotations

import math

import torch


def as_kernel(kernel: torch.Tensor, *, normalize: bool = True, name: str = "kernel") -> torch.Tensor:
    """Validate a kernel and bring it to shape ``(B or 1, 1, k1, k2)``; normalise each kernel to sum 1.

    Raises:
        ValueError: wrong number of dims, more than one channel, NaN/Inf, or a sum that is not positive.
    """
    kernel = torch.as_tensor(kernel, dtype=torch.float32) if not torch.is_tensor(kernel) else kernel
    if kernel.ndim == 2:
        kernel = kernel[None, None]
    elif kernel.ndim == 3:
        kernel = kernel[:, None]
    if kernel.ndim != 4 or kernel.shape[1] != 1:
        raise ValueError(f"{name}: expected shape (k, k), (B, k, k) or (B, 1, k, k), got {tuple(kernel.shape)}")
    if not torch.isfinite(kernel).all():
        raise ValueError(f"{name}: contains NaN/Inf")
    sums = kernel.sum(dim=(-2, -1))
    if not bool((sums > 0).all()):
        raise ValueError(f"{name}: every kernel must sum to a positive value, got sums {sums.flatten().tolist()}")
    return kernel / sums[..., None, None] if normalize else kernel


def kernel_to_otf(kernel: torch.Tensor, size: tuple[int, int], *, onesided: bool = True) -> torch.Tensor:
    r"""Optical transfer function :math:`\hat h = F(\tilde h)` of a kernel for circular convolution on ``size``.

    :math:`\tilde h` is the kernel zero-padded to ``size`` and circularly shifted so that tap
    ``(k1 // 2, k2 // 2)`` sits at the origin.

    Args:
        kernel: ``(B, 1, k1, k2)``.
        size: image size ``(H, W)``.
        onesided: return the rfft2 half spectrum ``(B, 1, H, W // 2 + 1)`` instead of the full ``fft2``.
    """
    H, W = size
    k1, k2 = kernel.shape[-2:]
    if k1 > H or k2 > W:
        raise ValueError(f"kernel of size {k1}x{k2} is larger than the image {H}x{W}")
    padded = torch.zeros(*kernel.shape[:-2], H, W, dtype=kernel.dtype, device=kernel.device)
    padded[..., :k1, :k2] = kernel
    padded = torch.roll(padded, shifts=(-(k1 // 2), -(k2 // 2)), dims=(-2, -1))
    return torch.fft.rfft2(padded) if onesided else torch.fft.fft2(padded)


class OTFCache:
    """A small cache of optical transfer functions keyed by everything that determines them.

    The key holds the image size, dtype, device, half/full spectrum, the kernel's storage and version counter (so an
    in-place edit or ``.to()`` of the kernel invalidates it) and whether inference mode is on (inference tensors must
    not enter autograd graphs later). At most ``max_entries`` spectra are kept.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, torch.Tensor] = {}

    def __call__(self, kernel: torch.Tensor, size: tuple[int, int], dtype: torch.dtype, onesided: bool) -> torch.Tensor:
        """``kernel_to_otf(kernel.to(dtype), size, onesided=onesided)``, computed once per key."""
        if kernel.requires_grad or kernel.is_inference():
            # a learnable kernel: keep the graph; a kernel created under inference_mode has no version counter, so
            # an in-place edit could not be detected: compute the spectrum every call
            return kernel_to_otf(kernel.to(dtype), size, onesided=onesided)
        key = (tuple(size), dtype, kernel.device, onesided, kernel.data_ptr(), kernel._version)
        key += (torch.is_inference_mode_enabled(),)
        otf = self._entries.get(key)
        if otf is None:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            otf = self._entries[key] = kernel_to_otf(kernel.to(dtype), size, onesided=onesided)
        return otf


def gaussian_kernel(
    sigma: float | tuple[float, float],
    size: int | None = None,
    *,
    angle: float = 0.0,
) -> torch.Tensor:
    r"""Gaussian kernel :math:`\propto \exp(-\tfrac12 r^\top \Sigma^{-1} r)`, sum 1, shape ``(1, 1, k, k)``.

    ``sigma`` is a std in pixels, or ``(sigma_1, sigma_2)`` along axes rotated by ``angle`` (radians).
    Default size: ``2 * floor(max(sigma) / 0.3 + 1) + 1`` (LATINO-PRO / deepinv rule; 43 for sigma 6).
    """
    s1, s2 = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    if min(s1, s2) <= 0:
        raise ValueError(f"gaussian_kernel: sigma must be positive, got {sigma}")
    if size is None:
        size = 2 * int(max(s1, s2) / 0.3 + 1) + 1
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2))
    return (k / k.sum()).float()[None, None]


def box_kernel(size: int) -> torch.Tensor:
    """Uniform ``size x size`` kernel with taps ``1 / size**2``, shape ``(1, 1, size, size)``."""
    return torch.full((1, 1, size, size), 1.0 / size**2)


def average_pool_kernel(factor: int) -> torch.Tensor:
    """Kernel that makes "blur then take every ``factor``-th pixel" equal ``avg_pool2d(x, factor)`` exactly.

    A ``(2 s - 1)``-tap kernel whose first ``s`` taps are ``1/s`` per axis: with the origin at tap ``s - 1``,
    output pixel ``s i`` averages input pixels ``s i .. s i + s - 1``.
    """
    k = torch.zeros(2 * factor - 1)
    k[:factor] = 1.0 / factor
    return torch.outer(k, k)[None, None]


def cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (-0.5: Catmull-Rom, MATLAB ``imresize``)."""
    t = t.abs()
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_kernel(factor: int) -> torch.Tensor:
    """Separable bicubic anti-aliasing kernel for ``factor``-fold downsampling: ``4 * factor`` taps at
    ``(k + 1/2) / factor``, Keys a = -0.5, sum 1, shape ``(1, 1, 4s, 4s)`` (§2.8)."""
    t = (torch.arange(4 * factor, dtype=torch.float64) - 2 * factor + 0.5) / factor
    w = cubic(t)
    w = w / w.sum()
    return torch.outer(w, w).float()[None, None]
