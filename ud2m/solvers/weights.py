r"""Data-weight rules of LATINO and LATINO-PRO (docs/method.md §4.3, §5.3): the step :math:`\gamma_k` of the
likelihood prox :math:`x^{(k)} = \mathrm{prox}_{\gamma_k g}(u^{(k)})` with
:math:`g(x) = \tfrac12\|Ax - y\|^2`, i.e. :math:`\gamma_k = \delta_k/\sigma_n^2` for the Langevin step
:math:`\delta_k` of Spagnoletti et al. (2025, LATINO / LATINO-PRO).

Every rule is a small callable ``rule(k, t, u, y, op, sigma_n, prior) -> gamma`` returning a ``(B,)`` tensor (one
step per sample, ``inf`` meaning projection onto :math:`\{Ax = y\}`):

* :class:`TableWeights`: the reference's tables, :math:`\delta_k = c(t_k)\,\nu_{t_k} R_k` with the residual
  :math:`R_k = \|A u^{(k)} - y\|` of the NOISELESS operator [ours] and a measurement-size rescaling [ours];
* :class:`DiscrepancyWeights`: Morozov's discrepancy principle on the prox output [ours], the default for operators
  without a tuned table;
* :class:`ConstantGamma`: a fixed :math:`\gamma` (tests, ablations).

The preset tables (:data:`LATINO_WEIGHTS`, :data:`LATINO_PRO_WEIGHTS`) are plain data: dicts from a preset name
(the operator preset it was tuned for, e.g. ``"latino/deblur_gaussian"``) to rule instances.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ud2m.operators.base import LinearOperator, Operator
from ud2m.priors.base import Prior
from ud2m.utils import batch_norm_sq, batch_scalar


def nu_of_t(prior: Prior, t: torch.Tensor) -> torch.Tensor:
    r"""VP-equivalent variance :math:`\nu_t = s_t^2/(1 + s_t^2)` (:math:`= 1 - \bar\alpha_t` for VP), §1.2."""
    s2 = prior.sigma(t).to(torch.float64) ** 2
    return s2 / (1 + s2)


def residual_norm(op: Operator, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-sample :math:`R = \|A u - y\|_2` with the noiseless operator, ``(B,)`` float64 [ours, §4.4]."""
    return batch_norm_sq(op.A(u) - y).sqrt()


def has_closed_form_prox(op: Operator) -> bool:
    """True when ``op``'s finite-gamma prox is closed form (§2.2), False for CG-only and nonlinear operators."""
    return isinstance(op, LinearOperator) and op.has_closed_form_prox()


def _gamma_from_delta(delta: torch.Tensor, sigma_n: torch.Tensor) -> torch.Tensor:
    r""":math:`\gamma = \delta/\sigma_n^2`, ``inf`` for noiseless data (:math:`\sigma_n = 0`, projection)."""
    inf = torch.full_like(delta, math.inf)
    return torch.where(sigma_n > 0, delta / sigma_n.clamp_min(1e-300) ** 2, inf)


