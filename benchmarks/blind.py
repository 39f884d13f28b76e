"""Blind restoration benchmark (issue [ld-rps]): LD-RPS on simulated low light, haze, noise and colourisation.

The offline evaluation protocol of docs/method.md §13.8, scaled to about an hour on one or two CPU cores. Clean
images are 64x64 crops of the held-out photographs (``benchmarks/quality.py``'s ``write_crops(folder,
HELD_OUT_PHOTOS)``: coffee and immunohistochemistry, 8 crops each, never seen by the shipped ``photos`` prior). Each
task degrades them with the simulators of ``ud2m.operators.simulate`` (parameters drawn per crop and seed from
``seed_for(seed, crop, task, 0)``, the noise from ``seed_for(seed, crop, task, 1)``, so every run replays):

- ``low-light``: y = e·clamp(x, 0, 1)^γ + σ_y n, γ ~ U[1.5, 2.5], e ~ U[0.2, 0.5], σ_y = 0.01 (``LowLight``);
- ``haze``: y = t ⊙ x + A(1 − t) + σ_y n, t = exp(−βd), d mixing a vertical ramp and blurred noise, β ~ U[0.8, 1.6],
  grey A ~ U[0.75, 0.95], σ_y = 0.01 (``Haze``);
- ``noise``: y = x + 0.1 n (``Denoising``);
- ``colour``: y = wᵀx + σ_y n, w = (0.299, 0.587, 0.114), σ_y = 0.01 (``Grayscale(1)``), given to LD-RPS replicated
  to RGB (``Grayscale(3)``).

Methods, all on the same observations: **LD-RPS blind** (the shipped presets, §13.4 but for noise, with
``guidance_norm="sum"``, no feature network, ``schedule_transfer="sigma"``, Q patches scaled by 64/512, F = 1, the
pixel prior unconditional: no caption; noise [ours, §13.12]: from y at its estimated noise level, unguided, R = 0,
F = 0, so it gets no tuned-guidance rows and the reference's preset is run beside it, as published and tuned);
**LD-RPS with the true linear part** (``LearnedDegradation(base=...)``: x ↦ t ⊙ x on y′ = y − (1 − t)(2A − 1) for haze,
the identity for noise, ``Grayscale(3)`` for colour; §13.2) where the task is linear; **LD-RPS with the true operator**
(``KnownDegradation(simulator)``, ``adapt=False``: the same sampler and guidance with ψ replaced by the truth, every
task); the same blind and true-operator runs with **tuned guidance** (a factor on the §13.4 guidance scale from
``GUIDANCE_FACTORS``, chosen on ``--guidance_tune_crops`` training crops, the blind row's by blind PSNR and the
true-operator row's with the true operator, with ẑ0 from z_t:
the §13.4 scales were made for SD1.5 latents at 512²; on the offline pixel prior they make the true operator fit
the noise on denoising and are far too weak on haze and low light, docs/method.md §13.10-13.11), and for colour
(``MEAN_OF_CHAINS``) the **mean of 4 chains** of the tuned blind run (``sample.py --num_samples 4``, §13.14); the
measurement itself (**y**); the **oracle inverse** (the simulator's ``lift`` with the true parameters:
(y₀₁/e)^{1/γ} for low light, (y − A(1 − t))/t for haze); the **classical blind estimate** from y alone (the dark
channel prior's dehazed image, the grey-world brightened one); and where linear **Tikhonov/Wiener** and **TV**
(``ud2m.solvers.baselines``), their weight tuned on crops of two training photographs (astronaut, chelsea), never on
the test crops. Reported per method: PSNR and SSIM (mean ± std over the (crop, seed) runs), PSNR of every LD-RPS pass,
the degradation fit PSNR(ψ(x̂), y) and PSNR(ψ(x), A(x)) (A(x) the noiseless truth), the §13.5 cost counters of
``ld_rps``'s ``info``, seconds per image and the load average (``os.getloadavg()``).

What is scaled relative to §13.8 (defaults; ``--quick`` in brackets):

- crops: 4 of the 16 held-out crops, evenly spaced over the sorted list, 2 per photograph [2: one per photograph];
- seeds: 1 (seed 0) instead of 3 (seeds 0-2) per crop [1];
- DDIM steps N: 200 instead of 450 [20, the §13.8 smoke run], or a task's preset N where that is smaller (haze 100,
  colour 50; docs/method.md §13.13), and ψ, D1 and D2 get as many Adam steps as there are DDIM steps (S_tot, below
  N + R⌊N/2⌋ with ``schedule_transfer="sigma"``; the shipped noise preset: the steps below y's noise level, 13 at
  N = 200);
- guidance: the §13.4 per-step scale s̃ times 450/N (``--guidance_scaling steps``, the default), so that a pass's
  total guidance matches the reference's; ``--guidance_scaling none`` keeps the per-step value. At N = 20 the
  unscaled guidance is too weak for even the true operator to matter (LD-RPS given the true operator reached
  7.7-14.9 dB PSNR unscaled, 14.9-22.3 dB scaled, in the ``--quick`` check);
- recurrences R: unchanged (§13.4: low light 2, haze 3, noise 1 (the shipped preset: 0), colour 1), F = 1;
- baselines: DPS-100, DiffPIR-100 and LATINO-8 are not run (Tikhonov and TV, and the classical blind estimates
  of ``ud2m.operators.estimate``: the dark channel prior for haze, a grey-world exposure for low light, their weight
  tuned on the training crops); no LPIPS (no backbone weights);
- tuning of Tikhonov's s0 and TV's λ: on 8 training crops [2]; of LD-RPS's guidance factor: on 4 [1].

``--num_steps 450 --crops 2 --guidance_scaling none`` runs the method at its published step count instead (about
the same time). At 1 thread on a loaded 2-core machine one LD-RPS image-step with ψ costs 0.2-0.3 s (the ψ and D1
updates dominate; with the true operator about 0.04 s), so the defaults take about 40-60 minutes and ``--quick``
about 2-3.

    python benchmarks/blind.py run [--quick] [--threads 1]   # writes benchmarks/results/blind[_quick].json and .md
    python benchmarks/blind.py report [--quick]              # tables again; the README section (full results only)

``--tasks`` runs some tasks and keeps the others' rows from the results file, so two processes can share the tasks
(``--tasks haze low-light`` and ``--tasks noise colour``); the table header gives each process's time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by the tests
from common import mean_pm_std as _pm
from common import nfe_text, write_report
from quality import HELD_OUT_PHOTOS, TIKHONOV_S0, TRAIN_PHOTOS, TV_LAMBDA, write_crops

from ud2m.operators.simulate import TASK_SIGMA_Y

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PRIOR = ROOT / "ud2m" / "assets" / "priors" / "photos"
WORK = Path("outputs/blind")
README_BEGIN, README_END = "<!-- blind:begin (generated by benchmarks/blind.py report) -->", "<!-- blind:end -->"

TASKS = tuple(TASK_SIGMA_Y)  # low-light, haze, noise, colour: the order seeds the runs (generators)
SIGMA_Y = TASK_SIGMA_Y  # §13.8, on the [0, 1] scale
SETTINGS = {
    "full": dict(crops=4, seeds=(0,), num_steps=200, tune_crops=8, guidance_tune_crops=4),
    "quick": dict(crops=2, seeds=(0,), num_steps=20, tune_crops=2, guidance_tune_crops=1),
}
BLIND, BASE, KNOWN = "LD-RPS blind (physical ψ)", "LD-RPS, true linear part", "LD-RPS, true operator (adapt off)"
# LD-RPS's guidance tuned on training crops [ours], as every other method's weight is: a factor on the §13.4 scale
# (made for SD1.5 latents at 512²; on the offline pixel prior too strong for denoising, where the true operator then
# fits the noise, and far too weak for haze and low light: ×3-×10 given the true operator, docs/method.md §13.11)
# with the Tweedie estimate of the current state (zhat_from="z_t"); the untuned rows keep the reference's settings
GUIDANCE_FACTORS = (10.0, 3.0, 1.0, 0.5, 0.3, 0.15)
#: the classical blind baselines' weights, tuned on the training crops like Tikhonov's and TV's
DCP_OMEGAS = (0.7, 0.8, 0.9, 0.95)
GREY_LEVELS = (0.3, 0.35, 0.4, 0.45, 0.5)
TUNED = "LD-RPS blind, tuned guidance"
#: tasks that also get the mean of that many chains at the blind row's tuned factor: colour, where a sample's
#: colours are a guess and the mean shrinks them towards the posterior's agreement (docs/method.md §13.14)
MEAN_OF_CHAINS = {"colour": 4}
KNOWN_TUNED = "LD-RPS, true operator, tuned guidance"
REFERENCE = "LD-RPS blind, the reference's preset (pure-noise start, guided, recurrences)"
REFERENCE_TUNED = "LD-RPS blind, the reference's preset, tuned guidance"
TASK_NOTES = {
    "noise": "Our preset [ours, docs/method.md §13.12]: pass 0 starts from y itself at the time of its noise level "
    "(Immerkær's estimate from y alone), unguided, without recurrence or free chains (ψ is the identity). The last "
    "two rows are "
    "the reference's §13.4 preset (pure-noise start, s = 4e4, R = 1).",
}


# ---------------------------------------------------------------------------------------------- inputs
def load_crops(folder: Path, photos: tuple[str, ...], count: int) -> tuple[list[str], torch.Tensor]:
    """``count`` crops evenly spaced over the sorted 16 of ``write_crops`` as ``(names, (count, 3, 64, 64))``."""
    from ud2m.io import load_image

    files = sorted(write_crops(folder, photos).glob("*.png"))
    if not 1 <= count <= len(files):
        raise ValueError(f"crops: expected 1..{len(files)}, got {count}")
    picked = [files[i] for i in torch.linspace(0, len(files) - 1, count).round().long().tolist()]
    return [f.stem for f in picked], torch.cat([load_image(f, channels=3) for f in picked])


def generators(keys: list[tuple[int, int]], task: str, purpose: int) -> list[torch.Generator]:
    """One generator per (seed, crop) run: ``seed_for(seed, crop, task index, purpose)`` (docs/method.md §1.5)."""
    from ud2m.utils import seed_for

    return [torch.Generator().manual_seed(seed_for(s, c, TASKS.index(task), purpose)) for s, c in keys]


@dataclass
class Problem:
    """One task's observations of a batch of runs and everything the methods need."""

    y: torch.Tensor  # what LD-RPS blind sees (RGB)
    truth_Ax: torch.Tensor  # the noiseless A(x) in y's space (degradation fit)
    simulator: Any  # the true operator on y (KnownDegradation, oracle lift)
    linear: Any  # linear operator of the task-aware solvers (None: low light)
    y_linear: torch.Tensor | None  # its measurement
    base: Any  # the known linear part given to LD-RPS as ``base`` (on y_base)
    y_base: torch.Tensor | None


