"""Operator cost on this machine: A, A_adjoint and prox_l2 for a batch of RGB images (issue [foundation]).

Reports the median wall time of each call, and the CG iterations needed to reach a 1e-5 relative residual for the
operators whose prox can also go through CG. ``--video`` times instead the proxes of LVTINO's composed video
operators (problems A, B, C with the presets' reflect-padded SR, one RGB clip): CG on the whole video, capped at the
operator default's 100 iterations (what every composition with a non-circular SR used before the per-slice reduction
of ``ud2m.operators.video``), against ``prox_l2`` (that reduction); both report the relative residual of the normal
equations, ‖γAᵀ(Ax − y) + x − z‖ / ‖z + γAᵀy‖. Usage::

    python benchmarks/operators.py --batch 8 --size 512 --out benchmarks/results/operators.json
    python benchmarks/operators.py --video --size 256 --out benchmarks/results/operators_video.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from common import median_ms

from ud2m.operators import GaussianBlur, RandomInpainting, SuperResolution, measure
from ud2m.operators.cg import cg_prox_solve
from ud2m.operators.video import lvtino_problem_a, lvtino_problem_b, lvtino_problem_c
from ud2m.utils import batch_norm_sq

#: LVTINO's composed operators with their frame counts, and the γ of their finite-γ proxes: problem B's data steps
#: (§6.4: 1363 / 3539 for step 2, 2721 / 16868 for step 4) and every problem's Wiener start, γ = 1/ε = s₀²/σ_n² at
#: σ_y = 0.001 (§6.6: 62 500, from z = 0).
VIDEO_PROBLEMS = {
    "A: pool x4, SR x4 reflect": (lambda: lvtino_problem_a(25), 25, []),
    "B: blur 7, SR x8 reflect": (lvtino_problem_b, 25, [1363.0, 3539.0, 2721.0, 16868.0]),
    "C: pool x8, SR x8 reflect": (lambda: lvtino_problem_c(81), 81, []),
}
WIENER_GAMMA = 0.5**2 / 0.002**2


def operators(size: int) -> dict:
    return {
        "gaussian blur (sigma 3, 19x19, FFT)": GaussianBlur(3.0, 19),
        "SR x4 bicubic circular (closed form)": SuperResolution(4, "bicubic"),
        "SR x4 bicubic reflect (CG)": SuperResolution(4, "bicubic", padding="reflect"),
        "inpainting (random 30 %)": RandomInpainting(size, 0.3),
    }


def bench_one(op, x, y, gamma, repeats):
    row = {
        "A_s": 1e-3 * median_ms(lambda: op.A(x), repeats),
        "A_adjoint_s": 1e-3 * median_ms(lambda: op.A_adjoint(y), repeats),
        "prox_l2_s": 1e-3 * median_ms(lambda: op.prox_l2(x, y, gamma), repeats),
    }
    row["prox_l2_cg_s"] = 1e-3 * median_ms(lambda: op.prox_l2_cg(x, y, gamma, rtol=1e-5, max_iter=500), 1)
    res = cg_prox_solve(op, x, y, torch.full((x.shape[0],), gamma), rtol=1e-5, max_iter=500)
    row["cg_iterations"] = res.iterations.tolist()
    return row


def normal_residual(op, x, z, y, gamma: float) -> float:
    """‖γAᵀ(Ax − y) + x − z‖ / ‖z + γAᵀy‖, the relative residual of the prox's normal equations (worst sample)."""
    r = gamma * op.A_adjoint(op.A(x) - y) + (x - z)
    return float((batch_norm_sq(r) / batch_norm_sq(z + gamma * op.A_adjoint(y))).sqrt().max())


def video_row(op, z: torch.Tensor, y: torch.Tensor, gamma: float, repeats: int) -> dict:
    """Whole-video CG against ``prox_l2`` at one γ, from z (from 0 for the Wiener start's γ)."""
    start = torch.zeros_like(z) if gamma == WIENER_GAMMA else z
    gt = torch.tensor([gamma])
    last = {}  # the timed calls' results, so that no solve is run again only for its output

    def cg() -> None:
        last["cg"] = cg_prox_solve(op, start, y, gt, rtol=1e-5, max_iter=100)

    def prox() -> None:
        last["prox"] = op.prox_l2(start, y, gt)

    cg_s, prox_s = 1e-3 * median_ms(cg, 1), 1e-3 * median_ms(prox, repeats)
    res = last["cg"]
    return {
        "cg_iterations": int(res.iterations),
        "cg_converged": bool(res.converged.all()),
        "cg_s": cg_s,
        "cg_residual": normal_residual(op, res.x, start, y, gamma),
        "prox_s": prox_s,
        "prox_residual": normal_residual(op, last["prox"], start, y, gamma),
    }


def video_rows(size: int, repeats: int) -> dict:
    """Whole-video CG (cap 100, rtol 1e-5) against ``prox_l2`` on one smooth RGB clip per LVTINO problem."""
    rows = {}
    print(
        "| problem | frames × H × W | gamma | whole-video CG: iterations | CG (s) | CG residual | prox_l2 (s) "
        "| prox_l2 residual |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (build, frames, gammas) in VIDEO_PROBLEMS.items():
        op = build()
        g = torch.Generator().manual_seed(0)
        low = torch.rand(1, 3 * frames, size // 16, size // 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1) * 2 - 1
        x = x.reshape(1, 3, frames, size, size)
        y = measure(op, x, 0.001, g)
        z = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        for gamma in [*gammas, WIENER_GAMMA]:
            row = {"frames": frames, "size": size, **video_row(op, z, y, gamma, repeats)}
            rows[f"{name} @ gamma={gamma:g}"] = row
            print(
                f"| {name} | {frames} × {size} × {size} | {gamma:g} | {row['cg_iterations']}"
                f"{'' if row['cg_converged'] else ' (cap)'} | {row['cg_s']:.2f} | {row['cg_residual']:.1e} | "
                f"{row['prox_s']:.2f} | {row['prox_residual']:.1e} |",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 100.0, 2500.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--video", action="store_true", help="LVTINO's composed video operators instead (module doc)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.video:
        results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        results["load_average_start"] = os.getloadavg()
        results["video_rows"] = video_rows(args.size, args.repeats)
        results["load_average_end"] = os.getloadavg()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        return
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1
    results = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "rows": {},
    }
    print("| operator | gamma | A (ms) | A^T (ms) | prox (ms) | CG prox (ms) | CG iterations to 1e-5 |")
    print("|---|---|---|---|---|---|---|")
    for name, op in operators(args.size).items():
        y = measure(op, x, 0.01, g)
        for gamma in args.gammas:
            row = bench_one(op, x, y, gamma, args.repeats)
            results["rows"][f"{name} @ gamma={gamma:g}"] = row
            its = sorted(set(row["cg_iterations"]))
            print(
                f"| {name} | {gamma:g} | {1e3 * row['A_s']:.1f} | {1e3 * row['A_adjoint_s']:.1f} | "
                f"{1e3 * row['prox_l2_s']:.1f} | {1e3 * row['prox_l2_cg_s']:.1f} | {its} |"
            )
    results["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
