"""Operator cost on this machine: A, A_adjoint and prox_l2 for a batch of RGB images (issue [foundation]).

Reports the median wall time of each call, and the CG iterations needed to reach a 1e-5 relative residual for the
operators whose prox can also go through CG. Usage::

    python benchmarks/operators.py --batch 8 --size 512 --out benchmarks/results/operators.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 100.0, 2500.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
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
