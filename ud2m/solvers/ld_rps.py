r"""LD-RPS: blind restoration by recurrent posterior sampling with a learned degradation (docs/method.md §13.3-13.5).

Implements the algorithm of seed 002 ("LD-RPS"): deterministic DDIM (η = 0) on a (latent or pixel) diffusion prior
while a small network ψ_φ (:class:`ud2m.operators.learned.LearnedDegradation`) is fitted online to make decoded
estimates look like y; below t1 the mismatch ψ(x̂⁺) vs y (plus Zero-DCE quality terms) steers the guided chain by
x0-guidance through the decoder, and the result is re-noised to τ_k and sampled again ("recurrence"). Free chains
share y and the state but get no guidance; they only feed ``adapt``.

The module also owns the per-task defaults of §13.4 (:data:`TASK_DEFAULTS`), the quality regularisers Q_exp, Q_col
(pure ``(B,)`` functions), the timestep grids and the reference's "clip without rescale" thresholding, and a
classifier-free-guidance condition (:class:`CFGCondition`, §13.1: x̂0_u + w(x̂0_c − x̂0_u), one batched call).

Autograd: callers may wrap :func:`ld_rps` in ``torch.no_grad()`` (never ``torch.inference_mode()``): the solver
enables grad locally for ``adapt`` and for the guidance gradient, as DPS does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ud2m.operators.learned import LearnedDegradation
from ud2m.priors.base import Prior
from ud2m.priors.vp import VPSchedule, make_betas
from ud2m.schedules import DDIM_SPACINGS, ddim_grid
from ud2m.utils import Generator, append_dims, randn

Regulariser = tuple[Callable[[torch.Tensor], torch.Tensor], float, float]  # (Q_j, w_j, t_j): w_j·Q_j(x̂⁺)·1[t < t_j]
Threshold = tuple[str, float, float, float] | None  # (kind, ratio, s_min, s_max)
DEFAULT_THRESHOLD = ("clip_quantile", 0.995, 1.0, 100.0)  # [ref] for SD latents
THRESHOLD_CHOICES = ("auto", "reference", "data")
REFERENCE_PIXELS = 786_432  # 3·512²: "sum" normalisation s̃ = s / 786,432 (§13.3)
REFERENCE_STEPS = 450  # §13.4's N; a run with N steps may scale its per-step guidance by 450/N (same total per pass)
SPACINGS, ZHAT_FROM = DDIM_SPACINGS, ("z_next", "z_t")
GUIDANCE_NORMS, GUIDANCE_STEPS, GUIDANCE_SPACES = ("mean", "sum"), ("latent", "x0"), ("rgb", "opponent")
#: BT.601 luma and chroma rows, (Y, Cb, Cr) = T·(R, G, B): the chroma rows sum to 0, so a grey shift is pure luma
YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.299 / 1.772, -0.587 / 1.772, 0.886 / 1.772),
    (0.701 / 1.402, -0.587 / 1.402, -0.114 / 1.402),
)


# ---------------------------------------------------------------------------------------------------- grids
def timestep_grid(num_steps: int, spacing: str = "leading", num_train_timesteps: int = 1000) -> list[int]:
    """τ_1 > … > τ_N (docs/method.md §13.3): :func:`ud2m.schedules.ddim_grid` as a list."""
    return list(ddim_grid(num_steps, spacing, num_train_timesteps))


def restart_index(num_steps: int, gamma: float) -> int:
    """0-based index of τ_k, k = N − ⌊γN⌋ + 1, where the recurrences restart (§13.3 line 4): ⌊γN⌋ steps."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma: expected a fraction in (0, 1], got {gamma}")
    return num_steps - math.floor(gamma * num_steps)


def num_steps_total(num_steps: int, gamma: float, num_recurrences: int) -> int:
    """S_tot = N + R·⌊γN⌋ DDIM steps (§13.5)."""
    return num_steps + num_recurrences * (num_steps - restart_index(num_steps, gamma))


def reference_schedule() -> VPSchedule:
    """The SD scaled-linear schedule on which the reference times t1, t_j and 449 were chosen."""
    return VPSchedule.from_betas(make_betas("scaled_linear", beta_start=0.00085, beta_end=0.012))


def transfer_time(prior: Prior, t: float) -> float:
    """``schedule_transfer="sigma"`` [ours]: the time of ``prior`` with the noise level s_t the reference had at t."""
    s = reference_schedule().sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(prior.t_of_sigma(s.to(torch.float32)))


