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

All three are :class:`WeightRule` subclasses, so a config chooses one by ``class_path``/``init_args``. The rules
tuned for an operator preset live IN the preset file (its ``solver:`` block, e.g. ``ud2m/assets/operators/latino/
deblur_gaussian.yaml``), not in a table keyed by preset name: :func:`preset_rules` reads them, and an operator
without tuned rules uses :class:`DiscrepancyWeights`.
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


class WeightRule:
    """A data-weight rule: ``rule(k, t, u, y, op, sigma_n, prior) -> gamma`` ``(B,)`` (the module docstring)."""

    def __call__(self, k: int, t, u, y, op, sigma_n, prior) -> torch.Tensor:
        raise NotImplementedError


class TableWeights(WeightRule):
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


class DiscrepancyWeights(WeightRule):
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


class ConstantGamma(WeightRule):
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


# ---------------------------------------------------------------------------------------------------- presets
def preset_rules(meta: dict[str, Any], method: str) -> dict[str, WeightRule]:
    """The weight rules a preset file declares for ``method`` (``latino``: ``{"weights": rule}``; ``latino_pro``:
    ``{"weights_inner": rule, "weights_final": rule}``), built from its ``solver: {method: {name: {class_path,
    init_args}}}`` block; ``{}`` when it declares none.

    Args:
        meta: the preset's metadata (:attr:`ud2m.operators.presets.Preset.meta`).
        method: the method's name.
    """
    from jsonargparse import ArgumentParser

    specs = (meta.get("solver") or {}).get(method) or {}
    parser = ArgumentParser(exit_on_error=False)
    for name in specs:
        parser.add_argument(f"--{name}", type=WeightRule)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        return vars(instantiate(parser.parse_object(specs)))
    except Exception as err:  # jsonargparse's own errors name the key
        raise ValueError(f"solver.{method}: not a valid set of weight rules ({err})") from err


__all__ = [
    "ConstantGamma",
    "DiscrepancyWeights",
    "TableWeights",
    "WeightRule",
    "has_closed_form_prox",
    "nu_of_t",
    "preset_rules",
    "residual_norm",
]
