"""Batched conjugate gradient and the CG-based proximal map of a linear operator (docs/method.md §2.3-2.4).

Every sample of the batch has its own step sizes and its own stopping test; converged samples are frozen.
Inner products are accumulated in float64. The default backward pass of the prox is *implicit*: it solves one
more linear system with the same CG instead of differentiating through the iterations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from ud2m.utils import append_dims, batch_dot, batch_norm_sq

logger = logging.getLogger(__name__)


class CGResult(NamedTuple):
    """Solution of a batched CG solve and its per-sample diagnostics."""

    x: torch.Tensor
    iterations: torch.Tensor  # (B,) int64
    converged: torch.Tensor  # (B,) bool


def conjugate_gradient(
    apply_M: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    rtol: float = 1e-5,
    max_iter: int = 100,
    warn: bool = True,
) -> CGResult:
    r"""Solve :math:`M x = b` for a symmetric positive (semi-)definite ``M``, one system per sample.

    Stops a sample when :math:`\|r_b\| \le \mathrm{rtol}\,\|b_b\|`; the loop ends when every sample has
    stopped or after ``max_iter`` iterations. Samples with ``b = 0`` return 0. Differentiable (unrolled)
    when called with autograd enabled.

    Args:
        apply_M: batched map ``(B, ...) -> (B, ...)``.
        b: right-hand side ``(B, ...)``.
        x0: warm start (default 0).
        rtol: relative residual tolerance per sample.
        max_iter: iteration cap.
        warn: log a warning when a sample has not converged after ``max_iter`` iterations (off for intended
            truncation, e.g. LVTINO's truncated projection).

    Returns:
        ``CGResult(x, iterations, converged)``.
    """
    x = torch.zeros_like(b) if x0 is None else x0
    b_norm = batch_norm_sq(b).sqrt()
    zero_rhs = b_norm == 0
    x = torch.where(append_dims(zero_rhs, b.ndim), torch.zeros_like(x), x)
    r = b - apply_M(x)
    p = r
    rs = batch_norm_sq(r)
    tol = rtol * b_norm
    active = rs.sqrt() > tol
    iterations = torch.zeros_like(active, dtype=torch.int64)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Mp = apply_M(p)
        pMp = batch_dot(p, Mp)
        # a frozen sample gets alpha = beta = 0, so x and r stop moving
        alpha = torch.where(active & (pMp > 0), rs / pMp.clamp_min(1e-300), torch.zeros_like(rs))
        x = x + append_dims(alpha.to(x.dtype), x.ndim) * p
        r = r - append_dims(alpha.to(r.dtype), r.ndim) * Mp
        rs_new = batch_norm_sq(r)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = r + append_dims(beta.to(r.dtype), r.ndim) * p
        rs = torch.where(active, rs_new, rs)
        iterations = iterations + active.long()
        active = active & (rs.sqrt() > tol) & (pMp > 0)
    converged = rs.sqrt() <= tol
    if warn and not bool(converged.all()):
        worst = (rs.sqrt() / b_norm.clamp_min(1e-300)).max().item()
        logger.warning("CG stopped after %d iterations; worst relative residual %.2e > %.1e", max_iter, worst, rtol)
    return CGResult(x, iterations, converged)


def normal_matrix(op, gamma: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""Return :math:`v \mapsto (I + \gamma A^\top A) v` with per-sample ``gamma`` ``(B,)``."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        return v + append_dims(gamma, v.ndim).to(v.dtype) * op.A_adjoint_A(v)

    return apply


def cg_prox_solve(op, z, y, gamma, *, rtol, max_iter) -> CGResult:
    r"""Solve :math:`(I + \gamma A^\top A)x = z + \gamma A^\top y` by CG started at ``z`` (§2.3 step 1-2)."""
    g = append_dims(gamma, z.ndim).to(z.dtype)
    b = z + g * op.A_adjoint(y)
    return conjugate_gradient(normal_matrix(op, gamma), b, z, rtol=rtol, max_iter=max_iter)


class _ImplicitCGProx(torch.autograd.Function):
    """prox_l2 by CG with the implicit-function backward of docs/method.md §2.3 item 4."""

    @staticmethod
    def forward(ctx, z, y, gamma, op, rtol, max_iter):
        x = cg_prox_solve(op, z, y, gamma, rtol=rtol, max_iter=max_iter).x
        ctx.save_for_backward(x, y, gamma)
        ctx.op, ctx.rtol, ctx.max_iter = op, rtol, max_iter
        return x

    @staticmethod
    def backward(ctx, grad_x):
        x, y, gamma = ctx.saved_tensors
        op = ctx.op
        # (I + γAᵀA) is symmetric, so the adjoint system uses the same matrix: (I + γAᵀA) w = ∂L/∂x
        w = conjugate_gradient(normal_matrix(op, gamma), grad_x, grad_x, rtol=ctx.rtol, max_iter=ctx.max_iter).x
        grad_z = w if ctx.needs_input_grad[0] else None
        grad_y = append_dims(gamma, y.ndim).to(w.dtype) * op.A(w) if ctx.needs_input_grad[1] else None
        grad_gamma = None
        if ctx.needs_input_grad[2]:
            # ∂x/∂γ = -(I + γAᵀA)⁻¹ Aᵀ(Ax - y)  =>  ∂L/∂γ_b = <w_b, Aᵀ(y - Ax)_b>
            grad_gamma = batch_dot(w, op.A_adjoint(y - op.A(x))).to(gamma.dtype)
        return grad_z, grad_y, grad_gamma, None, None, None


def prox_l2_cg(
    op,
    z: torch.Tensor,
    y: torch.Tensor,
    gamma: torch.Tensor,
    *,
    rtol: float,
    max_iter: int,
    backward: str = "implicit",
) -> torch.Tensor:
    r"""CG proximal map :math:`\arg\min_x \tfrac{\gamma}{2}\|Ax-y\|^2 + \tfrac12\|x-z\|^2`, ``gamma`` ``(B,)``.

    ``backward="implicit"`` (default) differentiates the exact solution of the linear system;
    ``backward="unrolled"`` differentiates through the CG iterations (exact gradient of the truncated solve).
    Gradients with respect to operator parameters are not supported by the implicit backward.
    """
    if backward == "unrolled":
        return cg_prox_solve(op, z, y, gamma, rtol=rtol, max_iter=max_iter).x
    if backward != "implicit":
        raise ValueError(f"backward must be 'implicit' or 'unrolled', got {backward!r}")
    return _ImplicitCGProx.apply(z, y, gamma, op, rtol, max_iter)