def simulate(task: str, x: torch.Tensor, keys: list[tuple[int, int]], offset: int = 0) -> Problem:
    """The §13.8 degradation of ``task`` for the clean batch ``x`` (runs ``keys`` = (seed, crop index)):
    ``ud2m.operators.simulate.simulate_task`` with per-run parameter and noise generators."""
    from ud2m.operators import Denoising
    from ud2m.operators.simulate import simulate_task

    if task not in TASKS:  # before generators(), whose seeds index TASKS
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    keys = [(s + offset, c) for s, c in keys]
    sim = simulate_task(task, x, generators(keys, task, 0), generators(keys, task, 1), sigma_y=SIGMA_Y[task])
    op, y = sim.op, sim.y
    if task == "low-light":
        return Problem(y, op.A(x), op, None, None, None, None)
    if task == "haze":
        y_lin = op.remove_offset(y)
        return Problem(y, op.A(x), op, op.linear, y_lin, op.linear, y_lin)
    if task == "noise":
        return Problem(y, x, op, op, y, Denoising(), y)
    grey, y1 = sim.measured  # colour: linear solvers get the one-channel luma, LD-RPS its RGB replica
    return Problem(y, op.A(x), op, grey, y1, op, y)


# ---------------------------------------------------------------------------------------------- metrics
def summary(values: torch.Tensor | list[float]) -> dict[str, Any]:
    """``{mean, std, values}`` over the runs (NaN-free values only in mean/std)."""
    v = [float(a) for a in (values.tolist() if torch.is_tensor(values) else values)]
    finite = [a for a in v if math.isfinite(a)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "values": v}


