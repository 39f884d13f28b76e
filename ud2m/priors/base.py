"""The prior contract (docs/method.md §3.1): one wrapper interface for every generative prior.

Every family (pixel VP UNets, latent consistency models, the Wan flow model, the analytic Gaussian) is written as
z_t = a_t·z_0 + b_t·ε (docs/method.md §1.2) and exposes ``encode``/``decode``, ``scales``/``sigma``/``t_of_sigma``,
``add_noise`` and ``predict_x0`` (one network call = 1 NFE). This module owns that contract, the conditioning
containers shared by the text-conditioned families, the flow-matching schedule, and the pure functions every family
uses: the consistency boundary scalings of Song et al. (2023) / Luo et al. (2023, LCM) and the conversion of a network
output (ε, v, x0, flow velocity) to the clean estimate.

Subclass contract (see docs/priors.md for a worked example):

* call ``super().__init__(net, schedule=..., prediction_type=...)`` (it freezes ``net``), register any other frozen
  module (VAE, text encoders), then call ``self._freeze()`` at the end of the constructor, before any LoRA;
* implement ``_network(z_in, t, cond) -> out`` (the raw network call; inputs already cast to the network dtype), or
  override ``_predict_x0(z_t, t, cond) -> x0_hat`` entirely when the predictor has a closed form;
* override ``encode``/``decode``/``encode_prompt``/``latent_shape``/``check_shape`` where the family needs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import nn

from ud2m.utils import append_dims, batch_scalar

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "x0", "flow")
BOUNDARIES = ("none", "lcm")


# ---------------------------------------------------------------------------------------------------- pure functions
class BoundaryScalings(NamedTuple):
    """Consistency-model boundary scalings; the returned estimate is ``c_skip·z_t + c_out·x0_hat``."""

    c_skip: torch.Tensor
    c_out: torch.Tensor


def cm_boundary_scalings(
    t: float | torch.Tensor, *, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> BoundaryScalings:
    r"""LCM boundary scalings (docs/method.md §3.1; diffusers ``LCMScheduler``, Luo et al. 2023).

    .. math:: c_\text{skip}(t) = \frac{\sigma_d^2}{(\kappa t)^2 + \sigma_d^2}, \qquad
              c_\text{out}(t) = \frac{\kappa t}{\sqrt{(\kappa t)^2 + \sigma_d^2}}

    so that :math:`c_\text{skip}(0) = 1` and :math:`c_\text{out}(0) = 0` (the consistency boundary condition).

    Args:
        t: native timestep, float or ``(B,)`` tensor.
        timestep_scaling: :math:`\kappa` (10 for LCM).
        sigma_data: :math:`\sigma_d` (0.5 for LCM).

    Returns:
        ``BoundaryScalings(c_skip, c_out)`` with the shape of ``t``.

    >>> cm_boundary_scalings(0.0)
    BoundaryScalings(c_skip=tensor(1.), c_out=tensor(0.))
    """
    t = torch.as_tensor(t, dtype=t.dtype if torch.is_tensor(t) and t.is_floating_point() else torch.float32)
    kt = timestep_scaling * t
    denom = kt**2 + sigma_data**2
    return BoundaryScalings(c_skip=sigma_data**2 / denom, c_out=kt / denom.sqrt())


def x0_from_prediction(
    z_t: torch.Tensor,
    out: torch.Tensor,
    a_t: float | torch.Tensor,
    b_t: float | torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    r"""Clean estimate from a network output (docs/method.md §3.1), for :math:`z_t = a_t z_0 + b_t \varepsilon`.

    * ``epsilon``: :math:`\hat z_0 = (z_t - b_t\hat\varepsilon)/a_t`;
    * ``v_prediction`` (:math:`v = a_t\varepsilon - b_t z_0`, VP): :math:`\hat z_0 = a_t z_t - b_t \hat v`;
    * ``sample`` / ``x0``: :math:`\hat z_0` is the output;
    * ``flow`` (Wan, :math:`v = \varepsilon - z_0`, :math:`b_t = \sigma_\text{fm}`): :math:`\hat z_0 = z_t - b_t\hat v`.

    Args:
        z_t: noisy input ``(B, ...)``.
        out: network output, same shape as ``z_t``.
        a_t, b_t: floats or ``(B,)`` tensors.
        prediction_type: one of ``PREDICTION_TYPES``.
    """
    a_t = append_dims(torch.as_tensor(a_t, dtype=z_t.dtype, device=z_t.device), z_t.ndim)
    b_t = append_dims(torch.as_tensor(b_t, dtype=z_t.dtype, device=z_t.device), z_t.ndim)
    if prediction_type == "epsilon":
        return (z_t - b_t * out) / a_t
    if prediction_type == "v_prediction":
        return a_t * z_t - b_t * out
    if prediction_type in ("sample", "x0"):
        return out
    if prediction_type == "flow":
        return z_t - b_t * out
    raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ---------------------------------------------------------------------------------------------------- conditioning
class _Condition:
    """Shared helpers of the frozen conditioning dataclasses: batch expansion and device/dtype moves."""

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        """Leading dimension shared by every tensor field."""
        return next(v.shape[0] for v in self._tensors().values() if v is not None)

    def expand(self, batch_size: int):
        """Repeat a batch-1 condition to ``batch_size`` (a no-op when it already has that size).

        Raises:
            ValueError: if a field has a batch size other than 1 or ``batch_size``.
        """
        fields = {}
        for name, v in self._tensors().items():
            if v is None or v.shape[0] == batch_size:
                fields[name] = v
            elif v.shape[0] == 1:
                fields[name] = v.repeat(batch_size, *([1] * (v.ndim - 1)))
            else:
                raise ValueError(f"{type(self).__name__}.{name}: batch {v.shape[0]} cannot expand to {batch_size}")
        return dataclasses.replace(self, **fields)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move every tensor to ``device``; floating tensors are also cast to ``dtype``."""
        fields = {}
        for name, v in self._tensors().items():
            cast = dtype if v is not None and v.is_floating_point() else None
            fields[name] = None if v is None else v.to(device=device, dtype=cast)
        return dataclasses.replace(self, **fields)