# ---------------------------------------------------------------------------------------------------- thresholding
def threshold_x0(z0: torch.Tensor, threshold: Threshold = DEFAULT_THRESHOLD) -> torch.Tensor:
    r"""Per-sample thresholding of a clean estimate (§13.3 "thr").

    s_q = clamp(quantile_ratio(|ẑ0|), s_min, s_max) per sample; ``"clip_quantile"`` [ref] returns
    clamp(ẑ0, −s_q, s_q) (no division, the reference's patched diffusers), ``"dynamic"`` the stock diffusers rule
    clamp(ẑ0, −s_q, s_q)/s_q; ``None`` is the identity.
    """
    if threshold is None:
        return z0
    kind, ratio, s_min, s_max = threshold
    if kind not in ("clip_quantile", "dynamic"):
        raise ValueError(f"threshold: expected 'clip_quantile', 'dynamic' or None, got {kind!r}")
    if s_min == s_max:  # a fixed bound (the data-range rule): the quantile cannot move it, so skip the sort
        out = z0.clamp(-s_max, s_max)
        return out / s_max if kind == "dynamic" else out
    s = torch.quantile(z0.abs().flatten(1).float(), ratio, dim=1).clamp(s_min, s_max).to(z0.dtype)  # (B,)
    s = append_dims(s, z0.ndim)
    out = torch.maximum(torch.minimum(z0, s), -s)
    return out / s if kind == "dynamic" else out


def resolve_threshold(threshold: Threshold | str, prior: Prior) -> Threshold:
    r"""The thresholding rule ``ld_rps`` applies on ``prior`` [ours for pixel priors].

    ``"reference"``: :data:`DEFAULT_THRESHOLD`, the reference's "clip without rescale" at the 99.5 % quantile with
    s_q ∈ [1, 100], made for SD latents. ``"data"``: clamp ẑ0 to the prior's data range (s_min = s_max = the bound
    of :attr:`~ud2m.priors.base.Prior.data_range`, a symmetric range), i.e. diffusers' ``clip_sample`` for pixel
    models and DiffPIR's and DPS's ``clip_denoised``. ``"auto"`` (the solver's default): ``"data"`` for pixel priors
    with a data range, ``"reference"`` otherwise (latent priors, the analytic Gaussian). A tuple or None passes
    through. Measured on the ``photos`` pixel prior (4 held-out crops, N = 50, docs/method.md §13.13): an ε-prediction
    DDPM's ẑ0 reaches ±60 early, which s_q ≤ 100 never clips, and the guided chains end with saturated colours;
    clamping at 1 lifts the true-operator colourisation from 11.1 to 17.2 dB and blind low light from 13.5 to 15.7.
    """
    if not isinstance(threshold, str):
        return threshold
    if threshold not in THRESHOLD_CHOICES:
        raise ValueError(f"threshold: expected one of {THRESHOLD_CHOICES}, a tuple or None, got {threshold!r}")
    if threshold == "auto":
        threshold = "reference" if prior.is_latent or prior.data_range is None else "data"
    if threshold == "reference":
        return DEFAULT_THRESHOLD
    if prior.data_range is None or prior.data_range[0] != -prior.data_range[1]:
        raise ValueError(f"threshold 'data': expected a symmetric data range, got {prior.data_range}")
    bound = float(prior.data_range[1])
    return ("clip_quantile", 0.995, bound, bound)


# ---------------------------------------------------------------------------------------------------- quality terms
def exposure_loss(x: torch.Tensor, patch_size: int = 32, level: float = 0.5) -> torch.Tensor:
    r"""Q_exp of Zero-DCE (§13.1): mean over non-overlapping P×P patches of (patch mean of the channel average
    − E)², incomplete patches dropped; x on [0, 1] ``(B, C, H, W)`` -> ``(B,)``."""
    means = F.avg_pool2d(x.mean(1, keepdim=True), patch_size, stride=patch_size)  # (B, 1, ⌊H/P⌋, ⌊W/P⌋)
    return (means - level).square().flatten(1).mean(1)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with gradient 0 (not NaN) at v = 0 [ours]."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


def colour_loss(x: torch.Tensor) -> torch.Tensor:
    r"""Q_col of Zero-DCE (§13.1): √((μ_R − μ_G)⁴ + (μ_R − μ_B)⁴ + (μ_G − μ_B)⁴), μ_c the mean of channel c,
    ``(B,)``; its gradient is 0 at grey balance [ours]."""
    mu = x.flatten(2).mean(2)  # (B, 3)
    r, g, b = mu.unbind(1)
    return _safe_sqrt((r - g) ** 4 + (r - b) ** 4 + (g - b) ** 4)


# ---------------------------------------------------------------------------------------------------- CFG
@dataclasses.dataclass(frozen=True)
class CFGCondition:
    """Classifier-free guidance folded into the condition (§13.1): x̂0 = x̂0_u + w(x̂0_c − x̂0_u), 2 NFE per chain.

    Attributes:
        cond: condition of the caption (e.g. ``prior.encode_prompt(caption)``).
        uncond: condition of the negative prompt (``prior.encode_prompt("")``).
        w: guidance weight (8 [ref]).
    """

    cond: Any
    uncond: Any
    w: float = 8.0


