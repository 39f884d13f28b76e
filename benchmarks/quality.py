"""Quality benchmark on the built-in digits (issue [quickstart], first slice): x4 super-resolution at sigma_y = 0.05
(the UD2M MNIST ablation operator) of the 90 held-out digits, every method on the same observations and seeds.

Every row is produced by ``sample.py`` itself (the CLI's ``sample()`` function), so the figures are what a user gets:
PSNR / SSIM mean and std over images (LPIPS is not reported: no backbone weights offline), NFE, wall time per image.
The UD2M row needs an export (``python train.py fit --config configs/quickstart.yaml`` writes
``outputs/quickstart/export``). No figure is edited by hand: the table below is printed by this script::

    python benchmarks/quality.py --out benchmarks/results/quality_digits.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "ud2m" / "assets" / "priors" / "digits"

#: (row name, sample() keywords); all share the operator, noise level, inputs and seed.
METHODS = [
    ("Wiener (A^T(AA^T + eps)^-1 y)", dict(method="wiener")),
    ("Tikhonov", dict(method="tikhonov")),
    ("TV (PDHG)", dict(method="tv")),
    ("LATINO, 8 steps", dict(method="latino", model=str(PRIOR))),
    ("DiffPIR, 100 steps", dict(method="diffpir", model=str(PRIOR), num_steps=100)),
    ("DPS, 100 steps", dict(method="dps", model=str(PRIOR), num_steps=100)),
    ("UD2M (quick start), N=3 x K=3", dict(checkpoint="outputs/quickstart/export")),
]


def load_sample():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="digits:val")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/quality_digits"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sample = load_sample()
    rows = {}
    print("| method | NFE | PSNR (dB) | SSIM | s / image |")
    print("|---|---|---|---|---|")
    for name, kw in METHODS:
        if "checkpoint" in kw and not Path(kw["checkpoint"]).is_dir():
            print(f"| {name} | – | (no export at {kw['checkpoint']}: run the quick start first) | | |")
            continue
        common = dict(operator="ud2m/mnist_sr_x4") if "checkpoint" not in kw else {}
        out = args.work_dir / name.split(",")[0].split(" ")[0].lower()
        result = sample(
            input=args.input, output_dir=out, seed=0, batch_size=args.batch_size, lpips=None, progress=False,
            resume=False, **common, **kw,
        )  # fmt: skip
        s = result["summary"]
        rows[name] = s
        print(
            f"| {name} | {s['nfe']['mean']:.0f} | {s['psnr']['mean']:.2f} ± {s['psnr']['std']:.2f} | "
            f"{s['ssim']['mean']:.3f} ± {s['ssim']['std']:.3f} | {s['seconds']['mean']:.3f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
