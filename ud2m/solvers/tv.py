r"""Total-variation regularisers and the PDHG data step (docs/method.md §6.1, §6.3), for images and videos.

Owns the weighted forward-difference operator :math:`D` (zero at the last index) on ``(B, C, H, W)`` images and
``(B, C, T, H, W)`` videos with its exact adjoint, the TV values, and the Chambolle-Pock (PDHG) solver of the
"data-scaled" objective of §6.3

.. math:: \min_u \tfrac12\|Au - y\|^2 + \lambda_\text{tv}\,\mathrm{reg}(u) + \tfrac{1}{2\gamma}\|u - \tilde x\|^2,

used by the classical TV baseline (``ud2m.solvers.baselines``) and by LVTINO's data step. Chambolle & Pock (2011),
"A first-order primal-dual algorithm for convex problems with applications to imaging", Algorithm 1 with
:math:`\theta = 1`. Everything is batched per sample (``gamma``, ``lam_tv``, step sizes are ``(B,)``), fp32
(or the input's dtype), and differentiable when autograd is on (the iterations are unrolled).

Regularisers (``reg``), per colour channel, summed over the whole image/video:

* ``"tv2"``: isotropic spatial TV :math:`\sum\sqrt{(D_h u)^2 + (D_v u)^2}` (videos: frame by frame);
* ``"tv3"``: isotropic spatio-temporal TV :math:`\sum\sqrt{\alpha(D_t u)^2 + (D_h u)^2 + (D_v u)^2}` (videos);
* ``"tv_t"``: anisotropic temporal TV :math:`\sum\sqrt\alpha\,|D_t u|` (videos; :math:`\alpha = 1` is §6.3's TV_t).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ud2m.operators.base import LinearOperator
from ud2m.utils import append_dims, batch_dot, batch_norm_sq, batch_scalar, randn

REGULARISERS = ("tv2", "tv3", "tv_t")


# ---------------------------------------------------------------------------------------------- difference operator
def _axes(x: torch.Tensor, weights: tuple[float, ...]) -> list[tuple[int, float]]:
    """``(dim, weight)`` of every active direction: h -> last dim, v -> dim -2, t -> dim -3 (videos only)."""
    if x.ndim not in (4, 5):
        raise ValueError(f"TV: expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    if len(weights) != x.ndim - 2:
        raise ValueError(
            f"TV: expected {x.ndim - 2} weights (lambda_h, lambda_v{', lambda_t' if x.ndim == 5 else ''}) for "
            f"shape {tuple(x.shape)}, got {len(weights)}"
        )
    return [(x.ndim - 1 - i, float(w)) for i, w in enumerate(weights) if float(w) != 0.0]


def _tracked(x: torch.Tensor) -> bool:
    """Whether autograd records ops on ``x`` (then the out=/in-place fast paths, which it refuses, are skipped)."""
    return torch.is_grad_enabled() and x.requires_grad


def _diff(x: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Forward difference along ``dim``, zero at the last index (written into ``out`` when given: one pass)."""
    n = x.shape[dim]
    if _tracked(x):
        d = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
        return torch.cat([d, torch.zeros_like(x.narrow(dim, 0, 1))], dim)
    out = torch.empty_like(x) if out is None else out
    torch.sub(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), out=out.narrow(dim, 0, n - 1))
    out.narrow(dim, n - 1, 1).zero_()
    return out


