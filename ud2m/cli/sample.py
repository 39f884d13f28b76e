"""Restore images with a zero-shot solver (LATINO, LATINO-PRO, DPS, DiffPIR, Tikhonov, TV, Wiener) or an exported
UD2M model: the ``sample`` function behind ``sample.py``, ``ud2m-sample`` and ``python -m ud2m sample``; the job itself
lives in :mod:`ud2m.cli.restore` (docs/cli.md has every option and examples).

    ud2m-sample --input skimage:astronaut --operator ud2m/sr_x4 --output_dir outputs/astronaut
    ud2m-sample --input photos/ --operator latino/deblur_gaussian --model path/to/lcm --num_samples 4
    ud2m-sample --input photos/ --checkpoint exports/ud2m_sr4 --output_dir outputs/ud2m
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import auto_cli

from ud2m.cli.errors import run_command, strip_debug
from ud2m.cli.restore import Options, restore

Method = Literal["latino", "latino_pro", "dps", "diffpir", "tikhonov", "tv", "wiener", "lift", "ud2m", "ld_rps"]


def sample(
    input: str = "skimage:astronaut",
    output_dir: Path = Path("outputs/sample"),
    method: Method | None = None,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
    allow_hash_mismatch: bool = False,
    operator: str | None = None,
    sigma_y: float | None = None,
    simulate: bool = True,
    reference: str | None = None,
    crop: int | None = None,
    prompt: str = "a photo of",
    calibrate_prompt: bool = False,
    task: Literal["low-light", "haze", "noise", "colour"] | None = None,
    captions: str | None = None,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int = 1,
    num_steps: int | None = None,
    eta: float | None = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    device: str = "auto",
    lpips: Literal["vgg", "alex", "squeeze"] | None = "vgg",
    lpips_weights: Path | None = None,
    tv_lambda: float = 20.0,
    solver_options: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Restore one image, a folder or a glob of images and write restored images, y, std maps and metrics.

    Args:
        input: an image file, a folder, a glob (``"photos/*.png"``) or ``skimage:<name>``.
        output_dir: where ``<stem>_restored.png``, ``<stem>_y.png``, ``<stem>_std.png`` and metrics.{json,csv} go.
        method: solver; default ``ud2m`` with ``checkpoint``, ``latino`` with ``model``, else ``wiener``.
        model: diffusers model folder or hub id (pixel or latent, detected); UD2M: overrides the manifest's.
        model_options: extra keywords of the prior's ``from_pretrained`` (``lora``, ``unet_weights``, ``vae``, ...).
        checkpoint: an exported UD2M folder (implies ``method=ud2m``; base model and operator from its manifest).
        allow_hash_mismatch: UD2M: load even if the base model's weights differ from the manifest's hash.
        operator: preset name (``ud2m/sr_x4``, ``latino/deblur_gaussian``, ...) or preset YAML path.
        sigma_y: noise std on the [0, 1] scale (default: the preset's or the checkpoint's).
        simulate: inputs are clean images, degraded here (y written); False: inputs ARE observations y on [0, 1].
        reference: observation mode only: clean images (file/folder/glob) matched by stem, for PSNR/SSIM/LPIPS.
        crop: central square crop of simulated inputs; None: the preset's image_size if smaller; 0: no crop.
        prompt: text prompt of latent models (LATINO-PRO's initial prompt, starting with "a photo of").
        calibrate_prompt: calibrate the prompt by empirical Bayes (LATINO-PRO); implies ``method=latino_pro``.
        task: LD-RPS blind restoration (no ``--operator``; the degradation is learned per image, docs/blind.md):
            ``low-light``, ``haze``, ``noise`` or ``colour``; implies ``method=ld_rps`` and ``--simulate false``.
        captions: LD-RPS with a text-conditioned prior: a folder of ``<stem>.txt`` captions (default: ``--prompt``).
        seed: base seed; sample s of image i uses hash(seed, i, s), its simulated noise hash(seed, i).
        num_samples: posterior samples per image: the restored image is their mean, ``_std.png`` their std.
        batch_size: images per solver call (each with ``num_samples`` chains).
        num_steps: UD2M N / DPS and DiffPIR steps / LATINO uniform grid (default: each method's own).
        eta: DDIM stochasticity of UD2M (default: the manifest's) and DPS.
        dtype: network dtype; auto = fp32 on CPU, bf16/fp16 on CUDA (docs/method.md §1.4).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        lpips: LPIPS backbone, reported only when its real weights are available (None: off).
        lpips_weights: local path of the torchvision backbone weights for LPIPS.
        tv_lambda: TV weight λ of ``method=tv`` (objective ‖Ax−y‖²/(2σ_n²) + λ TV(x)).
        solver_options: extra keywords of the solver function (e.g. ``{"zeta": 0.5}`` for DPS).
        resume: skip images whose outputs exist (False recomputes and overwrites them).
        progress: show a progress bar.
    """
    return restore(Options(**{k: v for k, v in locals().items()}))


def main(args: list[str] | None = None, *, exit_on_error: bool = True) -> None:
    """Parse the options, run, print the summary (``exit_on_error=False``: option errors are raised, not printed
    after the usage)."""
    print(json.dumps(auto_cli(sample, args=args, exit_on_error=exit_on_error)["summary"], indent=2))


def cli(args: list[str] | None = None) -> None:
    """The shell entry point (``sample.py``, ``ud2m-sample``, ``python -m ud2m sample``): :func:`main` with user
    errors as two readable lines and exit status 2 (``--debug``: the traceback; :mod:`ud2m.cli.errors`)."""
    argv, debug = strip_debug(sys.argv[1:] if args is None else list(args))
    run_command("sample.py", lambda: main(argv, exit_on_error=False), argv, debug=debug)
