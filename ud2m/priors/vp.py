"""Variance-preserving (DDPM) noise schedules with a continuous-time extension (docs/method.md §1.2).

The table ᾱ_t = ∏_{i≤t}(1 − β_i) of Ho et al. (2020) is built exactly as diffusers builds it (float32 cumulative
product of the betas of the scheduler config), so integer timesteps reproduce diffusers' schedulers. Non-integer ``t``
**[ours]** interpolates the log-SNR λ(t) = log(ᾱ_t/(1 − ᾱ_t)) linearly between integers and sets
ᾱ(t) = sigmoid(λ(t)); ``t_of_sigma`` inverts it by ``searchsorted`` on the monotone table. Both directions are
differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ud2m.priors.base import NoiseSchedule

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    beta_schedule: str = "linear",
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    r"""β table of a diffusers scheduler config (float32, as diffusers computes it).

    * ``linear``: :math:`\beta_i` evenly spaced from ``beta_start`` to ``beta_end``;
    * ``scaled_linear``: :math:`\beta_i = (\sqrt{\beta_0} + (\sqrt{\beta_1}-\sqrt{\beta_0})\,i/(T-1))^2`
      (SD, SDXL, LCM);
    * ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal (2021), β capped at 0.999.

    Args:
        beta_schedule: one of ``BETA_SCHEDULES``.
        beta_start, beta_end: end points of the (scaled) linear schedules.
        num_train_timesteps: :math:`T`.

    Returns:
        ``(T,)`` float32 tensor.
    """
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {beta_schedule!r}")


class VPSchedule(NoiseSchedule):
    r"""VP schedule :math:`a_t = \sqrt{\bar\alpha_t}`, :math:`b_t = \sqrt{1-\bar\alpha_t}` on :math:`t\in[0, T-1]`.

    Args:
        alphas_cumprod: ``(T,)`` table :math:`\bar\alpha_0 > \dots > \bar\alpha_{T-1}`, strictly inside (0, 1).
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a (T,) table with T >= 2, got shape {tuple(ac.shape)}")
        if not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod: expected strictly decreasing values in (0, 1) (zero-SNR not supported)")
        self.register_buffer("alphas_cumprod", ac)  # (T,) float64
        self.register_buffer("log_snr", torch.log(ac) - torch.log1p(-ac))  # (T,) λ_t, decreasing
        self.num_train_timesteps = ac.numel()
        self.t_max = float(ac.numel() - 1)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> VPSchedule:
        """Schedule from a β table, with diffusers' float32 cumulative product."""
        betas = torch.as_tensor(betas, dtype=torch.float32)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> VPSchedule:
        """Schedule from a diffusers scheduler config (a mapping, or a scheduler with ``.config``).

        Reads ``trained_betas`` if set, else ``beta_schedule``/``beta_start``/``beta_end``/``num_train_timesteps``.

        Raises:
            ValueError: for an unknown ``beta_schedule`` or ``rescale_betas_zero_snr=True``.
        """
        config = dict(getattr(config, "config", config))
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("scheduler config: rescale_betas_zero_snr=True (zero terminal SNR) is not supported")
        if config.get("trained_betas") is not None:
            return cls.from_betas(torch.as_tensor(config["trained_betas"]))
        betas = make_betas(
            config.get("beta_schedule", "linear"),
            beta_start=config.get("beta_start", 1e-4),
            beta_end=config.get("beta_end", 0.02),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
        )
        return cls.from_betas(betas)

    def log_snr_at(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""Continuous log-SNR :math:`\lambda(t)` (float64), linear between integers, exact table value at integers."""
        t = self.check_time(t)
        t64 = t.to(torch.float64)
        i0 = t64.detach().floor().clamp(max=self.t_max - 1).long()  # t = T-1 uses the last interval with w = 1
        w = t64 - i0.to(torch.float64)
        return torch.lerp(self.log_snr[i0], self.log_snr[i0 + 1], w)  # float64; lerp is exact at w = 0 and w = 1

    def alpha_bar(self, t: float | torch.Tensor) -> torch.Tensor:
        r""":math:`\bar\alpha(t) = \operatorname{sigmoid}(\lambda(t))`, float64 for internal use."""
        return torch.sigmoid(self.log_snr_at(t))

    def scales(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\sqrt{\bar\alpha(t)}, \sqrt{1-\bar\alpha(t)})` with the shape and float dtype of ``t``."""
        dtype = _float_dtype(t)
        lam = self.log_snr_at(t)  # float64
        # sigmoid(-λ) = 1 - ᾱ without cancellation at small t
        return torch.sigmoid(lam).sqrt().to(dtype), torch.sigmoid(-lam).sqrt().to(dtype)

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        r""":math:`s_t = \exp(-\lambda(t)/2) = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`."""
        return torch.exp(-0.5 * self.log_snr_at(t)).to(_float_dtype(t))

    def t_of_sigma(self, s: float | torch.Tensor) -> torch.Tensor:
        r"""Continuous :math:`t` with :math:`\lambda(t) = -2\log s`, clamped to ``[0, T-1]``.

        ``searchsorted`` on the increasing table :math:`-\lambda` brackets the target, then linear interpolation in
        :math:`\lambda` (the exact inverse of :meth:`log_snr_at`). Differentiable in ``s`` inside the range.
        """
        dtype = _float_dtype(s)
        s = torch.as_tensor(s, dtype=torch.float64, device=self.log_snr.device)
        lam = -2.0 * torch.log(s)
        neg = -self.log_snr  # increasing
        i1 = torch.searchsorted(neg, -lam.detach().reshape(-1)).reshape(lam.shape)
        i1 = i1.clamp(1, self.num_train_timesteps - 1)
        i0 = i1 - 1
        w = (self.log_snr[i0] - lam) / (self.log_snr[i0] - self.log_snr[i1])
        return (i0.to(torch.float64) + w.clamp(0.0, 1.0)).to(dtype)


def _float_dtype(x: Any) -> torch.dtype:
    return torch.float64 if torch.is_tensor(x) and x.dtype == torch.float64 else torch.float32