def scores(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, Any]:
    from ud2m.metrics import psnr, ssim

    return {"psnr": summary(psnr(x_hat, x)), "ssim": summary(ssim(x_hat, x))}


# ---------------------------------------------------------------------------------------------- methods
def classical_blind(task: str, y: torch.Tensor, weight: float) -> torch.Tensor:
    """The classical single-image estimate of ``task`` from ``y`` alone (``ud2m.operators.estimate``), on the internal
    scale and clamped: the dark channel prior's dehazed image (``weight`` = ω) or the grey-world brightened one
    (``weight`` = the mean level)."""
    from ud2m.operators import estimate

    y01 = (y + 1) / 2
    if task == "haze":
        x01 = estimate.dehaze(y01, estimate.estimate_haze(y01, omega=weight))
    elif task == "low-light":
        x01 = estimate.brighten(y01, estimate.estimate_exposure(y01, mean_level=weight))
    else:
        raise ValueError(f"classical_blind: no classical estimate for task {task!r}")
    return (2 * x01 - 1).clamp(-1, 1)


CLASSICAL = {"haze": ("dark channel prior", "ω", DCP_OMEGAS), "low-light": ("grey-world exposure", "mean", GREY_LEVELS)}


def tune_baselines(task: str, x_tune: torch.Tensor, keys: list[tuple[int, int]]) -> dict[str, float]:
    """Tikhonov's s0 and TV's λ (linear tasks) and the classical blind estimate's weight (haze, low light) with the
    best mean PSNR on the training crops (other seeds than the test runs)."""
    from ud2m.metrics import psnr
    from ud2m.solvers.baselines import solve_tikhonov, solve_total_variation

    p = simulate(task, x_tune, keys, offset=1000)
    out: dict = {"tuning": {}}
    if task in CLASSICAL:
        blind = {w: float(psnr(classical_blind(task, p.y, w), x_tune).mean()) for w in CLASSICAL[task][2]}
        out.update(classical=max(blind, key=blind.get))
        out["tuning"]["classical"] = blind
    if p.linear is None:
        return out
    sigma = SIGMA_Y[task]
    tik = {
        s0: float(psnr(solve_tikhonov(p.linear, p.y_linear, sigma_y=sigma, s0=s0), x_tune).mean()) for s0 in TIKHONOV_S0
    }
    tv = {
        lam: float(psnr(solve_total_variation(p.linear, p.y_linear, sigma_y=sigma, lam=lam), x_tune).mean())
        for lam in TV_LAMBDA
    }
    out.update(s0=max(tik, key=tik.get), tv_lambda=max(tv, key=tv.get))
    out["tuning"].update(s0=tik, tv_lambda=tv)
    return out


