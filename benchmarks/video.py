"""Video benchmark (issue [video]): LVTINO against frame-wise solvers on the held-out clips, problems A, B and C.

Clips: the first N of ``clips:val`` (``ud2m.video_io``): 9-frame 64x64 RGB clips with known motion (pans, zooms,
slow rotations) over the two photographs that neither shipped prior saw (coffee, immunohistochemistry; clip i of
photograph i mod 2). Every method restores the same observations: y = A(x) + σ_n n with the noise of clip i drawn
from ``seed_for(seed, 1, i)``; solver noise of clip i from ``seed_for(seed, 0, i)``, fresh for every method (§1.5).

Problems (docs/method.md §2.5, §2.8, §6.4), scaled from 25 or 81 frames of 768x1280 to 9 frames of 64x64. Every
factor is halved, because the frames are 12-20 times smaller per side: the unscaled factors would leave 16x16 (A) or
8x8 (B, C) low-resolution frames of a few flat blocks and, for C, a single low-rate frame (⌈9/8⌉ = 2, one of them a
padded group of one frame); halving keeps the order of difficulty A < B, C. B's temporal kernel keeps its length
relative to the clip (7/25 of T ≈ 2.5 frames -> 3 taps). SR padding is circular (the presets use reflect) so that the
exact Fourier proxes of §2.5 apply (prox_pool_sr, prox_temporal_blur_sr) instead of CG; the truth is simulated with
the same operator, so this changes cost, not the problem. σ_y = 0.001 as in the presets.

- **A**: temporal ×2 average pooling (9 -> 5 frames, the last group padded) then bicubic ×2 SR per frame (64 -> 32);
- **B**: circular uniform temporal blur over 3 frames then bicubic ×4 SR per frame (64 -> 16);
- **C**: temporal ×4 average pooling (9 -> 3 frames) then bicubic ×4 SR per frame (64 -> 16).

Methods:

- **Wiener**: LVTINO's start, clamp(A_dagger(y, ε), -1, 1) (§6.6).
- **TV3 (PDHG)**: LVTINO's data step with TV only, argmin ½‖Au - y‖² + λ_tv·TV3(u) (γ = ∞, α = 1, §6.3) from the
  Wiener estimate, ``--tv_iters`` PDHG iterations, λ_tv = ``--tv_lambda`` (data-scaled units, not tuned).
- **LVTINO**: ``lvtino(FrameStackedPrior(clips prior), photos prior, op, y, schedule)`` with the released schedule of
  the problem (§6.4: its data steps, γ, λ_tv and iteration counts as released) whose times are moved to the pixel
  priors' linear β schedule at the same noise level s_t = b_t/a_t: the video times are Wan's flow-matching times
  (s = t/(1000 - t)), the image times SDXL's scaled-linear ones, so 757, 522, 375, 255, 125 -> 482, 275, 170, 100, 40
  and 374, 249, 124 (63) -> 271, 193, 116 (75). Without this the released times (made for SDXL's and Wan's
  schedules) would start the pixel priors at almost pure noise (a_t < 0.05 above t = 760 on the linear schedule).
- **LATINO (frame-wise)**: ``lvtino(None, photos prior, ...)``, i.e. ``latino`` on every frame with the schedule's
  image times and step-4 weights (project_cg rows -> exact projections), independent noise per frame (§6.2).
- **..., tuned**: TV3's λ_tv (:data:`TV_LAMBDAS`) and the factor on LVTINO's / frame-wise LATINO's mapped times
  (:data:`TIME_SCALES`, ``map_times(time_scale=...)``) chosen by mean PSNR on ``--tune_clips`` training clips
  (``clips:train``: the training photographs and motion law, never the held-out clips), as the image benchmark tunes
  its baselines on training images; the row label gives the chosen value and the JSON every tuning score.
- **DiffPIR (frame-wise)**: ``solve_diffpir`` with the photos prior on every frame (``FrameWisePrior``, all frames of
  all clips in one batch), the joint video prox as its data step, ``--diffpir_steps`` steps on the reference's
  quadratic grid from pure noise, λ = 1.75, ζ = 0.3 (Appendix A defaults, not tuned here); and **warm**: from the
  Wiener estimate re-noised to t = 400, ``--diffpir_steps``/2 steps on a uniform grid below it. With independent
  noise per frame, a frame-wise prior has nothing that makes the frames of a pooled group agree: the within-group
  differences lie in the null space of temporal pooling, at every spatial frequency, so each frame of a group keeps
  its own hallucination and the projection mixes them (ghosting). Expect frame-wise DiffPIR to fall below the Wiener
  start on A and C (about 11-14 dB from noise, 24-25 dB warm, on an A clip where Wiener gives 26 dB).

Metrics (docs/method.md §10.1), per clip, then mean ± std over clips: PSNR (mean of the per-frame PSNRs on [0, 1]),
the clip-global PSNR, SSIM (per frame, averaged), and **flicker** = mean over pixels, channels and the T - 1 frame
pairs of |e_{t+1} - e_t|, e_t = x̂_t - x_t the error of frame t on the [0, 1] scale, reported ×100 (percent of
the range): 0 for an error constant in time, so it measures temporal inconsistency of the restoration itself, not
the motion of the clip. Cost: NFE in both conventions of §6.5 (one image NFE = a sweep over the T frames; calls =
network evaluations counting one per frame), wall seconds per clip (the batch's time divided by the clips), peak
memory (CPU: the process's ``ru_maxrss``, which is monotone, so a row includes the rows before it; CUDA: the
method's own ``max_memory_allocated``) and the load average (``os.getloadavg()``) after each method.

    python benchmarks/video.py run --quick        # 2 clips, problem A, ≤ 5 minutes on one thread
    python benchmarks/video.py run [--clips 8] [--problems A B C] [--prior ud2m/assets/priors/clips]
    python benchmarks/video.py report [--quick]   # results/video[_quick].md; the README section (full runs only)
    python benchmarks/video.py overhead           # wall / UNet time of LVTINO (results/video_overhead.json)
    python benchmarks/video.py ablation --problems A C  # LVTINO without its TV data steps (video_ablation.json)

``run`` writes ``benchmarks/results/video[_quick].json`` then reports. The README section sits between
``<!-- video:begin (generated by benchmarks/video.py report) -->`` and ``<!-- video:end -->``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by the tests
from common import CallTimer, write_report
from common import mean_pm_std as _pm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PRIORS = ROOT / "ud2m" / "assets" / "priors"
README_BEGIN, README_END = "<!-- video:begin (generated by benchmarks/video.py report) -->", "<!-- video:end -->"

SIGMA_Y = 0.001  # the presets' (ud2m/assets/operators/lvtino/*.yaml)
FRAMES, SIZE = 9, 64
PROBLEMS = {
    "A": "temporal ×2 pooling + bicubic ×2 SR (scaled from ×4 + ×4)",
    "B": "3-frame temporal blur + bicubic ×4 SR (scaled from 7 taps + ×8)",
    "C": "temporal ×4 pooling + bicubic ×4 SR (scaled from ×8 + ×8)",
}
DIFFPIR_WARM_T = 400  # DiffPIR's warm start: from the Wiener estimate re-noised to t = 400, uniform grid below it
METHODS = (
    "Wiener",
    "TV3 (PDHG)",
    "DiffPIR (frame-wise)",
    "DiffPIR (frame-wise, warm)",
    "LATINO (frame-wise)",
    "LVTINO",
    "TV3 (PDHG), tuned",
    "LATINO (frame-wise), tuned",
    "LVTINO, tuned",
)
# Tuned on the tuning clips (clips:train, never the held-out ones), as the image benchmark tunes its baselines: TV3's
# weight, and the factor on LVTINO's / frame-wise LATINO's mapped schedule times (map_times(time_scale)): the
# released times were made for Wan2.1 + SDXL at 768x1280, not for 64x64 clips on the pixel priors.
TV_LAMBDAS = (1e-4, 3e-4, 1e-3, 3e-3)
TIME_SCALES = (1.0, 0.6, 0.35, 0.2, 0.1)
SETTINGS = {
    "quick": dict(clips=2, problems=("A",), diffpir_steps=40, tune_clips=2),
    "full": dict(clips=8, problems=("A", "B", "C"), diffpir_steps=100, tune_clips=8),
}


# ---------------------------------------------------------------------------------------------- problems
def make_operator(problem: str):
    """The scaled problem (module docstring): the preset ``lvtino/<problem>_clips``, a ``Compose(PerFrame(SR),
    temporal)`` with circular SR padding (the same file ``sample.py --operator lvtino/A_clips`` reads)."""
    from ud2m.operators.presets import load_preset

    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; expected one of {sorted(PROBLEMS)}")
    preset = load_preset(f"lvtino/{problem}_clips")
    assert preset.sigma_y == SIGMA_Y and preset.meta["num_frames"] == FRAMES
    return preset.operator


def prox_is_stable(op, x_like: torch.Tensor, gamma: float = 1e9) -> bool:
    """Whether ``op.prox_l2`` in float32 matches float64 at a large γ (DiffPIR's early steps reach γ ~ 1e9 at
    σ_y = 0.001). The closed forms of ``ud2m/operators/video.py`` computed r - γAᵀ(I + γAAᵀ)⁻¹Ar with
    r = z + γAᵀy, which cancels catastrophically in float32 (error ~ γ·1e-7); the stable form is
    z + γAᵀ(I + γAAᵀ)⁻¹(y - Az)."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(x_like.shape[1:], generator=g)[None].to(x_like) * 2 - 1
    y = op.A(torch.rand(z.shape, generator=g).to(z) * 2 - 1)
    gam = torch.full((1,), gamma, device=z.device)
    ref = copy.deepcopy(op).double().prox_l2(z.double(), y.double(), gam.double())
    return bool((op.prox_l2(z, y, gam).double() - ref).abs().max() < 1e-3)


