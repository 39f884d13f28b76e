"""UD2M training entry point: ``LightningCLI`` over :class:`ud2m.training.module.UnfoldedDistillation`.

Train (subcommands fit / validate / test / predict; every option is also a YAML key)::

    python train.py fit --config configs/experiments/tiny_pixel_sr4.yaml --trainer.max_steps 100
    python train.py fit --config configs/experiments/tiny_pixel_sr4.yaml --ckpt_path <run>/checkpoints/last.ckpt

Export a checkpoint to the folder that ``sample.py --checkpoint`` reads (docs/method.md §9)::

    python train.py export --ckpt <run>/checkpoints/last.ckpt --out exports/my_model

Train a pixel diffusion prior for your own domain first (docs/prior_training.md)::

    python train.py prior fit --config configs/priors/digits.yaml
    python train.py prior export --ckpt <run>/checkpoints/last.ckpt --out priors/digits

See docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a source checkout without installing

from ud2m.cli.train import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
