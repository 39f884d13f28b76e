"""Restore images from a simulated or given measurement.

Today this runs the classical, prior-free reconstructions (Wiener pseudo-inverse and Tikhonov); the LATINO /
UD2M paths plug into the same CLI (issues [zero-shot] and [ud2m]). Example (no download)::

    python sample.py --input skimage:astronaut --operator ud2m/sr_x4 --output_dir outputs/astronaut
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import auto_cli

from ud2m.io import center_crop, load_image, psnr, save_image
from ud2m.operators import LinearOperator, measure, sigma_internal
from ud2m.operators.presets import load_preset


def classical(op, y: torch.Tensor, x_shape, sigma_y: float, method: str, s0: float = 0.5) -> torch.Tensor:
    """Wiener: Aᵀ(AAᵀ + εI)⁻¹y with ε = σ_n²/s0²; Tikhonov: argmin ‖Ax − y‖²/(2σ_n²) + ‖x‖²/(2 s0²)."""
    sigma_n = max(sigma_internal(sigma_y), 1e-3)
    if not isinstance(op, LinearOperator):
        return op.prox_l2(y, y, s0**2 / sigma_n**2)  # nonlinear (JPEG): gradient-step prox from y itself
    if method == "wiener":
        return op.A_dagger(y, eps=sigma_n**2 / s0**2)
    return op.prox_l2(torch.zeros(x_shape, device=y.device), y, s0**2 / sigma_n**2)


def sample(
    input: str = "skimage:astronaut",
    operator: str = "ud2m/sr_x4",
    sigma_y: float | None = None,
    method: Literal["wiener", "tikhonov"] = "wiener",
    crop: int | None = 256,
    output_dir: Path = Path("outputs/sample"),
    seed: int = 0,
) -> dict:
    """Simulate y = A x + n from a clean image and restore it.

    Args:
        input: an image file or ``skimage:<name>`` (a photograph bundled with scikit-image).
        operator: a preset name (``ud2m/sr_x4``, ``latino/deblur_gaussian``, ...) or a preset YAML path.
        sigma_y: noise std on the [0, 1] scale (default: the preset's).
        method: classical reconstruction.
        crop: central square crop of the input (``None`` keeps the whole image).
        output_dir: where x.png, y.png, x_hat.png and metrics.json are written.
        seed: seed of the measurement noise.
    """
    preset = load_preset(operator)
    sigma_y = preset.sigma_y if sigma_y is None else sigma_y
    x = load_image(input, channels=3)
    x = center_crop(x, crop) if crop else x
    with torch.inference_mode():
        y = measure(preset.operator, x, sigma_y, torch.Generator().manual_seed(seed))
        t0 = time.perf_counter()
        x_hat = classical(preset.operator, y, x.shape, sigma_y, method).clamp(-1, 1)
        seconds = time.perf_counter() - t0
        lifted = preset.operator.lift(y)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, img in (("x", x), ("y", lifted), ("x_hat", x_hat)):
        save_image(img, output_dir / f"{name}.png")
    metrics = {
        "input": input,
        "operator": operator,
        "sigma_y": sigma_y,
        "method": method,
        "nfe": 0,
        "psnr": psnr(x_hat, x).item(),
        "psnr_lifted_y": psnr(lifted, x).item(),
        "seconds": seconds,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    print(json.dumps(auto_cli(sample), indent=2))