def baseline_rows(task: str, p: Problem, x: torch.Tensor, tuned: dict) -> dict[str, dict]:
    """y, the oracle inverse, the classical blind estimate (haze, low light), Tikhonov and TV (linear tasks)."""
    from ud2m.solvers.baselines import solve_tikhonov, solve_total_variation

    rows: dict[str, dict] = {}

    def timed(name: str, fn, **extra) -> None:
        start = time.perf_counter()
        out = fn()
        rows[name] = {**scores(out, x), "seconds_per_image": (time.perf_counter() - start) / len(x), **extra}

    timed("y (identity)", lambda: p.y.clamp(-1, 1))
    if task in ("low-light", "haze"):
        timed("oracle inverse (simulator lift)", lambda: p.simulator.lift(p.y))
        name, symbol, _ = CLASSICAL[task]
        w = tuned["classical"]
        timed(
            f"{name}, blind ({symbol} = {w:g})",
            lambda: classical_blind(task, p.y, w),
            tuning=tuned["tuning"]["classical"],
        )
    if p.linear is not None:
        sigma = SIGMA_Y[task]
        s0, lam = tuned["s0"], tuned["tv_lambda"]
        tikhonov = lambda: solve_tikhonov(p.linear, p.y_linear, sigma_y=sigma, s0=s0).clamp(-1, 1)  # noqa: E731
        tv = lambda: solve_total_variation(p.linear, p.y_linear, sigma_y=sigma, lam=lam)  # noqa: E731
        timed(f"Tikhonov (s0 = {s0:g})", tikhonov, tuning=tuned["tuning"]["s0"])
        timed(f"TV (λ = {lam:g})", tv, tuning=tuned["tuning"]["tv_lambda"])
    return rows


def ld_rps_row(
    prior,
    task: str,
    label: str,
    op,
    y: torch.Tensor,
    x: torch.Tensor,
    truth_Ax: torch.Tensor,
    keys,
    args,
    *,
    adapt: bool = True,
    guidance: dict | None = None,
    defaults=None,
    chains: int = 1,
) -> dict:
    """One LD-RPS variant over the batch: per-pass scores, the degradation fit, the §13.5 costs and the time;
    ``guidance``: ``{"factor", "zhat_from"}`` (None: the reference's, factor 1 and z_next); ``defaults``: the
    task's column (None: ``task_defaults(task)``); ``chains`` > 1: that many independent runs per image in one batch
    (``sample.py --num_samples``), scored by their mean (chain 0 is the one-chain row's run; the fit and the costs
    are per chain); only with a learned ψ without ``base`` (a known operator holds one set of parameters per image)."""
    if chains > 1 and (not adapt or getattr(op, "base", None) is not None):
        raise ValueError(
            "ld_rps_row: chains > 1 needs a learned ψ without base (the operator's parameters are per image)"
        )
    from ud2m.metrics import psnr
    from ud2m.solvers.ld_rps import REFERENCE_STEPS, ld_rps, task_defaults

    kw = (defaults or task_defaults(task)).solver_kwargs(guidance_norm="sum", image_size=x.shape[-1])
    if args.guidance_scaling == "steps":  # keep the reference's total guidance per pass on a shorter grid
        kw["guidance_scale"] *= REFERENCE_STEPS / args.num_steps
    kw.setdefault("free_chains", 1)  # F = 1 [ref] unless the preset sets it (noise: 0, ψ has nothing to fit)
    if guidance is not None:
        kw.update(guidance_scale=kw["guidance_scale"] * guidance["factor"], zhat_from=guidance["zhat_from"])
    last_state: dict[str, Any] = {}
    # chain m's generators: purpose 2 for chain 0 (the one-chain rows' run), 2 + m for the others
    gens = [g for m in range(chains) for g in generators(keys, task, 2 + m)]
    y_all, x_all, truth_all = (v.repeat(chains, 1, 1, 1) for v in (y, x, truth_Ax))
    start = time.perf_counter()
    with torch.no_grad():
        passes, info = ld_rps(
            prior,
            op,
            y_all,
            num_steps=args.num_steps,
            schedule_transfer="sigma",
            adapt=adapt,
            generator=gens,
            on_pass=lambda r, x_r, state: last_state.update(state=state),
            **kw,
        )
    seconds = (time.perf_counter() - start) / len(x)
    fitted = op.freeze(last_state["state"])  # ψ at the end (the true operator for KnownDegradation)
    mean = lambda v: v.view(chains, *x.shape).mean(0)  # noqa: E731 (the mean of the chains, per image)
    row = {
        **scores(mean(passes[-1]), x),
        "passes": [scores(mean(x_r), x) for x_r in passes],
        "fit_psnr_y": summary(psnr(fitted.A(passes[-1]), y_all)),  # ψ(x̂) vs y, each chain's own
        "fit_psnr_truth": summary(psnr(fitted.A(x_all), truth_all)) if adapt else None,  # ψ(x) vs A(x)
        "costs": info,
        "seconds_per_image": seconds,
        "load_average": os.getloadavg(),
        **({"guidance": guidance} if guidance is not None else {}),
        **({"chains": chains} if chains > 1 else {}),
    }
    print(f"  {task} / {label}: PSNR {row['psnr']['mean']:.2f} ({seconds:.1f} s/image)", flush=True)
    return row