def use_float64_prox(op) -> None:
    """Route ``op.prox_l2`` through a float64 copy of ``op`` (result cast back): the workaround for an unstable
    closed-form prox (:func:`prox_is_stable`)."""
    op64 = copy.deepcopy(op).double()

    def prox_l2(z: torch.Tensor, y: torch.Tensor, gamma):
        gamma = gamma.double() if torch.is_tensor(gamma) else gamma
        return op64.prox_l2(z.double(), y.double(), gamma).to(z.dtype)

    op.prox_l2 = prox_l2


# ---------------------------------------------------------------------------------------------- measurement
def generators(seed: int, stream: int, n: int) -> list[torch.Generator]:
    from ud2m.utils import seed_for

    return [torch.Generator().manual_seed(seed_for(seed, stream, i)) for i in range(n)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evaluate(name: str, fn: Callable[[], tuple[torch.Tensor, dict]], x: torch.Tensor, device: torch.device) -> dict:
    """Run ``fn`` (-> restored videos and cost counters), time it and score it against ``x``."""
    from ud2m.metrics import flicker, psnr, ssim, video_psnr_global

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        x_hat, cost = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    x_hat = x_hat.float()
    per_clip = {
        "psnr": psnr(x_hat, x).tolist(),
        "psnr_global": video_psnr_global(x_hat, x).tolist(),
        "ssim": ssim(x_hat, x).tolist(),
        "flicker": (100 * flicker(x_hat, x)).tolist(),
    }
    row = {
        "per_clip": per_clip,
        **{k: _mean_std(v) for k, v in per_clip.items()},
        **cost,
        "seconds_per_clip": seconds / x.shape[0],
        "peak_memory_mb": peak_memory_mb(device),
        "load_average": list(os.getloadavg()),
    }
    print(
        f"  {name:22s} PSNR {row['psnr']['mean']:6.2f}  SSIM {row['ssim']['mean']:.3f}  flicker "
        f"{row['flicker']['mean']:.2f}  {row['seconds_per_clip']:.1f} s/clip",
        flush=True,
    )
    return row


def _mean_std(values: list[float]) -> dict:
    m = sum(values) / len(values)
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "std": std}