def _cat_conditions(a: Any, b: Any, batch: int) -> Any:
    """Batch-concatenate two frozen condition dataclasses (each expanded to ``batch``) field by field."""
    a, b = a.expand(batch), b.expand(batch)
    fields = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)}
    return dataclasses.replace(a, **{k: None if u is None else torch.cat([u, v]) for k, (u, v) in fields.items()})


def predict_x0_cfg(prior: Prior, z: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """ẑ0 of the prior, with CFG when ``cond`` is a :class:`CFGCondition` (one batched call of 2B)."""
    if not isinstance(cond, CFGCondition):
        return prior.predict_x0(z, t, cond)
    both = prior.predict_x0(torch.cat([z, z]), torch.cat([t, t]), _cat_conditions(cond.cond, cond.uncond, len(z)))
    x0_c, x0_u = both.chunk(2)
    return x0_u + cond.w * (x0_c - x0_u)


def caption_condition(prior: Prior, caption: str | None, w: float = 8.0) -> Any:
    """Condition for a caption: ``CFGCondition`` (caption vs "") or, for an empty caption, the plain condition
    (CFG is then the identity, one branch suffices [ours]); None for unconditional priors."""
    if caption is None:
        return prior.encode_prompt(None)
    uncond = prior.encode_prompt("")
    return uncond if caption == "" or w == 1.0 else CFGCondition(prior.encode_prompt(caption), uncond, w)


# ---------------------------------------------------------------------------------------------------- task defaults
@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    """One column of §13.4. Quality patch sizes are given at 512² and scaled by H/512."""

    guidance_scale: float  # s for guidance_norm="mean"; "sum" uses s / 786,432
    w_mse: float
    w_pse: float
    w_adv: float
    d1_lr: float
    lambda_p: float
    lambda_a: float
    d2_lr: float
    exposure: tuple[float, int, float] | None  # (weight, P at 512², active t <)
    colour: tuple[float, float] | None  # (weight, active t <)
    num_recurrences: int
    use_caption: bool
    physical_arch: str = "tone"  # ψ = "physical" [ours] (§13.9): the physical model of this task
    physical_iters: int = 5  # its paired Adam steps per adapt (0: ψ stays the identity, nothing to fit)
    physical_exposure: tuple[float, int, float] | None = None  # Q_exp with ψ = "physical": (w, P at 512², t <)
    start: str | None = None  # pass 0's start (:func:`ld_rps`'s ``start``): None [ref] pure noise, "measurement" y
    free_chains: int | None = None  # F; None: the solver's default (1 [ref]); 0 where ψ has nothing to fit [ours]
    num_steps: int | None = None  # N; None: the reference's 450; low light 200, haze 100, colour 50 [ours, §13.13]

    def steps(self, num_steps: int | None = None) -> int:
        """N for a run: ``num_steps`` when given, else this task's, else the reference's 450."""
        return int(num_steps or self.num_steps or REFERENCE_STEPS)

    def degradation_kwargs(self, psi: str = "physical") -> dict[str, Any]:
        """Keyword arguments of :class:`LearnedDegradation` for this task: ``psi="physical"`` [ours, default]
        the task's physical ψ fitted paired (§13.9), ``psi="fpam"`` the reference's F-PAM and its weights."""
        if psi == "physical":
            return dict(arch=self.physical_arch, psi_iters=self.physical_iters, **PHYSICAL_FIT)
        if psi != "fpam":
            raise ValueError(f"psi: expected 'physical' or 'fpam', got {psi!r}")
        names = ("w_mse", "w_pse", "w_adv", "d1_lr", "lambda_p", "lambda_a", "d2_lr")
        return {k: getattr(self, k) for k in names}

    def regularisers(self, image_size: int = 512, psi: str = "physical") -> tuple[Regulariser, ...]:
        """``(Q_j, w_j, t_j)`` for :func:`ld_rps`, Q_exp patches scaled to ``image_size`` (32 → 4 at 64²); with
        ``psi="physical"`` the task's ``physical_exposure`` replaces Q_exp."""
        regs: list[Regulariser] = []
        exposure = self.physical_exposure if psi == "physical" else self.exposure
        if exposure is not None:
            w, P, t_j = exposure
            P = max(1, round(P * image_size / 512))
            regs.append((lambda x, P=P: exposure_loss(x, P), w, t_j))
        if self.colour is not None:
            regs.append((colour_loss, *self.colour))
        return tuple(regs)

    def solver_kwargs(
        self, *, guidance_norm: str = "mean", image_size: int = 512, psi: str = "physical"
    ) -> dict[str, Any]:
        """``guidance_scale``, ``num_recurrences``, ``regularisers``, ``guidance_norm``, ``start`` (and ``free_chains``
        where the task sets it) for :func:`ld_rps`
        (``psi`` as in :meth:`degradation_kwargs`)."""
        s = self.guidance_scale if guidance_norm == "mean" else self.guidance_scale / REFERENCE_PIXELS
        return dict(
            guidance_scale=s,
            num_recurrences=self.num_recurrences,
            regularisers=self.regularisers(image_size, psi),
            guidance_norm=guidance_norm,
            start=self.start,
            **({} if self.free_chains is None else {"free_chains": self.free_chains}),
        )


PHYSICAL_FIT = dict(psi_lr=2e-2, psi_weight_decay=0.0)  # a few parameters: a larger step, no decay [ours] (§13.9)
GLOBAL_EXPOSURE = (1e-2, 512, 999.0)  # Q_exp on the whole image (P = H), every guided step [ours] (§13.9)
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    # [ours] N = 200: on 8 training crops 16.5 dB against 15.9 at the reference's 450, at 0.44 of the cost (§13.13)
    "low-light": TaskDefaults(
        8e4,
        0.02,
        0.3,
        0.8,
        4e-5,
        2e-3,
        5e-5,
        4e-5,
        (1e-2, 32, 100),
        (1e-2, 100),
        2,
        True,
        "tone",
        5,
        GLOBAL_EXPOSURE,
        num_steps=200,
    ),
    # [ours] N = 100: on 8 training crops 16.5 dB against 14.8 at the reference's 450 (§13.13)
    "haze": TaskDefaults(
        2.5e4,
        0.2,
        0.5,
        0.2,
        1e-4,
        5e-3,
        0.0,
        4e-5,
        (1e-2, 64, 150),
        (1e-3, 150),
        3,
        True,
        "scattering",
        5,
        (1e-2, 64, 150),
        num_steps=100,
    ),
    # [ours] the noise column starts from y at its estimated noise level, unguided, without recurrences and without
    # free chains (ψ is the identity: nothing to fit); the reference: pure noise, s = 4e4, R = 1, F = 1 (§13.12)
    "noise": TaskDefaults(
        0.0, 3.0, 0.002, 0.001, 1e-4, 0.0, 0.0, 4e-5, None, None, 0, False, "tone", 0, None, "measurement", 0
    ),
    # [ours] N = 50 (guidance ×450/N): on 8 training crops 21.2 dB against 15.1 at the reference's N = 450 (§13.13)
    "colour": TaskDefaults(
        2.5e4, 0.2, 0.5, 0.2, 1e-4, 5e-3, 0.0, 4e-5, None, None, 1, True, "luma", 5, None, num_steps=50
    ),
}


