r"""LVTINO: zero-shot video restoration with a video and an image consistency prior (docs/method.md §6).

Implements the split Langevin iteration of Spagnoletti, Almansa & Pereyra, "LVTINO: LATent Video consisTency
INverse sOlver for High Definition Video Restoration" (ICLR 2026) for the product of experts of §6.1,
:math:`p(x \mid c) \propto p_V(x \mid c)^\eta\,p_I(x \mid c)^{1-\eta}\,e^{-\phi_\lambda(x)}`: each iteration k takes a
stochastic auto-encoder (SAE) step of the video consistency model, a data step (likelihood, optionally with TV), an
SAE step of the image consistency model on every frame (one noise shared by all frames [ref]) and a likelihood data
step (§6.2). The pieces are the project's: the SAE step and the Wiener start of LATINO
(:mod:`ud2m.solvers.steps`, §4.2, §6.6), the PDHG data step (:mod:`ud2m.solvers.tv`, §6.3), the operators'
``prox_l2`` and ``project_cg`` (§2.4), and the frame-wise view of an image prior
(:class:`~ud2m.priors.stacked.FrameWisePrior`, §6.5).

Public API:

* :class:`DataStep`, :class:`LVTINOStep`: one data step (§6.3) and one schedule row (§6.4);
* :data:`LVTINO_SCHEDULES`: the released schedules of problems A, B and C (§6.4); :func:`generic_schedule`: the
  default for any other operator (η = 0.25, γ from a user δ_k, §6.4 last paragraph);
* :func:`data_step`, :func:`data_step_adam`: the data step of §6.3 (prox, PDHG, Adam on smoothed TV3, truncated CG);
* :func:`map_times`: a schedule's times moved to other priors' noise schedules (docs/video.md §1);
* :func:`lvtino`: the solver; without a video prior it is frame-wise LATINO (:func:`latino` on every frame).

Autograd: nothing here needs it (no gradient is taken; Adam uses the closed-form gradient of its objective), so
entry points call :func:`lvtino` under ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ud2m.operators.base import LinearOperator, Operator
from ud2m.priors.base import Prior
from ud2m.priors.stacked import FrameWisePrior
from ud2m.priors.vp import VPSchedule, make_betas
from ud2m.solvers.latino_algorithms import _batch_time, _noise_std, latino
from ud2m.solvers.steps import sae_step, wiener_init
from ud2m.solvers.tv import (
    REGULARISERS,
    data_step_pdhg,
    diff_norm_sq_bound,
    forward_diff,
    forward_diff_adjoint,
    reg_weights,
)
from ud2m.utils import Generator, append_dims, batch_norm_sq, batch_scalar, randn

Callback = Callable[[dict[str, Any]], None] | None

#: Prompts of the reference (§6.2); entry points encode them with the priors' ``encode_prompt``.
VIDEO_PROMPT = "a high resolution video"
IMAGE_PROMPT = "a high resolution photo"

METHODS = ("prox", "pdhg", "adam", "project_cg")


# ---------------------------------------------------------------------------------------------------- data steps
@dataclasses.dataclass(frozen=True)
class DataStep:
    r"""Settings of one data step (docs/method.md §6.3),
    :math:`\arg\min_u \tfrac12\|Au - y\|^2 + \lambda_\text{tv}\,\mathrm{reg}(u) + \|u - \tilde x\|^2/(2\gamma)`.

    Attributes:
        method: ``"prox"`` (``op.prox_l2``, :math:`\lambda_\text{tv} = 0`; γ = ∞ projects), ``"pdhg"``
            (:func:`~ud2m.solvers.tv.data_step_pdhg`, then clamp), ``"adam"`` (:func:`data_step_adam`, smoothed TV3,
            clamp every step) or ``"project_cg"`` (``op.project_cg``: exactly ``iters`` CG iterations on
            :math:`(A^\top A + \epsilon I)x = A^\top y + \epsilon\tilde x` from :math:`\tilde x`, §2.4).
        gamma: proximity weight γ in data-scaled units (``inf``: no proximity term).
        delta: paper units instead of ``gamma``: :math:`\gamma = \delta/\sigma_n^2` per video (§6.1,
            :math:`\delta = \delta_k\eta` or :math:`\delta_k(1 - \eta)`).
        reg: ``"tv_t"``, ``"tv3"`` or ``"tv2"`` (PDHG), ``"tv3"`` (Adam), None otherwise.
        lam_tv: :math:`\lambda_\text{tv}` (data-scaled, :math:`\sigma_n^2\lambda`).
        alpha: temporal weight α of TV3 / TV_t.
        iters: PDHG / Adam / CG iterations.
        tau, sigma: PDHG step sizes; None: :math:`1/\sqrt L` (§6.3), estimated once per solve.
        relaxation: PDHG over-relaxation :math:`\rho \in (0, 2)` [ours]; 1 (the reference) keeps the plain
            iteration (:func:`~ud2m.solvers.tv.pdhg_solve`).
        lr: Adam learning rate.
        eps: ``project_cg``'s ε, or Adam's TV smoothing :math:`\epsilon_\text{TV}`.
    """

    method: str = "prox"
    gamma: float = math.inf
    delta: float | None = None
    reg: str | None = None
    lam_tv: float = 0.0
    alpha: float = 1.0
    iters: int = 0
    tau: float | None = None
    sigma: float | None = None
    lr: float = 0.0
    eps: float = 0.0
    relaxation: float = 1.0

    def __post_init__(self) -> None:
        m = self.method
        if m not in METHODS:
            raise ValueError(f"DataStep: method must be one of {METHODS}, got {m!r}")
        if not self.gamma > 0 or (self.delta is not None and not self.delta > 0):
            raise ValueError(f"DataStep: expected gamma > 0 and delta > 0, got gamma={self.gamma}, delta={self.delta}")
        if self.lam_tv < 0 or self.alpha < 0 or int(self.iters) != self.iters or self.iters < 0:
            raise ValueError(
                f"DataStep: expected lam_tv >= 0, alpha >= 0, integer iters >= 0, got lam_tv={self.lam_tv}, "
                f"alpha={self.alpha}, iters={self.iters}"
            )
        if m in ("prox", "project_cg") and (self.lam_tv != 0 or self.reg is not None):
            raise ValueError(f"DataStep: method {m!r} has no TV term (got reg={self.reg!r}, lam_tv={self.lam_tv})")
        if m == "project_cg" and (math.isfinite(self.gamma) or self.delta is not None or self.eps < 0):
            raise ValueError("DataStep: 'project_cg' is a projection (gamma = inf, no delta) with eps >= 0")
        if m == "pdhg" and (self.reg not in REGULARISERS or self.iters < 1):
            raise ValueError(
                f"DataStep: 'pdhg' needs reg in {REGULARISERS} and iters >= 1, got {self.reg!r}, {self.iters}"
            )
        if m == "adam" and (self.reg != "tv3" or self.iters < 1 or not self.lr > 0 or not self.eps > 0):
            raise ValueError(
                f"DataStep: 'adam' needs reg='tv3', iters >= 1, lr > 0 and a smoothing eps > 0, got reg={self.reg!r}, "
                f"iters={self.iters}, lr={self.lr}, eps={self.eps}"
            )
        if not 0 < self.relaxation < 2 or (self.relaxation != 1 and m != "pdhg"):
            raise ValueError(f"DataStep: relaxation must lie in (0, 2), and only PDHG has one, got {self.relaxation}")
        if (self.tau is None) != (self.sigma is None):
            raise ValueError(f"DataStep: give both PDHG steps or neither, got tau={self.tau}, sigma={self.sigma}")

    def gammas(self, sigma_n: torch.Tensor) -> torch.Tensor:
        r"""Per-video γ ``(B,)``: ``gamma``, or :math:`\delta/\sigma_n^2` (∞ for noiseless data)."""
        if self.delta is None:
            return torch.full_like(sigma_n, self.gamma)
        return self.delta / sigma_n**2


def _objective_grad(op: Operator, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_u \tfrac12\|A(u) - y\|^2`: :math:`A^\top(Au - y)`, or :math:`J'(u)^\top(J(u) - y)` (nonlinear)."""
    if isinstance(op, LinearOperator):
        return op.A_adjoint(op.A(u) - y)
    return op.A_vjp(u, op.A(u) - y)


