r"""Circular (FFT) blur operators with the exact Fourier-domain prox (docs/method.md §2.2).

:math:`A x = F^{-1}(\hat h \cdot F x)`; each sample of a batch may carry its own kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ud2m.operators.base import LinearOperator
from ud2m.operators.kernels import OTFCache, as_kernel, box_kernel, gaussian_kernel
from ud2m.utils import append_dims, broadcast_eps


def check_image_batch(x: torch.Tensor, op: object, *, ndim: int = 4) -> None:
    """Raise a clear error unless ``x`` is a ``(B, C, H, W)`` batch (or ``ndim`` dims)."""
    if x.ndim != ndim:
        layout = "(B, C, H, W)" if ndim == 4 else "(B, C, T, H, W)"
        raise ValueError(f"{type(op).__name__}: expected a {ndim}-D batch {layout}, got shape {tuple(x.shape)}")


def check_batch(n_params: int, batch: int, op: object, what: str) -> None:
    """Per-sample parameters must number 1 or B."""
    if n_params not in (1, batch):
        raise ValueError(f"{type(op).__name__}: {n_params} {what}s for a batch of {batch} (expected 1 or {batch})")


class KernelBlur(LinearOperator):
    r"""Circular convolution with a user kernel (one per sample or shared).

    Args:
        kernel: ``(k, k)``, ``(B, k, k)`` or ``(B, 1, k, k)`` tensor, or a path to a ``.npy``/``.pt``/image file.
        normalize: rescale each kernel to sum 1 (a kernel whose sum is not positive is an error).
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(self, kernel: torch.Tensor | str, *, normalize: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(kernel, (str, Path)):
            kernel = load_kernel(kernel)
        self.register_buffer("kernel", as_kernel(kernel, normalize=normalize))
        self._otf_cache = OTFCache()

    def otf(self, x: torch.Tensor) -> torch.Tensor:
        """Half-spectrum OTF ``(B or 1, 1, H, W // 2 + 1)`` matched to ``x``'s size and dtype."""
        check_image_batch(x, self)
        check_batch(self.kernel.shape[0], x.shape[0], self, "kernel")
        return self._otf_cache(self.kernel, tuple(x.shape[-2:]), x.dtype, onesided=True)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Circular convolution :math:`F^{-1}(\\hat h F x)`."""
        return torch.fft.irfft2(torch.fft.rfft2(x) * self.otf(x), s=x.shape[-2:])

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Circular correlation :math:`F^{-1}(\\overline{\\hat h} F y)`."""
        return torch.fft.irfft2(torch.fft.rfft2(y) * self.otf(y).conj(), s=y.shape[-2:])

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r"""Closed form :math:`F^{-1}[(\hat z + \gamma \bar{\hat h} \hat y) / (1 + \gamma |\hat h|^2)]`."""
        h = self.otf(z)
        g = append_dims(gamma, z.ndim)
        num = torch.fft.rfft2(z) + g * h.conj() * torch.fft.rfft2(y)
        return torch.fft.irfft2(num / (1 + g * h.abs() ** 2), s=z.shape[-2:])

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Projection onto :math:`\{Ax = y\}` (pseudo-inverse on frequencies where :math:`\hat h = 0`)."""
        return z + self.A_dagger(y - self.A(z), eps=0.0)

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        r"""Wiener pseudo-inverse :math:`F^{-1}[\bar{\hat h} \hat y / (|\hat h|^2 + \epsilon)]` (0 where the
        denominator vanishes)."""
        h = self.otf(y)
        den = h.abs() ** 2 + broadcast_eps(eps, y)
        ratio = torch.where(den > 0, h.conj() / den.clamp_min(1e-30), torch.zeros_like(h))
        return torch.fft.irfft2(torch.fft.rfft2(y) * ratio, s=y.shape[-2:])

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The blurred image is already image-shaped."""
        return y


class GaussianBlur(KernelBlur):
    """Circular Gaussian blur (isotropic, or anisotropic with ``sigma2`` and ``angle``).

    Args:
        sigma: std in pixels (first axis).
        size: kernel size (default ``2 * floor(sigma / 0.3 + 1) + 1``).
        sigma2: std along the second axis (default ``sigma``).
        angle: rotation of the axes in radians.
    """

    def __init__(
        self, sigma: float, size: int | None = None, *, sigma2: float | None = None, angle: float = 0.0, **kwargs
    ) -> None:
        super().__init__(gaussian_kernel((sigma, sigma if sigma2 is None else sigma2), size, angle=angle), **kwargs)


class UniformBlur(KernelBlur):
    """Circular ``size x size`` box blur (UD2M "uniform", size 5)."""

    def __init__(self, size: int = 5, **kwargs) -> None:
        super().__init__(box_kernel(size), **kwargs)


def load_kernel(path: str | Path) -> torch.Tensor:
    """Load a kernel from ``.npy``, ``.pt``/``.pth`` (tensor only, ``weights_only=True``), ``.safetensors``
    (key ``kernel``) or a grayscale image file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if suffix in (".pt", ".pth"):
        return torch.load(path, weights_only=True, map_location="cpu").float()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))["kernel"].float()
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("F"), dtype=np.float32))
