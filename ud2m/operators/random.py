r"""Random operator generators for training (docs/method.md §2.7).

Each generator is a small class configured by ``__init__`` (so a YAML ``class_path`` can build it) and called as
``gen(batch_size, image_size, generator, device=None)``. It draws per-sample parameters from ``generator`` only and
returns an ordinary operator (``KernelBlur``, ``Inpainting``, ``SuperResolution``) holding B per-sample kernels or
masks. The training step uses that one instance to simulate y (``measure``), inside every prox, for ``lift(y)`` and
in logs, so the parameters travel with the batch.

Generators draw their parameters through a public ``sample_params`` method (a named tuple of ``(B,)`` tensors),
which ``__call__`` calls first; replaying a generator with the same seed replays the parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ud2m.operators.base import LinearOperator
from ud2m.operators.blur import KernelBlur
from ud2m.operators.inpainting import Inpainting
from ud2m.operators.kernels import as_kernel, box_kernel
from ud2m.operators.motion import MOTION_KINDS, motion_kernel_gp, motion_kernel_walk
from ud2m.operators.superres import SuperResolution
from ud2m.utils import rand

Size = tuple[int, int]


def _uniform(low: float, high: float, batch_size: int, generator, device) -> torch.Tensor:
    """``(B,)`` draws from U[low, high)."""
    return low + (high - low) * rand((batch_size,), generator, device=device)


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b <= high:
        raise ValueError(f"{name}: expected a range (a, b) with {low} <= a <= b <= {high}, got {value}")
    return a, b


def _choose(num: int, weights: torch.Tensor | None, generator) -> int:
    """One index in ``range(num)``, uniform or proportional to ``weights``, drawn from ``generator``."""
    u = rand((1,), generator).cpu()
    if weights is None:
        return min(int(u.item() * num), num - 1)
    cdf = torch.cumsum(weights, 0) / weights.sum()
    return min(int(torch.searchsorted(cdf, u).item()), num - 1)


def gaussian_kernels(sigma1: torch.Tensor, sigma2: torch.Tensor, angle: torch.Tensor, size: int) -> torch.Tensor:
    r"""Batched (anisotropic) Gaussian kernels, the per-sample version of :func:`kernels.gaussian_kernel`.

    :math:`h_b(r) \propto \exp(-\tfrac12[(u/\sigma_{1,b})^2 + (v/\sigma_{2,b})^2])` with
    :math:`(u, v)` the tap offsets from ``(k // 2, k // 2)`` rotated by ``angle_b`` (radians).

    Args:
        sigma1, sigma2, angle: ``(B,)`` tensors.
        size: kernel side k.

    Returns:
        ``(B, 1, k, k)`` float32 kernels summing to 1.
    """
    r = torch.arange(size, dtype=torch.float64, device=sigma1.device) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")  # (k, k)
    c, s = (f(angle.double())[:, None, None] for f in (torch.cos, torch.sin))  # (B, 1, 1)
    u, v = c * xx + s * yy, -s * xx + c * yy  # (B, k, k)
    s1, s2 = sigma1.double()[:, None, None], sigma2.double()[:, None, None]
    h = torch.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2))
    return as_kernel(h[:, None].float(), name="Gaussian kernels")


class OperatorGenerator:
    """Base class of the random operator generators: ``gen(batch_size, image_size, generator, device)``."""

    def __call__(
        self,
        batch_size: int,
        image_size: Size,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> LinearOperator:
        """Draw B operators' parameters from ``generator`` and return one operator holding all of them."""
        raise NotImplementedError


class GaussianBlurParams(NamedTuple):
    """Per-sample Gaussian blur parameters, ``(B,)`` each (pixels, radians)."""

    sigma1: torch.Tensor
    sigma2: torch.Tensor
    angle: torch.Tensor


class RandomGaussianBlur(OperatorGenerator):
    r"""Circular Gaussian blur with :math:`\sigma \sim U[\sigma_{lo}, \sigma_{hi}]` per sample (pixels at 256²).

    The anisotropic variant draws :math:`\sigma_1, \sigma_2 \sim U` independently and an angle :math:`\sim
    U[0, \pi)`.

    Args:
        size: kernel side (default ``2 * floor(sigma_hi / 0.3 + 1) + 1``, 23 for 3.0).
        sigma_range: range of the std in pixels.
        anisotropic: draw two stds and an angle.
    """

    def __init__(
        self, size: int | None = None, sigma_range: tuple[float, float] = (0.5, 3.0), anisotropic: bool = False
    ) -> None:
        self.sigma_range = _check_range("RandomGaussianBlur.sigma_range", sigma_range, 1e-6, math.inf)
        self.size = 2 * int(self.sigma_range[1] / 0.3 + 1) + 1 if size is None else int(size)
        self.anisotropic = anisotropic

    def sample_params(self, batch_size: int, generator: torch.Generator, device=None) -> GaussianBlurParams:
        """Draw σ₁ (and σ₂, angle if anisotropic; else σ₂ = σ₁ and angle 0)."""
        sigma1 = _uniform(*self.sigma_range, batch_size, generator, device)
        if not self.anisotropic:
            return GaussianBlurParams(sigma1, sigma1, torch.zeros_like(sigma1))
        sigma2 = _uniform(*self.sigma_range, batch_size, generator, device)
        return GaussianBlurParams(sigma1, sigma2, _uniform(0.0, math.pi, batch_size, generator, device))

    def __call__(self, batch_size, image_size, generator, device=None) -> KernelBlur:
        """A :class:`KernelBlur` with B Gaussian kernels."""
        p = self.sample_params(batch_size, generator, device)
        return KernelBlur(gaussian_kernels(p.sigma1, p.sigma2, p.angle, self.size))


class RandomMotionBlur(OperatorGenerator):
    """Circular motion blur, one trajectory per sample (:mod:`ud2m.operators.motion`).

    Args:
        size: kernel side.
        kind: ``"gp"`` (UD2M) or ``"walk"`` (DPS/LATINO).
        intensity: random-walk intensity.
        length_scale: GP length-scale.
        std: GP std.
        num_points: GP trajectory points.
    """

    def __init__(
        self,
        size: int = 61,
        kind: str = "gp",
        *,
        intensity: float = 0.5,
        length_scale: float = 0.1,
        std: float = 0.5,
        num_points: int = 1000,
    ) -> None:
        if kind not in MOTION_KINDS:
            raise ValueError(f"RandomMotionBlur: kind must be one of {MOTION_KINDS}, got {kind!r}")
        self.size, self.kind, self.intensity = size, kind, intensity
        self.length_scale, self.std, self.num_points = length_scale, std, num_points

    def __call__(self, batch_size, image_size, generator, device=None) -> KernelBlur:
        """A :class:`KernelBlur` with B motion kernels."""
        if self.kind == "walk":
            k = motion_kernel_walk(self.size, self.intensity, batch_size, generator, device=device)
        else:
            k = motion_kernel_gp(
                self.size, batch_size, generator, self.length_scale, self.std, self.num_points, device=device
            )
        return KernelBlur(k)


class RandomUniformBlur(OperatorGenerator):
    """The ``size x size`` box blur (UD2M "uniform", size 5) [ref]; deterministic, replicated over the batch."""

    def __init__(self, size: int = 5) -> None:
        self.size = size

    def __call__(self, batch_size, image_size, generator, device=None) -> KernelBlur:
        """A :class:`KernelBlur` with B identical box kernels."""
        return KernelBlur(box_kernel(self.size).expand(batch_size, -1, -1, -1).to(device))


class RandomInpaintingMask(OperatorGenerator):
    r"""Bernoulli masks :math:`M_{ij} \sim \mathcal B(p_b)`, :math:`p_b \sim U[p_{lo}, p_{hi}]` per sample,
    shared over channels.

    Args:
        p_obs_range: range of the probability that a pixel is observed.
    """

    def __init__(self, p_obs_range: tuple[float, float] = (0.2, 0.5)) -> None:
        self.p_obs_range = _check_range("RandomInpaintingMask.p_obs_range", p_obs_range, 0.0, 1.0)

    def sample_params(self, batch_size: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Per-sample observation probabilities ``(B,)``."""
        return _uniform(*self.p_obs_range, batch_size, generator, device)

    def __call__(self, batch_size, image_size, generator, device=None) -> Inpainting:
        """An :class:`Inpainting` operator with B masks."""
        p_obs = self.sample_params(batch_size, generator, device)
        u = rand((batch_size, 1, *image_size), generator, device=device)
        return Inpainting((u < p_obs[:, None, None, None]).float())


class BoxParams(NamedTuple):
    """Per-sample missing squares: side, top row and left column, ``(B,)`` int64 each."""

    side: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor


class RandomBoxMask(OperatorGenerator):
    r"""A missing square of side :math:`\mathrm{round}(f H)`, :math:`f \sim U[f_{lo}, f_{hi}]`, at a uniformly
    random position per sample (the UD2M reference forced the corner to (64, 64); §2.7).

    Args:
        fraction_range: range of the side as a fraction of the image height.
    """

    def __init__(self, fraction_range: tuple[float, float] = (0.25, 0.5)) -> None:
        self.fraction_range = _check_range("RandomBoxMask.fraction_range", fraction_range, 0.0, 1.0)

    def sample_params(self, batch_size: int, image_size: Size, generator: torch.Generator, device=None) -> BoxParams:
        """Draw the side, then top and left uniformly among the positions that keep the box inside the image."""
        H, W = image_size
        f = _uniform(*self.fraction_range, batch_size, generator, device)
        side = torch.round(f * H).long().clamp(1, min(H, W))
        top = (rand((batch_size,), generator, device=device) * (H - side + 1)).floor().long()
        left = (rand((batch_size,), generator, device=device) * (W - side + 1)).floor().long()
        return BoxParams(side, top.clamp(max=H - side), left.clamp(max=W - side))

    def __call__(self, batch_size, image_size, generator, device=None) -> Inpainting:
        """An :class:`Inpainting` operator whose B masks are 0 inside each box."""
        p = self.sample_params(batch_size, image_size, generator, device)
        H, W = image_size
        rows = torch.arange(H, device=p.side.device)[None, :]  # (1, H)
        cols = torch.arange(W, device=p.side.device)[None, :]
        in_rows = (rows >= p.top[:, None]) & (rows < (p.top + p.side)[:, None])  # (B, H)
        in_cols = (cols >= p.left[:, None]) & (cols < (p.left + p.side)[:, None])  # (B, W)
        box = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
        return Inpainting((~box).float()[:, None])


class RandomSuperResolution(OperatorGenerator):
    """Super-resolution with one factor per call (a batch must share its low-resolution size, so the factor is
    drawn per training step, §7.8) and either a fixed filter or per-sample kernels from a blur generator.

    Args:
        factors: candidate factors, drawn uniformly.
        filter: ``"bicubic"``, ``"box"``, ``"gaussian"`` (shared filter), or a blur generator whose per-sample
            kernels are used as anti-aliasing filters.
        padding: ``"circular"`` (closed-form prox) or ``"reflect"`` (CG prox).
    """

    def __init__(
        self,
        factors: tuple[int, ...] = (2, 4, 8),
        filter: str | OperatorGenerator = "bicubic",
        padding: str = "circular",
    ) -> None:
        if not factors or any(int(s) != s or s < 1 for s in factors):
            raise ValueError(f"RandomSuperResolution: factors must be positive integers, got {factors}")
        self.factors = tuple(int(s) for s in factors)
        self.filter = filter
        self.padding = padding

    def sample_factor(self, generator: torch.Generator) -> int:
        """The factor of this call (uniform over ``factors``)."""
        return self.factors[_choose(len(self.factors), None, generator)]

    def __call__(self, batch_size, image_size, generator, device=None) -> SuperResolution:
        """A :class:`SuperResolution` operator with one factor and one filter per sample (or shared)."""
        s = self.sample_factor(generator)
        H, W = image_size
        if H % s or W % s:
            raise ValueError(f"RandomSuperResolution: image size {H}x{W} is not divisible by the drawn factor {s}")
        if isinstance(self.filter, str):
            return SuperResolution(s, self.filter, padding=self.padding).to(device)
        blur = self.filter(batch_size, image_size, generator, device)
        if not isinstance(blur, KernelBlur):
            raise TypeError(f"RandomSuperResolution: filter generator returned {type(blur).__name__}, not KernelBlur")
        return SuperResolution(s, blur.kernel, padding=self.padding)


class RandomOperatorMix(OperatorGenerator):
    """Pick ONE generator per call (with probabilities ``weights``) and use it for the whole batch.

    One family per call, not per sample, because a batch must share its measurement shape (SR changes it, masks
    and blurs do not) and one operator object must serve the batch in every prox; mixing happens across steps.

    Args:
        generators: the candidate generators.
        weights: non-negative, not all zero (default uniform).
    """

    def __init__(self, generators: list[OperatorGenerator], weights: list[float] | None = None) -> None:
        if not generators:
            raise ValueError("RandomOperatorMix: needs at least one generator")
        if weights is not None:
            if len(weights) != len(generators) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"RandomOperatorMix: expected {len(generators)} non-negative weights with a positive sum, "
                    f"got {weights}"
                )
        self.generators = list(generators)
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)

    def sample_index(self, generator: torch.Generator) -> int:
        """Index of the generator used by this call."""
        return _choose(len(self.generators), self.weights, generator)

    def __call__(self, batch_size, image_size, generator, device=None) -> LinearOperator:
        """The operator of the chosen generator."""
        return self.generators[self.sample_index(generator)](batch_size, image_size, generator, device)


def sample_sigma_y(
    batch_size: int,
    generator: torch.Generator,
    low: float = 0.001,
    high: float = 0.05,
    log_uniform: bool = True,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Per-sample noise levels :math:`\sigma_y` on the [0, 1] scale (§2.7).

    Log-uniform: :math:`\log\sigma_y \sim U[\log \text{low}, \log \text{high}]`; otherwise
    :math:`\sigma_y \sim U[\text{low}, \text{high}]`.

    Returns:
        ``(B,)`` float32.
    """
    if not 0 < low <= high:
        raise ValueError(f"sample_sigma_y: expected 0 < low <= high, got low={low}, high={high}")
    u = rand((batch_size,), generator, device=device, dtype=torch.float64)
    if log_uniform:
        return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).float()
    return (low + u * (high - low)).float()
