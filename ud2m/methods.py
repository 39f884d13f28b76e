r"""The restoration methods of ``sample.py`` as typed objects (docs/cli.md "Methods"; house-style K): one class per
method, chosen like every other component by ``class_path``/``init_args`` (``--method DPS --method.zeta 2``, or a
``method:`` block in a ``--config`` YAML) or by its short name (``--method dps``: the class with its defaults).

A method restores one batch of observations of a :class:`Problem` (operator, noise level, prior, ...) with
:meth:`Method.restore`; :func:`ud2m.solvers.posterior.posterior_sample` turns that into S posterior samples with
their mean and std. Every setting is a typed ``__init__`` argument; ``None`` means the solver function's own default
(its signature holds it, so each default lives in one place), and :meth:`Method.settings` resolves it for the run
record. Data-weight rules tuned for an operator preset are read from the preset file (its ``solver:`` block,
:func:`ud2m.solvers.weights.preset_rules`) unless the method is given its own.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from ud2m.operators.base import LinearOperator
from ud2m.operators.noise import sigma_internal
from ud2m.priors.base import Prior
from ud2m.solvers.weights import DiscrepancyWeights, WeightRule, preset_rules

Task = Literal["low-light", "haze", "noise", "colour"]
Schedule = Literal["A", "B", "C", "A_fast"]


@dataclasses.dataclass
class Problem:
    """What a method restores from, for one image size.

    Attributes:
        op: the forward operator.
        sigma_y: noise std of the data term on the [0, 1] scale (a JPEG preset's ``sigma_eff``, §2.6).
        x_shape: ``(C, H, W)`` of one restored image.
        prior: the prior (None for the model-free methods).
        cond: the prompt's condition (latent priors).
        model: UD2M: the loaded export (:func:`ud2m.export.load_checkpoint`).
        manifest: UD2M: the export's manifest (its default N and eta).
        preset: the operator preset's metadata (its ``solver:`` block holds tuned weight rules).
        captions: LD-RPS: one caption per observation (None: unconditional).
        video_prior: LVTINO: the video prior (None: frame-wise LATINO with ``prior``, the image prior).
    """

    op: Any
    sigma_y: float
    x_shape: tuple[int, int, int]
    prior: Any = None
    cond: Any = None
    model: Any = None
    manifest: dict | None = None
    preset: dict = dataclasses.field(default_factory=dict)
    captions: list[str] | None = None
    video_prior: Any = None


class Method:
    """A restoration method (subclasses: one per method). Class attributes say how ``sample.py`` runs it;
    :meth:`solver_function` is the solver whose signature holds the defaults of ``None`` settings.

    Attributes:
        name: the short name (``--method <name>``).
        needs_model: loads a prior (``--model``).
        needs_autograd: the solver enables grad locally, so the entry point uses ``no_grad``, not ``inference_mode``.
        deterministic: one output per observation (``num_samples`` must be 1).
        video: restores videos ``(B, C, T, H, W)``: ``sample.py`` hands it to the video job (docs/cli.md "Videos").
    """

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True
    needs_autograd: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    video: ClassVar[bool] = False

    @classmethod
    def solver_function(cls) -> Callable[..., Any] | None:
        """The solver function whose signature holds the defaults of ``None`` settings (None: no such solver)."""
        return None

    def restore(self, problem: Problem, y: torch.Tensor, generators: list[torch.Generator], index: torch.Tensor):
        """Restore the rows ``y`` ``(R, ...)`` (row r: observation ``index[r]``, drawing from ``generators[r]``);
        returns ``samples (R, C, H, W)`` or ``(samples, extras)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The settings given (``None`` ones dropped), as the solver's keyword arguments."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def settings(self, problem: Problem | None = None) -> dict[str, Any]:
        """Every setting with ``None`` resolved to the value used (the solver's default), JSON-friendly: the run
        record that lets ``sample.py`` resume only a run with the same settings."""
        solver, defaults = self.solver_function(), {}
        if solver is not None:
            parameters = inspect.signature(solver).parameters
            defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
        return {k: _record(defaults.get(k) if v is None else v) for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    @classmethod
    def class_of(cls, name: str) -> type[Method]:
        """The method class called ``name`` (``"dps"`` -> :class:`DPS`)."""
        known = {c.name: c for c in _subclasses(cls) if c.name}
        if name not in known:
            raise ValueError(f"method: expected one of {sorted(known)} or a Method class_path, got {name!r}")
        return known[name]

    @classmethod
    def by_name(cls, name: str) -> Method:
        """The method called ``name`` with its defaults (``"dps"`` -> ``DPS()``)."""
        method = cls.class_of(name)
        try:
            return method()
        except TypeError as err:  # a required setting (LD-RPS's task)
            example = f"--method {method.__name__} --method.<setting> ..."
            raise ValueError(f"method {name!r} needs settings: {err} ({example})") from err


def _subclasses(cls: type) -> list[type]:
    return [s for c in cls.__subclasses__() for s in (c, *_subclasses(c))]


def _record(value: Any) -> Any:
    """JSON-friendly value of a setting (rules by their repr, tuples as lists)."""
    if isinstance(value, (WeightRule, torch.Tensor)):
        return repr(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# ============================================================================================== model-free
class Lift(Method):
    """No inversion: :math:`A^\\top y` (bilinear upsampling for SR), the naive baseline."""

    name, needs_model, deterministic = "lift", False, True

    def restore(self, problem, y, generators, index):
        return problem.op.lift(y).clamp(-1, 1)


class Wiener(Method):
    r"""The Wiener / Tikhonov warm start :math:`(A^\top A + \sigma_n^2/s_0^2 I)^{-1}A^\top y` (docs/method.md §4.2).

    Args:
        s0: prior std on the [-1, 1] scale (None: ``wiener_init``'s default).
    """

    name, needs_model, deterministic = "wiener", False, True

    def __init__(self, s0: float | None = None) -> None:
        self.s0 = s0

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.steps import wiener_init

        return wiener_init

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.steps import wiener_init

        return wiener_init(problem.op, y, sigma_internal(problem.sigma_y), **self.options())


class Tikhonov(Method):
    """Tikhonov-regularised least squares (docs/method.md §10.3).

    Args:
        s0: prior std on the [-1, 1] scale (None: ``solve_tikhonov``'s default).
    """

    name, needs_model, deterministic = "tikhonov", False, True

    def __init__(self, s0: float | None = None) -> None:
        self.s0 = s0

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.baselines import solve_tikhonov

        return solve_tikhonov

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.baselines import solve_tikhonov

        return solve_tikhonov(problem.op, y, sigma_y=problem.sigma_y, **self.options()).clamp(-1, 1)


class TotalVariation(Method):
    r"""Total variation: :math:`\min_x \|Ax - y\|^2/(2\sigma_n^2) + \lambda\,\mathrm{TV}(x)` by PDHG (§10.3).

    Args:
        lam: the TV weight :math:`\lambda` in likelihood units.
        iters: PDHG iterations (None: the solver's default).
        reg: the TV kind (None: ``tv2`` for images, ``tv3`` for videos).
        alpha: its weight (None: the solver's default).
    """

    name, needs_model, deterministic = "tv", False, True

    def __init__(
        self,
        lam: float = 20.0,
        iters: int | None = None,
        reg: Literal["tv2", "tv3", "tv_t"] | None = None,
        alpha: float | None = None,
    ) -> None:
        self.lam, self.iters, self.reg, self.alpha = lam, iters, reg, alpha

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.baselines import solve_total_variation

        return solve_total_variation

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.baselines import solve_total_variation

        return solve_total_variation(problem.op, y, sigma_y=problem.sigma_y, **self.options())


# ============================================================================================== zero-shot
def default_timesteps(prior: Any, num_steps: int | None) -> tuple[int, ...]:
    """LATINO's grid: a uniform grid of ``num_steps`` when given; else SDXL/DMD2's 8-step grid for SDXL UNets,
    LCM's otherwise (docs/method.md §4.2)."""
    from ud2m.schedules import LATINO_SDXL, LCM_8, uniform_grid

    if num_steps is not None:
        return uniform_grid(num_steps)
    return LATINO_SDXL if getattr(prior, "is_sdxl", False) else LCM_8


def _grid(timesteps: list[int] | None, num_steps: int | None, prior: Any) -> tuple[int, ...]:
    if timesteps is not None and num_steps is not None:
        raise ValueError(f"give timesteps or num_steps, not both (got {timesteps} and {num_steps})")
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return tuple(timesteps) if timesteps is not None else default_timesteps(prior, num_steps)


class Latino(Method):
    """LATINO (docs/method.md §4): N steps of SAE + likelihood prox, one network call each.

    Args:
        timesteps: the grid, largest first (None: :func:`default_timesteps`).
        num_steps: a uniform grid of this many steps instead (not with ``timesteps``).
        weights: the data-weight rule (None: the operator preset's tuned rule, else the discrepancy rule).
        fill_holes_iters: hole-filling initialisation iterations for inpainting (None: the solver's default).
    """

    name = "latino"

    def __init__(
        self,
        timesteps: list[int] | None = None,
        num_steps: int | None = None,
        weights: WeightRule | None = None,
        fill_holes_iters: int | None = None,
    ) -> None:
        self.timesteps, self.num_steps, self.weights = timesteps, num_steps, weights
        self.fill_holes_iters = fill_holes_iters
        _grid(timesteps, num_steps, None)  # contradictions fail at construction

    def rule(self, problem: Problem) -> WeightRule:
        """The given rule, else the preset's, else :class:`DiscrepancyWeights`."""
        return self.weights or preset_rules(problem.preset, self.name).get("weights") or DiscrepancyWeights()

    def settings(self, problem=None):
        grid = _grid(self.timesteps, self.num_steps, None if problem is None else problem.prior)
        rule = self.rule(problem) if problem is not None else self.weights
        return {"timesteps": list(grid), "weights": _record(rule), "fill_holes_iters": self.fill_holes_iters or 0}

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.latino_algorithms import latino

        grid = _grid(self.timesteps, self.num_steps, problem.prior)
        extra = {} if self.fill_holes_iters is None else {"fill_holes_iters": self.fill_holes_iters}
        return latino(
            problem.prior, problem.op, y, timesteps=grid, weights=self.rule(problem), sigma_y=problem.sigma_y,
            cond=problem.cond, generator=generators, **extra,
        )  # fmt: skip


class LatinoPro(Method):
    """LATINO-PRO (docs/method.md §5): LATINO with the prompt calibrated by empirical Bayes (latent priors).

    Args:
        num_outer: outer SAPG iterations (None: the solver's default).
        inner_timesteps: grid of the inner chains (None: the solver's default).
        final_timesteps: grid of the final LATINO run (None: :func:`default_timesteps`).
        num_steps: a uniform final grid of this many steps instead (not with ``final_timesteps``).
        weights_inner: data-weight rule of the inner chains (None: the preset's, else the discrepancy rule).
        weights_final: data-weight rule of the final run (None: the preset's, else the discrepancy rule).
        optimizer: ``"sapg"`` or ``"adam"`` (None: the solver's default).
    """

    name, needs_autograd = "latino_pro", True

    def __init__(
        self,
        num_outer: int | None = None,
        inner_timesteps: list[int] | None = None,
        final_timesteps: list[int] | None = None,
        num_steps: int | None = None,
        weights_inner: WeightRule | None = None,
        weights_final: WeightRule | None = None,
        optimizer: Literal["sapg", "adam"] | None = None,
    ) -> None:
        self.num_outer, self.inner_timesteps, self.final_timesteps = num_outer, inner_timesteps, final_timesteps
        self.num_steps, self.weights_inner, self.weights_final, self.optimizer = (
            num_steps, weights_inner, weights_final, optimizer,
        )  # fmt: skip
        _grid(final_timesteps, num_steps, None)

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.latino_algorithms import latino_pro

        return latino_pro

    def rules(self, problem: Problem) -> dict[str, WeightRule]:
        """The given rules, else the preset's, else the discrepancy rule."""
        tuned = preset_rules(problem.preset, self.name)
        return {k: getattr(self, k) or tuned.get(k) or DiscrepancyWeights() for k in ("weights_inner", "weights_final")}

    def _kwargs(self, problem: Problem) -> dict[str, Any]:
        given = self.options()
        kw = {k: given[k] for k in ("num_outer", "inner_timesteps", "optimizer") if k in given}
        kw["final_timesteps"] = _grid(self.final_timesteps, self.num_steps, problem.prior)
        return {**kw, **self.rules(problem)}

    def settings(self, problem=None):
        from ud2m.solvers.latino_algorithms import latino_pro

        if problem is None:
            return super().settings()
        defaults = inspect.signature(latino_pro).parameters
        kw = self._kwargs(problem)
        names = ("num_outer", "inner_timesteps", "optimizer", "final_timesteps", "weights_inner", "weights_final")
        return {k: _record(kw[k] if k in kw else defaults[k].default) for k in names}

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.latino_algorithms import latino_pro

        x, cond = latino_pro(
            problem.prior, problem.op, y, cond=problem.cond, sigma_y=problem.sigma_y, generator=generators,
            **self._kwargs(problem),
        )  # fmt: skip
        return x, {"cond": cond}  # one calibrated condition per chain: S independent LATINO-PRO runs per image


class DPS(Method):
    """Diffusion posterior sampling (docs/method.md §10.3).

    Args:
        num_steps: DDIM steps (None: ``solve_dps``'s default).
        zeta: guidance step (None: the solver's default); see ``zeta_scaling``.
        zeta_scaling: ``"none"`` or ``"steps"`` (zeta is per 1000 steps).
        step_rule: ``"norm"`` (the reference's) or ``"squared"``.
        eta: DDIM stochasticity.
        clip_x0: clamp x̂0 to the prior's data range (None: the solver's default, True, as the reference).
    """

    name, needs_autograd = "dps", True

    def __init__(
        self,
        num_steps: int | None = None,
        zeta: float | None = None,
        zeta_scaling: Literal["none", "steps"] | None = None,
        step_rule: Literal["norm", "squared"] | None = None,
        eta: float | None = None,
        clip_x0: bool | None = None,
    ) -> None:
        self.num_steps, self.zeta, self.zeta_scaling, self.step_rule, self.eta, self.clip_x0 = (
            num_steps, zeta, zeta_scaling, step_rule, eta, clip_x0,
        )  # fmt: skip

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.baselines import solve_dps

        return solve_dps

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.baselines import solve_dps

        kw = dict(cond=problem.cond, sigma_y=problem.sigma_y, generator=generators)
        return solve_dps(problem.prior, problem.op, y, **kw, **self.options())


class DiffPIR(Method):
    """DiffPIR (docs/method.md §10.3).

    Args:
        num_steps: steps (None: ``solve_diffpir``'s default).
        lambda_: data weight in internal units (None: the solver's default).
        zeta: stochasticity (None: the solver's default).
        grid: ``"quad"`` (the reference's) or ``"uniform"``.
        clip_x0: clamp the denoiser's x̂0 to the prior's data range (None: the solver's default, True, as the
            reference).
    """

    name = "diffpir"

    def __init__(
        self,
        num_steps: int | None = None,
        lambda_: float | None = None,
        zeta: float | None = None,
        grid: Literal["quad", "uniform"] | None = None,
        clip_x0: bool | None = None,
    ) -> None:
        self.num_steps, self.lambda_, self.zeta, self.grid = num_steps, lambda_, zeta, grid
        self.clip_x0 = clip_x0

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.baselines import solve_diffpir

        return solve_diffpir

    def restore(self, problem, y, generators, index):
        from ud2m.solvers.baselines import solve_diffpir

        kw = dict(cond=problem.cond, sigma_y=problem.sigma_y, generator=generators)
        return solve_diffpir(problem.prior, problem.op, y, **kw, **self.options())


# ============================================================================================== trained and blind
class UD2M(Method):
    """The exported UD2M sampler (``--checkpoint``; docs/method.md §8): N steps of K blocks.

    Args:
        num_steps: N (None: the export's).
        eta: DDIM stochasticity (None: the export's).
        t_start: first grid time (None: the export's, else 999 = from pure noise); below 999 the chain starts from
            the Wiener estimate re-noised (docs/method.md §8 revision [ours]), a start to tune on training images as
            LATINO's t_max is.
        final_gamma: close the chain with one data step of weight γ (LATINO's γ convention; None: the export's,
            else none, the paper's output); docs/method.md §8 revision [ours], to tune on training images.
        residual_renoise: re-noise each block's data-step output with only the noise its time is missing (True)
            or with the full noise of §7.1 step 6 (False); None: the export's (its manifest's sampler entry, else
            its training's ``renoise``); docs/method.md §8 revision [ours], to tune on training images.
    """

    name = "ud2m"

    def __init__(
        self,
        num_steps: int | None = None,
        eta: float | None = None,
        t_start: int | None = None,
        final_gamma: float | None = None,
        residual_renoise: bool | None = None,
    ) -> None:
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if t_start is not None and not 1 <= t_start <= 999:
            raise ValueError(f"t_start must lie in [1, 999], got {t_start}")
        from ud2m.unfolded import check_final_gamma  # lazily: ud2m.unfolded imports peft (seconds at start-up)

        check_final_gamma(final_gamma)
        self.num_steps, self.eta, self.t_start, self.final_gamma = num_steps, eta, t_start, final_gamma
        self.residual_renoise = residual_renoise

    def settings(self, problem=None):
        sampler = (problem.manifest or {}).get("sampler", {}) if problem is not None else {}
        return {k: sampler.get(k) if v is None else v for k, v in vars(self).items()}

    def restore(self, problem, y, generators, index):
        from ud2m.unfolded import sample_ud2m

        kw = {**self.settings(problem), "cond": problem.cond, "generator": generators}
        return sample_ud2m(problem.model, problem.op, y, problem.sigma_y, x_shape=(len(y), *problem.x_shape), **kw)


class LDRPS(Method):
    """LD-RPS blind restoration (docs/method.md §13, docs/blind.md): the degradation is learned per image.

    Args:
        task: ``low-light``, ``haze``, ``noise`` or ``colour`` (its defaults: §13.4).
        captions: a folder of ``<stem>.txt`` captions for text-conditioned priors (None: ``--prompt``).
        num_steps: DDIM steps N (None: the task's [ours, §13.13]: low light 200, haze 100, colour 50; noise the
            reference's 450).
        free_chains: free chains F (None: the task preset's, else the solver's default 1).
        psi: the learned degradation: ``"physical"`` (the task's physical ψ fitted paired, §13.9 [ours]; the
            default) or ``"fpam"`` (the reference's F-PAM network with its adversarial loss, §13.2).
        guidance_factor: factor on the task's guidance scale (None: 1, the reference's value, made for SD1.5 latents
            at 512²); the blind benchmark tunes it on training crops for the offline ``photos`` prior (docs/blind.md).
            The scale is the resolution-independent ``"sum"`` one times 450/N (a pass's total guidance as the
            reference's at any N), as in the benchmark, so its tuned factors apply here. The ``noise`` preset is
            unguided (it starts from y at its estimated noise level, docs/blind.md): no factor changes it.
        zhat_from: ``"z_next"`` (the reference's off-by-one estimate, None) or ``"z_t"`` (the Tweedie estimate
            of the current state [ours], §13.3).
        threshold: ``"auto"`` (None: clamp ẑ0 to the data range on pixel priors, the reference's quantile rule on
            latent priors), ``"reference"`` or ``"data"`` (``ud2m.solvers.ld_rps.resolve_threshold``).
    """

    name, needs_autograd = "ld_rps", True

    def __init__(
        self,
        task: Task,
        captions: str | None = None,
        num_steps: int | None = None,
        free_chains: int | None = None,
        psi: Literal["physical", "fpam"] | None = None,
        guidance_factor: float | None = None,
        zhat_from: Literal["z_next", "z_t"] | None = None,
        threshold: Literal["auto", "reference", "data"] | None = None,
    ) -> None:
        from ud2m.solvers.ld_rps import task_defaults

        task_defaults(task)  # an unknown task is refused here, naming the known ones
        if guidance_factor is not None and not guidance_factor > 0:
            raise ValueError(f"guidance_factor must be > 0, got {guidance_factor}")
        self.task, self.captions, self.num_steps, self.free_chains = task, captions, num_steps, free_chains
        self.psi, self.guidance_factor, self.zhat_from, self.threshold = psi, guidance_factor, zhat_from, threshold

    def settings(self, problem=None):
        # the later settings stay None at their defaults (factor 1, z_next, threshold "auto"): a run record names
        # them all, so a run from before the threshold setting (unclamped on pixel priors) is not resumed into
        later = {"guidance_factor": self.guidance_factor, "zhat_from": self.zhat_from, "threshold": self.threshold}
        out = {**super().settings(problem), "psi": self.psi or "physical", **later}
        from ud2m.solvers.ld_rps import preset_for, task_defaults

        # the preset's F and N where the task sets them (noise: F = 0; low light / haze / colour: N = 200 / 100 / 50)
        defaults = task_defaults(self.task) if problem is None else preset_for(self.task, problem.prior)
        if self.free_chains is None and defaults.free_chains is not None and problem is not None:
            out["free_chains"] = defaults.free_chains
        out["num_steps"] = defaults.steps(self.num_steps)
        return out

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.ld_rps import ld_rps

        return ld_rps

    def restore(self, problem, y, generators, index):
        """The last pass, and as extras every pass, ψ's output on the result and the §13.5 cost counters."""
        from ud2m.solvers.ld_rps import REFERENCE_STEPS, CFGCondition, ld_rps, learned_degradation, preset_for

        defaults, psi = preset_for(self.task, problem.prior), self.psi or "physical"
        op = learned_degradation(self.task, psi=psi).to(y.device)
        captions = None if problem.captions is None else [problem.captions[i] for i in index.tolist()]
        cond = None
        if getattr(problem.prior, "vae", None) is not None and captions is not None:  # text-conditioned latent prior
            uncond = problem.prior.encode_prompt([""] * len(captions))
            if any(captions):
                cond = CFGCondition(problem.prior.encode_prompt(captions), uncond)
            else:
                cond = uncond
        # the "sum" guidance norm (resolution-independent, the reference's at 512²) scaled by 450/N so that a pass
        # gets the reference's total guidance on any grid, times the tuned factor: benchmarks/blind.py's convention
        kw = defaults.solver_kwargs(guidance_norm="sum", image_size=y.shape[-1], psi=psi)
        n = defaults.steps(self.num_steps)  # the task's N unless given (colour: 50)
        kw["guidance_scale"] *= REFERENCE_STEPS / n * (self.guidance_factor or 1.0)
        kw.update({k: v for k, v in self.options().items() if k in ("free_chains", "zhat_from", "threshold")})
        kw["num_steps"] = n
        states = {}
        passes, info = ld_rps(
            problem.prior, op, y, cond=cond, generator=generators, on_pass=lambda r, x, st: states.update(last=st),
            **kw,
        )  # fmt: skip
        psi = op.psi((passes[-1].detach() + 1) / 2, states["last"]).detach() * 2 - 1  # ψ(x̂) on [-1, 1]: y's look
        return passes[-1], {"passes": passes, "psi": psi, "costs": info}


# ============================================================================================== video
class LVTINO(Method):
    """LVTINO video restoration (docs/method.md §6, docs/video.md): ``--model`` is the video prior (a stacked-frame
    pixel DDPM such as ``ud2m/assets/priors/clips``, or a Wan folder); without it the method is frame-wise LATINO
    with the image prior only (§6.2). The released schedule's times are moved to the priors' own noise schedules
    (:func:`~ud2m.solvers.lvtino.map_times`: the identity for Wan and SDXL-schedule priors). Prompts are the
    reference's (``VIDEO_PROMPT``, ``IMAGE_PROMPT``) for priors with a text encoder; unconditional priors get none.

    Args:
        image_model: the image prior's folder or hub id (applied frame by frame; required).
        schedule: ``"A"``, ``"B"`` or ``"C"``, the released rows of §6.4, or ``"A_fast"`` (A's data steps at a
            quarter of the PDHG work, :data:`~ud2m.solvers.lvtino.LVTINO_SCHEDULES`). None: the operator preset's
            (its ``schedule:`` key, set by the ``lvtino/*`` presets for their problem), else ``"A"``.
        frame_batch: frames per image-prior call (None: ``lvtino``'s default).
        shared_image_noise: one image noise per video shared by its frames (None: ``lvtino``'s default, shared with
            a video prior; frame-wise LATINO draws it per frame and refuses True).
        time_scale: factor on every (mapped) schedule time [ours] (:func:`~ud2m.solvers.lvtino.map_times`); the
            offline clips benchmark tunes it on training clips (docs/video.md).
    """

    name, video = "lvtino", True

    def __init__(
        self,
        image_model: str,
        schedule: Schedule | None = None,
        frame_batch: int | None = None,
        shared_image_noise: bool | None = None,
        time_scale: float = 1.0,
    ) -> None:
        if frame_batch is not None and frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        if not 0 < time_scale <= 1:
            raise ValueError(f"time_scale must lie in (0, 1], got {time_scale}")
        self.image_model, self.schedule = image_model, schedule
        self.frame_batch, self.shared_image_noise, self.time_scale = frame_batch, shared_image_noise, time_scale

    @classmethod
    def solver_function(cls):
        from ud2m.solvers.lvtino import lvtino

        return lvtino

    def schedule_of(self, problem: Problem | None) -> str:
        """The schedule's name: the given one, else the preset's, else ``"A"``."""
        return self.schedule or (problem.preset if problem else {}).get("schedule") or "A"

    def check(self, problem: Problem) -> None:
        """Refuse what the solver would refuse mid-run (before anything is written)."""
        from ud2m.solvers.lvtino import resolve_schedule

        if problem.video_prior is None and self.shared_image_noise:
            raise ValueError("LVTINO without --model is frame-wise LATINO: its image noise is drawn per frame")
        rows = resolve_schedule(self.schedule_of(problem))
        steps = {r.video_step.method for r in rows} | {r.image_step.method for r in rows if r.image_step}
        if not isinstance(problem.op, LinearOperator) and steps != {"prox"}:
            raise ValueError(
                f"LVTINO schedule {self.schedule_of(problem)!r} has {sorted(steps)} data steps, which need a linear "
                f"operator; {type(problem.op).__name__} is not (schedule B uses prox steps only)"
            )

    def settings(self, problem=None):
        out = super().settings(problem)
        out["schedule"] = self.schedule_of(problem)
        if problem is not None and self.shared_image_noise is None:
            out["shared_image_noise"] = problem.video_prior is not None
        return out

    def restore(self, problem, y, generators, index):
        """The videos, and as extras the NFE counts of ``lvtino``'s info (§6.5)."""
        from ud2m.solvers.lvtino import IMAGE_PROMPT, VIDEO_PROMPT, lvtino, map_times

        rows = map_times(self.schedule_of(problem), problem.video_prior, problem.prior, self.time_scale)
        kw = {k: v for k, v in self.options().items() if k in ("frame_batch", "shared_image_noise")}
        x, info = lvtino(
            problem.video_prior, problem.prior, problem.op, y, schedule=rows, sigma_y=problem.sigma_y,
            cond_video=_prompt(problem.video_prior, VIDEO_PROMPT), cond_image=_prompt(problem.prior, IMAGE_PROMPT),
            generator=generators, return_info=True, **kw,
        )  # fmt: skip
        counts = ("nfe", "nfe_video", "nfe_image", "calls", "calls_image")
        return x, {"nfe": {k: info[k] for k in counts}}


def _prompt(prior: Any, text: str) -> str | None:
    """``text`` for a prior with a text encoder; None for unconditional priors (they refuse prompts)."""
    return None if prior is None or type(prior).encode_prompt is Prior.encode_prompt else text


__all__ = [
    "DPS",
    "LDRPS",
    "LVTINO",
    "UD2M",
    "DiffPIR",
    "Latino",
    "LatinoPro",
    "Lift",
    "Method",
    "Problem",
    "Tikhonov",
    "TotalVariation",
    "Wiener",
    "default_timesteps",
]