def _diff_adjoint(q: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Adjoint of :func:`_diff`: :math:`(D^\top q)_j = q_{j-1}[j \ge 1] - q_j[j \le n-2]` (the last entry of q
    is ignored: Dx is always 0 there), in one pass over the interior."""
    n = q.shape[dim]
    if _tracked(q) or n == 1:
        zero = torch.zeros_like(q.narrow(dim, 0, 1))
        qm = torch.cat([q.narrow(dim, 0, n - 1), zero], dim)
        return torch.cat([zero, qm.narrow(dim, 0, n - 1)], dim) - qm
    out = torch.empty_like(q)
    out.narrow(dim, 0, 1).copy_(q.narrow(dim, 0, 1)).neg_()
    torch.sub(q.narrow(dim, 0, n - 2), q.narrow(dim, 1, n - 2), out=out.narrow(dim, 1, n - 2))
    out.narrow(dim, n - 1, 1).copy_(q.narrow(dim, n - 2, 1))
    return out


def forward_diff(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    r"""Weighted forward differences :math:`Dx = (\lambda_k D_k x)_k` over the directions with non-zero weight.

    Args:
        x: ``(B, C, H, W)`` with ``weights = (lambda_h, lambda_v)``, or ``(B, C, T, H, W)`` with
            ``weights = (lambda_h, lambda_v, lambda_t)``. ``h`` differences along W, ``v`` along H, ``t`` along T.

    Returns:
        ``(B, K, C, ...)``: K = number of non-zero weights, each component zero at its last index.

    >>> forward_diff(torch.tensor([[[[0.0, 1.0, 3.0]]]]), (1.0, 1.0))[0, :, 0, 0]
    tensor([[1., 2., 0.],
            [0., 0., 0.]])
    """
    axes = _axes(x, weights)
    if _tracked(x):
        return torch.stack([w * _diff(x, dim) for dim, w in axes], dim=1)
    out = x.new_empty(x.shape[0], len(axes), *x.shape[1:])
    for k, (dim, w) in enumerate(axes):
        _diff(x, dim, out=out[:, k])  # dims of x are those of out[:, k]
        if w != 1.0:
            out[:, k].mul_(w)
    return out


def forward_diff_adjoint(q: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    r"""Exact adjoint :math:`D^\top q = \sum_k \lambda_k D_k^\top q_k` of :func:`forward_diff`.

    Args:
        q: ``(B, K, C, ...)`` dual field.
        weights: the weights given to :func:`forward_diff`.
    """
    axes = _axes(q[:, 0], weights)
    if q.shape[1] != len(axes):
        raise ValueError(f"TV: dual field has {q.shape[1]} components, weights {weights} give {len(axes)}")
    if _tracked(q):
        return sum(w * _diff_adjoint(q[:, k], dim) for k, (dim, w) in enumerate(axes))
    out = None
    for k, (dim, w) in enumerate(axes):
        term = _diff_adjoint(q[:, k], dim)
        out = (term.mul_(w) if w != 1.0 else term) if out is None else out.add_(term, alpha=w)
    return out


def diff_norm_sq_bound(weights: tuple[float, ...]) -> float:
    r"""Upper bound :math:`\|D\|^2 \le 4\sum_k\lambda_k^2` (each 1-D forward difference has norm at most 2)."""
    return 4.0 * sum(float(w) ** 2 for w in weights)


def reg_weights(reg: str, ndim: int, alpha: float = 1.0) -> tuple[float, ...]:
    r"""Direction weights of a named regulariser (module docstring) for ``ndim``-dimensional batches.

    >>> reg_weights("tv3", 5, alpha=4.0)
    (1.0, 1.0, 2.0)
    """
    if reg not in REGULARISERS:
        raise ValueError(f"reg: expected one of {REGULARISERS}, got {reg!r}")
    if ndim == 4:
        if reg != "tv2":
            raise ValueError(f"reg={reg!r} needs a video (B, C, T, H, W); images take reg='tv2'")
        return (1.0, 1.0)
    if ndim != 5:
        raise ValueError(f"TV: expected a 4-d image or 5-d video batch, got {ndim} dims")
    return {"tv2": (1.0, 1.0, 0.0), "tv3": (1.0, 1.0, math.sqrt(alpha)), "tv_t": (0.0, 0.0, math.sqrt(alpha))}[reg]


def tv_norm(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    r"""Isotropic weighted TV :math:`\sum_{c,i}\sqrt{\sum_k(\lambda_k D_k x)_{c,i}^2}` per sample, ``(B,)``."""
    return forward_diff(x, weights).square().sum(1).sqrt().flatten(1).sum(1)


def project_dual(q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r"""Projection onto :math:`\{\|q_{c,i}\|_2 \le \lambda\}` per voxel and channel (the conjugate of
    :math:`\lambda\,\mathrm{TV}`): :math:`q / \max(1, \|q\|/\lambda)`. With one direction (TV_t) this is the clip to
    :math:`[-\lambda, \lambda]`. ``lam`` is ``(B,)``; ``lam = 0`` gives 0."""
    if q.shape[1] == 1:  # one direction: the clip, without the norm's square root (TV_t's PDHG runs it 200 times)
        lam = append_dims(lam, q.ndim)
        return torch.clamp(q, -lam, lam)
    lam = append_dims(lam, q.ndim - 1)  # (B, 1, ...) against the norm over K
    norm = q.square().sum(1).sqrt()  # (B, C, ...)
    return q * (lam / torch.maximum(norm, lam).clamp_min(torch.finfo(q.dtype).tiny)).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- PDHG
class PDHGState(NamedTuple):
    """Primal iterate ``u`` (image space), duals ``p`` (measurement space) and ``q`` (``(B, K, C, ...)``)."""

    u: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor


def op_norm_sq(op: LinearOperator, x_like: torch.Tensor, iters: int = 20) -> torch.Tensor:
    r"""Per-sample :math:`\|A\|^2` by ``iters`` power iterations on :math:`A^\top A`, ``(B,)`` (detached).

    The start vector comes from a fixed-seed local generator so the estimate is deterministic (it is a step-size
    rule, not a random draw of the method). Power iteration approaches :math:`\|A\|^2` from below.
    """
    v = randn(x_like.shape, torch.Generator().manual_seed(0), device=x_like.device, dtype=x_like.dtype)
    for _ in range(iters):
        v = v / append_dims(batch_norm_sq(v).sqrt().to(v.dtype).clamp_min(1e-30), v.ndim)
        v = op.A_adjoint_A(v).detach()
    v = v / append_dims(batch_norm_sq(v).sqrt().to(v.dtype).clamp_min(1e-30), v.ndim)
    return batch_norm_sq(op.A(v)).to(x_like.dtype).detach()


def pdhg_step_size(op: LinearOperator, x_like: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    r"""§6.3 step size :math:`\tau = \sigma = 1/\sqrt L`, :math:`L = 1.01\,\|A\|^2_\text{power} + 4\sum\lambda_k^2`
    (1 % margin over the power-iteration estimate, which is a lower bound), ``(B,)``."""
    return (1.01 * op_norm_sq(op, x_like) + diff_norm_sq_bound(weights)).rsqrt()


def pdhg_solve(
    op: LinearOperator,
    x_tilde: torch.Tensor,
    y: torch.Tensor,
    *,
    gamma: float | torch.Tensor,
    lam_tv: float | torch.Tensor,
    reg: str = "tv2",
    alpha: float = 1.0,
    iters: int = 200,
    tau: float | torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
    relaxation: float = 1.0,
) -> PDHGState:
    r"""Chambolle-Pock iterations of §6.3 for :math:`\min_u \tfrac12\|Au-y\|^2 + \lambda_\text{tv}\mathrm{reg}(u) +
    \tfrac1{2\gamma}\|u-\tilde x\|^2`, :math:`K = [A; D]`, :math:`\theta = 1`, from :math:`u = \bar u = \tilde x`,
    :math:`p = q = 0`:

    .. math::
        p &\leftarrow (p + \sigma(A\bar u - y))/(1 + \sigma) \\
        q &\leftarrow \Pi_{\lambda_\text{tv}}(q + \sigma D\bar u) \\
        u^+ &\leftarrow \big(u - \tau(A^\top p + D^\top q) + (\tau/\gamma)\tilde x\big)/(1 + \tau/\gamma) \\
        \bar u &\leftarrow 2u^+ - u, \quad u \leftarrow u^+

    Args:
        op: linear operator (PDHG needs :math:`A^\top`).
        x_tilde: anchor and start ``(B, C, H, W)`` or ``(B, C, T, H, W)``.
        y: measurement ``(B, ...)``.
        gamma: proximity weight, float or ``(B,)``, ``> 0``; ``inf`` removes the proximity term (the term
            :math:`\tau/\gamma` is then exactly 0).
        lam_tv: TV weight :math:`\lambda_\text{tv} \ge 0`, float or ``(B,)`` (data-scaled units, §6.3).
        reg: ``"tv2"``, ``"tv3"`` or ``"tv_t"`` (module docstring).
        alpha: temporal weight :math:`\alpha` of ``tv3``/``tv_t``.
        iters: number of iterations.
        tau, sigma: step sizes (float or ``(B,)``); ``None`` uses :func:`pdhg_step_size` for both.
        relaxation: :math:`\rho \in (0, 2)` **[ours]**: 1 is the iteration above (the reference's); otherwise the
            over-relaxed primal-dual iteration of Condat (2013, Algorithm 3.1 with :math:`\rho_n = \rho`), same
            minimiser, same step condition :math:`\tau\sigma\|K\|^2 < 1`. Its gain is problem-dependent: on
            LVTINO problem A's clips ρ = 1.9 needs half the iterations for the same PSNR (``benchmarks/video.py
            ablation``), on a random γ = ∞ TV_t problem it gained nothing, and near 2 it can oscillate early:

            .. math::
                \tilde u = (u - \tau K^\top(p, q) + (\tau/\gamma)\tilde x)/(1 + \tau/\gamma), \quad
                (\tilde p, \tilde q) = \mathrm{prox}_{\sigma F^*}((p, q) + \sigma K(2\tilde u - u)), \quad
                (u, p, q) \mathrel{+}= \rho\,((\tilde u, \tilde p, \tilde q) - (u, p, q)).

    Returns:
        :class:`PDHGState` after ``iters`` iterations (not clamped).
    """
    if not 0 < relaxation < 2:
        raise ValueError(f"PDHG: relaxation must lie in (0, 2), got {relaxation}")
    if not isinstance(op, LinearOperator):
        raise ValueError(f"PDHG needs a LinearOperator (with A_adjoint), got {type(op).__name__}")
    B, dtype, dev = x_tilde.shape[0], x_tilde.dtype, x_tilde.device
    weights = reg_weights(reg, x_tilde.ndim, alpha)
    gamma = batch_scalar(gamma, B, device=dev, dtype=dtype, name="gamma")
    lam = batch_scalar(lam_tv, B, device=dev, dtype=dtype, name="lam_tv")
    if not bool((gamma > 0).all()) or not bool((lam >= 0).all()):
        raise ValueError(f"PDHG: expected gamma > 0 and lam_tv >= 0, got gamma={gamma}, lam_tv={lam}")
    step = pdhg_step_size(op, x_tilde, weights) if tau is None or sigma is None else None
    tau = batch_scalar(step if tau is None else tau, B, device=dev, dtype=dtype, name="tau")
    sigma = batch_scalar(step if sigma is None else sigma, B, device=dev, dtype=dtype, name="sigma")
    c = append_dims(tau / gamma, x_tilde.ndim)  # τ/γ, exactly 0 for γ = inf
    c = c if bool(c.any()) else None  # None: no proximity term anywhere (the fused primal step)
    t_u, s_p = append_dims(tau, x_tilde.ndim), append_dims(sigma, y.ndim)
    s_q = append_dims(sigma, x_tilde.ndim + 1)
    u = u_bar = x_tilde
    p = torch.zeros_like(y)
    q = torch.zeros_like(forward_diff(x_tilde, weights))  # (B, K, C, ...)
    if relaxation != 1.0:
        return _pdhg_relaxed(op, x_tilde, y, p, q, lam, weights, t_u, s_p, s_q, c, iters, relaxation)
    for _ in range(iters):
        p = (p + s_p * (op.A(u_bar) - y)) / (1 + s_p)
        q = project_dual(torch.addcmul(q, s_q, forward_diff(u_bar, weights)), lam)
        u_next = _primal(u, op.A_adjoint(p) + forward_diff_adjoint(q, weights), t_u, c, x_tilde)
        u_bar, u = torch.lerp(u, u_next, 2.0), u_next  # ū = 2u⁺ − u (θ = 1)
    return PDHGState(u, p, q)


def _primal(u: torch.Tensor, grad: torch.Tensor, t_u: torch.Tensor, c: torch.Tensor | None, x_tilde: torch.Tensor):
    """u⁺ = (u − τ·grad + (τ/γ)x̃)/(1 + τ/γ), one fused pass when ``c`` (τ/γ) is None: γ = ∞ for every sample
    (decided once per solve, so no device sync per iteration)."""
    step = torch.addcmul(u, t_u, grad, value=-1.0)
    return step if c is None else (step + c * x_tilde) / (1 + c)


def _pdhg_relaxed(op, x_tilde, y, p, q, lam, weights, t_u, s_p, s_q, c, iters: int, rho: float) -> PDHGState:
    """The over-relaxed iteration of :func:`pdhg_solve` (``relaxation`` there), from ``u = x_tilde``, ``p = q = 0``.

    Primal-first, so the first primal step from zero duals leaves ``x_tilde`` in place; a last primal step from the
    final duals closes the run, so ``iters`` iterations make ``iters`` dual and ``iters`` primal updates, and at
    ``rho = 1`` the result is the plain iteration's (tested)."""

    def primal(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return _primal(u, op.A_adjoint(p) + forward_diff_adjoint(q, weights), t_u, c, x_tilde)

    u = x_tilde
    for _ in range(iters):
        u_new = primal(u, p, q)
        u_bar = torch.lerp(u, u_new, 2.0)
        p_new = (p + s_p * (op.A(u_bar) - y)) / (1 + s_p)
        q_new = project_dual(torch.addcmul(q, s_q, forward_diff(u_bar, weights)), lam)
        u, p, q = torch.lerp(u, u_new, rho), torch.lerp(p, p_new, rho), torch.lerp(q, q_new, rho)
    return PDHGState(primal(u, p, q), p, q)


def data_step_pdhg(
    op: LinearOperator,
    x_tilde: torch.Tensor,
    y: torch.Tensor,
    *,
    gamma: float | torch.Tensor,
    lam_tv: float | torch.Tensor,
    reg: str = "tv2",
    alpha: float = 1.0,
    iters: int = 200,
    tau: float | torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
    relaxation: float = 1.0,
    clamp: bool = True,
) -> torch.Tensor:
    r"""LVTINO's TV data step (§6.3) by PDHG: :func:`pdhg_solve`, then clamp to [-1, 1].

    .. math:: \mathrm{data\_step}(\tilde x) = \arg\min_u \tfrac12\|Au - y\|^2 + \lambda_\text{tv}\mathrm{reg}(u)
              + \tfrac{1}{2\gamma}\|u - \tilde x\|^2

    With ``lam_tv = 0`` and finite ``gamma`` the minimiser is ``op.prox_l2(x_tilde, y, gamma)``. The reference's
    Problem A solver is ``gamma=inf, reg="tv_t", tau=sigma=0.25, iters=200``. Arguments as in :func:`pdhg_solve`;
    ``clamp=False`` returns the raw iterate.
    """
    u = pdhg_solve(
        op,
        x_tilde,
        y,
        gamma=gamma,
        lam_tv=lam_tv,
        reg=reg,
        alpha=alpha,
        iters=iters,
        tau=tau,
        sigma=sigma,
        relaxation=relaxation,
    ).u
    return u.clamp(-1.0, 1.0) if clamp else u


def primal_dual_gap(
    op: LinearOperator,
    state: PDHGState,
    x_tilde: torch.Tensor,
    y: torch.Tensor,
    *,
    gamma: float | torch.Tensor,
    lam_tv: float | torch.Tensor,
    reg: str = "tv2",
    alpha: float = 1.0,
) -> torch.Tensor:
    r"""Duality gap of a :class:`PDHGState` for finite ``gamma``, ``(B,)``; it is :math:`\ge 0` and 0 exactly at
    the saddle point (optimality certificate). With :math:`f = \tfrac12\|\cdot - y\|^2`,
    :math:`g = \tfrac1{2\gamma}\|\cdot - \tilde x\|^2` and a feasible :math:`q` (:math:`h^*(q) = 0`):

    .. math:: P(u) = f(Au) + \lambda_\text{tv}\mathrm{TV}(u) + g(u),\quad
              D(p, q) = -\tfrac12\|p\|^2 - \langle p, y\rangle - \langle w, \tilde x\rangle - \tfrac\gamma2\|w\|^2,
              \quad w = -(A^\top p + D^\top q)
    """
    B, dtype, dev = x_tilde.shape[0], x_tilde.dtype, x_tilde.device
    weights = reg_weights(reg, x_tilde.ndim, alpha)
    gamma = batch_scalar(gamma, B, device=dev, dtype=torch.float64, name="gamma")
    lam = batch_scalar(lam_tv, B, device=dev, dtype=torch.float64, name="lam_tv")
    if bool(torch.isinf(gamma).any()):
        raise ValueError("primal_dual_gap: defined for finite gamma only")
    u, p, q = state
    primal = 0.5 * batch_norm_sq(op.A(u) - y) + lam * tv_norm(u, weights).double()
    primal = primal + batch_norm_sq(u - x_tilde) / (2 * gamma)
    w = -(op.A_adjoint(p) + forward_diff_adjoint(q, weights))
    dual = -0.5 * batch_norm_sq(p) - batch_dot(p, y) - batch_dot(w, x_tilde) - 0.5 * gamma * batch_norm_sq(w)
    return (primal - dual).to(dtype)