@dataclasses.dataclass(frozen=True)
class TextCondition(_Condition):
    """Text conditioning of latent/video priors (docs/method.md §3.2a, c). Tensors may require grad (LATINO-PRO).

    Attributes:
        prompt_embeds: ``(B, L, D)`` encoder hidden states (CLIP: (B, 77, 768); SDXL: (B, 77, 2048); UMT5: (B, 512,
            4096)).
        pooled: ``(B, P)`` pooled text embedding (SDXL ``text_embeds``), else None.
        time_ids: ``(B, 6)`` SDXL micro-conditioning ``[H_orig, W_orig, top, left, H, W]``, else None.
        timestep_cond: ``(B, time_cond_proj_dim)`` LCM guidance embedding, else None.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class ClassCondition(_Condition):
    """Class labels ``(B,)`` (int64) of a class-conditional pixel UNet."""

    class_labels: torch.Tensor


# ---------------------------------------------------------------------------------------------------- schedules
class NoiseSchedule(nn.Module):
    r"""A schedule :math:`t \mapsto (a_t, b_t)` on native time ``t \in [t_min, t_max]`` (docs/method.md §1.2).

    Subclasses implement :meth:`scales` and :meth:`t_of_sigma`; both accept a float or a tensor of any shape and are
    differentiable in their argument. Floats give float32 0-d tensors; float64 tensors stay float64.
    """

    t_min: float = 0.0
    t_max: float = 999.0

    def scales(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a_t, b_t)`` with the shape of ``t``."""
        raise NotImplementedError

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""VE-equivalent noise level :math:`s_t = b_t / a_t`."""
        a_t, b_t = self.scales(t)
        return b_t / a_t

    def nu(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""VP-equivalent variance :math:`\nu_t = s_t^2/(1 + s_t^2)` used by the weight rules."""
        s = self.sigma(t)
        return s**2 / (1 + s**2)

    def t_of_sigma(self, s: float | torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma` (continuous native time)."""
        raise NotImplementedError

    def check_time(self, t: float | torch.Tensor, name: str = "t") -> torch.Tensor:
        """``t`` as a float tensor on the schedule's device, checked to lie in ``[t_min, t_max]``.

        Raises:
            ValueError: for non-finite values or values outside ``[t_min, t_max]``.
        """
        dtype = t.dtype if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32
        # a table-free schedule (flow matching) keeps a tensor's device; one with tables moves t to them
        device = t.device if torch.is_tensor(t) and next(self.buffers(), None) is None else self._device()
        t = torch.as_tensor(t, dtype=dtype, device=device)
        if not torch.isfinite(t).all() or (t < self.t_min).any() or (t > self.t_max).any():
            raise ValueError(f"{name}: expected values in [{self.t_min}, {self.t_max}], got {t.detach().cpu()}")
        return t

    def _device(self) -> torch.device:
        buf = next(self.buffers(), None)
        return buf.device if buf is not None else torch.device("cpu")

    def _apply(self, fn, recurse: bool = True):
        # tables keep their dtype (float64) under prior.to(torch.bfloat16) / .half(): only the device follows
        for name, buf in self._buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self


class FlowMatchingSchedule(NoiseSchedule):
    r"""Rectified-flow schedule of Wan / CausVid (docs/method.md §1.2, §3.2c).

    :math:`t = T\sigma_\text{fm}`, :math:`a_t = 1 - \sigma_\text{fm}`, :math:`b_t = \sigma_\text{fm}`,
    :math:`s_t = \sigma_\text{fm}/(1-\sigma_\text{fm})`.

    Args:
        num_train_timesteps: :math:`T` (1000).
    """

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.t_max = float(num_train_timesteps)

    def scales(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - t/T, t/T)``."""
        sigma_fm = self.check_time(t) / self.num_train_timesteps
        return 1 - sigma_fm, sigma_fm

    def t_of_sigma(self, s: float | torch.Tensor) -> torch.Tensor:
        r""":math:`t = T s/(1+s)`; ``s = inf`` gives ``T``."""
        s = torch.as_tensor(s, dtype=s.dtype if torch.is_tensor(s) and s.is_floating_point() else torch.float32)
        sigma_fm = torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))
        return self.num_train_timesteps * sigma_fm


# ---------------------------------------------------------------------------------------------------- the prior
class Prior(nn.Module):
    r"""A frozen generative prior seen as :math:`z_t = a_t z_0 + b_t\varepsilon` (docs/method.md §3.1).

    The network lives in ``self.net`` (UNet / transformer; LoRA attaches there). The whole wrapper stays in
    ``eval()`` mode (``train()`` is overridden) and its base parameters never require grad.

    Args:
        net: the denoising network, or None for closed-form priors.
        schedule: the :class:`NoiseSchedule` giving :math:`(a_t, b_t)`.
        prediction_type: what ``net`` outputs, one of ``PREDICTION_TYPES``.
        boundary: ``"lcm"`` applies :func:`cm_boundary_scalings`, ``"none"`` returns the converted output.
        timestep_scaling: :math:`\kappa` of the boundary scalings.
        sigma_data: :math:`\sigma_d` of the boundary scalings.
        latent_channels: channel count of ``z`` (checked by :meth:`predict_x0`), None to skip the check.
    """

    def __init__(
        self,
        net: nn.Module | None,
        *,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        boundary: str = "none",
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.boundary = boundary
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data
        self.latent_channels = latent_channels
        self.nfe = 0
        self._freeze()

    # ------------------------------------------------------------------ frozen base, eval mode
    def _freeze(self) -> None:
        """Freeze every parameter registered so far and switch to eval; call at the end of subclass constructors."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Prior:
        """Stay in eval mode whatever ``mode`` is: the frozen network never runs dropout (docs/method.md §3.1)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the network: a diffusers model's own ``dtype`` (which skips the parameters its
        ``_keep_in_fp32_modules`` keep in float32, as Wan's modulation tables), else that of the first parameter or
        buffer, float32 when there is none."""
        net_dtype = getattr(self.net, "dtype", None)
        if isinstance(net_dtype, torch.dtype):
            return net_dtype
        t = self._first_tensor()
        return t.dtype if t is not None else torch.float32

    @property
    def device(self) -> torch.device:
        """Device of the network (of the first parameter or buffer)."""
        t = self._first_tensor()
        return t.device if t is not None else torch.device("cpu")

    def _first_tensor(self) -> torch.Tensor | None:
        # the schedule keeps float64 tables: it never decides the network dtype
        module = self.net if self.net is not None else self
        for t in module.parameters():
            return t
        for name, t in module.named_buffers():
            if t.is_floating_point() and not name.startswith("schedule."):
                return t
        return None

    # ------------------------------------------------------------------ schedule
    def scales(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, b_t)`` of docs/method.md §1.2, with the shape of ``t`` (float -> 0-d tensor)."""
        return self.schedule.scales(t)

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""VE-equivalent noise level :math:`s_t = b_t/a_t`."""
        return self.schedule.sigma(t)

    def t_of_sigma(self, s: float | torch.Tensor) -> torch.Tensor:
        """Continuous native time whose :meth:`sigma` is ``s``."""
        return self.schedule.t_of_sigma(s)

    def add_noise(self, z0: torch.Tensor, t: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r""":math:`z_t = a_t z_0 + b_t \varepsilon`, ``t`` a float or ``(B,)`` tensor."""
        a_t, b_t = self.scales(self._batch_time(t, z0))
        return append_dims(a_t.to(z0.dtype), z0.ndim) * z0 + append_dims(b_t.to(z0.dtype), z0.ndim) * eps

    def _batch_time(self, t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``t`` as a ``(B,)`` tensor on ``z``'s device (float64 only when ``t`` is float64)."""
        dtype = torch.float64 if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32
        return batch_scalar(t, z.shape[0], device=z.device, dtype=dtype, name="t")

    # ------------------------------------------------------------------ encoder / decoder / text
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Data -> clean latent ``z0`` (identity for pixel priors)."""
        return x

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Clean latent -> data (identity for pixel priors)."""
        return z0

    #: Range of the data (decoded images): the internal [-1, 1] of §1.1 for image priors, None where the data are
    #: unbounded (the analytic Gaussian prior), so that clamping estimates to it is the identity there.
    data_range: tuple[float, float] | None = (-1.0, 1.0)

    @property
    def is_latent(self) -> bool:
        """True when the prior works in a latent space (it overrides :meth:`decode`), e.g. latent consistency models."""
        return type(self).decode is not Prior.decode

    def clip_data(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp a data-space estimate (a decoded x̂0) to :attr:`data_range`, the identity when it is None.

        The DiffPIR and DPS references do this to every x̂0 (guided-diffusion's ``clip_denoised=True``), as does
        diffusers' DDIM for pixel models (``clip_sample``); on an ε-prediction DDPM x̂0 = (z_t − b_t ε̂)/a_t
        reaches ±60 at t ≈ 950 (``photos`` prior), and unclamped it drives colours to saturation (docs/method.md
        Appendix A).
        """
        if self.data_range is None:
            return x
        return x.clamp(*self.data_range)

    def encode_prompt(self, prompts: str | list[str] | None) -> Any:
        """Conditioning from text; unconditional priors return None for ``None`` and refuse real prompts.

        Raises:
            ValueError: if prompts are given to a prior without a text encoder.
        """
        if prompts is None:
            return None
        raise ValueError(f"{type(self).__name__} is unconditional: it takes no prompt (got {prompts!r})")

    def latent_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``encode(x)`` for ``x`` of ``x_shape`` (identity for pixel priors)."""
        self.check_shape(x_shape)
        return tuple(x_shape)

    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Raise a ``ValueError`` if data of ``x_shape`` cannot go through this prior (default: image batch).

        Raises:
            ValueError: if ``x_shape`` is not ``(B, C, H, W)`` with ``C == latent_channels`` (when known).
        """
        if len(x_shape) != 4:
            raise ValueError(f"{type(self).__name__}: expected an image batch (B, C, H, W), got shape {x_shape}")
        if self.latent_channels is not None and x_shape[1] != self.latent_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.latent_channels} channels, got shape {x_shape}")

    # ------------------------------------------------------------------ the denoiser
    def predict_x0(self, z_t: torch.Tensor, t: float | torch.Tensor, cond: Any = None) -> torch.Tensor:
        r"""One-step clean estimate :math:`\hat z_0(z_t, t)`: exactly one network call, counted in ``self.nfe``.

        Args:
            z_t: noisy latent ``(B, c, ...)``, any float dtype (cast to the network dtype inside).
            t: native timestep, float or ``(B,)`` tensor (may be non-integer: continuous time, §1.2).
            cond: conditioning (:class:`TextCondition`, :class:`ClassCondition` or None); batch 1 is expanded.

        Returns:
            :math:`\hat z_0` with the shape of ``z_t``, float32 (float64 when ``z_t`` is float64).
        """
        if not torch.is_tensor(z_t) or not z_t.is_floating_point() or z_t.ndim < 3:
            raise ValueError(f"z_t: expected a float tensor (B, C, ...), got {type(z_t).__name__} {_shape(z_t)}")
        if self.latent_channels is not None and z_t.shape[1] != self.latent_channels:
            raise ValueError(f"z_t: expected {self.latent_channels} channels, got shape {tuple(z_t.shape)}")
        out_dtype = torch.promote_types(z_t.dtype, torch.float32)
        t = self._batch_time(t, z_t)  # (B,)
        self.schedule.check_time(t)
        if isinstance(cond, _Condition):
            cond = cond.expand(z_t.shape[0])
        x0_hat = self._predict_x0(z_t.to(out_dtype), t, cond)
        self.nfe += 1
        return x0_hat.to(out_dtype)

    def reset_nfe(self) -> int:
        """Set the NFE counter to 0 and return its previous value."""
        nfe, self.nfe = self.nfe, 0
        return nfe

    def _predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Default hook: network call in the network dtype, then the fp32 conversion of §3.1 and boundary scalings.

        Args:
            z_t: ``(B, c, ...)`` in float32/float64.
            t: ``(B,)`` float tensor.
            cond: batch-expanded conditioning or None.
        """
        z_in = z_t.to(self.dtype)
        if isinstance(cond, _Condition):
            cond = cond.to(device=z_in.device, dtype=self.dtype)
        out = self._network(z_in, t, cond).to(z_t.dtype)
        out = out[:, : z_t.shape[1]]  # learned-variance networks output 2C channels: keep the mean
        a_t, b_t = self.scales(t)
        x0_hat = x0_from_prediction(z_t, out, a_t, b_t, self.prediction_type)
        if self.boundary == "lcm":
            c_skip, c_out = cm_boundary_scalings(
                t.to(z_t.dtype), timestep_scaling=self.timestep_scaling, sigma_data=self.sigma_data
            )
            x0_hat = append_dims(c_skip, z_t.ndim) * z_t + append_dims(c_out, z_t.ndim) * x0_hat
        return x0_hat

    def _network(self, z_in: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Raw network output for ``z_in`` (network dtype) at time ``t`` ``(B,)``; families implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement _network or _predict_x0")

    def forward(self, z_t: torch.Tensor, t: float | torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Same as :meth:`predict_x0`."""
        return self.predict_x0(z_t, t, cond)


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if hasattr(x, "shape") else None


# ---------------------------------------------------------------------------------------------------- VE view
class PriorDenoiser(nn.Module):
    r"""House-style VE view of a prior: :math:`D(x, s) = \hat z_0(a_t x, t)` with :math:`t = t(s)` (§3.1).

    ``x = z_0 + s\,\varepsilon`` (VE form) is mapped to the native :math:`z_t = a_t x` since
    :math:`a_t(z_0 + s_t\varepsilon) = a_t z_0 + b_t\varepsilon`.

    Args:
        prior: any :class:`Prior`.
        cond: conditioning passed to every call.
    """

    def __init__(self, prior: Prior, cond: Any = None) -> None:
        super().__init__()
        self.prior = prior
        self.cond = cond

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``D(x, sigma)``, ``sigma`` a float or ``(B,)`` tensor; returns ``x0_hat``."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = batch_scalar(sigma, x.shape[0], device=x.device, dtype=dtype, name="sigma")
        t = self.prior.t_of_sigma(sigma)
        a_t, _ = self.prior.scales(t)
        return self.prior.predict_x0(append_dims(a_t.to(x.dtype), x.ndim) * x, t, self.cond)


def as_denoiser(prior: Prior, cond: Any = None) -> PriorDenoiser:
    """Wrap ``prior`` as the VE denoiser ``D(x, sigma) -> x0_hat`` of house-style F (docs/method.md §3.1)."""
    return PriorDenoiser(prior, cond)