def tune_guidance(prior, task: str, x_tune: torch.Tensor, keys, args, *, known: bool = False, defaults=None) -> dict:
    """The guidance factor (``GUIDANCE_FACTORS``, with ``zhat_from="z_t"``) of blind LD-RPS (``known``: of LD-RPS
    given the true operator) with the best mean PSNR on the first ``--guidance_tune_crops`` training crops (other
    seeds than the test runs)."""
    from ud2m.operators.simulate import KnownDegradation
    from ud2m.solvers.ld_rps import learned_degradation

    x, keys = x_tune[: args.guidance_tune_crops], keys[: args.guidance_tune_crops]
    p = simulate(task, x, keys, offset=1000)
    scores_ = {}
    for factor in GUIDANCE_FACTORS:
        guidance = {"factor": factor, "zhat_from": "z_t"}
        op = KnownDegradation(p.simulator) if known else learned_degradation(task)
        row = ld_rps_row(prior, task, f"tune ×{factor}", op, p.y, x, p.truth_Ax, keys, args, adapt=not known,
                         guidance=guidance, defaults=defaults)  # fmt: skip
        scores_[str(factor)] = row["psnr"]["mean"]
    best = max(scores_, key=lambda k: scores_[k] if math.isfinite(scores_[k]) else -math.inf)
    return {"factor": float(best), "zhat_from": "z_t", "tuning": scores_}


def tuned_row(prior, task: str, label: str, p: Problem, x, keys, x_tune, tune_keys, args, *, known: bool = False,
              defaults=None) -> dict:  # fmt: skip
    """LD-RPS blind (``known``: given the true operator, no ψ fit) with the guidance factor that
    :func:`tune_guidance` chose on the training crops for that variant, and the tuning scores."""
    from ud2m.operators.simulate import KnownDegradation
    from ud2m.solvers.ld_rps import learned_degradation

    tuned = tune_guidance(prior, task, x_tune, tune_keys, args, known=known, defaults=defaults)
    op = KnownDegradation(p.simulator) if known else learned_degradation(task)
    guidance = {k: tuned[k] for k in ("factor", "zhat_from")}
    row = ld_rps_row(prior, task, label, op, p.y, x, p.truth_Ax, keys, args, adapt=not known, guidance=guidance,
                     defaults=defaults)  # fmt: skip
    return {**row, "tuning": tuned["tuning"]}


def protocol_steps(task: str, num_steps: int) -> int:
    """The N ``task`` runs at under the protocol's ``num_steps``: its preset's N where that is smaller (haze 100,
    colour 50; docs/method.md §13.13), else ``num_steps``."""
    from ud2m.solvers.ld_rps import task_defaults

    return min(num_steps, task_defaults(task).num_steps or num_steps)


