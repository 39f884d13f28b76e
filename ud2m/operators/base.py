"""The forward-operator contract (docs/method.md §2.1): linear operators with a CG default prox, and nonlinear
operators whose prox is a few projected gradient steps.

A user adds a degradation by subclassing :class:`LinearOperator` and writing ``A`` and ``A_adjoint`` only; every
solver then works with it through the batched, differentiable conjugate-gradient prox of ``ud2m.operators.cg``.
Operators hold their state (kernels, masks) in buffers, never write solver settings to ``self`` in a math method,
and know nothing about diffusion time or noise (noise lives in ``ud2m.operators.noise``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ud2m.operators.cg import conjugate_gradient, prox_l2_cg
from ud2m.utils import append_dims, batch_dot, batch_scalar, broadcast_eps, check_finite, randn


class LinearOperator(nn.Module):
    r"""A linear forward map :math:`A` with adjoint, proximal map and pseudo-inverse.

    Subclasses implement :meth:`A` and :meth:`A_adjoint`, and may override :meth:`_prox` (closed form for
    finite ``gamma``), :meth:`_project` (``gamma = inf``), :meth:`A_dagger`, :meth:`lift` and
    :meth:`observed_mask`.

    Args:
        cg_rtol: relative residual at which CG stops (per sample).
        cg_max_iter: CG iteration cap.
        cg_backward: ``"implicit"`` (solve the adjoint system) or ``"unrolled"`` (autograd through iterations).
    """

    def __init__(self, *, cg_rtol: float = 1e-5, cg_max_iter: int = 100, cg_backward: str = "implicit") -> None:
        super().__init__()
        self.cg_rtol = cg_rtol
        self.cg_max_iter = cg_max_iter
        self.cg_backward = cg_backward

    # ------------------------------------------------------------------ the map
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Noiseless forward map."""
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Exact adjoint of :meth:`A`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`A` (no noise)."""
        return self.A(x)

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`A^\top A x`."""
        return self.A_adjoint(self.A(x))

    def at_size(self, hw: tuple[int, int]) -> LinearOperator:
        """This operator for ``H x W`` images. Operators whose state is drawn for one size (random masks, boxes)
        redraw it; the rest return themselves, and their shape checks run when they are applied."""
        return self

    # ------------------------------------------------------------------ proximal maps
    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        r"""Proximal map of the data term, :math:`\arg\min_x \tfrac{\gamma}{2}\|Ax-y\|^2 + \tfrac12\|x-z\|^2`.

        Equals :math:`(I + \gamma A^\top A)^{-1}(z + \gamma A^\top y)`; ``gamma = inf`` gives the projection of
        ``z`` onto :math:`\{x : Ax = y\}`.

        Args:
            z: point ``(B, ...)`` in image space.
            y: measurement ``(B, ...)``.
            gamma: float or ``(B,)`` tensor, one step per sample (may be ``inf``).
        """
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        is_inf = torch.isinf(gamma)
        if not bool(is_inf.any()):
            return self._prox(z, y, gamma)
        projected = self._project(z, y)
        if bool(is_inf.all()):
            return projected
        finite = self._prox(z, y, torch.where(is_inf, torch.ones_like(gamma), gamma))
        return torch.where(append_dims(is_inf, z.ndim), projected, finite)

    def has_closed_form_prox(self) -> bool:
        """True when the finite-``gamma`` prox of this instance is closed form rather than CG."""
        return type(self)._prox is not LinearOperator._prox

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Finite-``gamma`` prox; the default is CG. Closed forms override this."""
        return self.prox_l2_cg(z, y, gamma)

    def prox_l2_cg(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        gamma: float | torch.Tensor,
        *,
        rtol: float | None = None,
        max_iter: int | None = None,
        backward: str | None = None,
    ) -> torch.Tensor:
        """CG prox (docs/method.md §2.3), available on every operator so closed forms can be checked against it."""
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        return prox_l2_cg(
            self,
            z,
            y,
            gamma,
            rtol=self.cg_rtol if rtol is None else rtol,
            max_iter=self.cg_max_iter if max_iter is None else max_iter,
            backward=self.cg_backward if backward is None else backward,
        )

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Projection onto :math:`\{Ax = y\}`: :math:`z + A^\top (AA^\top)^{-1}(y - Az)`, CG in measurement space."""
        u = conjugate_gradient(
            lambda v: self.A(self.A_adjoint(v)), y - self.A(z), rtol=self.cg_rtol, max_iter=self.cg_max_iter
        ).x
        return z + self.A_adjoint(u)

    def project_cg(self, z: torch.Tensor, y: torch.Tensor, *, iters: int, eps: float = 0.0) -> torch.Tensor:
        r"""LVTINO's truncated projection (§2.4): CG on :math:`(A^\top A + \epsilon I)x = A^\top y + \epsilon z`
        from ``z``, stopped after ``iters`` iterations (truncation acts as regularisation), or earlier at round-off
        (a sample whose residual reached 10 ulp is frozen: with ε = 0, iterating past convergence diverges)."""
        b = self.A_adjoint(y) + eps * z
        rtol = 10 * torch.finfo(z.dtype).eps
        return conjugate_gradient(
            lambda v: self.A_adjoint_A(v) + eps * v, b, z, rtol=rtol, max_iter=iters, warn=False
        ).x

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        r"""Regularised pseudo-inverse :math:`A^\top (AA^\top + \epsilon I)^{-1} y` (CG default); ``eps`` may be a
        ``(B,)`` tensor (one value per sample). An operator with a closed-form prox solves the same normal equations
        :math:`(A^\top A + \epsilon I)x = A^\top y` exactly as :math:`\mathrm{prox}(0, y, \gamma = 1/\epsilon)`
        (e.g. the composed video operators, whose CG took 51 iterations for LVTINO's Wiener start)."""
        if self.has_closed_form_prox():
            e = batch_scalar(eps, y.shape[0], device=y.device, dtype=y.real.dtype, name="eps")
            if bool((e > 0).all()):
                x = self.A_adjoint(y)
                return self.prox_l2(torch.zeros_like(x), y, 1 / e)
        eps = broadcast_eps(eps, y)
        u = conjugate_gradient(
            lambda v: self.A(self.A_adjoint(v)) + eps * v, y, rtol=self.cg_rtol, max_iter=self.cg_max_iter
        ).x
        return self.A_adjoint(u)

    # ------------------------------------------------------------------ helpers for solvers and training
    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Cheap image-shaped view of ``y`` (discriminator conditioning, visualisation); default ``A_adjoint``."""
        return self.A_adjoint(y)

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """0/1 mask of the observed measurement entries, broadcastable to ``y``; ``None`` if all are observed."""
        return None

    def num_observed(self, y: torch.Tensor) -> torch.Tensor:
        """Number m of observed measurement entries per sample, ``(B,)`` float (for discrepancy rules)."""
        mask = self.observed_mask(y)
        if mask is None:
            return torch.full((y.shape[0],), float(y[0].numel()), device=y.device)
        return torch.broadcast_to(mask, y.shape).flatten(1).sum(1).to(torch.float32)

    def check_measurement(self, y: torch.Tensor, x_shape: tuple[int, ...] | None = None) -> None:
        """Raise a clear ``ValueError`` if ``y`` has NaN/Inf or, given ``x_shape``, the wrong shape."""
        check_finite(y, "measurement y")
        if x_shape is not None:
            expected = tuple(self.A(torch.zeros(x_shape, device=y.device, dtype=y.dtype)).shape)
            if tuple(y.shape) != expected:
                raise ValueError(
                    f"{type(self).__name__}: measurement y has shape {tuple(y.shape)}, expected {expected} "
                    f"for images of shape {tuple(x_shape)}"
                )

    def adjointness_test(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Relative adjointness error :math:`|\langle Ax, v\rangle - \langle x, A^\top v\rangle| /
        (\|Ax\|\,\|v\|)` for a random ``v``; close to machine precision for a correct adjoint."""
        Ax = self.A(x)
        v = randn(Ax.shape, generator, device=x.device, dtype=x.dtype)
        lhs = batch_dot(Ax, v).sum()
        rhs = batch_dot(x, self.A_adjoint(v)).sum()
        return (lhs - rhs).abs() / (Ax.norm().double() * v.norm().double()).clamp_min(1e-300)