def smoothed_tv3_grad(u: torch.Tensor, alpha: float, eps_tv: float) -> torch.Tensor:
    r"""Gradient of the smoothed TV3 of §6.3,
    :math:`\nabla\sum\sqrt{\alpha(D_t u)^2 + (D_h u)^2 + (D_v u)^2 + \epsilon_\text{TV}^2}
    = D^\top\big(Du/\sqrt{|Du|^2 + \epsilon_\text{TV}^2}\big)` (per voxel and colour channel)."""
    weights = reg_weights("tv3", u.ndim, alpha)
    du = forward_diff(u, weights)  # (B, K, C, T, H, W)
    inv_norm = torch.rsqrt(torch.linalg.vecdot(du, du, dim=1).add(eps_tv**2)).unsqueeze(1)  # 1/√(|Du|² + ε²)
    return forward_diff_adjoint(du * inv_norm, weights)


def data_step_adam(
    op: Operator,
    x_tilde: torch.Tensor,
    y: torch.Tensor,
    *,
    lam_tv: float | torch.Tensor,
    gamma: float | torch.Tensor = math.inf,
    alpha: float = 1.0,
    eps_tv: float = 1e-2,
    iters: int = 55,
    lr: float = 0.019848,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Problem C's data step [ref] (§6.3): Adam (torch's update, default betas) on
    :math:`\tfrac12\|Au - y\|^2 + \lambda_\text{tv}\sum\sqrt{\alpha(D_t u)^2 + (D_h u)^2 + (D_v u)^2
    + \epsilon_\text{TV}^2} + \|u - \tilde x\|^2/(2\gamma)` from :math:`u = \tilde x`, clamping to [-1, 1] after
    every step. The gradient is in closed form (:func:`smoothed_tv3_grad`), so no autograd is needed; Adam acts
    elementwise and the objective separates over videos, so each video's result is independent of the batch.

    Args:
        op: forward operator (linear, or nonlinear through ``A_vjp``).
        x_tilde: start and anchor ``(B, C, T, H, W)``.
        y: measurement ``(B, ...)``.
        lam_tv, gamma: float or ``(B,)``; ``gamma = inf`` drops the proximity term (the reference's choice).
        alpha, eps_tv: TV3's temporal weight and smoothing.
        iters, lr, betas, eps: Adam's settings (reference: 55 iterations, lr 0.019848).
    """
    B, n = x_tilde.shape[0], x_tilde.ndim
    lam = append_dims(batch_scalar(lam_tv, B, device=x_tilde.device, dtype=x_tilde.dtype, name="lam_tv"), n)
    inv_gamma = append_dims(
        1.0 / batch_scalar(gamma, B, device=x_tilde.device, dtype=x_tilde.dtype, name="gamma"), n
    )  # exactly 0 for gamma = inf
    (b1, b2), u = betas, x_tilde
    m, v = torch.zeros_like(u), torch.zeros_like(u)
    proximal = bool(inv_gamma.any())
    for i in range(1, iters + 1):
        g = torch.addcmul(_objective_grad(op, u, y), lam, smoothed_tv3_grad(u, alpha, eps_tv))
        if proximal:
            g = g + inv_gamma * (u - x_tilde)
        m, v = torch.lerp(m, g, 1 - b1), torch.addcmul(b2 * v, g, g, value=1 - b2)  # fused torch.optim.Adam moments
        denom = (v.sqrt() / math.sqrt(1 - b2**i)).add(eps)
        u = torch.addcdiv(u, m, denom, value=-lr / (1 - b1**i)).clamp(-1.0, 1.0)
    return u


def pdhg_step_size_per_video(
    op: LinearOperator, x_like: torch.Tensor, weights: tuple[float, ...], iters: int = 20
) -> torch.Tensor:
    r"""§6.3 step size :math:`\tau = \sigma = 1/\sqrt L`, :math:`L = 1.01\|A\|^2 + 4\sum\lambda_k^2`, ``(B,)``, with
    :math:`\|A\|^2` from ``iters`` power iterations started from **one vector shared by every sample**, so that a
    video's step (and result) does not depend on its position in the batch (§1.5). Same rule as
    :func:`ud2m.solvers.tv.pdhg_step_size`, whose start vector is drawn for the whole batch."""
    v = randn((1, *x_like.shape[1:]), torch.Generator().manual_seed(0), device=x_like.device, dtype=x_like.dtype)
    v = v.expand_as(x_like)
    for _ in range(iters):
        v = op.A_adjoint_A(v / append_dims(batch_norm_sq(v).sqrt().to(v.dtype).clamp_min(1e-30), v.ndim))
    v = v / append_dims(batch_norm_sq(v).sqrt().to(v.dtype).clamp_min(1e-30), v.ndim)
    return (1.01 * batch_norm_sq(op.A(v)).to(x_like.dtype) + diff_norm_sq_bound(weights)).rsqrt()


def data_step(
    op: Operator,
    x_tilde: torch.Tensor,
    y: torch.Tensor,
    step: DataStep,
    sigma_n: torch.Tensor,
    *,
    step_size: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""LVTINO's data step (docs/method.md §6.3):
    :math:`\arg\min_u \tfrac12\|Au - y\|^2 + \lambda_\text{tv}\,\mathrm{reg}(u) + \|u - \tilde x\|^2/(2\gamma)`,
    by the method of ``step`` (:class:`DataStep`).

    Args:
        op: forward operator (PDHG and ``project_cg`` need a :class:`LinearOperator`).
        x_tilde: the prior step's output ``(B, C, T, H, W)``.
        y: measurement.
        step: the settings.
        sigma_n: internal noise std ``(B,)`` (for ``delta``-specified steps).
        step_size: PDHG :math:`\tau = \sigma` ``(B,)`` when ``step`` leaves them to the rule (default: computed
            here by :func:`pdhg_step_size_per_video`).

    Returns:
        ``prox`` and ``project_cg``: the solution as computed, not clamped (so ``prox`` outputs satisfy the
        optimality condition exactly); ``pdhg`` and ``adam``: clamped to [-1, 1] as the reference does.
    """
    gamma = step.gammas(sigma_n.to(x_tilde.dtype))
    if step.method == "prox":
        return op.prox_l2(x_tilde, y, gamma)
    if step.method == "adam":
        return data_step_adam(
            op, x_tilde, y, lam_tv=step.lam_tv, gamma=gamma, alpha=step.alpha, eps_tv=step.eps, iters=step.iters,
            lr=step.lr,
        )  # fmt: skip
    if not isinstance(op, LinearOperator):
        raise ValueError(f"LVTINO data step {step.method!r} needs a LinearOperator, got {type(op).__name__}")
    if step.method == "project_cg":
        return op.project_cg(x_tilde, y, iters=step.iters, eps=step.eps)
    tau, sigma = step.tau, step.sigma
    if tau is None:
        tau = sigma = (
            step_size if step_size is not None else pdhg_step_size_per_video(op, x_tilde, _weights(step, x_tilde))
        )
    return data_step_pdhg(
        op, x_tilde, y, gamma=gamma, lam_tv=step.lam_tv, reg=step.reg, alpha=step.alpha, iters=step.iters, tau=tau,
        sigma=sigma, relaxation=step.relaxation,
    )  # fmt: skip


def _weights(step: DataStep, x: torch.Tensor) -> tuple[float, ...]:
    return reg_weights(step.reg, x.ndim, step.alpha)


# ---------------------------------------------------------------------------------------------------- schedules
@dataclasses.dataclass(frozen=True)
class LVTINOStep:
    """One schedule row of §6.2/§6.4: the video time and step-2 data step, and (for every row but the last) the
    image time and step-4 data step (likelihood only: ``"prox"`` or ``"project_cg"``)."""

    t_video: float
    video_step: DataStep
    t_image: float | None = None
    image_step: DataStep | None = None

    def __post_init__(self) -> None:
        if (self.t_image is None) != (self.image_step is None):
            raise ValueError(f"LVTINOStep: give both t_image and image_step or neither, got t_image={self.t_image}")
        if self.image_step is not None and self.image_step.method not in ("prox", "project_cg"):
            raise ValueError(
                f"LVTINOStep: the step after the image prior is likelihood only ('prox' or 'project_cg'), got "
                f"{self.image_step.method!r}"
            )


#: Times of problems A and B [ref] (§6.4); the reference's unused first image time (499) is omitted.
T_VIDEO_AB = (757.0, 522.0, 375.0, 255.0, 125.0)
T_IMAGE_AB = (374.0, 249.0, 124.0, 124.0)
#: Times of problem C [ref] (§6.4).
T_VIDEO_C = (757.0, 522.0, 375.0)
T_IMAGE_C = (249.0, 63.0)


def _rows(
    t_video: Sequence[float], t_image: Sequence[float], video_steps: Sequence[DataStep], image_steps: Sequence[DataStep]
) -> tuple[LVTINOStep, ...]:
    N = len(t_video)
    if N < 1 or len(t_image) != N - 1 or len(video_steps) != N or len(image_steps) != N - 1:
        raise ValueError(
            f"LVTINO schedule: expected N >= 1 video times and steps and N - 1 image times and steps, got "
            f"{len(t_video)}, {len(video_steps)}, {len(t_image)}, {len(image_steps)}"
        )
    image = [(float(t), s) for t, s in zip(t_image, image_steps, strict=True)] + [(None, None)]
    return tuple(
        LVTINOStep(float(tv), sv, ti, si) for tv, sv, (ti, si) in zip(t_video, video_steps, image, strict=True)
    )


def _adam_c(lam_tv: float) -> DataStep:
    return DataStep("adam", reg="tv3", lam_tv=lam_tv, alpha=1.0, iters=55, lr=0.019848, eps=1e-2)


_PDHG_A = DataStep("pdhg", reg="tv_t", lam_tv=2.873789e-4, iters=200, tau=0.25, sigma=0.25)
_CG_A = DataStep("project_cg", iters=19, eps=1e-6)
_CG_C = DataStep("project_cg", iters=23, eps=0.0)

#: The released schedules of problems A, B and C (docs/method.md §6.4) [ref]: Optuna outputs of the authors.
#: A: step 2 = PDHG on TV_t with γ = ∞ (200 it., τ = σ = 0.25), step 4 = ``project_cg`` 19 it., ε = 1e-6; NFE 5 + 4.
#: B: finite γ, no TV: step 2 γ = 3539 (k ≤ 1), 1363 (k ≥ 2); step 4 γ = 16868 (k ≤ 1), 2721 (k ≥ 2); NFE 5 + 4.
#: C: step 2 = Adam on smoothed TV3 with γ = ∞ (55 it., lr 0.019848, λ_tv = 6.1785e-7 at k = 0, 1.5583e-6 after),
#: step 4 = ``project_cg`` 23 it., ε = 0; NFE 3 + 2. ``"A_fast"`` [ours]: A's data steps at a quarter of the PDHG
#: iterations (over-relaxed, §6.3 step rule), the same results within 0.05 dB on the tuning clips.
LVTINO_SCHEDULES: dict[str, tuple[LVTINOStep, ...]] = {
    "A": _rows(T_VIDEO_AB, T_IMAGE_AB, [_PDHG_A] * 5, [_CG_A] * 4),
    "B": _rows(
        T_VIDEO_AB,
        T_IMAGE_AB,
        [DataStep(gamma=3539.0)] * 2 + [DataStep(gamma=1363.0)] * 3,
        [DataStep(gamma=16868.0)] * 2 + [DataStep(gamma=2721.0)] * 2,
    ),
    "C": _rows(T_VIDEO_C, T_IMAGE_C, [_adam_c(6.1785e-7)] + [_adam_c(1.5583e-6)] * 2, [_CG_C] * 2),
    # [ours] A with a quarter of the PDHG work: the §6.3 step rule τ = σ = 1/√L and over-relaxation ρ = 1.9 at
    # 50 iterations reach the released 200 (on the 8 tuning clips of benchmarks/video.py ablation: 32.99 against
    # 33.01 dB, flicker 2.62 against 2.61; the solver overhead on the tiny models falls from 2.01 to 1.35, README)
    "A_fast": _rows(
        T_VIDEO_AB,
        T_IMAGE_AB,
        [dataclasses.replace(_PDHG_A, tau=None, sigma=None, iters=50, relaxation=1.9)] * 5,
        [_CG_A] * 4,
    ),
}


def generic_schedule(
    deltas: float | Sequence[float],
    *,
    t_video: Sequence[float] = T_VIDEO_AB,
    t_image: Sequence[float] = T_IMAGE_AB,
    eta: float = 0.25,
    lam_tv: float = 0.0,
    reg: str = "tv3",
    alpha: float = 1.0,
    pdhg_iters: int = 100,
) -> tuple[LVTINOStep, ...]:
    r"""The default schedule for operators without a preset [ours] (§6.4 last paragraph, §6.1): Langevin step
    :math:`\delta_k` split as :math:`\gamma^V_k = \eta\delta_k/\sigma_n^2` after the video prior and
    :math:`\gamma^I_k = (1 - \eta)\delta_k/\sigma_n^2` after the image prior (per video, from its σ_n).

    Step 2 is the finite-γ data step with TV (``reg``, ``lam_tv``) by PDHG (steps from the §6.3 rule), or the
    closed-form / CG prox when ``lam_tv = 0`` (the same minimiser, exactly); step 4 is the prox.

    Args:
        deltas: :math:`\delta_k`, one float for every row or N values.
        t_video: N video times (default: those of A/B).
        t_image: N - 1 image times (default: those of A/B).
        eta: :math:`\eta \in (0, 1)`, the video prior's share (default 0.25, between the values B implies).
        lam_tv, reg, alpha, pdhg_iters: the TV term of step 2 (data-scaled :math:`\lambda_\text{tv}`, §6.3).
    """
    if not 0 < eta < 1:
        raise ValueError(f"generic_schedule: eta must lie in (0, 1), got {eta}")
    N = len(t_video)
    deltas = [float(deltas)] * N if isinstance(deltas, int | float) else [float(d) for d in deltas]
    if len(deltas) != N:
        raise ValueError(f"generic_schedule: expected {N} deltas (one per video time), got {len(deltas)}")
    if lam_tv > 0:
        video = [DataStep("pdhg", delta=eta * d, reg=reg, lam_tv=lam_tv, alpha=alpha, iters=pdhg_iters) for d in deltas]
    else:
        video = [DataStep("prox", delta=eta * d) for d in deltas]
    image = [DataStep("prox", delta=(1 - eta) * d) for d in deltas[:-1]]
    return _rows(t_video, t_image, video, image)


def resolve_schedule(schedule: str | Sequence[LVTINOStep] | None) -> tuple[LVTINOStep, ...]:
    """The rows of a preset name (``"A"``, ``"B"``, ``"C"``) or of a sequence of :class:`LVTINOStep`, checked: every
    row but the last has an image step, the last has none (§6.2)."""
    if schedule is None:
        raise ValueError(
            "lvtino: schedule is required: 'A', 'B', 'C', 'A_fast' (docs/method.md §6.4) or generic_schedule(deltas) "
            "for other operators"
        )
    if isinstance(schedule, str):
        if schedule not in LVTINO_SCHEDULES:
            raise ValueError(f"lvtino: unknown schedule {schedule!r}; expected one of {sorted(LVTINO_SCHEDULES)}")
        return LVTINO_SCHEDULES[schedule]
    rows = tuple(schedule)
    if not rows or not all(isinstance(r, LVTINOStep) for r in rows):
        raise ValueError(f"lvtino: schedule must be a non-empty sequence of LVTINOStep rows, got {schedule!r}")
    bad = [k for k, r in enumerate(rows) if (r.image_step is None) != (k == len(rows) - 1)]
    if bad:
        raise ValueError(
            f"lvtino: every row but the last needs an image step and the last must have none (§6.2); rows {bad} "
            f"of {len(rows)} do not"
        )
    return rows


def map_times(
    schedule: str | Sequence[LVTINOStep], video_prior: Prior | None, image_prior: Prior, time_scale: float = 1.0
) -> tuple[LVTINOStep, ...]:
    r"""A schedule's times moved to the priors' own noise schedules at equal noise level :math:`s_t = b_t/a_t`
    [ours] (docs/video.md §1): the released times (§6.4) are Wan's flow-matching times for the video prior
    (:math:`s = t/(1000 - t)`) and SDXL's scaled-linear VP times for the image prior; each is replaced by the time
    with the same :math:`s` under ``video_prior.t_of_sigma`` (``image_prior``'s when there is no video prior) and
    ``image_prior.t_of_sigma``, rounded to 0.1. For Wan and an SDXL-schedule image prior it is the identity (up to
    the rounding); on the pixel DDPMs' linear β schedule it moves 757, 522, 375, 255, 125 to 482, 275, 170, 100, 40
    and 374, 249, 124 to 271, 193, 116, where the released times would start from almost pure noise.

    ``time_scale`` then multiplies every mapped time [ours]: the released times were tuned for Wan2.1 + SDXL at
    768×1280, and on the offline 64×64 clips with the pixel priors a later start (0.1–0.35) is better on the tuning
    clips (benchmarks/video.py tunes it there, as the image benchmark tunes LATINO's t_max).

    Args:
        schedule: ``"A"``, ``"B"``, ``"C"``, ``"A_fast"`` or rows (:func:`resolve_schedule`).
        video_prior: the video prior, or None (frame-wise LATINO: its video times are unused).
        image_prior: the image prior.
        time_scale: factor on every mapped time, in (0, 1].
    """
    if not 0 < time_scale <= 1:
        raise ValueError(f"map_times: time_scale must lie in (0, 1], got {time_scale}")
    sdxl = VPSchedule.from_betas(make_betas("scaled_linear", beta_start=0.00085, beta_end=0.012))
    video = video_prior if video_prior is not None else image_prior

    def video_t(t: float) -> float:
        return round(float(video.t_of_sigma(torch.tensor(t / (1000.0 - t), dtype=torch.float64))), 1)

    def image_t(t: float | None) -> float | None:
        return None if t is None else round(float(image_prior.t_of_sigma(sdxl.sigma(t))), 1)

    def scaled(t: float | None) -> float | None:
        return None if t is None else round(t * time_scale, 1)

    rows = resolve_schedule(schedule)
    return tuple(
        dataclasses.replace(r, t_video=scaled(video_t(r.t_video)), t_image=scaled(image_t(r.t_image))) for r in rows
    )


class ScheduleWeights:
    r"""A LATINO weight rule (``(k, t, u, y, op, sigma_n, prior) -> gamma``) reading step k's γ from the image data
    steps of a schedule: ``prox`` rows give their γ (or :math:`\delta/\sigma_n^2`), ``project_cg`` rows the exact
    projection γ = ∞ (LATINO's data step is a prox)."""

    def __init__(self, steps: Sequence[DataStep]) -> None:
        self.steps = tuple(steps)

    def __call__(self, k: int, t, u, y, op, sigma_n, prior) -> torch.Tensor:
        step = self.steps[k - 1]
        sigma_n = batch_scalar(sigma_n, u.shape[0], device=u.device, dtype=u.dtype, name="sigma_n")
        return torch.full_like(sigma_n, math.inf) if step.method == "project_cg" else step.gammas(sigma_n)

    def __repr__(self) -> str:
        return f"ScheduleWeights({self.steps})"


# ---------------------------------------------------------------------------------------------------- the solver
def image_sae_step(
    prior: FrameWisePrior,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any = None,
    generator: Generator = None,
    *,
    shared_noise: bool = True,
) -> torch.Tensor:
    r"""§6.2 step 3: the image prior's SAE step on every frame,
    :math:`u_\tau = \mathrm{clamp}(D_I(\hat z_0(a_t E_I(x_\tau) + b_t\varepsilon_\tau, t)), -1, 1)`, in chunks
    (:class:`~ud2m.priors.stacked.FrameWisePrior`). ``shared_noise`` [ref]: one :math:`\varepsilon_I` of one frame's
    latent shape per video, drawn from that video's generator and used by all its frames; otherwise independent
    noise per frame (:func:`~ud2m.solvers.steps.sae_step`, as LATINO)."""
    if not shared_noise:
        return sae_step(prior, x, t, cond, generator)
    z0 = prior.encode(x.clamp(-1, 1))  # (B, T, c, h, w)
    eps = randn((z0.shape[0], 1, *z0.shape[2:]), generator, device=z0.device, dtype=z0.dtype).expand_as(z0)
    z = prior.add_noise(z0, t, eps)
    return prior.decode(prior.predict_x0(z, t, cond)).clamp(-1, 1)


def _condition(prior: Prior, cond: Any) -> Any:
    return prior.encode_prompt(cond) if isinstance(cond, str) else cond


def lvtino(
    video_prior: Prior | None,
    image_prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    schedule: str | Sequence[LVTINOStep] | None = None,
    *,
    sigma_y: float | torch.Tensor,
    cond_video: Any = None,
    cond_image: Any = None,
    frame_batch: int = 8,
    shared_image_noise: bool | None = None,
    weights: Callable[..., torch.Tensor] | None = None,
    generator: Generator = None,
    callback: Callback = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    r"""Implements LVTINO (docs/method.md §6.2) for a batch of B videos.

    For rows :math:`k = 0..N-1` of the schedule :math:`(t^V_k, \text{step2}_k, t^I_k, \text{step4}_k)`:

    1. :math:`x_{k+1/4} = \mathrm{clamp}(D_V(\hat z_0^V(a E_V(x_k) + b\varepsilon_V, t^V_k)), -1, 1)` (1 video NFE);
    2. :math:`x_{k+1/2} = \text{data\_step}(x_{k+1/4}; \text{step2}_k)` (likelihood, optionally TV, §6.3);
    3. if :math:`k < N - 1`: the image prior's SAE step on every frame at :math:`t^I_k` with one
       :math:`\varepsilon_I` shared by the frames [ref] (1 image NFE = T network calls, chunks of ``frame_batch``);
    4. :math:`x_{k+1} = \text{data\_step}(x_{k+3/4}; \text{step4}_k)` (likelihood only); else
       :math:`x_{k+1} = x_{k+1/2}`.

    Start: the Wiener estimate of §6.6 unless ``x_init``. Without a video prior (``video_prior=None``) this is
    frame-wise LATINO: :func:`~ud2m.solvers.latino_algorithms.latino` with the image prior on every frame
    (:class:`~ud2m.priors.stacked.FrameWisePrior`), the schedule's image times and step-4 weights (``project_cg``
    rows become exact projections) or ``weights``, and independent noise per frame by default; for a frame-wise
    operator and frame-separable weights it equals running ``latino`` on each video's frames with that video's
    generator.

    Args:
        video_prior: the video consistency prior (``VideoFlowPrior``, ``FrameStackedPrior``), or None.
        image_prior: the image prior (applied frame-wise; a :class:`FrameWisePrior` is used as is).
        op: video operator (linear, or nonlinear with ``prox`` steps only).
        y: measurements ``(B, ...)`` on the internal scale.
        x_init: start ``(B, C, T, H, W)``; default :func:`~ud2m.solvers.steps.wiener_init` (§6.6).
        schedule: ``"A"``, ``"B"``, ``"C"``, ``"A_fast"`` (:data:`LVTINO_SCHEDULES`) or rows
            (:func:`generic_schedule`).
        sigma_y: noise std on the [0, 1] scale (float or ``(B,)``); :math:`\sigma_n = 2\sigma_y`.
        cond_video, cond_image: conditions (or prompt strings, encoded by the priors; the reference's are
            :data:`VIDEO_PROMPT` and :data:`IMAGE_PROMPT`), batch 1 or B.
        frame_batch: frames per image-prior call (default 8; reference 1).
        shared_image_noise: one image noise per video shared by its frames; default True with a video prior [ref],
            False without one (frame-wise LATINO).
        weights: LATINO weight rule of the frame-wise fallback (default :class:`ScheduleWeights`); ignored otherwise.
        generator: a ``torch.Generator`` or a list of B (video i draws only from generator i, §1.5).
        callback: called after every row with ``dict(k, x, x_video, x_half, x_image, t_video, t_image)``
            (:math:`x_{k+1}, x_{k+1/4}, x_{k+1/2}, x_{k+3/4}`); the fallback passes LATINO's dicts.
        return_info: also return the info dict: ``nfe`` (paper convention, video NFE + image sweeps), ``nfe_video``,
            ``nfe_image``, ``calls`` and ``calls_image`` (network evaluations per video counting one per frame:
            ``nfe_video + nfe_image * T``), ``forward_passes`` (batched network calls actually made, per prior) and
            ``x_video``, the last raw video-prior output (the reference's output, §6.6, §11.4).

    Returns:
        :math:`x_N` after the last data step (data-consistent) [ours], ``(B, C, T, H, W)``; with ``return_info`` a
        pair ``(x, info)``.
    """
    rows = resolve_schedule(schedule)
    if x_init is not None and not torch.is_tensor(x_init):
        raise TypeError(f"lvtino: x_init must be a tensor or None, got {type(x_init).__name__}")
    frames = image_prior if isinstance(image_prior, FrameWisePrior) else FrameWisePrior(image_prior, frame_batch)
    cond_image = _condition(frames, cond_image)
    sigma_n = _noise_std(sigma_y, y)
    x = wiener_init(op, y, sigma_n) if x_init is None else x_init  # §6.6
    if x.ndim != 5:
        raise ValueError(f"lvtino: expected videos (B, C, T, H, W), got a start of shape {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[2]
    image_calls0 = frames.image_prior.nfe
    if video_prior is None:
        if shared_image_noise:
            raise ValueError("lvtino: without a video prior (frame-wise LATINO) the noise is drawn per frame")
        return _framewise_latino(
            frames, op, y, x, rows, cond_image, sigma_y, weights, generator, callback, return_info, image_calls0
        )
    op.check_measurement(y, tuple(x.shape))  # shapes first, before any network call (§6.2)
    video_prior.check_shape(tuple(x.shape))
    frames.check_shape(tuple(x.shape))
    cond_video = _condition(video_prior, cond_video)
    shared = True if shared_image_noise is None else bool(shared_image_noise)
    video_calls0, step_sizes = video_prior.nfe, {}

    def step(x_tilde: torch.Tensor, settings: DataStep) -> torch.Tensor:
        size = None
        if settings.method == "pdhg" and settings.tau is None and isinstance(op, LinearOperator):
            key = (settings.reg, settings.alpha)  # the operator is fixed: estimate ||A||^2 once per solve
            if key not in step_sizes:
                step_sizes[key] = pdhg_step_size_per_video(op, x_tilde, _weights(settings, x_tilde))
            size = step_sizes[key]
        return data_step(op, x_tilde, y, settings, sigma_n, step_size=size)

    x_video = None
    for k, row in enumerate(rows):
        t_v = _batch_time(row.t_video, B, y.device)
        x_video = sae_step(video_prior, x, t_v, cond_video, generator)  # 1. one video NFE
        x_half = step(x_video, row.video_step)  # 2. likelihood (+ TV)
        x_image = None
        if row.image_step is not None:  # k < N - 1
            t_i = _batch_time(row.t_image, B, y.device)
            x_image = image_sae_step(frames, x_half, t_i, cond_image, generator, shared_noise=shared)  # 3. T calls
            x = step(x_image, row.image_step)  # 4. likelihood only
        else:
            x = x_half
        if callback is not None:
            callback(
                dict(
                    k=k, x=x, x_video=x_video, x_half=x_half, x_image=x_image, t_video=row.t_video, t_image=row.t_image
                )
            )
    if not return_info:
        return x
    n_image = sum(r.image_step is not None for r in rows)
    info = _counts(len(rows), n_image, T)
    info["forward_passes"] = dict(video=video_prior.nfe - video_calls0, image=frames.image_prior.nfe - image_calls0)
    info["x_video"] = x_video
    return x, info


def _counts(n_video: int, n_image: int, frames: int) -> dict[str, Any]:
    """§6.5 cost in both conventions, per video: NFE (image sweeps) and network evaluations (one per frame)."""
    return dict(
        nfe=n_video + n_image,
        nfe_video=n_video,
        nfe_image=n_image,
        calls=n_video + n_image * frames,
        calls_image=n_image * frames,
    )


def _framewise_latino(
    frames: FrameWisePrior,
    op: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    rows: tuple[LVTINOStep, ...],
    cond: Any,
    sigma_y: float | torch.Tensor,
    weights: Callable[..., torch.Tensor] | None,
    generator: Generator,
    callback: Callback,
    return_info: bool,
    image_calls0: int,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """LVTINO without a video prior: LATINO (§4.2) with the frame-wise image prior and the schedule's image rows."""
    image_rows = [r for r in rows if r.image_step is not None]
    if not image_rows:
        raise ValueError("lvtino: without a video prior the schedule needs at least one image step")
    rule = weights if weights is not None else ScheduleWeights([r.image_step for r in image_rows])
    x, latino_info = latino(
        frames, op, y, x, [r.t_image for r in image_rows], cond=cond, weights=rule, sigma_y=sigma_y,
        generator=generator, callback=callback, return_info=True,
    )  # fmt: skip
    if not return_info:
        return x
    info = _counts(0, latino_info["nfe"], x.shape[2])
    info["forward_passes"] = dict(video=0, image=frames.image_prior.nfe - image_calls0)
    info["x_video"] = None
    info["gammas"] = latino_info["gammas"]
    return x, info


__all__ = [
    "IMAGE_PROMPT",
    "LVTINO_SCHEDULES",
    "METHODS",
    "T_IMAGE_AB",
    "T_IMAGE_C",
    "T_VIDEO_AB",
    "T_VIDEO_C",
    "VIDEO_PROMPT",
    "DataStep",
    "LVTINOStep",
    "ScheduleWeights",
    "data_step",
    "data_step_adam",
    "generic_schedule",
    "image_sae_step",
    "lvtino",
    "map_times",
    "pdhg_step_size_per_video",
    "resolve_schedule",
    "smoothed_tv3_grad",
]
