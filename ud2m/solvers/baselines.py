r"""Baseline solvers on the same prior and operator interfaces as LATINO, so comparisons run side by side.

One pure function per method:

* :func:`solve_tikhonov`: MAP (= posterior mean) under the Gaussian prior :math:`N(0, s_0^2 I)`, one prox;
* :func:`solve_total_variation`: classical TV reconstruction by PDHG (Chambolle & Pock 2011; ``ud2m.solvers.tv``);
* :func:`solve_dps`: Diffusion Posterior Sampling (Chung et al. 2023, ICLR, Algorithm 1), gradients through the
  network (and the VAE decoder for latent priors) by autograd;
* :func:`solve_diffpir`: DiffPIR (Zhu et al. 2023, CVPRW, Algorithm 1), plug-and-play with a proximal data step.

They share the prox (``op.prox_l2`` through :func:`~ud2m.solvers.steps.data_consistency`), the DDIM step and the
re-noising kernel of ``ud2m.solvers.steps`` and the grids of ``ud2m.schedules``. Images are on [-1, 1]; ``sigma_y``
is the user-facing [0, 1] noise std, converted once by :func:`~ud2m.operators.noise.sigma_internal`. No function
here disables autograd; outputs are not clamped except by the TV solver (§6.3). DPS and DiffPIR clamp their
intermediate x̂0 to the prior's data range, as their references do (``clip_x0``, default on; the analytic Gaussian
prior has no data range, so the Gaussian-prior tests still see the exact affine maps). NFE: DPS and DiffPIR make
exactly one ``predict_x0`` call per timestep.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ud2m.operators.base import LinearOperator, Operator
from ud2m.operators.noise import sigma_internal
from ud2m.priors.base import Prior
from ud2m.schedules import time_grid
from ud2m.solvers.steps import data_consistency, ddim_step, renoise, wiener_init
from ud2m.solvers.tv import data_step_pdhg
from ud2m.utils import Generator, append_dims, batch_scalar, randn

Callback = Callable[[dict[str, Any]], None] | None
STEP_RULES = ("norm", "squared")
ZETA_SCALINGS = ("none", "steps")
GRIDS = ("quad", "uniform")
#: DPS's step sizes were tuned on its 1000-step DDPM chain (Chung et al. 2023: 1000 NFE throughout).
DPS_REFERENCE_STEPS = 1000


# ---------------------------------------------------------------------------------------------- shared helpers
def _sigma_n(sigma_y: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Internal noise std :math:`\\sigma_n = 2\\sigma_y` as ``(B,)`` in ``like``'s dtype."""
    return sigma_internal(batch_scalar(sigma_y, like.shape[0], device=like.device, dtype=like.dtype, name="sigma_y"))


def _grid(timesteps: Sequence[float] | None, num_steps: int, kind: str = "uniform") -> tuple[float, ...]:
    """``timesteps`` (strictly decreasing native times), else ``num_steps`` times of
    :func:`~ud2m.schedules.uniform_grid` (``kind="uniform"``) or :func:`~ud2m.schedules.quadratic_skip_grid`
    (``kind="quad"``)."""
    if kind not in GRIDS:
        raise ValueError(f"grid: expected one of {GRIDS}, got {kind!r}")
    if timesteps is None:
        timesteps = time_grid(kind, num_steps)
    grid = tuple(timesteps)
    if len(grid) == 0 or any(float(t1) >= float(t0) for t0, t1 in itertools.pairwise(grid)):
        raise ValueError(f"timesteps: expected a non-empty, strictly decreasing sequence, got {grid}")
    return grid