class NonlinearOperator(nn.Module):
    r"""A differentiable nonlinear forward map :math:`J` (e.g. JPEG), docs/method.md §2.6.

    Subclasses implement :meth:`A`; :meth:`A_vjp` defaults to autograd. The prox runs ``prox_steps`` projected
    gradient steps :math:`x \leftarrow \mathrm{clamp}(x - \eta[\gamma J'(x)^\top(J(x)-y) + (x - z)], -1, 1)` with
    :math:`\eta = 1/(1+\gamma)`, differentiable (unrolled) when autograd is on.

    Attributes:
        noise_before_forward: ``measure`` adds the Gaussian noise before applying ``A`` (JPEG: y = J(x + n)).
    """

    noise_before_forward: bool = True

    def __init__(self, *, prox_steps: int = 5) -> None:
        super().__init__()
        self.prox_steps = prox_steps

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Forward map (differentiable)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`A`."""
        return self.A(x)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The map used by ``measure`` to simulate data (JPEG: exact rounding); default :meth:`A`."""
        return self.A(x)

    def at_size(self, hw: tuple[int, int]) -> NonlinearOperator:
        """This operator for ``H x W`` images (see :meth:`LinearOperator.at_size`): itself."""
        return self

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector-Jacobian product :math:`J'(x)^\top v` by autograd (graph kept when autograd is on)."""
        create_graph = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().clone().requires_grad_(True)
            out = self.A(xg)
            (g,) = torch.autograd.grad(out, xg, v.clone() if v.is_inference() else v, create_graph=create_graph)
        return g

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """Approximate data-term prox by ``prox_steps`` projected gradient steps from ``z`` (§2.6)."""
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        if bool(torch.isinf(gamma).any()):
            raise ValueError(f"{type(self).__name__}: gamma = inf (projection) is undefined for a nonlinear operator")
        g = append_dims(gamma, z.ndim)
        eta = 1.0 / (1.0 + g)
        x = z
        for _ in range(self.prox_steps):
            grad = g * self.A_vjp(x, self.A(x) - y) + (x - z)
            x = (x - eta * grad).clamp(-1.0, 1.0)
        return x

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Image-shaped view of ``y`` (JPEG: ``y`` itself)."""
        return y

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """All entries are observed."""
        return None

    def num_observed(self, y: torch.Tensor) -> torch.Tensor:
        """Number of measurement entries per sample, ``(B,)``."""
        return torch.full((y.shape[0],), float(math.prod(y.shape[1:])), device=y.device)

    def check_measurement(self, y: torch.Tensor, x_shape: tuple[int, ...] | None = None) -> None:
        """Raise a clear ``ValueError`` if ``y`` has NaN/Inf or a shape other than ``x_shape``."""
        check_finite(y, "measurement y")
        if x_shape is not None and tuple(y.shape) != tuple(x_shape):
            raise ValueError(f"{type(self).__name__}: measurement y has shape {tuple(y.shape)}, expected {x_shape}")


Operator = LinearOperator | NonlinearOperator