#: the §13.4 columns that :data:`TASK_DEFAULTS` replaces [ours], for comparisons (``benchmarks/blind.py``)
REFERENCE_TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "noise": dataclasses.replace(
        TASK_DEFAULTS["noise"], guidance_scale=4e4, num_recurrences=1, start=None, free_chains=None
    ),
}


def task_defaults(task: str) -> TaskDefaults:
    """The §13.4 defaults of ``task``.

    Raises:
        ValueError: naming the known tasks for an unknown one.
    """
    if task not in TASK_DEFAULTS:
        raise ValueError(f"task: unknown LD-RPS task {task!r}; known tasks: {', '.join(TASK_DEFAULTS)}")
    return TASK_DEFAULTS[task]


def preset_for(task: str, prior: Prior) -> TaskDefaults:
    """The shipped column of ``task`` for ``prior``: a measurement start needs a pixel prior (its state is the
    image, and the noise is Gaussian there), so a prior with an encoder (a latent prior) gets the reference's column
    (:data:`REFERENCE_TASK_DEFAULTS`)."""
    defaults = task_defaults(task)
    if defaults.start == "measurement" and prior.is_latent:
        return REFERENCE_TASK_DEFAULTS[task]
    return defaults


def learned_degradation(task: str, *, psi: str | None = None, **overrides: Any) -> LearnedDegradation:
    """A :class:`LearnedDegradation` for ``task`` (overrides win).

    ``psi="physical"`` [ours, the default without ``base``] gives the task's physical ψ fitted paired (§13.9);
    ``psi="fpam"`` [ref, the default with ``base``] the F-PAM ψ with the task's §13.4 loss weights and learning rates;
    with ``base`` the adversarial weight w_adv defaults to 0 [ours]: D1's pull moved ψ off a correct A₀ (§13.9).
    """
    psi = psi or ("fpam" if "base" in overrides or "arch" in overrides else "physical")
    anchored = {"w_adv": 0.0} if "base" in overrides else {}
    return LearnedDegradation(**{**task_defaults(task).degradation_kwargs(psi), **anchored, **overrides})


