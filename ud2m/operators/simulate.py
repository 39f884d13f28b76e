r"""Simulated degradations of the offline LD-RPS protocol (docs/method.md §13.8) as operators of the §2.1 contract.

LD-RPS (§13) restores images whose degradation is unknown; to measure it offline we degrade clean crops with
known, per-sample random models and keep their parameters, so the truth, the true operator (the price of
blindness) and task-aware baselines are all available. Every class here is batched: its parameters carry a
leading per-sample dimension (1 = shared), are drawn by ``random(...)`` from one generator or a list of B
generators (sample b's parameters depend only on generator b, docs/method.md §1.5) and live in buffers, so
``state_dict()`` saves them, ``.to()`` moves them and :meth:`params` / ``from_params(**params)`` replay them.

Conventions (§1.1): images and measurements are on the internal [-1, 1] scale; a model written on [0, 1] as
y₀₁ = f(x₀₁) becomes y = 2f((x + 1)/2) − 1. Noise is never inside an operator: ``measure(op, x, sigma_y)`` adds
2σ_y·n after the map (``noise_before_forward = False``), as §13.8 writes every model.

- :class:`PixelScale` (linear): A x = g ⊙ x, a per-sample gain per pixel and/or channel (exposure; the linear part
  x ↦ t ⊙ x of haze). Closed-form prox, projection and pseudo-inverse.
- :class:`PixelAffine` (affine, hence a :class:`NonlinearOperator`): A x = g ⊙ x + b, with its linear part
  (:attr:`PixelAffine.linear`) and :meth:`PixelAffine.remove_offset` for linear solvers: y − b = g ⊙ x.
- :class:`Grayscale` (linear): luma y = wᵀx, w = (0.299, 0.587, 0.114) (ITU-R BT.601), one output channel or the
  same value replicated to three (``out_channels``); its lift is the grey RGB image y·𝟙/Σw, an exact right inverse.
- :class:`LowLight` (nonlinear): y₀₁ = e·clamp(x₀₁, 0, 1)^γ, γ ~ U[1.5, 2.5], e ~ U[0.2, 0.5] per sample; the lift
  is the oracle inverse (clamp(y₀₁/e, 0, 1))^{1/γ}.
- :class:`Haze` (affine): the atmospheric scattering model I = J·t + A(1 − t), t = exp(−β d), grey airlight
  A ~ U[0.75, 0.95], β ~ U[0.8, 1.6]; the depth proxy d (see :func:`depth_proxy`) mixes a vertical ramp and
  blurred noise. The lift is the exact inverse (I − A(1 − t))/t.
- :class:`KnownDegradation`: any operator above (or of §2) as the "degradation" argument of ``ld_rps`` with
  ``adapt=False``: LD-RPS given the true operator.
- :func:`simulate_task`: one task's whole §13.8 degradation (parameters, map and noise) of a clean batch, as
  ``benchmarks/blind.py`` and ``data/make_shards.py --simulate`` use it.

This module must not import ``ud2m.priors`` or ``ud2m.solvers`` (import layering, pyproject.toml).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ud2m.operators.base import LinearOperator, NonlinearOperator
from ud2m.operators.inpainting import Denoising
from ud2m.operators.noise import measure
from ud2m.utils import Generator, append_dims, batch_scalar, broadcast_eps, rand, randn

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, docs/method.md §13.8
LOW_LIGHT_GAMMA, LOW_LIGHT_EXPOSURE = (1.5, 2.5), (0.2, 0.5)  # §13.8
HAZE_BETA, HAZE_AIRLIGHT = (0.8, 1.6), (0.75, 0.95)  # §13.8
#: the measurement noise σ_y of each task of the offline protocol (§13.8), on the [0, 1] scale
TASK_SIGMA_Y = {"low-light": 0.01, "haze": 0.01, "noise": 0.1, "colour": 0.01}
Size = int | tuple[int, int]


# ---------------------------------------------------------------------------------------------------- helpers
def _size2(image_size: Size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b <= high:
        raise ValueError(f"{name}: expected a range (a, b) with {low} <= a <= b <= {high}, got {tuple(value)}")
    return a, b


def _uniform(bounds: tuple[float, float], batch_size: int, generator: Generator, device) -> torch.Tensor:
    """``(B,)`` draws from U[a, b), one per sample from its generator."""
    a, b = bounds
    return a + (b - a) * rand((batch_size,), generator, device=device)


def _as_map(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """A float or a tensor as a 4-D ``(B|1, C|1, H|1, W|1)`` float32 map (``(B,)`` tensors become ``(B, 1, 1, 1)``)."""
    v = torch.as_tensor(value, dtype=torch.float32)
    if v.ndim == 0:
        v = v.reshape(1, 1, 1, 1)
    elif v.ndim == 1:
        v = v.reshape(-1, 1, 1, 1)
    if v.ndim != 4:
        raise ValueError(
            f"{name}: expected a float, a (B,) tensor or a 4-D (B|1, C|1, H|1, W|1) map, got shape {tuple(v.shape)}"
        )
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: expected finite values")
    return v


def _check_map(m: torch.Tensor, x: torch.Tensor, op: object, what: str) -> torch.Tensor:
    """``m`` broadcast-checked against images ``x`` ``(B, C, H, W)``, with errors naming expected and actual sizes."""
    name = type(op).__name__
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    for dim, label in ((0, "batch size"), (1, "channel count"), (2, "height"), (3, "width")):
        if m.shape[dim] not in (1, x.shape[dim]):
            raise ValueError(
                f"{name}: the {what} has {label} {m.shape[dim]}, the images have {x.shape[dim]} "
                f"(expected 1 or {x.shape[dim]})"
            )
    return m.to(dtype=x.dtype, device=x.device)


def _check_channels(x: torch.Tensor, channels: int | None, op: object, what: str = "images") -> None:
    if x.ndim != 4:
        raise ValueError(f"{type(op).__name__}: expected (B, C, H, W) {what}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{type(op).__name__}: expected {what} with {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
        )


def _check_batch(n: int, x: torch.Tensor, op: object, what: str) -> None:
    if n not in (1, x.shape[0]):
        raise ValueError(f"{type(op).__name__}: {n} {what} for a batch of {x.shape[0]} (expected 1 or {x.shape[0]})")


def gaussian_blur_fft(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Circular Gaussian blur of ``(B, C, H, W)`` maps with std ``sigma`` pixels, by FFT: the transfer function is
    :math:`\exp(-2\pi^2\sigma^2(f_x^2 + f_y^2))` (the continuous Gaussian's), so the mean is kept exactly."""
    H, W = x.shape[-2:]
    fy = torch.fft.fftfreq(H, device=x.device, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(W, device=x.device, dtype=torch.float64)[None, :]
    transfer = torch.exp(-2 * math.pi**2 * sigma**2 * (fy**2 + fx**2)).to(x.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(x) * transfer, s=(H, W))


def depth_proxy(
    batch_size: int,
    image_size: Size,
    generator: Generator = None,
    *,
    ramp_weight: float = 0.5,
    smoothness: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The relative depth d ∈ [0, 1] of the haze simulator (docs/method.md §13.8 "a vertical ramp and blurred noise").

    d = w·r + (1 − w)·n₀₁: r is 1 on the top row and 0 on the bottom one (scenes recede towards the top of a
    photograph), n₀₁ a white-noise field blurred with a circular Gaussian of std ``smoothness``·H pixels and min-max
    normalised per sample to [0, 1] (blobs of distant and near matter). One ``(1, 1, H, W)`` noise draw per sample
    from its generator. Returns ``(B, 1, H, W)`` float32.
    """
    if not 0.0 <= ramp_weight <= 1.0:
        raise ValueError(f"ramp_weight: expected a value in [0, 1], got {ramp_weight}")
    if smoothness <= 0:
        raise ValueError(f"smoothness: expected > 0, got {smoothness}")
    H, W = _size2(image_size)
    noise = gaussian_blur_fft(randn((batch_size, 1, H, W), generator, device=device), smoothness * H)
    lo = noise.amin(dim=(-2, -1), keepdim=True)
    hi = noise.amax(dim=(-2, -1), keepdim=True)
    noise01 = (noise - lo) / (hi - lo).clamp_min(1e-12)
    ramp = torch.linspace(1.0, 0.0, H, device=noise.device).view(1, 1, H, 1) if H > 1 else noise.new_ones(1, 1, 1, 1)
    return (ramp_weight * ramp + (1 - ramp_weight) * noise01).float()


class _Params:
    """Mixin: :meth:`params` (the drawn per-sample parameters) and ``from_params`` (replay)."""

    _param_names: tuple[str, ...] = ()

    def params(self) -> dict[str, torch.Tensor]:
        """The per-sample parameters as detached clones, ``{name: (B, ...) tensor}``; ``type(op)(**op.params())``
        (or ``from_params``) rebuilds the operator exactly."""
        return {k: getattr(self, k).detach().clone() for k in self._param_names}

    @classmethod
    def from_params(cls, **params: Any):
        """The operator with the given parameters (e.g. a saved :meth:`params` dict)."""
        return cls(**params)


# ---------------------------------------------------------------------------------------------------- PixelScale
class PixelScale(_Params, LinearOperator):
    r"""Diagonal gain :math:`A x = g \odot x` (docs/method.md §13.8: exposure, and haze's linear part x ↦ t ⊙ x).

    Args:
        gain: a float, a ``(B,)`` tensor (one gain per sample) or a ``(B|1, C|1, H|1, W|1)`` map (per channel
            and/or per pixel). Gains may be 0 (the pixel is not observed) or negative.
        lift_eps: regulariser of :meth:`lift`; 0 gives the exact inverse y/g where g ≠ 0.
        **kwargs: CG settings of :class:`LinearOperator` (unused: every map is closed form).
    """

    _param_names = ("gain",)

    def __init__(self, gain: float | torch.Tensor, *, lift_eps: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("gain", _as_map(gain, "PixelScale: gain"))
        self.lift_eps = float(lift_eps)

    @classmethod
    def random(
        cls,
        batch_size: int,
        generator: Generator = None,
        *,
        gain_range: tuple[float, float] = LOW_LIGHT_EXPOSURE,
        channels: int = 1,
        device: torch.device | str | None = None,
    ) -> PixelScale:
        """Per-sample gains g ~ U[gain_range], one per sample (``channels=1``) or per channel (e.g. 3: a colour cast),
        drawn ``(B, channels)`` from each sample's generator."""
        a, b = _check_range("gain_range", gain_range, -math.inf, math.inf)
        g = a + (b - a) * rand((batch_size, channels), generator, device=device)
        return cls(g.view(batch_size, channels, 1, 1))

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        return _check_map(self.gain, x, self, "gain")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`g \\odot x`."""
        return self._g(x) * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Self-adjoint: :math:`g \\odot y`."""
        return self._g(y) * y

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r"""Closed form :math:`(z + \gamma g y)/(1 + \gamma g^2)`."""
        g, gam = self._g(z), append_dims(gamma, z.ndim)
        return (z + gam * g * y) / (1 + gam * g * g)

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y/g`` where ``g ≠ 0``, ``z`` elsewhere."""
        g = self._g(z).expand_as(z)
        return torch.where(g != 0, y / torch.where(g != 0, g, torch.ones_like(g)), z)

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        r""":math:`g y/(g^2 + \epsilon)` (``eps`` a float or ``(B,)``)."""
        g = self._g(y)
        return g * y / (g * g + broadcast_eps(eps, y))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The (pseudo-)inverse: ``y/g`` where ``g ≠ 0`` and 0 elsewhere (``lift_eps > 0``: ``A_dagger(y, lift_eps)``),
        clamped to [-1, 1]: the oracle inverse of a known gain."""
        if self.lift_eps > 0:
            return self.A_dagger(y, self.lift_eps).clamp(-1, 1)
        return self._project(torch.zeros_like(y), y).clamp(-1, 1)

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """Entries with ``g = 0`` carry no information (None when every gain is non-zero)."""
        g = self._g(y)
        return None if bool((g != 0).all()) else (g != 0).to(y.dtype)

    def at_size(self, hw: tuple[int, int]) -> PixelScale:
        """Itself when its gain has no spatial extent or already this size; a per-pixel gain map is resampled
        (bilinear) to ``hw``."""
        if self.gain.shape[-2:] in ((1, 1), tuple(hw)):
            return self
        return PixelScale(_resize(self.gain, hw), lift_eps=self.lift_eps).to(self.gain.device)


def _resize(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------- PixelAffine
class PixelAffine(_Params, NonlinearOperator):
    r"""Affine pixel map :math:`A x = g \odot x + b` (docs/method.md §13.8): exact closed-form prox and inverse.

    An affine map is not linear, so this is a :class:`NonlinearOperator` (LinearOperator solvers must not see it);
    linear solvers use :attr:`linear` (:class:`PixelScale` with gain g) on :meth:`remove_offset` (y − b = g ⊙ x).

    Args:
        gain, offset: floats, ``(B,)`` tensors or ``(B|1, C|1, H|1, W|1)`` maps.
    """

    noise_before_forward = False  # y = A(x) + noise
    _param_names = ("gain", "offset")

    def __init__(self, gain: float | torch.Tensor, offset: float | torch.Tensor = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("gain", _as_map(gain, f"{type(self).__name__}: gain"))
        self.register_buffer("offset", _as_map(offset, f"{type(self).__name__}: offset"))

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _check_map(self.gain, x, self, "gain"), _check_map(self.offset, x, self, "offset")

    @property
    def linear(self) -> PixelScale:
        """The linear part x ↦ g ⊙ x (for Tikhonov, TV, Wiener on :meth:`remove_offset`)."""
        return PixelScale(self.gain.detach().clone()).to(self.gain.device)

    def remove_offset(self, y: torch.Tensor) -> torch.Tensor:
        """``y − b``, the measurement of :attr:`linear` (§13.8: y′ = y − (1 − t)(2A − 1) for haze)."""
        return y - _check_map(self.offset, y, self, "offset")

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`g \\odot x + b`."""
        g, b = self._maps(x)
        return g * x + b

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:math:`g \\odot v` (the Jacobian is diagonal)."""
        return self._maps(x)[0] * v

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        r"""Exact prox :math:`(z + \gamma g(y - b))/(1 + \gamma g^2)`; ``gamma = inf`` gives (y − b)/g where g ≠ 0."""
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        return self.linear.prox_l2(z, self.remove_offset(y), gamma)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The exact inverse ``(y − b)/g`` (0 where g = 0), clamped to [-1, 1]."""
        return self.linear.lift(self.remove_offset(y))

    def at_size(self, hw: tuple[int, int]) -> PixelAffine:
        """Itself when its maps already fit ``hw`` (or have no spatial extent), else the maps resampled (bilinear)."""
        if all(m.shape[-2:] in ((1, 1), tuple(hw)) for m in (self.gain, self.offset)):
            return self
        resized = {k: _resize(v, hw) if v.shape[-2:] != (1, 1) else v for k, v in self.params().items()}
        return PixelAffine(**resized).to(self.gain.device)


# ---------------------------------------------------------------------------------------------------- Grayscale
class Grayscale(_Params, LinearOperator):
    r"""Luma :math:`y = w^\top x` per pixel (docs/method.md §13.8, colourisation), ``w = (0.299, 0.587, 0.114)``.

    Choice: ``out_channels=1`` (default) is the physical measurement, ``(B, 1, H, W)``, with AᵀA = wwᵀ and the
    closed-form prox of §13.8, :math:`v - \gamma w(w^\top v)/(1 + \gamma\|w\|^2)`, :math:`v = z + \gamma A^\top y`;
    ``out_channels=3`` replicates the luma to RGB, ``(B, 3, H, W)``, the form LD-RPS (whose ψ maps RGB to RGB) is
    given; then AᵀA = 3wwᵀ and the same formula holds with ‖w‖² → 3‖w‖². Only the 1-channel form whitens
    independent measurement noise: simulate with it and replicate (``Grayscale(3).A(x) == Grayscale(1).A(x)``
    expanded) when both are needed.

    Args:
        out_channels: 1 or 3.
        weights: the three luma weights (need not sum to 1; the internal scale is exact only when they do).
    """

    _param_names = ("weights",)

    def __init__(self, out_channels: int = 1, weights: Sequence[float] | torch.Tensor = LUMA_WEIGHTS, **kwargs) -> None:
        super().__init__(**kwargs)
        if out_channels not in (1, 3):
            raise ValueError(f"Grayscale: out_channels must be 1 or 3, got {out_channels}")
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.shape != (3,):
            raise ValueError(f"Grayscale: expected 3 luma weights (R, G, B), got shape {tuple(w.shape)}")
        if float(w.sum()) == 0.0:
            raise ValueError(f"Grayscale: the luma weights must not sum to 0, got {w.tolist()}")
        self.out_channels = out_channels
        self.register_buffer("weights", w)

    def _w(self, like: torch.Tensor) -> torch.Tensor:
        return self.weights.to(dtype=like.dtype, device=like.device).view(1, 3, 1, 1)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`w^\\top x`, replicated to ``out_channels``."""
        _check_channels(x, 3, self, "RGB images")
        return (self._w(x) * x).sum(1, keepdim=True).expand(-1, self.out_channels, -1, -1)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`w \\sum_k y_k` (sum over the output channels)."""
        _check_channels(y, self.out_channels, self, "measurements")
        return self._w(y) * y.sum(1, keepdim=True)

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r"""Closed form :math:`v - \gamma c\,w(w^\top v)/(1 + \gamma c\|w\|^2)`, :math:`v = z + \gamma A^\top y`
        (Sherman-Morrison; c = ``out_channels``)."""
        _check_channels(z, 3, self, "RGB images")
        w, g, c = self._w(z), append_dims(gamma, z.ndim), self.out_channels
        v = z + g * self.A_adjoint(y)
        return v - g * c * w * (w * v).sum(1, keepdim=True) / (1 + g * c * (w * w).sum())

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`z + w(\bar y - w^\top z)/\|w\|^2`, :math:`\bar y` the mean of the output channels."""
        _check_channels(z, 3, self, "RGB images")
        w = self._w(z)
        r = y.mean(1, keepdim=True) - (w * z).sum(1, keepdim=True)
        return z + w * r / (w * w).sum()

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        r""":math:`w\sum_k y_k/(c\|w\|^2 + \epsilon)` (exact: AAᵀ = ‖w‖²𝟙𝟙ᵀ in measurement space)."""
        w = self._w(y)
        return self.A_adjoint(y) / (self.out_channels * (w * w).sum() + broadcast_eps(eps, y))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The grey RGB image ``ȳ·𝟙/Σw`` (ȳ the mean of the output channels): an exact right inverse,
        A(lift(y)) = y for consistent y; on the internal scale the grey image of the luma when Σw = 1."""
        _check_channels(y, self.out_channels, self, "measurements")
        return (y.mean(1, keepdim=True) / self.weights.sum().to(y.dtype)).expand(-1, 3, -1, -1)


# ---------------------------------------------------------------------------------------------------- LowLight
class LowLight(_Params, NonlinearOperator):
    r"""Low light (docs/method.md §13.8): :math:`y_{01} = e\cdot\mathrm{clamp}(x_{01}, 0, 1)^{\gamma}`, i.e. on the
    internal scale :math:`A(x) = 2e\,\mathrm{clamp}((x + 1)/2, 0, 1)^{\gamma} - 1`, per sample (γ, e).

    Noise is added after the map by ``measure`` (y = A(x) + 2σ_y n). Differentiable (γ ≥ 1: finite gradient at 0);
    the prox is the projected-gradient one of :class:`NonlinearOperator`.

    Args:
        gamma: ``(B,)`` exponents γ (a float: shared).
        exposure: ``(B,)`` gains e.
        channels: channel count the images must have (None: any).
    """

    noise_before_forward = False
    _param_names = ("gamma", "exposure")

    def __init__(
        self, gamma: float | torch.Tensor, exposure: float | torch.Tensor, *, channels: int | None = 3, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        gamma = torch.as_tensor(gamma, dtype=torch.float32).reshape(-1)
        exposure = torch.as_tensor(exposure, dtype=torch.float32).reshape(-1)
        if not bool((gamma > 0).all()) or not bool((exposure > 0).all()):
            raise ValueError(
                f"LowLight: gamma and exposure must be > 0, got gamma {gamma.tolist()}, exposure {exposure.tolist()}"
            )
        if len(gamma) != len(exposure) and 1 not in (len(gamma), len(exposure)):
            raise ValueError(f"LowLight: {len(gamma)} gammas but {len(exposure)} exposures (expected equal, or 1)")
        self.channels = channels
        self.register_buffer("gamma", gamma)
        self.register_buffer("exposure", exposure)

    @classmethod
    def random(
        cls,
        batch_size: int,
        generator: Generator = None,
        *,
        gamma_range: tuple[float, float] = LOW_LIGHT_GAMMA,
        exposure_range: tuple[float, float] = LOW_LIGHT_EXPOSURE,
        channels: int | None = 3,
        device: torch.device | str | None = None,
    ) -> LowLight:
        """γ ~ U[gamma_range] then e ~ U[exposure_range], per sample from its generator (§13.8 ranges)."""
        gamma = _uniform(_check_range("gamma_range", gamma_range, 1e-6, math.inf), batch_size, generator, device)
        exposure = _uniform(
            _check_range("exposure_range", exposure_range, 1e-6, math.inf), batch_size, generator, device
        )
        return cls(gamma, exposure, channels=channels)

    def _ge(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(x, self.channels, self)
        for name in self._param_names:
            _check_batch(len(getattr(self, name)), x, self, f"{name} values")
        gamma, e = (append_dims(getattr(self, k).to(dtype=x.dtype, device=x.device), x.ndim) for k in self._param_names)
        return gamma, e

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`2e\\,\\mathrm{clamp}((x + 1)/2, 0, 1)^\\gamma - 1`."""
        gamma, e = self._ge(x)
        return 2 * e * ((x + 1) / 2).clamp(0, 1).pow(gamma) - 1

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The oracle inverse :math:`2\\,\\mathrm{clamp}(y_{01}/e, 0, 1)^{1/\\gamma} - 1` (noise clipped at 0 and 1)."""
        gamma, e = self._ge(y)
        return 2 * (((y + 1) / 2) / e).clamp(0, 1).pow(1 / gamma) - 1


# ---------------------------------------------------------------------------------------------------- Haze
class Haze(PixelAffine):
    r"""Atmospheric scattering (docs/method.md §13.8): :math:`I = J t + A(1 - t)`, :math:`t = \exp(-\beta d)`.

    On the internal scale :math:`A(x) = t \odot x + (1 - t)(2A - 1)`: a :class:`PixelAffine` with gain t and offset
    (1 − t)(2A − 1), so t = 1 is the identity, t = 0 the airlight 2A − 1, and the lift is the exact inverse.

    Args:
        depth: ``(B|1, 1, H, W)`` relative depth d ≥ 0 (see :func:`depth_proxy`).
        beta: ``(B,)`` scattering coefficients β ≥ 0.
        airlight: ``(B,)`` grey airlight A on [0, 1] (or ``(B, 3)`` for a coloured one).
        channels: channel count the images must have (None: any; a coloured airlight needs 3).
    """

    _param_names = ("depth", "beta", "airlight")

    def __init__(
        self,
        depth: torch.Tensor,
        beta: float | torch.Tensor,
        airlight: float | torch.Tensor,
        *,
        channels: int | None = 3,
        **kwargs,
    ) -> None:
        depth = _as_map(depth, "Haze: depth")
        if depth.shape[1] != 1:
            raise ValueError(f"Haze: depth must have 1 channel, got shape {tuple(depth.shape)}")
        beta = torch.as_tensor(beta, dtype=torch.float32).reshape(-1)
        airlight = torch.as_tensor(airlight, dtype=torch.float32)
        airlight = airlight.reshape(-1, 1) if airlight.ndim < 2 else airlight  # (B, 1) grey or (B, 3)
        if not bool((beta >= 0).all()) or not bool((depth >= 0).all()):
            raise ValueError("Haze: beta and depth must be >= 0")
        t = torch.exp(-beta.view(-1, 1, 1, 1) * depth)  # (B, 1, H, W)
        super().__init__(t, (1 - t) * (2 * airlight.view(*airlight.shape, 1, 1) - 1), **kwargs)
        self.channels = channels
        self.register_buffer("depth", depth)
        self.register_buffer("beta", beta)
        self.register_buffer("airlight", airlight)

    @classmethod
    def random(
        cls,
        batch_size: int,
        image_size: Size,
        generator: Generator = None,
        *,
        beta_range: tuple[float, float] = HAZE_BETA,
        airlight_range: tuple[float, float] = HAZE_AIRLIGHT,
        ramp_weight: float = 0.5,
        smoothness: float = 0.125,
        channels: int | None = 3,
        device: torch.device | str | None = None,
    ) -> Haze:
        """β ~ U[beta_range], grey A ~ U[airlight_range], then the depth noise of :func:`depth_proxy`, in that order
        per sample from its generator (§13.8 ranges)."""
        beta = _uniform(_check_range("beta_range", beta_range, 0.0, math.inf), batch_size, generator, device)
        airlight = _uniform(_check_range("airlight_range", airlight_range, 0.0, 1.0), batch_size, generator, device)
        depth = depth_proxy(
            batch_size, image_size, generator, ramp_weight=ramp_weight, smoothness=smoothness, device=device
        )
        return cls(depth, beta, airlight, channels=channels)

    @property
    def transmission(self) -> torch.Tensor:
        """t = exp(−β d), ``(B, 1, H, W)``."""
        return self.gain

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(x, self.channels, self)
        return super()._maps(x)

    def at_size(self, hw: tuple[int, int]) -> Haze:
        """The same scene at ``H x W``: the depth map resampled (bilinear), β and A kept."""
        if tuple(self.depth.shape[-2:]) == tuple(hw):
            return self
        return Haze(_resize(self.depth, hw), self.beta, self.airlight, channels=self.channels).to(self.depth.device)


# ---------------------------------------------------------------------------------------------------- known operator
class KnownDegradation:
    r"""A known operator in the place of LD-RPS's learned ψ (docs/method.md §13.8 "LD-RPS given the true operator").

    ``ld_rps(prior, KnownDegradation(op), y, adapt=False, ...)`` runs the §13.3 sampler with the fidelity
    :math:`L(\hat x) = \mathrm{MSE}(A_{01}(\hat x), y_{01}) = \tfrac14\,\mathrm{mean}\,(A(2\hat x - 1) - y)^2` per
    sample, the same [0, 1]-scale MSE as :meth:`LearnedDegradation.fidelity` with ψ replaced by the truth (exact for
    operators of the §1.1 convention, y = 2y₀₁ − A(𝟙)). Nothing is fitted: :meth:`adapt` returns the state
    unchanged, so ``adapt=True`` only costs nothing. ``x_hat`` is on [0, 1], ``y`` on the internal scale.
    """

    def __init__(self, op: LinearOperator | NonlinearOperator) -> None:
        self.op = op

    def image_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        """Shape of the images behind ``y``: ``op.lift(y)``'s."""
        return tuple(self.op.lift(y).shape)

    def init_state(self, y: torch.Tensor, *, generator: Generator = None) -> None:
        """No state (the operator is fixed)."""
        return None

    def adapt(self, x_hat, y, state, *, t=None, guided=None) -> tuple[None, dict[str, torch.Tensor]]:
        """Nothing to fit: ``(state, {})``."""
        return state, {}

    def fidelity(self, x_hat: torch.Tensor, y: torch.Tensor, state: Any = None) -> torch.Tensor:
        """:math:`\\tfrac14\\,\\mathrm{mean}(A(2\\hat x - 1) - y)^2` per sample, ``(B,)``, differentiable in x̂."""
        return ((self.op.A(2 * x_hat - 1) - y) / 2).square().flatten(1).mean(1)

    def A(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
        """The operator's forward map on the internal scale."""
        return self.op.A(x)

    def freeze(self, state: Any = None) -> LinearOperator | NonlinearOperator:
        """The operator itself (the counterpart of :meth:`LearnedDegradation.freeze`)."""
        return self.op


# ---------------------------------------------------------------------------------------------------- one task
class Simulated(NamedTuple):
    """One task's degraded batch (:func:`simulate_task`).

    Attributes:
        y: the measurement, with x's channels (colour: the grey value in every channel, the form LD-RPS takes).
        op: the true operator on y's space (colour: :class:`Grayscale` with 3 output channels; noise:
            :class:`~ud2m.operators.Denoising`).
        measured: the operator that was measured and its measurement, ``(op, y)`` but for colour, where the
            physical measurement has one channel, ``(Grayscale(1), y[:, :1])``: what a linear solver is given.
        sigma_y: the noise standard deviation on the [0, 1] scale.
    """

    y: torch.Tensor
    op: LinearOperator | NonlinearOperator
    measured: tuple[LinearOperator | NonlinearOperator, torch.Tensor]
    sigma_y: float


def simulate_task(
    task: str,
    x: torch.Tensor,
    generator: Generator = None,
    noise_generator: Generator = None,
    *,
    sigma_y: float | None = None,
) -> Simulated:
    """The §13.8 degradation of ``task`` (``TASK_SIGMA_Y``'s keys) of the clean batch ``x`` (internal scale).

    Parameters come from ``generator`` and the noise from ``noise_generator`` (each one generator or B, one per
    sample: sample b's draw depends only on its own, docs/method.md §1.5), so a saved pair of seeds replays a sample
    exactly. ``sigma_y`` None: the task's ``TASK_SIGMA_Y``. Colour measures the one-channel luma (independent noise
    per pixel) and replicates it to x's 3 channels.

    Raises:
        ValueError: for an unknown task, or colour on images without 3 channels.
    """
    if task not in TASK_SIGMA_Y:
        raise ValueError(f"simulate_task: unknown task {task!r}; known tasks: {', '.join(TASK_SIGMA_Y)}")
    sigma = float(TASK_SIGMA_Y[task] if sigma_y is None else sigma_y)
    B, C = x.shape[:2]
    if task == "colour":
        if C != 3:
            raise ValueError(f"simulate_task: colour needs RGB images (3 channels), got shape {tuple(x.shape)}")
        grey = Grayscale(1)
        y1 = measure(grey, x, sigma, noise_generator)
        return Simulated(y1.expand(-1, 3, -1, -1).contiguous(), Grayscale(3), (grey, y1), sigma)
    if task == "low-light":
        op = LowLight.random(B, generator, channels=C, device=x.device)
    elif task == "haze":
        op = Haze.random(B, tuple(x.shape[-2:]), generator, channels=C, device=x.device)
    else:
        op = Denoising()
    y = measure(op, x, sigma, noise_generator)
    return Simulated(y, op, (op, y), sigma)
