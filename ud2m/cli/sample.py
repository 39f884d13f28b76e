"""Restore images with a zero-shot solver (LATINO, LATINO-PRO, DPS, DiffPIR, Tikhonov, TV, Wiener), LD-RPS or an
exported UD2M model: the ``sample`` function behind ``sample.py``, ``ud2m-sample`` and ``python -m ud2m sample``; the
job itself lives in :mod:`ud2m.cli.restore`, the methods in :mod:`ud2m.methods` (docs/cli.md has every option).

    ud2m-sample --input skimage:astronaut --operator ud2m/sr_x4 --output_dir outputs/astronaut
    ud2m-sample --input photos/ --operator latino/deblur_gaussian --model path/to/lcm --num_samples 4
    ud2m-sample --input photos/ --operator ud2m/sr_x4 --model path/to/ddpm --method DPS --method.zeta 2
    ud2m-sample --input photos/ --checkpoint exports/ud2m_sr4 --method UD2M --method.num_steps 4
    ud2m-sample --config restore.yaml       # the same options as YAML (method: {class_path: ..., init_args: ...})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from jsonargparse import auto_cli

from ud2m.cli.errors import run_command, strip_debug
from ud2m.cli.restore import Options, restore
from ud2m.methods import Method
from ud2m.operators.base import LinearOperator, NonlinearOperator


def sample(
    input: str = "skimage:astronaut",
    output_dir: Path = Path("outputs/sample"),
    method: Method | str | None = None,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
    allow_hash_mismatch: bool = False,
    operator: str | LinearOperator | NonlinearOperator | None = None,
    sigma_y: float | None = None,
    simulate: bool = True,
    reference: str | None = None,
    crop: int | None = None,
    prompt: str = "a photo of",
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int = 1,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    device: str = "auto",
    lpips: Literal["vgg", "alex", "squeeze"] | None = "vgg",
    lpips_weights: Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Restore one image, a folder or a glob of images and write restored images, y, std maps and metrics.

    Args:
        input: an image file, a folder, a glob (``"photos/*.png"``) or ``skimage:<name>``.
        output_dir: where ``<stem>_restored.png``, ``<stem>_y.png``, ``<stem>_std.png`` and metrics.{json,csv} go.
        method: the method (:mod:`ud2m.methods`), as ``class_path``/``init_args`` (``--method DPS --method.zeta 2``)
            or a short name with its defaults (``latino``, ``latino_pro``, ``dps``, ``diffpir``, ``tikhonov``, ``tv``,
            ``wiener``, ``lift``, ``ud2m``, ``ld_rps``); default UD2M with ``checkpoint``, LATINO with ``model``,
            else the Wiener filter. LD-RPS (``--method LDRPS --method.task haze``) learns the degradation: no
            ``--operator``, and the inputs are the degraded images (``--simulate false``; docs/blind.md).
        model: diffusers model folder or hub id (pixel or latent, detected); UD2M: overrides the manifest's.
        model_options: extra keywords of the prior's ``from_pretrained`` (``lora``, ``unet_weights``, ``vae``, ...).
        checkpoint: an exported UD2M folder (implies the UD2M method; base model and operator from its manifest).
        allow_hash_mismatch: UD2M: load even if the base model's weights differ from the manifest's hash.
        operator: preset name (``ud2m/sr_x4``, ``latino/deblur_gaussian``, ...), preset YAML path, or an operator
            object (``class_path``/``init_args``, as in training configs; then ``sigma_y`` is required).
        sigma_y: noise std on the [0, 1] scale (default: the preset's or the checkpoint's).
        simulate: inputs are clean images, degraded here (y written); False: inputs ARE observations y on [0, 1].
        reference: observation mode only: clean images (file/folder/glob) matched by stem, for PSNR/SSIM/LPIPS.
        crop: central square crop of simulated inputs; None: the preset's image_size if smaller; 0: no crop.
        prompt: text prompt of latent models (LATINO-PRO's initial prompt, starting with "a photo of"), or a
            condition saved by LATINO-PRO (``<stem>_cond.safetensors``).
        seed: base seed; sample s of image i uses hash(seed, i, s), its simulated noise hash(seed, i).
        num_samples: posterior samples per image: the restored image is their mean, ``_std.png`` their std.
        batch_size: images per solver call (each with ``num_samples`` chains).
        dtype: network dtype; auto = fp32 on CPU, bf16/fp16 on CUDA (docs/method.md §1.4).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        lpips: LPIPS backbone, reported only when its real weights are available (None: off).
        lpips_weights: local path of the torchvision backbone weights for LPIPS.
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