def _time(t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Native time as ``(B,)``, float64 for float64 states (exact Gaussian tests), else float32."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return batch_scalar(t, z.shape[0], device=z.device, dtype=dtype, name="t")


def _scales(prior: Prior, t: float | torch.Tensor | None, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, b_t)`` as ``(B,)`` in ``z``'s dtype; ``t = None`` is the clean end point ``(1, 0)``."""
    if t is None:
        return z.new_ones(z.shape[0]), z.new_zeros(z.shape[0])
    a, b = prior.scales(_time(t, z))
    return a.to(z.dtype), b.to(z.dtype)


def _start(prior: Prior, op: Operator, y: torch.Tensor, x_init: torch.Tensor | None, t0: float, generator: Generator):
    r"""Initial state :math:`z = a_{t_0} E(x_\text{init}) + b_{t_0}\varepsilon`; without ``x_init``, :math:`z_0 = 0`
    (for :math:`t_0 = 999`, :math:`a_{t_0} \ll 1`, so this is the usual start from noise)."""
    if x_init is not None:
        return renoise(prior, prior.encode(x_init), t0, generator)
    x_shape = tuple(op.lift(y).shape)  # image shape seen through the operator (SR: upsampled y)
    z0 = torch.zeros(prior.latent_shape(x_shape), device=y.device, dtype=y.dtype)
    return renoise(prior, z0, t0, generator)


# ---------------------------------------------------------------------------------------------- classical
def solve_tikhonov(op: Operator, y: torch.Tensor, *, sigma_y: float | torch.Tensor, s0: float = 0.5) -> torch.Tensor:
    r"""Tikhonov / Wiener reconstruction: the MAP (and posterior mean) under :math:`x \sim N(0, s_0^2 I)`.

    .. math:: \hat x = \arg\min_x \frac{\|Ax - y\|^2}{2\sigma_n^2} + \frac{\|x\|^2}{2 s_0^2}
              = \mathrm{prox}_{\gamma}(0, y) = (I + \gamma A^\top A)^{-1}\gamma A^\top y,
              \qquad \gamma = s_0^2/\sigma_n^2

    (multiply the objective by :math:`s_0^2`). ``sigma_y = 0`` gives :math:`\gamma = \infty`: the minimum-norm
    solution of :math:`Ax = y`. Not clamped.

    Args:
        op: forward operator (nonlinear ones use their gradient-step prox from 0).
        y: measurement ``(B, ...)``.
        sigma_y: noise std on the [0, 1] scale, float or ``(B,)``.
        s0: prior std on the [-1, 1] scale.
    """
    x = torch.zeros_like(op.lift(y))  # (B, C, H, W)
    return data_consistency(op, x, y, s0**2 / _sigma_n(sigma_y, x) ** 2)


def solve_total_variation(
    op: LinearOperator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    *,
    sigma_y: float | torch.Tensor,
    lam: float | torch.Tensor,
    iters: int = 200,
    reg: str | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    r"""TV-regularised reconstruction by PDHG (Chambolle & Pock 2011):

    .. math:: \hat x = \arg\min_x \frac{1}{2\sigma_n^2}\|Ax - y\|^2 + \lambda\,\mathrm{TV}(x)
              = \arg\min_x \tfrac12\|Ax - y\|^2 + \sigma_n^2\lambda\,\mathrm{TV}(x)

    i.e. :func:`~ud2m.solvers.tv.data_step_pdhg` with :math:`\gamma = \infty` and
    :math:`\lambda_\text{tv} = \sigma_n^2\lambda`, started at ``x_init`` (default: the Wiener start of
    :func:`~ud2m.solvers.steps.wiener_init`), clamped to [-1, 1].

    Args:
        op: linear operator.
        y: measurement ``(B, ...)``.
        x_init: start, or None.
        sigma_y: noise std on the [0, 1] scale, float or ``(B,)``.
        lam: TV weight :math:`\lambda` (likelihood units), float or ``(B,)``.
        iters: PDHG iterations.
        reg: ``"tv2"`` (default for images) or, for videos, ``"tv3"`` (default) / ``"tv_t"``.
        alpha: temporal weight of ``tv3``/``tv_t``.
    """
    sigma_n = _sigma_n(sigma_y, y)
    x0 = wiener_init(op, y, sigma_n) if x_init is None else x_init
    reg = reg if reg is not None else ("tv2" if x0.ndim == 4 else "tv3")
    lam = batch_scalar(lam, y.shape[0], device=y.device, dtype=y.dtype, name="lam")
    return data_step_pdhg(op, x0, y, gamma=math.inf, lam_tv=sigma_n**2 * lam, reg=reg, alpha=alpha, iters=iters)


# ---------------------------------------------------------------------------------------------- DPS
class DPSGuidance(NamedTuple):
    """Output of :func:`dps_guidance` (all detached)."""

    grad: torch.Tensor  # ∇_z ‖y − A(x̂0)‖, shape of z
    z0_hat: torch.Tensor  # clean-latent estimate
    x0_hat: torch.Tensor  # decoded estimate (image space)
    residual_norm: torch.Tensor  # ‖y − A(x̂0)‖ per sample, (B,)


def dps_guidance(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    z: torch.Tensor,
    t: float | torch.Tensor,
    cond: Any = None,
    *,
    clip_x0: bool = False,
) -> DPSGuidance:
    r"""One DPS measurement gradient (Chung et al. 2023, Algorithm 1 lines 4-7), 1 NFE:

    .. math:: \hat x_0 = D(\hat z_0(z_t, t)), \qquad
              g = \nabla_{z_t}\|y - A(\hat x_0)\| = -\Big(\frac{\partial \hat x_0}{\partial z_t}\Big)^{\!\top}
              J_A(\hat x_0)^\top\frac{y - A(\hat x_0)}{\|y - A(\hat x_0)\|}

    per sample, by autograd through the network, the decoder :math:`D` (latent priors) and :math:`A` (any
    differentiable operator, JPEG included). Autograd is enabled locally, so the caller may be under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (inputs are cloned out of inference mode, as in
    ``NonlinearOperator.A_vjp``); the prior itself must have been built outside inference mode. No graph is kept.

    ``clip_x0``: :math:`\hat x_0 \leftarrow \mathrm{clamp}(\hat x_0)` to the prior's data range
    (:meth:`~ud2m.priors.base.Prior.clip_data`) inside the graph, so clipped pixels pass no gradient, as in the
    reference (guided-diffusion's ``clip_denoised=True``); for pixel priors the returned ``z0_hat`` is the clamped
    estimate too (latents are never clamped).
    """
    with torch.inference_mode(False), torch.enable_grad():
        z_in = z.detach().clone().requires_grad_(True)
        y_in = y.clone() if y.is_inference() else y
        z0_hat = prior.predict_x0(z_in, _time(t, z), cond)  # 1 NFE, with graph
        if clip_x0 and not prior.is_latent:  # z0 is the data (in the prior's layout): the DDIM step sees it clamped
            z0_hat = prior.clip_data(z0_hat)
        x0_hat = prior.decode(z0_hat)  # (B, C, H, W)
        if clip_x0 and prior.is_latent:  # latents are never clamped, the decoded image is
            x0_hat = prior.clip_data(x0_hat)
        residual_norm = (y_in - op.A(x0_hat)).flatten(1).norm(dim=1)  # (B,)
        (grad,) = torch.autograd.grad(residual_norm.sum(), z_in)  # samples are independent: per-sample gradients
    return DPSGuidance(grad, z0_hat.detach(), x0_hat.detach(), residual_norm.detach())


def dps_zeta(zeta: float, num_steps: int, zeta_scaling: str) -> float:
    r"""DPS's per-step :math:`\zeta` on an N-step grid: ``zeta`` itself (``"none"``) or
    :math:`\zeta \cdot 1000/N` (``"steps"``; ``zeta`` is then the 1000-step value, see :func:`solve_dps`).

    >>> dps_zeta(2.0, 100, "steps"), dps_zeta(2.0, 1000, "steps"), dps_zeta(2.0, 100, "none")
    (20.0, 2.0, 2.0)
    """
    if zeta_scaling not in ZETA_SCALINGS:
        raise ValueError(f"zeta_scaling: expected one of {ZETA_SCALINGS}, got {zeta_scaling!r}")
    return zeta * DPS_REFERENCE_STEPS / num_steps if zeta_scaling == "steps" else zeta


def solve_dps(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    timesteps: Sequence[float] | None = None,
    *,
    cond: Any = None,
    sigma_y: float | torch.Tensor | None = None,
    num_steps: int = 100,
    zeta: float = 1.0,
    zeta_scaling: str = "none",
    step_rule: str = "norm",
    eta: float = 1.0,
    clip_x0: bool = True,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    r"""Diffusion Posterior Sampling (Chung et al. 2023, Algorithm 1), any number of steps, pixel or latent prior.

    For each :math:`t_k` (next time :math:`t_{k+1}`, the clean end :math:`a = 1, b = 0` after the last):

    .. math:: z' = \mathrm{DDIM}_\eta(z_{t_k}, \hat z_0; t_k \to t_{k+1}), \qquad
              z_{t_{k+1}} = z' - \zeta_k\, \nabla_{z_{t_k}}\mathcal L

    with :math:`\eta = 1` the DDPM ancestral step of the paper, and

    * ``step_rule="norm"`` (reference code): :math:`\mathcal L = \|y - A(\hat x_0)\|`, :math:`\zeta_k = \zeta`;
      identical to the paper's adaptive rule :math:`\zeta_k = \zeta'/\|y - A(\hat x_0)\|` on
      :math:`\nabla\|y - A(\hat x_0)\|^2` with :math:`\zeta' = \zeta/2`;
    * ``step_rule="squared"``: :math:`\mathcal L = \|y - A(\hat x_0)\|^2` with a constant :math:`\zeta_k = \zeta`.

    The last update is applied to :math:`\hat z_0` and the result decoded. Each step's gradient is detached (the
    output does not carry a graph across steps); see :func:`dps_guidance` for autograd modes. :math:`\zeta` is
    not scale-free: the reference's 1.0 was tuned for 256x256 RGB images and 1000 steps.

    ``zeta_scaling="steps"`` reads ``zeta`` as the step size of the 1000-step chain and uses
    :math:`\zeta_\text{eff} = \zeta \cdot 1000/N` on an N-step grid: the guidance term is an explicit Euler
    discretisation of a gradient flow in diffusion time, so the total guidance :math:`\sum_k \zeta_k\|\nabla\|`
    (step size times number of steps) stays the same as N changes, and one tuned :math:`\zeta` serves every N.
    ``"none"`` (default, the reference code's rule) applies ``zeta`` as given at every step.

    Args:
        prior: any prior (latent priors are differentiated through the decoder).
        op: linear or nonlinear (differentiable) operator.
        y: measurement ``(B, ...)``.
        x_init: optional image the chain starts from (re-noised to ``timesteps[0]``); default the noise start.
        timesteps: strictly decreasing native times; default ``uniform_grid(num_steps)``.
        cond: prior conditioning.
        sigma_y: unused by DPS's step rules (accepted so that every baseline takes the same arguments).
        num_steps: number of steps when ``timesteps`` is None (NFE = number of timesteps).
        zeta: step size :math:`\zeta`.
        zeta_scaling: ``"none"`` (:math:`\zeta_k` from ``zeta`` as given) or ``"steps"`` (``zeta`` is per 1000
            steps: multiplied by :math:`1000/N`, N = number of timesteps).
        step_rule: ``"norm"`` or ``"squared"``.
        eta: DDIM stochasticity (1 = DDPM ancestral sampling).
        clip_x0: clamp :math:`\hat x_0` to the prior's data range before the loss and the DDIM step (the
            reference's ``clip_denoised=True``; the identity on priors without one, e.g. the Gaussian prior; see
            :func:`dps_guidance`).
        generator: torch generator or list of B generators.
        callback: called with ``dict(k, t, sigma, x, x0_hat, residual_norm)`` after every step.

    Returns:
        ``(B, C, H, W)`` reconstruction (not clamped).
    """
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule: expected one of {STEP_RULES}, got {step_rule!r}")
    grid = _grid(timesteps, num_steps)
    zeta = dps_zeta(zeta, len(grid), zeta_scaling)
    z = _start(prior, op, y, x_init, grid[0], generator)
    for k, t in enumerate(grid):
        g = dps_guidance(prior, op, y, z, t, cond, clip_x0=clip_x0)  # 4.-5. x̂0 and ∇‖y − A x̂0‖ (1 NFE)
        a, b = _scales(prior, t, z)
        a_next, b_next = _scales(prior, grid[k + 1] if k + 1 < len(grid) else None, z)
        xi = randn(z.shape, generator, device=z.device, dtype=z.dtype)  # 6. z ~ N(0, I)
        z_prime = ddim_step(z, g.z0_hat, a=a, b=b, a_next=a_next, b_next=b_next, eta=eta, xi=xi)  # 6.
        zeta_k = zeta if step_rule == "norm" else 2 * zeta * append_dims(g.residual_norm, z.ndim)
        z = z_prime - zeta_k * g.grad  # 7. (∇‖r‖² = 2‖r‖∇‖r‖)
        if callback is not None:
            callback(dict(k=k, t=t, sigma=b / a, x=z, x0_hat=g.x0_hat, residual_norm=g.residual_norm))
    return prior.decode(z)


# ---------------------------------------------------------------------------------------------- DiffPIR
def diffpir_gamma(s: torch.Tensor, sigma_n: torch.Tensor, lambda_: float) -> torch.Tensor:
    r"""Prox weight of DiffPIR's data subproblem (Zhu et al. 2023, eq. 13 and Algorithm 1).

    The paper solves :math:`\hat x_0 = \arg\min_x \|y - Ax\|^2 + \rho_t\|x - x_0^{(t)}\|^2` with
    :math:`\rho_t = \lambda\sigma_n^2/\bar\sigma_t^2`, where :math:`\bar\sigma_t = \sqrt{(1-\bar\alpha_t)/
    \bar\alpha_t}` is the VE noise level :math:`s_t = b_t/a_t`. Dividing by :math:`2\rho_t` gives
    ``prox_l2``'s form :math:`\tfrac\gamma2\|Ax - y\|^2 + \tfrac12\|x - x_0^{(t)}\|^2` with

    .. math:: \gamma_t = \frac{1}{\rho_t} = \frac{s_t^2}{\lambda\sigma_n^2}

    i.e. the likelihood :math:`\|y - Ax\|^2/(2\sigma_n^2)` against a Gaussian of variance :math:`s_t^2/\lambda`
    around the denoiser output. Units: the reference code evaluates :math:`\rho_t` with the [0, 1]-scale std
    :math:`\sigma_y = \sigma_n/2` against the [-1, 1]-scale :math:`\bar\sigma_t`, so its :math:`\lambda_\text{ref}`
    equals :math:`4\lambda` here.
    """
    return s**2 / (lambda_ * sigma_n**2)


def solve_diffpir(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    timesteps: Sequence[float] | None = None,
    *,
    cond: Any = None,
    sigma_y: float | torch.Tensor,
    num_steps: int = 100,
    lambda_: float = 1.75,
    zeta: float = 0.3,
    grid: str = "quad",
    clip_x0: bool = True,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    r"""DiffPIR (Zhu et al. 2023, Algorithm 1): denoise, proximal data step, re-noise with effective noise.

    For each :math:`t_k` (next time :math:`t_{k+1}`; after the last step the result is the data-consistent
    :math:`\hat x_0`):

    .. math::
        x_0^{(t)} &= \mathrm{clamp}(D(\hat z_0(z_t, t))) \\
        \hat x_0 &= \mathrm{prox}_{\gamma_t}(x_0^{(t)}, y), \quad \gamma_t = s_t^2/(\lambda\sigma_n^2)
            \quad (\text{:func:`diffpir_gamma`}) \\
        \hat\varepsilon &= (z_t - a_t E(\hat x_0))/b_t \\
        z_{t'} &= a_{t'} E(\hat x_0) + b_{t'}\big(\sqrt{1-\zeta}\,\hat\varepsilon + \sqrt\zeta\,\xi\big)

    The last line is :func:`~ud2m.solvers.steps.ddim_step` with :math:`\varsigma = \sqrt\zeta\,b_{t'}`, i.e.
    :math:`\eta_t = \sqrt\zeta\,b_t/\sqrt{1 - a_t^2/a_{t'}^2}`. For latent priors the prox runs in pixel space on
    the decoded estimate and its result is re-encoded (:math:`D`, :math:`E` are the identity for pixel priors);
    :math:`\gamma_t` then uses the latent :math:`s_t`, a heuristic of ours (the paper is pixel-space only).
    :math:`\sigma_n` is floored at 1e-3 (as the Wiener start) so that noiseless data keep a finite
    :math:`\gamma_t` (the reference floors :math:`\sigma_y` at 1e-3). The default ``"quad"`` grid ends at
    :math:`t = 0`, where :math:`s_0` is tiny (about 0.01 for the linear DDPM schedule), so the last data step barely
    moves the denoised estimate; the reference skips it there.

    Args:
        prior: any prior.
        op: linear operator (closed-form or CG prox) or nonlinear operator (gradient-step prox).
        y: measurement ``(B, ...)``.
        x_init: optional image the chain starts from (re-noised to ``timesteps[0]``); default the noise start.
        timesteps: strictly decreasing native times; overrides ``grid`` and ``num_steps``.
        cond: prior conditioning.
        sigma_y: noise std on the [0, 1] scale, float or ``(B,)``.
        num_steps: number of steps when ``timesteps`` is None (NFE = number of timesteps).
        lambda_: :math:`\lambda` (regularisation strength of the prior term, internal units; see
            :func:`diffpir_gamma` for the factor 4 against the reference code). The default 1.75 is the
            reference's tuned setting lambda = 7 (zeta = 0.3) converted to our units.
        zeta: :math:`\zeta \in [0, 1]`, share of fresh noise in the re-noising.
        grid: ``"quad"`` (default): the reference's ``skip_type="quad"`` grid
            (:func:`~ud2m.schedules.quadratic_skip_grid`, 999 down to 0, denser near the clean end; at most 501
            steps); ``"uniform"``: :func:`~ud2m.schedules.uniform_grid` (from 999 in steps of ``1000 // N``, the former
            default).
        clip_x0: clamp the denoiser's :math:`x_0^{(t)}` to the prior's data range before the data step
            (:meth:`~ud2m.priors.base.Prior.clip_data`; the reference's ``clip_denoised=True``; the identity on
            priors without a data range, e.g. the Gaussian prior). Unclamped, an ε-prediction DDPM's early
            estimates reach ±60 and a colourisation ends with saturated colours (docs/method.md Appendix A).
        generator: torch generator or list of B generators.
        callback: called with ``dict(k, t, sigma, x, x0_hat, gamma)`` after every step (``x0_hat``: after the
            data step).

    Returns:
        ``(B, C, H, W)`` reconstruction (not clamped).
    """
    if not 0.0 <= zeta <= 1.0 or not lambda_ > 0:
        raise ValueError(f"DiffPIR: expected zeta in [0, 1] and lambda_ > 0, got zeta={zeta}, lambda_={lambda_}")
    times = _grid(timesteps, num_steps, grid)
    sigma_n = _sigma_n(sigma_y, y).clamp_min(1e-3)  # (B,)
    z = _start(prior, op, y, x_init, times[0], generator)
    for k, t in enumerate(times):
        a, b = _scales(prior, t, z)
        x0_t = prior.decode(prior.predict_x0(z, _time(t, z), cond))  # 3. denoiser (1 NFE)
        x0_t = prior.clip_data(x0_t) if clip_x0 else x0_t
        gamma = diffpir_gamma((b / a).to(y.dtype), sigma_n, lambda_)
        x0 = data_consistency(op, x0_t, y, gamma)  # 4. data proximal subproblem
        last = k + 1 == len(times)
        if not last:
            a_next, b_next = _scales(prior, times[k + 1], z)
            eta_k = math.sqrt(zeta) * b / torch.sqrt(1 - a**2 / a_next**2)  # ς = √ζ·b'
            xi = randn(z.shape, generator, device=z.device, dtype=z.dtype)
            z = ddim_step(z, prior.encode(x0), a=a, b=b, a_next=a_next, b_next=b_next, eta=eta_k, xi=xi)  # 5.-7.
        if callback is not None:
            callback(dict(k=k, t=t, sigma=b / a, x=z, x0_hat=x0, gamma=gamma))
    return x0