class TableWeights:
    r"""The reference's table rule (docs/method.md §4.3):

    .. math:: \delta_k = c(t_k)\,\nu_{t_k}\,R_k\,\sqrt{m_\text{ref}/m}\;[/\sigma_n],\qquad
              \gamma_k = \delta_k/\sigma_n^2,

    :math:`c(t) = c_\text{hi}` if :math:`t > t_\text{switch}` else :math:`c_\text{lo}`,
    :math:`R_k = \|A u^{(k)} - y\|` per sample (noiseless A) when ``adaptive`` else 1, the division by
    :math:`\sigma_n` only when ``per_sigma`` (tables marked "/σ_n"), and the size factor :math:`\sqrt{m_\text{ref}/m}`
    (m = observed measurement entries per sample) only for adaptive rules with ``m_ref`` set: the residual grows like
    :math:`\sqrt m`, so constants tuned at size :math:`m_\text{ref}` transfer to other sizes [ours].

    Args:
        c_hi: constant for :math:`t > t_\text{switch}`.
        c_lo: constant for :math:`t \le t_\text{switch}`.
        t_switch: switch time; None uses ``c_hi`` at every t.
        adaptive: multiply by the residual :math:`R_k`.
        per_sigma: divide :math:`\delta` once more by :math:`\sigma_n`.
        m_ref: measurement size the constants were tuned for (None: no rescaling).
    """

    def __init__(
        self,
        c_hi: float,
        c_lo: float,
        t_switch: float | None = None,
        adaptive: bool = True,
        per_sigma: bool = False,
        m_ref: float | None = None,
    ) -> None:
        if c_hi < 0 or c_lo < 0:
            raise ValueError(f"TableWeights: constants must be >= 0, got c_hi={c_hi}, c_lo={c_lo}")
        self.c_hi, self.c_lo, self.t_switch = c_hi, c_lo, t_switch
        self.adaptive, self.per_sigma, self.m_ref = adaptive, per_sigma, m_ref

    def constant(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`c(t)` per sample, ``(B,)`` float64."""
        t = t.to(torch.float64)
        if self.t_switch is None:
            return torch.full_like(t, self.c_hi)
        return torch.where(t > self.t_switch, torch.full_like(t, self.c_hi), torch.full_like(t, self.c_lo))

    def __call__(self, k: int, t, u, y, op, sigma_n, prior) -> torch.Tensor:
        """Step ``gamma`` ``(B,)`` in ``u``'s dtype (see the class docstring)."""
        B = u.shape[0]
        t = batch_scalar(t, B, device=u.device, dtype=torch.float64, name="t")
        sigma_n = batch_scalar(sigma_n, B, device=u.device, dtype=torch.float64, name="sigma_n")
        delta = self.constant(t) * nu_of_t(prior, t).to(u.device)
        if self.adaptive:
            delta = delta * residual_norm(op, u, y)
            if self.m_ref is not None:
                delta = delta * torch.sqrt(self.m_ref / op.num_observed(y).to(torch.float64))
        if self.per_sigma:
            delta = delta / sigma_n
        return _gamma_from_delta(delta, sigma_n).to(u.dtype)

    def __repr__(self) -> str:
        return (
            f"TableWeights(c_hi={self.c_hi}, c_lo={self.c_lo}, t_switch={self.t_switch}, adaptive={self.adaptive}, "
            f"per_sigma={self.per_sigma}, m_ref={self.m_ref})"
        )


class DiscrepancyWeights:
    r"""Discrepancy rule [ours] (docs/method.md §4.3): per sample, the :math:`\gamma` for which the prox output meets
    Morozov's discrepancy principle

    .. math:: \|A\,\mathrm{prox}_{\gamma g}(u) - y\|^2 = \tau\, m\, \sigma_n^2,

    m = ``op.num_observed(y)``, found by ``iters`` steps of vectorised bisection on :math:`\log\gamma` over
    ``bounds`` (the residual decreases with :math:`\gamma`). If the target is unreachable (every probe falls on the
    same side of it) the nearest bound is returned (lower bound: even :math:`\gamma_\text{min}` fits better than the
    noise; upper bound: the data cannot be fitted that well). The search runs on detached tensors: :math:`\gamma` is
    a selected hyperparameter, not a differentiable function of ``u``. Operators without a closed-form prox (CG-only
    linear operators, nonlinear operators) fall back to the fixed rule :math:`c = 1`, non-adaptive (:math:`\gamma =
    \nu_t/\sigma_n^2`).

    Args:
        tau: discrepancy factor :math:`\tau`.
        iters: bisection steps (each costs one batched prox).
        bounds: search interval :math:`[\gamma_\text{min}, \gamma_\text{max}]`.
    """

    def __init__(self, tau: float = 1.0, iters: int = 20, bounds: tuple[float, float] = (1e-6, 1e8)) -> None:
        if not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"DiscrepancyWeights: bounds must satisfy 0 < lo < hi, got {bounds}")
        if tau <= 0 or iters < 1:
            raise ValueError(f"DiscrepancyWeights: expected tau > 0 and iters >= 1, got tau={tau}, iters={iters}")
        self.tau, self.iters, self.bounds = tau, iters, bounds
        self.fallback = TableWeights(1.0, 1.0, None, adaptive=False)

    def __call__(self, k: int, t, u, y, op, sigma_n, prior) -> torch.Tensor:
        """Step ``gamma`` ``(B,)`` in ``u``'s dtype (see the class docstring)."""
        if not has_closed_form_prox(op):
            return self.fallback(k, t, u, y, op, sigma_n, prior)
        u, y = u.detach(), y.detach()
        B = u.shape[0]
        sigma_n = batch_scalar(sigma_n, B, device=u.device, dtype=torch.float64, name="sigma_n")
        target = self.tau * op.num_observed(y).to(torch.float64) * sigma_n**2  # (B,)
        return self.solve(op, u, y, target).to(u.dtype)

    def solve(self, op: LinearOperator, u: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r"""Bisection on :math:`\log\gamma` for :math:`r(\gamma) = \|A\,\mathrm{prox}(u, y, \gamma) - y\|^2 =`
        ``target`` per sample; ``(B,)`` float64, clamped to the nearest bound when unreachable."""

        def r(log_gamma: torch.Tensor) -> torch.Tensor:
            return batch_norm_sq(op.A(op.prox_l2(u, y, log_gamma.exp().to(u.dtype))) - y)

        lo = torch.full_like(target, math.log(self.bounds[0]))
        hi = torch.full_like(target, math.log(self.bounds[1]))
        lo_moved, hi_moved = torch.zeros_like(target, dtype=torch.bool), torch.zeros_like(target, dtype=torch.bool)
        for _ in range(self.iters):
            mid = 0.5 * (lo + hi)
            above = r(mid) > target  # residual too large: need a larger gamma
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
            lo_moved, hi_moved = lo_moved | above, hi_moved | ~above
        # the end points themselves are never evaluated (a prox at gamma = 1e8 can be inaccurate in fp32): a side
        # that never moved means every probe fell on the other side of the target, i.e. it is unreachable
        log_gamma = 0.5 * (lo + hi)
        log_gamma = torch.where(hi_moved, log_gamma, torch.full_like(lo, math.log(self.bounds[1])))
        log_gamma = torch.where(lo_moved, log_gamma, torch.full_like(lo, math.log(self.bounds[0])))
        return log_gamma.exp()

    def __repr__(self) -> str:
        return f"DiscrepancyWeights(tau={self.tau}, iters={self.iters}, bounds={self.bounds})"


class ConstantGamma:
    r"""Fixed step :math:`\gamma_k = \gamma` for every k and sample (``inf``: projection onto :math:`Ax = y`).

    Args:
        gamma: the step, a float or a ``(B,)`` tensor.
    """

    def __init__(self, gamma: float | torch.Tensor) -> None:
        self.gamma = gamma

    def __call__(self, k: int, t, u, y, op, sigma_n, prior) -> torch.Tensor:
        """``gamma`` broadcast to ``(B,)`` in ``u``'s dtype."""
        return batch_scalar(self.gamma, u.shape[0], device=u.device, dtype=u.dtype, name="gamma")

    def __repr__(self) -> str:
        return f"ConstantGamma({self.gamma})"


# ---------------------------------------------------------------------------------------------------- preset tables
#: Measurement sizes of the reference presets (1024² RGB; SR outputs 64² and 32²; SD1.5 at 512²).
M_1024 = 3 * 1024 * 1024
M_SR16 = 3 * 64 * 64
M_SR32 = 3 * 32 * 32
M_512 = 3 * 512 * 512

_NON_ADAPTIVE_ONE = TableWeights(1.0, 1.0, None, adaptive=False)
_INPAINT_BAND = TableWeights(1.0, 0.5, 500, adaptive=False)

#: LATINO (8 steps, SDXL/DMD2 at 1024², σ_n = 2σ_y), docs/method.md §4.3. ``deblur_gaussian`` is the σ_k < 10
#: row, ``deblur_gaussian_wide`` the σ_k ≥ 10 row; ``sd15_deblur_motion`` is LCM-LoRA SD1.5 at 512² (t_switch
#: unverified); ``default`` is the discrepancy rule used for every operator without a table.
LATINO_WEIGHTS: dict[str, Any] = {
    "latino/deblur_gaussian": TableWeights(5e-4, 2e-4, 400, adaptive=True, m_ref=M_1024),
    "latino/deblur_gaussian_wide": TableWeights(7e-4, 3e-4, 400, adaptive=True, m_ref=M_1024),
    "latino/deblur_motion": TableWeights(4e-4, 2e-4, 400, adaptive=True, m_ref=M_1024),
    "latino/inpaint_band": _INPAINT_BAND,
    "latino/sr_x16": TableWeights(0.3, 0.2, 300, adaptive=True, m_ref=M_SR16),
    "latino/sr_x32": TableWeights(0.15, 0.3, 300, adaptive=True, m_ref=M_SR32),
    "latino/sr_x4": _NON_ADAPTIVE_ONE,  # [ours]: the reference crashes (no branch)
    "latino/sr_x8": _NON_ADAPTIVE_ONE,
    "latino/sd15_deblur_motion": TableWeights(8e-4, 7e-4, 400, adaptive=True, m_ref=M_512),
    "default": DiscrepancyWeights(),
}

#: LATINO-PRO (docs/method.md §5.3): preset name -> ``(weights_inner, weights_final)`` for the 4-step chains and the
#: final 8-step run. ``inpaint_band`` is [ours] (the reference has no branch).
LATINO_PRO_WEIGHTS: dict[str, tuple[Any, Any]] = {
    "latino/deblur_gaussian": (
        TableWeights(4e-3, 2e-3, 500, adaptive=True, m_ref=M_1024),
        TableWeights(4e-4, 4e-4, None, adaptive=True, m_ref=M_1024),
    ),
    "latino/deblur_gaussian_wide": (TableWeights(2e-2, 2e-3, 400, adaptive=True, m_ref=M_1024),) * 2,
    "latino/deblur_motion": (
        TableWeights(4e-4, 5e-4, 500, adaptive=True, m_ref=M_1024),
        TableWeights(5e-4, 9e-4, 400, adaptive=True, m_ref=M_1024),
    ),
    "latino/sr_x16": (TableWeights(6e-4, 9e-4, 300, adaptive=True, per_sigma=True, m_ref=M_SR16),) * 2,
    "latino/sr_x32": (TableWeights(0.015, 9e-3, 300, adaptive=True, per_sigma=True, m_ref=M_SR32),) * 2,
    "latino/sr_x4": (_NON_ADAPTIVE_ONE, _NON_ADAPTIVE_ONE),
    "latino/sr_x8": (_NON_ADAPTIVE_ONE, _NON_ADAPTIVE_ONE),
    "latino/inpaint_band": (_INPAINT_BAND, _INPAINT_BAND),
    "default": (DiscrepancyWeights(), DiscrepancyWeights()),
}

__all__ = [
    "LATINO_PRO_WEIGHTS",
    "LATINO_WEIGHTS",
    "ConstantGamma",
    "DiscrepancyWeights",
    "TableWeights",
    "has_closed_form_prox",
    "nu_of_t",
    "residual_norm",
]