def observe(problem: str, x: torch.Tensor, seed: int, device):
    """``(op, y, sigma_n)``: the scaled problem's operator (float64 proxes where float32 is unstable) and its
    observation of ``x`` with the noise of stream 1 (§1.5)."""
    from ud2m.operators import measure, sigma_internal

    op = make_operator(problem).to(device)
    stable = prox_is_stable(op, x)
    if not stable:  # see prox_is_stable; the README table then notes the float64 prox
        use_float64_prox(op)
    y = measure(op, x, SIGMA_Y, generators(seed, 1, x.shape[0]))
    return op, y, torch.full((x.shape[0],), sigma_internal(SIGMA_Y), device=device), stable


def tv3(op, y, sigma_n, lam: float, iters: int) -> torch.Tensor:
    """TV3 by PDHG from the Wiener estimate (§6.3)."""
    from ud2m.solvers.lvtino import DataStep, data_step
    from ud2m.solvers.steps import wiener_init

    step = DataStep("pdhg", reg="tv3", lam_tv=lam, alpha=1.0, iters=iters)
    return data_step(op, wiener_init(op, y, sigma_n), y, step, sigma_n)


def restore_lvtino(video, frames, op, y, rows, seed: int) -> tuple[torch.Tensor, dict]:
    """LVTINO (``video`` given) or frame-wise LATINO (``video=None``: noise per frame) with schedule ``rows`` and
    the solver noise of stream 0; returns the videos and lvtino's info."""
    from ud2m.solvers.lvtino import lvtino

    return lvtino(
        video, frames, op, y, schedule=rows, sigma_y=SIGMA_Y, generator=generators(seed, 0, y.shape[0]),
        shared_image_noise=None if video is not None else False, return_info=True,
    )  # fmt: skip