# ---------------------------------------------------------------------------------------------------- the solver
@dataclasses.dataclass
class _Run:
    """Static quantities of one call and the cost counters of §13.5 (per image)."""

    prior: Prior
    op: Any
    y: torch.Tensor
    cond: Any
    chains: int
    guidance_scale: float
    regularisers: tuple[Regulariser, ...]
    threshold: Threshold
    zhat_from: str
    guidance_norm: str
    guidance_step: str
    guidance_space: str
    adapt: bool
    on_step: Callable[[dict[str, Any]], None] | None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def count(self, key: str, k: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + k


def _scales(prior: Prior, t: float, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, b_t)`` as ``(B·n,)`` in ``z``'s dtype (fp32, or fp64 for fp64 runs)."""
    a, b = prior.scales(torch.full((len(z),), float(t), device=z.device, dtype=torch.float64))
    return a.to(z.dtype), b.to(z.dtype)


def _decode01(run: _Run, z0: torch.Tensor) -> torch.Tensor:
    """x̂ = (decode(ž0) + 1)/2, unclamped (§13.1)."""
    return (run.prior.decode(z0) + 1) / 2


def _guidance(run: _Run, z0_plus: torch.Tensor, t: float, t_reg: Sequence[float], state) -> torch.Tensor:
    r"""g = −s ∇_{ž0⁺} Σ_b L_b (``"sum"``: −s̃ N_y ∇), L = fidelity + Σ_j w_j Q_j 1[t < t_j] (§13.3 lines 14-15)."""
    with torch.enable_grad():
        z0 = z0_plus.detach().requires_grad_(True)
        x_plus = _decode01(run, z0)  # the decoder VJP of this step (batch 1 per image)
        loss = run.op.fidelity(x_plus, run.y, state)
        for (Q, w, _), t_j in zip(run.regularisers, t_reg, strict=True):
            if t < t_j:
                loss = loss + w * Q(x_plus)
        (grad,) = torch.autograd.grad(loss.sum(), z0)
    run.count("decoder_vjps")
    scale = run.guidance_scale * (run.y[0].numel() if run.guidance_norm == "sum" else 1.0)
    return -scale * (opponent_metric(grad) if run.guidance_space == "opponent" else grad)


def opponent_metric(grad: torch.Tensor) -> torch.Tensor:
    r"""The gradient step taken in (Y, Cb, Cr) coordinates and mapped back to RGB [ours]: :math:`M\nabla` with
    :math:`M = T^{-1}T^{-\top}` (T = :data:`YCBCR`), symmetric positive definite, per pixel.

    The Euclidean RGB gradient of a loss that sees only luma, w·x with w = (0.299, 0.587, 0.114), points along w:
    a step raises green twice as much as red and five times as much as blue, a chroma change that the fidelity
    cannot see and the guidance repeats every step (magenta and green casts on the ``colour`` task, §13.12).
    Since :math:`T^\top e_Y = w` and the chroma rows annihilate (1, 1, 1), :math:`Mw = T^{-1}e_Y = (1, 1, 1)`:
    the same loss moves all three channels equally, a grey shift, and leaves chroma to the prior."""
    if grad.ndim != 4 or grad.shape[1] != 3:
        raise ValueError(f"guidance_space='opponent' needs RGB pixels (B, 3, H, W), got {tuple(grad.shape)}")
    return torch.einsum("ij,bjhw->bihw", _OPPONENT_M.to(grad), grad)


def _opponent_m() -> torch.Tensor:
    """M = T⁻¹T⁻ᵀ of :func:`opponent_metric` in float64, computed once."""
    T_inv = torch.linalg.inv(torch.tensor(YCBCR, dtype=torch.float64))
    return T_inv @ T_inv.T


_OPPONENT_M = _opponent_m()


def _step(run: _Run, z: torch.Tensor, state, t: float, t_next: float, t1: float, t_reg, info: dict) -> tuple:
    """One DDIM step with adapt and (below t1) guidance, §13.3 lines 7-16; z is ``(B·n, c, h, w)``."""
    prior, n, B = run.prior, run.chains, z.shape[0] // run.chains
    a, b = _scales(prior, t, z)
    a2, b2 = _scales(prior, t_next, z)
    a, b, a2, b2 = (append_dims(v, z.ndim) for v in (a, b, a2, b2))
    z0_hat = predict_x0_cfg(prior, z, torch.full((len(z),), float(t), device=z.device), run.cond)  # 7.
    eps = (z - a * z0_hat) / b  # 8. from the unclipped ẑ0, as diffusers
    z0_hat = threshold_x0(z0_hat, run.threshold)
    z_next = a2 * z0_hat + b2 * eps  # 9. DDIM, η = 0
    z0_check = threshold_x0((z_next - b * eps) / a, run.threshold) if run.zhat_from == "z_next" else z0_hat  # 10.
    guided = t < t1
    z0_chk = z0_check.view(B, n, *z.shape[1:])
    x_all = _decode01(run, z0_check.detach()).detach()  # 11. all chains, no graph (the prior is frozen)
    x_hat = x_all.view(B, n, *x_all.shape[1:])  # (B, n, C, H, W)
    run.count("decoder_forwards")
    if run.adapt:
        state, logs = run.op.adapt(x_hat, run.y, state, t=t, guided=guided)  # 12.
        run.count("psi_steps")  # adapt calls (§13.5's S_tot ψ updates; a physical ψ fits only in guided ones)
        for key in ("d1", "d2"):  # optimiser steps actually taken (no D1 when w_adv = 0, no D2 when λ_a = 0)
            if key in logs and not bool(torch.isnan(logs[key]).all()):
                run.count(f"{key}_steps")
    g = torch.zeros_like(z_next).view(B, n, *z.shape[1:])
    if guided and run.guidance_scale != 0:  # 13.-16. (s = 0: no guidance, no decoder VJP [ours])
        g_plus = _guidance(run, z0_chk[:, 0], t, t_reg, state)
        g[:, 0] = g_plus * (a2.view(B, n, *a2.shape[1:])[:, 0] if run.guidance_step == "x0" else 1.0)
        run.count("guided_steps")
    g = g.view_as(z_next)
    if run.on_step is not None:
        run.on_step(dict(info, t=t, t_next=t_next, z=z, zhat0=z0_check, g=g, x_hat=x_hat, guided=guided, state=state))
    return z_next + g, state


def ld_rps(
    prior: Prior,
    op: Any,
    y: torch.Tensor,
    *,
    num_recurrences: int,
    guidance_scale: float,
    cond: Any = None,
    num_steps: int = REFERENCE_STEPS,
    t1: float = 700.0,
    gamma: float = 0.5,
    regularisers: Sequence[Regulariser] = (),
    free_chains: int = 1,
    spacing: str = "leading",
    threshold: Threshold | str = "auto",
    zhat_from: str = "z_next",
    guidance_norm: str = "mean",
    guidance_step: str = "latent",
    guidance_space: str = "rgb",
    schedule_transfer: str | None = None,
    start: torch.Tensor | str | None = None,
    start_sigma: float | torch.Tensor | None = None,
    start_time: float | None = None,
    adapt: bool = True,
    generator: Generator = None,
    on_pass: Callable[[int, torch.Tensor, Any], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    r"""LD-RPS (seed 002; docs/method.md §13.3): two-stage DDIM with an online-fitted degradation and recurrences.

    Per pass r = 0..R (pass 0 from τ_1, later passes re-noised to τ_k, k = N − ⌊γN⌋ + 1), each step t → t':
    ẑ0 = thr(x̂0(z, t)), z ← a_{t'}ẑ0 + b_{t'}ε̂, ž0 from z_{t'} [ref] or ẑ0, x̂ = (D(ž0) + 1)/2, one ``adapt``
    on all chains, and for t < t1 the guided chain moves by

    .. math:: g = -s\,\nabla_{\check z_0^+}\sum_b \Big[L_b(\hat x^+) + \sum_j w_j Q_j(\hat x^+)\,1[t < t_j]\Big]

    (``"sum"``: s̃·N_y instead of s; ``guidance_step="x0"``: a_{t'}·g).

    Args:
        prior: any §3 prior (pixel or latent; latent priors are differentiated through the decoder).
        op: a :class:`LearnedDegradation` (or any object with ``init_state``/``adapt``/``fidelity``).
        y: measurement ``(B, ...)`` on the internal scale.
        num_recurrences: R (§13.4 per task).
        guidance_scale: s (``"mean"``) or s̃ (``"sum"``).
        cond: prior condition; a :class:`CFGCondition` for CFG (see :func:`caption_condition`).
        num_steps, t1, gamma: N, the stage boundary and the recurrence fraction γ.
        regularisers: ``(Q_j, w_j, t_j)`` triples of per-sample functions on [0, 1] images.
        free_chains: F unguided chains per image that only feed ``adapt`` (0 allowed [ours]).
        spacing: ``"leading"`` [ref] or ``"trailing"`` [ours] timestep grid.
        threshold: ``"auto"`` (default: clamp to the data range on pixel priors [ours], the reference's rule on
            latent priors), ``"reference"``, ``"data"`` (:func:`resolve_threshold`), a tuple
            ``("clip_quantile" | "dynamic", ratio, s_min, s_max)`` or None.
        zhat_from: ``"z_next"`` [ref, off-by-one] or ``"z_t"`` [ours, the Tweedie estimate of z_t].
        guidance_norm: ``"mean"`` [ref] or ``"sum"`` [ours].
        guidance_step: ``"latent"`` [ref] or ``"x0"`` [ours].
        guidance_space: ``"rgb"`` [ref], the plain gradient, or ``"opponent"`` [ours], the gradient step taken in
            (Y, Cb, Cr) coordinates (:func:`opponent_metric`; pixel RGB priors only): a luma-only loss then shifts
            grey instead of green (for a known grey conversion; measured on the ``colour`` task and not its
            default, docs/method.md §13.12).
        schedule_transfer: None or ``"sigma"``: t1, t_j and the restart time move to the prior's times with the
            reference (SD scaled-linear) noise levels [ours].
        start: where pass 0 starts [ours]. None [ref]: pure noise at τ_1. ``"measurement"``: from y itself, which
            for additive Gaussian noise on a pixel prior *is* a draw of the forward process at the time whose
            noise level is y's (the ``noise`` task's preset); a tensor: any initial estimate x_init of the image's
            shape (internal scale). Pass 0 then starts at τ_s, the smallest grid time at or above ``start_time``,
            from :math:`z = a_{\tau_s} E(x_\text{init}) + \sqrt{b_{\tau_s}^2 - a_{\tau_s}^2\sigma^2}\,\varepsilon`
            (the noise topped up to τ_s's level; E the encoder), and the recurrences restart at the later of τ_k
            and τ_s (:func:`start_index`).
        start_sigma: σ, the noise std (internal scale) already in the start, float or ``(B,)``. None: Immerkær's
            estimate (:func:`ud2m.operators.estimate.noise_level`) for ``"measurement"``, 0 (a clean estimate,
            SDEdit) for a tensor. A latent prior takes only σ = 0 (the noise lives in pixel space).
        start_time: the time to start from; None: the prior's time of the largest σ of the batch (required when
            σ = 0).
        adapt: fit ψ at every step (False: ψ stays at its initialisation; for tests and ablations).
        generator: a generator or a list of B (per image: state, then z, then ε_1..ε_R).
        on_pass: ``on_pass(r, x_r, state)`` after every pass.
        on_step: called with ``dict(r, i, t, t_next, z, zhat0, g, x_hat, guided, state)`` after every step.

    Returns:
        ``([x_0, …, x_R], info)``: passes clamped to [-1, 1] (x_R is the result) and the §13.5 cost counters per
        image (``steps``, ``guided_steps``, ``nfe`` batched prior calls, ``nfe_paper`` per chain and CFG branch,
        ``decoder_forwards``, ``decoder_vjps``, ``output_decodes``, ``psi_steps``, ``d1_steps``, ``d2_steps``).
    """
    _check_options(spacing, zhat_from, guidance_norm, guidance_step, guidance_space, schedule_transfer, free_chains)
    n, B = 1 + free_chains, y.shape[0]
    grid = [*timestep_grid(num_steps, spacing, round(prior.schedule.t_max) + 1), 0]  # τ_{N+1} = 0: ᾱ_0 [ref]
    k = restart_index(num_steps, gamma)
    t_reg = [float(t_j) for _, _, t_j in regularisers]
    if schedule_transfer == "sigma":
        t1, t_restart = transfer_time(prior, t1), transfer_time(prior, grid[k])
        t_reg = [transfer_time(prior, t_j) for t_j in t_reg]
        k = next(i for i in range(num_steps) if grid[i] <= t_restart)  # the first grid entry at or below
    threshold = resolve_threshold(threshold, prior)
    run = _Run(prior, op, y, cond, n, guidance_scale, tuple(regularisers), threshold, zhat_from, guidance_norm,
               guidance_step, guidance_space, adapt, on_step)  # fmt: skip
    nfe0 = prior.nfe
    c, h, w = prior.latent_shape(_image_shape(op, y))[1:]
    state = op.init_state(y, generator=generator)  # 1. fresh per call [ours]
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32  # fp32 latents (§1.4); fp64 for tests
    z = randn((B, n * c, h, w), generator, device=y.device, dtype=dtype).view(B * n, c, h, w)  # 2.
    i0 = 0
    if start is not None:  # [ours] from an estimate, its noise topped up to τ_s (the draw of line 2 is the top-up)
        x_init, sigma = start_image(op, y, start, start_sigma)
        i0 = start_index(grid[:num_steps], _start_time(prior, sigma, start_time))
        z = _start_latent(prior, x_init, sigma, grid[i0], z.view(B, n, c, h, w)).view_as(z)
    passes = []
    for r in range(num_recurrences + 1):  # 3.
        start_i = i0 if r == 0 else max(k, i0)  # 4.
        if r > 0:  # 5. latent re-noise
            eps = randn((B, n * c, h, w), generator, device=y.device, dtype=dtype).view_as(z)
            z = prior.add_noise(z, torch.full((B * n,), float(grid[start_i]), device=y.device), eps)
        for i in range(start_i, num_steps):  # 6.
            z, state = _step(run, z, state, grid[i], grid[i + 1], t1, t_reg, dict(r=r, i=i))
        x_r = prior.decode(z.view(B, n, c, h, w)[:, 0]).clamp(-1.0, 1.0)  # 17.
        run.count("output_decodes")
        passes.append(x_r)
        if on_pass is not None:
            on_pass(r, x_r, state)
    return passes, _info(run, prior.nfe - nfe0)


def start_index(grid: Sequence[float], t_start: float) -> int:
    """Index of τ_s, the smallest time of the descending ``grid`` at or above ``t_start`` (0 when even τ_1 is
    below it), so that a start with noise level ≤ s(t_start) needs only a non-negative top-up."""
    above = [i for i, t in enumerate(grid) if t >= t_start]
    return above[-1] if above else 0


def start_image(op: Any, y: torch.Tensor, start: torch.Tensor | str, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_init, σ (B,))`` of the ``start`` option of :func:`ld_rps` (see there), with clear errors."""
    from ud2m.operators.estimate import noise_level

    measured = isinstance(start, str)
    if measured and start != "measurement":
        raise ValueError(f"start: expected None, 'measurement' or an image tensor, got {start!r}")
    x_init = y if measured else start
    shape = _image_shape(op, y)
    if tuple(x_init.shape) != tuple(shape):
        what = "y" if measured else "start"
        raise ValueError(f"start: {what} has shape {tuple(x_init.shape)}, the restored images have {tuple(shape)}")
    if sigma is None:
        sigma = 2 * noise_level((x_init + 1) / 2) if measured else 0.0  # Immerkær on [0, 1], doubled to [-1, 1]
    B = x_init.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x_init.dtype, device=x_init.device).expand(B).clone()
    if not bool((sigma >= 0).all()):
        raise ValueError(f"start_sigma: expected >= 0, got {sigma.tolist()}")
    return x_init, sigma


def _start_time(prior: Prior, sigma: torch.Tensor, start_time: float | None) -> float:
    if start_time is not None:
        return float(start_time)
    if not bool((sigma > 0).any()):
        raise ValueError("start: a clean start (start_sigma = 0) needs start_time, the time to re-noise it to")
    return float(prior.t_of_sigma(sigma.max().float()))


def _start_latent(prior: Prior, x_init: torch.Tensor, sigma: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
    """z = a_t E(x_init) + √(b_t² − a_t²σ²) ε per image, for every chain: ``eps`` is ``(B, n, c, h, w)``."""
    z0 = prior.encode(x_init.to(eps.dtype))
    if bool((sigma > 0).any()) and tuple(z0.shape) != tuple(x_init.shape):
        raise ValueError(
            f"start_sigma: {type(prior).__name__} works on latents of shape {tuple(z0.shape[1:])}; a noisy start "
            "(start_sigma > 0) needs a pixel prior, whose state is the image itself"
        )
    a, b = (v.to(eps.dtype) for v in prior.scales(torch.tensor(float(t), dtype=torch.float64)))
    top_up = (b**2 - a**2 * sigma.to(eps.dtype) ** 2).clamp_min(0).sqrt()  # (B,)
    return a * z0[:, None] + append_dims(top_up, eps.ndim) * eps


def _image_shape(op: Any, y: torch.Tensor) -> tuple[int, ...]:
    return tuple(op.image_shape(y)) if hasattr(op, "image_shape") else tuple(y.shape)


def _info(run: _Run, nfe: int) -> dict[str, Any]:
    """§13.5 cost accounting per image, counted as the loop ran."""
    counts, cfg = run.counts, isinstance(run.cond, CFGCondition)
    steps = counts.get("decoder_forwards", 0)
    return dict(
        steps=steps,
        guided_steps=counts.get("guided_steps", 0),
        chains=run.chains,
        cfg=cfg,
        nfe=nfe,
        nfe_paper=steps * run.chains * (2 if cfg else 1),
        decoder_forwards=steps,
        decoder_vjps=counts.get("decoder_vjps", 0),
        output_decodes=counts.get("output_decodes", 0),
        psi_steps=counts.get("psi_steps", 0),
        d1_steps=counts.get("d1_steps", 0),
        d2_steps=counts.get("d2_steps", 0),
    )


def _check_options(spacing, zhat_from, guidance_norm, guidance_step, guidance_space, schedule_transfer, free_chains):
    for name, value, allowed in (
        ("spacing", spacing, SPACINGS),
        ("zhat_from", zhat_from, ZHAT_FROM),
        ("guidance_norm", guidance_norm, GUIDANCE_NORMS),
        ("guidance_step", guidance_step, GUIDANCE_STEPS),
        ("guidance_space", guidance_space, GUIDANCE_SPACES),
        ("schedule_transfer", schedule_transfer, (None, "sigma")),
    ):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    if free_chains < 0:
        raise ValueError(f"free_chains: expected >= 0, got {free_chains}")