def run_task(prior, task: str, x: torch.Tensor, keys, x_tune, tune_keys, args) -> dict:
    from ud2m.operators.simulate import KnownDegradation
    from ud2m.solvers.ld_rps import REFERENCE_TASK_DEFAULTS, learned_degradation, task_defaults

    args = argparse.Namespace(**{**vars(args), "num_steps": protocol_steps(task, args.num_steps)})
    print(f"{task} (N = {args.num_steps})", flush=True)
    p = simulate(task, x, keys)
    rows = baseline_rows(task, p, x, tune_baselines(task, x_tune, tune_keys))
    rows[BLIND] = ld_rps_row(prior, task, BLIND, learned_degradation(task), p.y, x, p.truth_Ax, keys, args)
    if p.base is not None:
        op = learned_degradation(task, base=p.base)
        rows[BASE] = ld_rps_row(prior, task, BASE, op, p.y_base, x, p.base.A(x), keys, args)
    rows[KNOWN] = ld_rps_row(
        prior, task, KNOWN, KnownDegradation(p.simulator), p.y, x, p.truth_Ax, keys, args, adapt=False
    )
    reference = REFERENCE_TASK_DEFAULTS.get(task)
    if reference is not None:  # the §13.4 column our preset replaced, as published and with tuned guidance
        rows[REFERENCE] = ld_rps_row(prior, task, REFERENCE, learned_degradation(task), p.y, x, p.truth_Ax, keys,
                                     args, defaults=reference)  # fmt: skip
        rows[REFERENCE_TUNED] = tuned_row(prior, task, REFERENCE_TUNED, p, x, keys, x_tune, tune_keys, args,
                                          defaults=reference)  # fmt: skip
    if task_defaults(task).guidance_scale == 0:  # an unguided preset: no guidance to tune
        return rows
    rows[TUNED] = tuned_row(prior, task, TUNED, p, x, keys, x_tune, tune_keys, args)
    if task in MEAN_OF_CHAINS:  # the posterior mean of a few chains at the tuned factor (docs/method.md §13.14)
        m = MEAN_OF_CHAINS[task]
        rows[f"{TUNED}, mean of {m} chains"] = ld_rps_row(prior, task, f"{TUNED}, mean of {m} chains",
                                                         learned_degradation(task), p.y, x, p.truth_Ax, keys, args,
                                                         guidance=rows[TUNED]["guidance"], chains=m)  # fmt: skip
    # the true-operator row gets its own factor, as every row's weight
    rows[KNOWN_TUNED] = tuned_row(prior, task, KNOWN_TUNED, p, x, keys, x_tune, tune_keys, args, known=True)
    return rows


def run(args) -> Path:
    from ud2m.priors import PixelDiffusionPrior

    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()
    names, x = load_crops(args.work_dir / "test_crops", HELD_OUT_PHOTOS, args.crops)
    _, x_tune = load_crops(args.work_dir / "tune_crops", TRAIN_PHOTOS[:2], args.tune_crops)
    keys = [(s, c) for s in args.seeds for c in range(len(names))]  # runs = (seed, crop)
    tune_keys = [(0, c) for c in range(len(x_tune))]
    x_runs = x.repeat(len(args.seeds), 1, 1, 1)
    prior = PixelDiffusionPrior.from_pretrained(PRIOR)
    tasks = {task: run_task(prior, task, x_runs, keys, x_tune, tune_keys, args) for task in args.tasks}
    meta = {
        "mode": "quick" if args.quick else "full",
        "crops": names,
        "seeds": list(args.seeds),
        "num_steps": args.num_steps,
        "guidance_scaling": args.guidance_scaling,
        "guidance_factors": list(GUIDANCE_FACTORS),
        "threads": torch.get_num_threads(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - start,
        "prior": "photos (pixel, unconditional: no caption)",
        "feature_net": None,
        "psi": "physical (§13.9: tone / scattering / tone, not fitted / luma); base rows: F-PAM, w_adv = 0",
    }
    path = RESULTS / ("blind_quick.json" if args.quick else "blind.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if set(args.tasks) != set(TASKS) and path.is_file():  # a run of some tasks (e.g. two processes) keeps the others
        earlier = json.loads(path.read_text())
        tasks = {t: tasks.get(t, earlier["tasks"].get(t)) for t in TASKS if t in tasks or t in earlier["tasks"]}
        runs = earlier["meta"].get("partial_runs") or [{"tasks": list(earlier["tasks"]), **_run_cost(earlier["meta"])}]
        meta["partial_runs"] = merge_runs(runs, {"tasks": list(args.tasks), **_run_cost(meta)})
    path.write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=2, default=float))
    print(f"wrote {path} ({meta['wall_seconds']:.0f} s)")
    return path


def merge_runs(runs: list[dict], new: dict) -> list[dict]:
    """The runs behind the rows once ``new`` replaced its tasks' rows: each earlier run keeps the tasks it still
    provides (a run left with none is dropped) and, in ``ran``, the tasks its wall time covered; then ``new``."""
    kept = [
        {**r, "ran": r.get("ran", r["tasks"]), "tasks": [t for t in r["tasks"] if t not in new["tasks"]]} for r in runs
    ]
    return [*(r for r in kept if r["tasks"]), new]


