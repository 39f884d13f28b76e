"""The Python API on one page (README "Python API"): restore held-out digits with LATINO on the shipped DDPM prior and
on its consistency model, then load a UD2M export and sample with it; and the whole ``sample.py`` job as one call
with a typed method object. Runs offline on the CPU in seconds.

    python docs/examples/python_api.py [--export outputs/quickstart/export] [--output_dir outputs/python_api]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ud2m import load_checkpoint, sample_ud2m
from ud2m.embedding import digits_crops
from ud2m.metrics import psnr
from ud2m.operators import SuperResolution, measure
from ud2m.priors import PixelDiffusionPrior
from ud2m.schedules import uniform_grid
from ud2m.solvers import latino
from ud2m.solvers.weights import ConstantGamma

PRIORS = Path(__file__).resolve().parents[2] / "ud2m" / "assets" / "priors"


@torch.inference_mode()
def main(export: str | None = None) -> dict[str, float]:
    x = digits_crops("val")[:16]  # (16, 1, 32, 32) held-out digits on [-1, 1]
    op = SuperResolution(factor=4, filter="gaussian", gaussian_sigma=3**0.5, gaussian_size=3)  # ud2m/mnist_sr_x4
    sigma_y = 0.05  # noise std on the [0, 1] scale (the internal [-1, 1] scale uses σ_n = 2σ_y)
    y = measure(op, x, sigma_y, torch.Generator().manual_seed(0))
    result = {"A^T y (bilinear lift)": psnr(op.lift(y).clamp(-1, 1), x).mean().item()}
    timesteps = uniform_grid(8, t_max=500)  # 500, 437, ..., 62: see the quality benchmark's tuned LATINO rows
    for name in ("digits", "digits-cm"):
        prior = PixelDiffusionPrior.from_pretrained(PRIORS / name)  # the CM folder loads with boundary="lcm"
        gen = torch.Generator().manual_seed(1)
        x_hat = latino(prior, op, y, timesteps=timesteps, weights=ConstantGamma(1000.0), sigma_y=sigma_y, generator=gen)
        result[f"LATINO-8 on {name}"] = psnr(x_hat, x).mean().item()
    if export is not None:  # a UD2M export, e.g. the quick start's
        prior = PixelDiffusionPrior.from_pretrained(PRIORS / "digits")
        model = load_checkpoint(export, prior)
        gen = torch.Generator().manual_seed(1)
        x_hat = sample_ud2m(model, op, y, sigma_y, x_shape=tuple(x.shape), num_steps=3, generator=gen)
        result["UD2M, 3 steps"] = psnr(x_hat, x).mean().item()
    for name, value in result.items():
        print(f"{name}: PSNR {value:.2f} dB")
    return result


def restore_files(output_dir: str) -> dict:
    """``sample.py``'s job from Python: files in, restored PNGs, std maps and metrics.json out; the method is an
    object of :mod:`ud2m.methods` (what ``--method Latino --method.num_steps 8`` builds)."""
    from ud2m.cli.sample import sample
    from ud2m.methods import Latino

    problem = dict(input="skimage:camera", operator="ud2m/mnist_sr_x4", model=str(PRIORS / "digits"), crop=32)
    return sample(**problem, method=Latino(num_steps=8), num_samples=2, output_dir=Path(output_dir), lpips=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default=None)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args()
    main(args.export)
    if args.output_dir is not None:
        print(restore_files(args.output_dir)["summary"])