def tune(problem: str, x: torch.Tensor, video_prior, image_prior, args, device) -> dict:
    """TV3's weight (:data:`TV_LAMBDAS`) and the time scale (:data:`TIME_SCALES`) of LVTINO and of frame-wise LATINO
    with the best mean PSNR on the tuning clips ``x``; returns the choices and every score."""
    from ud2m.metrics import psnr
    from ud2m.priors.stacked import FrameWisePrior
    from ud2m.solvers.lvtino import map_times

    op, y, sigma_n, _ = observe(problem, x, args.seed, device)
    frames = FrameWisePrior(image_prior, frame_batch=args.frame_batch)
    scores: dict[str, dict[str, float]] = {"tv_lambda": {}, "latino_time_scale": {}, "lvtino_time_scale": {}}
    for lam in TV_LAMBDAS:
        scores["tv_lambda"][str(lam)] = psnr(tv3(op, y, sigma_n, lam, args.tv_iters), x).mean().item()
    for f in TIME_SCALES:
        for key, video in (("latino_time_scale", None), ("lvtino_time_scale", video_prior)):
            out, _ = restore_lvtino(video, frames, op, y, map_times(problem, video_prior, image_prior, f), args.seed)
            scores[key][str(f)] = psnr(out, x).mean().item()
    best = {k: float(max(v, key=v.get)) for k, v in scores.items()}
    print(f"problem {problem}: tuned on {x.shape[0]} training clips: {best}", flush=True)
    return {**best, "scores": scores}