def cost(args) -> Path:
    """What a user pays per 64×64 image (issue [ld-rps]): blind LD-RPS with the shipped presets (guidance ×450/N) at
    the reference's N = 450 and cheaper step counts (``--cost_steps``; the presets run 200 on low light and 50 on
    colour), one image at a time on ``--cost_crops`` held-out crops with ``--threads`` threads; PSNR, SSIM, steps
    and seconds per image into ``results/blind_cost.json`` (tabled by ``report``)."""
    from ud2m.priors import PixelDiffusionPrior
    from ud2m.solvers.ld_rps import learned_degradation

    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()
    names, x = load_crops(args.work_dir / "test_crops", HELD_OUT_PHOTOS, args.cost_crops)
    keys = [(0, c) for c in range(len(names))]
    prior = PixelDiffusionPrior.from_pretrained(PRIOR)
    tasks: dict[str, dict] = {}
    for task in args.tasks:
        p = simulate(task, x, keys)
        tasks[task] = {}
        for n in args.cost_steps:
            steps_args = argparse.Namespace(num_steps=n, guidance_scaling="steps")
            one = [slice(i, i + 1) for i in range(len(x))]  # one image per call: a user's cost per image
            runs = [
                ld_rps_row(
                    prior, task, f"N = {n}", learned_degradation(task), p.y[i], x[i], p.truth_Ax[i], keys[i], steps_args
                )
                for i in one
            ]
            tasks[task][str(n)] = {
                "psnr": summary([r["psnr"]["mean"] for r in runs]),
                "ssim": summary([r["ssim"]["mean"] for r in runs]),
                "steps": statistics.mean(r["costs"]["steps"] for r in runs),  # noise: per image (its σ̂)
                "nfe": statistics.mean(r["costs"]["nfe_paper"] for r in runs),
                "seconds_per_image": statistics.mean(r["seconds_per_image"] for r in runs),
            }
    meta = {"crops": names, "threads": torch.get_num_threads(), "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "wall_seconds": time.perf_counter() - start,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    path = RESULTS / "blind_cost.json"
    path.write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=2, default=float))
    print(f"wrote {path} ({meta['wall_seconds']:.0f} s)")
    return path


def cost_text(data: dict) -> str:
    """The step-count table of :func:`cost`."""
    m = data["meta"]
    load = ", ".join(f"{v:.1f}" for v in m["load_average_start"])
    lines = [
        f"**Cost per 64×64 image** (`python benchmarks/blind.py cost`: blind LD-RPS, shipped presets, guidance ×450/N, "
        f"one image at a time on {len(m['crops'])} held-out crops, {m['threads']} thread(s), load average {load} at "
        f"the start, {m['date']}; N = 450 is the reference's step count (the presets': low light 200, colour 50, "
        "haze and noise 450), the smaller N the cheaper settings (`LDRPS(num_steps=N)`); the noise preset's steps are "
        "those below y's noise level):",
        "",
        "| task | N | DDIM steps | NFE | PSNR (dB) | SSIM | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, rows in data["tasks"].items():
        for n, r in rows.items():
            lines.append(
                f"| {task} | {n} | {r['steps']:g} | {r['nfe']:g} | {_pm(r['psnr'])} | {_pm(r['ssim'], '.3f')} | "
                f"{r['seconds_per_image']:.1f} |"
            )
    return "\n".join(lines)


def _run_cost(meta: dict) -> dict:
    return {k: meta[k] for k in ("wall_seconds", "load_average_start", "load_average_end", "threads") if k in meta}


# ---------------------------------------------------------------------------------------------- report
def task_table(rows: dict) -> list[str]:
    lines = [
        "| method | PSNR (dB) | SSIM | PSNR per pass (dB) | fit ψ(x̂) vs y (dB) | fit ψ(x) vs A(x) (dB) | S_tot / S_g | "
        "NFE | ψ / D1 / D2 steps | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c = r.get("costs")
        passes = " → ".join(f"{p['psnr']['mean']:.2f}" for p in r.get("passes", [])) or "–"
        cost = "– | 0 | –"
        if c:
            steps = f"{c['psi_steps']} / {c['d1_steps']} / {c['d2_steps']}"
            nfe = nfe_text(c["nfe_paper"], r.get("chains", 1))  # every chain's calls; S_tot, S_g per chain
            cost = f"{c['steps']} / {c['guided_steps']} | {nfe} | {steps}"
        if "guidance" in r:  # the tuned factor and estimate
            name = f"{name} (×{r['guidance']['factor']:g}, ẑ0 from {r['guidance']['zhat_from']})"
        lines.append(
            f"| {name} | {_pm(r['psnr'])} | {_pm(r['ssim'], '.3f')} | {passes} | {_pm(r.get('fit_psnr_y'))} | "
            f"{_pm(r.get('fit_psnr_truth'))} | {cost} | {r['seconds_per_image']:.2f} |"
        )
    return lines


def _timing(m: dict) -> str:
    """The wall time and load of the run (or of each run behind the rows), with each run's thread count where the
    runs record it (runs of some tasks may use other counts)."""
    runs = m.get("partial_runs") or [m]

    def one(r: dict) -> str:
        start, end = (", ".join(f"{v:.1f}" for v in r[k]) for k in ("load_average_start", "load_average_end"))
        names, ran = r.get("tasks", []), r.get("ran", r.get("tasks", []))
        tasks = f"{_and(names)}: " if names else ""
        if names and list(ran) != list(names):  # the time covered tasks whose rows a later run replaced
            tasks = f"{_and(names)} (from a run of {_and(ran)}): "
        threads = f" on {r['threads']} thread(s)" if "threads" in r and m.get("partial_runs") else ""
        return (
            f"{tasks}{r['wall_seconds'] / 60:.1f} min{threads}, load average {start} at the start and {end} at the end"
        )

    return (f"rows from {len(runs)} runs: " if len(runs) > 1 else "") + "; ".join(one(r) for r in runs)


def _and(names) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    names = list(names)
    return f"{', '.join(names[:-1])}{' and ' if len(names) > 1 else ''}{names[-1]}"


def _factors(meta: dict) -> str:
    """The guidance factors a run tuned over (runs before the grid went above ×1 recorded none: the old grid)."""
    factors = meta.get("guidance_factors", (1.0, 0.5, 0.3, 0.15))
    return "×" + " / ".join(f"{f:g}" for f in factors)


def _preset_steps(num_steps: int, tasks) -> str:
    """`` (colour at its preset N = 50, §13.13)`` for the tasks that ``run_task`` ran at their presets' smaller N."""
    fewer = {t: n for t in tasks if (n := protocol_steps(t, num_steps)) < num_steps}
    return f" ({', '.join(f'{t} at its preset N = {n}' for t, n in fewer.items())}, §13.13)" if fewer else ""


def report_text(data: dict) -> str:
    m = data["meta"]
    parts = [
        f"Protocol of docs/method.md §13.8 scaled as in `benchmarks/blind.py` ({m['mode']}): "
        f"{len(m['crops'])} held-out 64×64 crops × {len(m['seeds'])} seed(s), N = {m['num_steps']} DDIM steps"
        f"{_preset_steps(m['num_steps'], data['tasks'])}, "
        '§13.4 presets (`guidance_norm="sum"`, `schedule_transfer="sigma"`, no feature network, F = 1), '
        f"ψ: {m.get('psi', 'F-PAM (§13.4)')}, "
        f"the `photos` pixel prior without caption{', guidance ×450/N' if m['guidance_scaling'] == 'steps' else ''}. "
        f"{'' if m.get('partial_runs') else str(m['threads']) + ' thread(s), '}{_timing(m)}. "
        "PSNR/SSIM: mean ± std over the runs; S_tot / S_g: DDIM steps / "
        "guided steps per image, NFE: network evaluations per image over both chains (§13.5; a 'mean of M chains' row "
        "runs M independent restorations per image, scored by their mean: NFE M × one run's, S_tot / S_g and the fit "
        "per run); fit: PSNR of the fitted degradation (the truth for the true-operator rows); Tikhonov's s0, TV's "
        "λ and the classical blind estimates' weight (dark channel prior: ω, grey world: the mean level) tuned on "
        "training crops; the 'tuned "
        f"guidance' rows use the factor on the §13.4 guidance scale ({_factors(m)}) with the best PSNR on training "
        "crops (the blind row's for the blind row, the true operator's for the true-operator row), and ẑ0 from z_t "
        "(our option) instead of the reference's z_next.",
        "",
    ]
    for task, rows in data["tasks"].items():
        sigma = SIGMA_Y[task]
        note = [TASK_NOTES[task], ""] if REFERENCE in rows and task in TASK_NOTES else []
        parts += [f"**{task}** (σ_y = {sigma:g})", "", *note, *task_table(rows), ""]
    cost_file = RESULTS / "blind_cost.json"
    if m["mode"] == "full" and cost_file.is_file():
        parts += [cost_text(json.loads(cost_file.read_text())), ""]
    return "\n".join(parts)


def report(args) -> str:
    """``blind[_quick].md`` from the JSON; the full results also go into the README section between the markers."""
    quick = getattr(args, "quick", False)
    return write_report(RESULTS, "blind", quick, report_text, README, README_BEGIN, README_END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["run", "report", "cost"], default="run")
    parser.add_argument("--quick", action="store_true", help="2 crops, N = 20 (≤ 5 minutes); blind_quick.json")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--crops", type=int, default=None, help="held-out crops (1-16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--num_steps", type=int, default=None, help="DDIM steps N (§13.4: 450)")
    parser.add_argument("--tune_crops", type=int, default=None, help="training crops for Tikhonov/TV tuning")
    parser.add_argument(
        "--guidance_tune_crops", type=int, default=None, help="training crops for LD-RPS's guidance tuning (2)"
    )
    parser.add_argument(
        "--guidance_scaling",
        choices=["steps", "none"],
        default="steps",
        help="steps: multiply the §13.4 guidance scale by 450/N (default); none: keep the per-step value",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost_crops", type=int, default=2, help="cost: held-out crops, one image at a time")
    parser.add_argument("--cost_steps", type=int, nargs="+", default=[450, 200, 100, 50], help="cost: the N to time")
    parser.add_argument("--work_dir", type=Path, default=WORK)
    args = parser.parse_args(argv)
    for key, value in SETTINGS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.command == "report":
        report(args)
        return
    if args.command == "cost":
        cost(args)
        report(argparse.Namespace(quick=False))
        return
    run(args)
    report(args)


if __name__ == "__main__":
    main()