def run_problem(problem: str, x: torch.Tensor, video_prior, image_prior, args, device, tuned=None) -> dict:
    """Every method on the same observation of ``x`` ``(B, C, T, H, W)``; ``tuned`` (:func:`tune`) adds the tuned
    rows."""
    from ud2m.priors.stacked import FrameWisePrior
    from ud2m.schedules import uniform_grid
    from ud2m.solvers.baselines import solve_diffpir
    from ud2m.solvers.lvtino import map_times
    from ud2m.solvers.steps import wiener_init

    B, T = x.shape[0], x.shape[2]
    op, y, sigma_n, stable = observe(problem, x, args.seed, device)
    schedule = map_times(problem, video_prior, image_prior)  # the released times on the pixel priors' schedule
    frames = FrameWisePrior(image_prior, frame_batch=args.frame_batch)
    none = {"nfe": 0, "nfe_video": 0, "nfe_image": 0, "calls": 0}

    def wiener():
        return wiener_init(op, y, sigma_n), none

    def run_tv3(lam):
        return lambda: (tv3(op, y, sigma_n, lam, args.tv_iters), none)

    def diffpir():
        out = solve_diffpir(
            frames, op, y, sigma_y=SIGMA_Y, num_steps=args.diffpir_steps, generator=generators(args.seed, 0, B)
        )
        n = args.diffpir_steps
        return out, {"nfe": n, "nfe_video": 0, "nfe_image": n, "calls": n * T}

    def diffpir_warm():
        grid = uniform_grid(max(1, args.diffpir_steps // 2), t_max=DIFFPIR_WARM_T)
        x0 = wiener_init(op, y, sigma_n)
        out = solve_diffpir(frames, op, y, x0, timesteps=grid, sigma_y=SIGMA_Y, generator=generators(args.seed, 0, B))
        return out, {"nfe": len(grid), "nfe_video": 0, "nfe_image": len(grid), "calls": len(grid) * T}

    def run_lvtino(video, time_scale=1.0):
        rows = schedule if time_scale == 1.0 else map_times(problem, video_prior, image_prior, time_scale)

        def fn():
            out, info = restore_lvtino(video, frames, op, y, rows, args.seed)
            return out, {k: info[k] for k in ("nfe", "nfe_video", "nfe_image", "calls")}

        return fn

    methods = {
        "Wiener": wiener,
        "TV3 (PDHG)": run_tv3(args.tv_lambda),
        "DiffPIR (frame-wise)": diffpir,
        "DiffPIR (frame-wise, warm)": diffpir_warm,
        "LATINO (frame-wise)": run_lvtino(None),
        "LVTINO": run_lvtino(video_prior),
    }
    if tuned is not None:
        methods["TV3 (PDHG), tuned"] = run_tv3(tuned["tv_lambda"])
        methods["LATINO (frame-wise), tuned"] = run_lvtino(None, tuned["latino_time_scale"])
        methods["LVTINO, tuned"] = run_lvtino(video_prior, tuned["lvtino_time_scale"])
    print(f"problem {problem}: {PROBLEMS[problem]}; y {tuple(y.shape)}", flush=True)
    rows = {name: evaluate(name, fn, x, device) for name, fn in methods.items() if name in args.methods}
    times = [{"t_video": r.t_video, "t_image": r.t_image} for r in schedule]
    return {
        "description": PROBLEMS[problem],
        "measurement_shape": list(y.shape[1:]),
        "schedule": times,
        "prox": "float32 closed form" if stable else "float64 closed form (the float32 one is unstable at large γ)",
        "rows": rows,
        **({"tuned": tuned} if tuned is not None else {}),
    }


# ---------------------------------------------------------------------------------------------- run / report
def load_priors(args, device: torch.device | None = None) -> tuple:
    """``(video prior, image prior, its frame-wise view)`` from ``--prior``, ``--image_prior`` and
    ``--frame_batch``, on ``device`` (default: where they load)."""
    from ud2m.priors.pixel import PixelDiffusionPrior
    from ud2m.priors.stacked import FrameStackedPrior, FrameWisePrior

    video = FrameStackedPrior.from_pretrained(args.prior, frames=FRAMES).to(device)
    image = PixelDiffusionPrior.from_pretrained(args.image_prior).to(device)
    return video, image, FrameWisePrior(image, frame_batch=args.frame_batch)


def run(args) -> dict:
    from ud2m.video_io import discover_videos, read_video, stack_videos

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior_path = Path(args.prior)
    if not (prior_path / "model_index.json").is_file() and not (prior_path / "unet").is_dir():
        raise SystemExit(
            f"video prior not found: {prior_path}. Train it (OMP_NUM_THREADS=1 python train.py prior fit --config "
            "configs/priors/clips.yaml) and export it (python train.py prior export --ckpt <last.ckpt> --out DIR), "
            "then pass --prior DIR"
        )
    video_prior, image_prior, _ = load_priors(args, device)
    sources = discover_videos("clips:val")[: args.clips]
    if len(sources) < args.clips:
        sources = [f"clips:val:{i}" for i in range(args.clips)]
    x = stack_videos([read_video(s, expected_frames=FRAMES) for s in sources]).to(device)  # (B, C, T, H, W)
    x_tune = None
    if args.tune_clips > 0:  # the tuning clips: the training motion law on the training photographs
        tune_sources = [f"clips:train:{i}" for i in range(args.tune_clips)]
        x_tune = stack_videos([read_video(s, expected_frames=FRAMES) for s in tune_sources]).to(device)
    start = time.perf_counter()
    problems = {}
    for p in args.problems:
        tuned = tune(p, x_tune, video_prior, image_prior, args, device) if x_tune is not None else None
        problems[p] = run_problem(p, x, video_prior, image_prior, args, device, tuned)
    meta = {
        "mode": "quick" if args.quick else "full",
        "clips": sources,
        "video_prior": str(prior_path),
        "image_prior": str(args.image_prior),
        "sigma_y": SIGMA_Y,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "diffpir_steps": args.diffpir_steps,
        "tv_lambda": args.tv_lambda,
        "tv_iters": args.tv_iters,
        "tune_clips": args.tune_clips,
        "frame_batch": args.frame_batch,
        "wall_seconds": time.perf_counter() - start,
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.note:
        meta["note"] = args.note
    result = {"meta": meta, "problems": problems}
    path = RESULTS / ("video_quick.json" if args.quick else "video.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def pdhg_step_rule(schedule: tuple, iters: int, relaxation: float = 1.0) -> tuple:
    """``schedule`` with every PDHG video step at the §6.3 step rule τ = σ = 1/√L and ``iters`` iterations
    (over-relaxed by ``relaxation``, :func:`ud2m.solvers.tv.pdhg_solve`)."""
    step = dict(tau=None, sigma=None, iters=iters, relaxation=relaxation)
    return tuple(
        dataclasses.replace(r, video_step=dataclasses.replace(r.video_step, **step))
        if r.video_step.method == "pdhg"
        else r
        for r in schedule
    )


FAST_A = "A, §6.3 PDHG step rule, 100 iterations"
RELAXED_A = "A, §6.3 PDHG step rule, 50 iterations, relaxation 1.9"
FAST_RULES = {FAST_A: (100, 1.0), RELAXED_A: (50, 1.9)}  # the ablation's equal-quality faster PDHG data steps


#: ``lvtino``'s functions that ``overhead`` times apart from the networks
OVERHEAD_PARTS = ("data_step", "pdhg_step_size_per_video", "wiener_init")


def overhead(args) -> dict:
    """Solver overhead of LVTINO on the shipped priors (the tiny-model target of issue [video]): wall time of whole
    ``lvtino`` runs over the summed time of the video and image UNet forwards (``CallTimer`` on each ``net``),
    median of ``--repeats`` runs after one warm-up, per problem, on ``--clips`` held-out clips in one batch, and for
    A also with the §6.3 PDHG step rule at 100 iterations, and over-relaxed (ρ = 1.9) at 50 (:data:`FAST_RULES`,
    :func:`pdhg_step_rule`); written to ``results/video_overhead.json``.

    The time outside the networks is split by timers on ``lvtino``'s own functions: the schedule's data-step solves
    (``data_step`` and the PDHG step-size estimate ``pdhg_step_size_per_video``), the Wiener start
    (``wiener_init``), and the rest (re-noising, noise draws, frame batching, callbacks: the solver's glue).
    ``glue_overhead`` = (wall − data steps − Wiener start) / network time: what the solver adds beyond the networks
    and the computations the schedule itself asks for."""
    import statistics

    import ud2m.solvers.lvtino as lvtino_module
    from ud2m.solvers.lvtino import lvtino, map_times
    from ud2m.video_io import read_video, stack_videos

    torch.set_num_threads(args.threads)
    video, image, frames = load_priors(args)
    nets = {"video": CallTimer(video.pixel_prior.net, "forward", lambda: None)}
    nets["image"] = CallTimer(image.net, "forward", lambda: None)
    # module globals that lvtino looks up at call time; the step-size estimate belongs to the PDHG data step
    parts = {name: CallTimer(lvtino_module, name, lambda: None) for name in OVERHEAD_PARTS}
    x = stack_videos([read_video(f"clips:val:{i}", expected_frames=FRAMES) for i in range(args.clips)])
    rows = {}
    runs_of = [(p, p) for p in args.problems] + ([(n, "A") for n in FAST_RULES] if "A" in args.problems else [])
    for name, problem in runs_of:
        op, y, _, _ = observe(problem, x, args.seed, torch.device("cpu"))
        schedule = map_times(problem, video, image)
        if name in FAST_RULES:  # the released PDHG at the §6.3 step rule, fewer iterations (ablation)
            schedule = pdhg_step_rule(schedule, *FAST_RULES[name])

        def once(op=op, y=y, schedule=schedule) -> tuple[float, ...]:
            for timer in (*nets.values(), *parts.values()):
                timer.reset()
            start = time.perf_counter()
            with torch.inference_mode():
                lvtino(video, frames, op, y, schedule=schedule, sigma_y=SIGMA_Y, generator=generators(0, 0, len(x)))
            wall = time.perf_counter() - start
            data = parts["data_step"].seconds + parts["pdhg_step_size_per_video"].seconds
            return wall, sum(t.seconds for t in nets.values()), data, parts["wiener_init"].seconds

        once()  # warm-up
        runs = [once() for _ in range(args.repeats)]
        wall, net, data, wiener = (statistics.median(r[i] for r in runs) for i in range(4))
        rows[name] = {
            "wall_s": wall,
            "network_s": net,
            "data_steps_s": data,
            "wiener_s": wiener,
            "overhead": wall / net,
            "glue_overhead": statistics.median((r[0] - r[2] - r[3]) / r[1] for r in runs),
            "runs": runs,
        }
        print(
            f"problem {name}: wall {wall:.2f} s, network {net:.2f} s, data steps {data:.2f} s, Wiener {wiener:.2f} s, "
            f"overhead {wall / net:.3f}, without the data steps and the start {rows[name]['glue_overhead']:.3f}",
            flush=True,
        )
    return write_measurement("video_overhead.json", rows, clips=args.clips, repeats=args.repeats)


def write_measurement(name: str, rows: dict, **head) -> dict:
    """``results/<name>``: ``head``, the threads, load average and date, then the per-problem ``rows``. Problems
    that this run did not measure keep their rows from the file, and ``earlier`` records when those were measured
    (so ``--problems C`` adds to an A measurement instead of erasing it)."""
    path = RESULTS / name
    previous = json.loads(path.read_text()) if path.is_file() else {"problems": {}}
    kept = {k: v for k, v in previous["problems"].items() if k not in rows}
    now = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": list(os.getloadavg())}
    earlier = {**{k: previous.get("date") for k in kept}, **previous.get("earlier", {})}  # a row's own date wins
    result = {
        **head,
        "threads": torch.get_num_threads(),
        **now,
        "problems": {**kept, **rows},
        "earlier": {k: v for k, v in earlier.items() if k in kept},
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def ablation(args) -> dict:
    """Are the released schedules' TV data steps needed? LVTINO (the tuned time scale of ``results/video.json``) on
    the tuning clips (``clips:train``, as for tuning) with the released data steps, with every data step replaced by
    the exact projection onto {Au = y} (no TV, closed form: the cheapest data step), with 50 instead of 200 PDHG
    iterations, and with 100 or 200 iterations at the §6.3 step rule τ = σ = 1/√L instead of the released
    τ = σ = 0.25, also over-relaxed (ρ = 1.5 or 1.9, 50 or 100 iterations; PDHG rows only); written to
    ``results/video_ablation.json``. The TV steps are what keeps A and C
    above the solver-overhead target on small networks (README)."""
    from ud2m.metrics import flicker, psnr
    from ud2m.solvers.lvtino import DataStep, map_times
    from ud2m.video_io import read_video, stack_videos

    torch.set_num_threads(args.threads)
    video, image, frames = load_priors(args)
    x = stack_videos([read_video(f"clips:train:{i}", expected_frames=FRAMES) for i in range(args.tune_clips)])
    tuned = json.loads((RESULTS / "video.json").read_text())["problems"]
    project = DataStep("prox", gamma=float("inf"))
    rows = {}
    for problem in args.problems:
        scale = tuned[problem]["tuned"]["lvtino_time_scale"]
        op, y, _, _ = observe(problem, x, args.seed, torch.device("cpu"))
        released = map_times(problem, video, image, scale)
        variants = {
            "released data steps": released,
            "exact projections only": tuple(
                dataclasses.replace(r, video_step=project, image_step=r.image_step and project) for r in released
            ),
        }
        if released[0].video_step.method == "pdhg":
            fewer = dataclasses.replace(released[0].video_step, iters=50)
            variants["PDHG 50 iterations"] = tuple(dataclasses.replace(r, video_step=fewer) for r in released)
            for iters in (100, 200):  # the §6.3 step rule τ = σ = 1/√L instead of the released τ = σ = 0.25
                variants[f"PDHG {iters} iterations, §6.3 step rule"] = pdhg_step_rule(released, iters)
            for iters, rho in ((50, 1.5), (50, 1.9), (100, 1.9)):  # over-relaxed (Condat 2013) [ours]
                name = f"PDHG {iters} iterations, §6.3 step rule, relaxation {rho}"
                variants[name] = pdhg_step_rule(released, iters, rho)
        if released[0].video_step.method == "adam":  # fewer Adam steps, each longer; and without the TV term
            for iters in (28, 14):
                variants[f"Adam {iters} iterations, lr x{55 / iters:.2g}"] = tuple(
                    dataclasses.replace(
                        r, video_step=dataclasses.replace(r.video_step, iters=iters, lr=r.video_step.lr * 55 / iters)
                    )
                    for r in released
                )
            variants["Adam without TV (lam_tv = 0)"] = tuple(
                dataclasses.replace(r, video_step=dataclasses.replace(r.video_step, lam_tv=0.0)) for r in released
            )
        rows[problem] = {"time_scale": scale}
        for name, schedule in variants.items():
            start = time.perf_counter()
            with torch.inference_mode():
                out, _ = restore_lvtino(video, frames, op, y, schedule, args.seed)
            seconds = time.perf_counter() - start
            row = {"psnr": psnr(out, x).mean().item(), "flicker": 100 * flicker(out, x).mean().item(), "s": seconds}
            rows[problem][name] = row
            print(f"problem {problem}, {name}: PSNR {row['psnr']:.2f} flicker {row['flicker']:.2f} ({seconds:.1f} s)")
    return write_measurement("video_ablation.json", rows, clips=[f"clips:train:{i}" for i in range(args.tune_clips)])


def tables(result: dict) -> str:
    """Markdown tables (one per problem) from a result JSON; every number is read from it."""
    meta = result["meta"]
    parts = [
        f"Held-out clips ({len(meta['clips'])} of `clips:val`, 9×64×64, σ_y = {meta['sigma_y']}), video prior "
        f"`{meta['video_prior']}`, image prior `{meta['image_prior']}`; {meta['threads']} thread(s) on "
        f"{meta['device']}, {meta['date']}, load average {meta['load_average'][0]:.2f}. PSNR and SSIM per frame, "
        "averaged per clip, mean ± std over clips; flicker = mean |Δ_t(x̂ − x)| ×100 (lower is steadier); NFE "
        "as video + image sweeps (network calls counting one per frame); peak RSS is the process's so far.",
        "",
    ]
    if meta.get("note"):
        parts += [f"*{meta['note']}*", ""]
    head = "| method | PSNR (dB) | global PSNR | SSIM | flicker | NFE (calls) | s / clip | peak MB | load |"
    for problem, res in result["problems"].items():
        prox = f"; prox in {res['prox']}" if "float64" in res.get("prox", "") else ""
        parts += [f"**Problem {problem}**: {res['description']}; y {tuple(res['measurement_shape'])}{prox}", "", head]
        parts.append("|" + "---|" * 9)
        tuned = res.get("tuned")
        for name, r in res["rows"].items():
            nfe = "–" if not r["nfe"] else f"{r['nfe_video']} + {r['nfe_image']} ({r['calls']})"
            if tuned is not None and name.endswith(", tuned"):
                name += f" ({_tuned_value(name, tuned)})"
            parts.append(
                f"| {name} | {_pm(r['psnr'])} | {_pm(r['psnr_global'])} | {_pm(r['ssim'], '.3f')} | "
                f"{_pm(r['flicker'])} | {nfe} | {r['seconds_per_clip']:.2f} | {r['peak_memory_mb']:.0f} | "
                f"{r['load_average'][0]:.2f} |"
            )
        parts.append("")
    return "\n".join(parts)


def _tuned_value(name: str, tuned: dict) -> str:
    """The chosen value of a tuned row, as the row's label says it."""
    if name.startswith("TV3"):
        return f"λ = {tuned['tv_lambda']:g}"
    key = "lvtino_time_scale" if name.startswith("LVTINO") else "latino_time_scale"
    return f"times ×{tuned[key]:g}"


def report(args) -> str:
    """``video[_quick].md`` from the JSON; a full run also fills the README section between the markers."""
    quick = getattr(args, "quick", False)
    return write_report(RESULTS, "video", quick, tables, README, README_BEGIN, README_END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report", "overhead", "ablation"])
    parser.add_argument("--quick", action="store_true", help="2 clips, problem A, DiffPIR 40 steps; video_quick.*")
    parser.add_argument("--prior", default=str(PRIORS / "clips"), help="the video prior (stacked-frame pixel DDPM)")
    parser.add_argument("--image_prior", default=str(PRIORS / "photos"))
    parser.add_argument("--clips", type=int, default=None, help="held-out clips (default 8; --quick 2)")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--diffpir_steps", type=int, default=None, help="default 100 (--quick 40)")
    parser.add_argument("--tv_lambda", type=float, default=1e-3, help="TV3 weight (data-scaled units, §6.3)")
    parser.add_argument(
        "--tune_clips", type=int, default=None, help="clips:train clips of the tuned rows (8; --quick 2; 0: none)"
    )
    parser.add_argument("--tv_iters", type=int, default=300)
    parser.add_argument("--frame_batch", type=int, default=32, help="frames per image-prior call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="overhead: timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default=None, help="a line printed above the tables (e.g. which prior)")
    args = parser.parse_args(argv)
    defaults = SETTINGS["quick" if args.quick else "full"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.command in ("overhead", "ablation"):
        (overhead if args.command == "overhead" else ablation)(args)
        return
    if args.command == "run":
        run(args)
    report(args)


if __name__ == "__main__":
    main()
