"""UD2M training entry point: ``LightningCLI`` over :class:`ud2m.training.module.UnfoldedDistillation`.

Train (subcommands fit / validate / test / predict; every option is also a YAML key)::

    python train.py fit --config configs/experiments/tiny_pixel_sr4.yaml --trainer.max_steps 100
    python train.py fit --config configs/experiments/tiny_pixel_sr4.yaml --ckpt_path <run>/checkpoints/last.ckpt

Export a checkpoint to the folder that ``sample.py --checkpoint`` reads (algorithms.md §9)::

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


def main(args: list[str] | None = None) -> None:
    """``export`` / ``prior export`` run :func:`ud2m.training.cli.export_command`, ``prior ...`` the base-prior CLI;
    anything else goes to the UD2M LightningCLI."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"] or argv[:2] == ["prior", "export"]:
        from ud2m.training.cli import export_command

        export_command(argv)
        return
    if argv[:1] == ["prior"]:
        from ud2m.training.prior_module import main as prior_main

        if args is None:  # from the shell: LightningCLI reads sys.argv itself, without the "prior" word
            sys.argv = [sys.argv[0], *argv[1:]]
        prior_main(None if args is None else argv[1:])
        return
    from ud2m.training.cli import UD2MCLI

    UD2MCLI(args=argv)


if __name__ == "__main__":
    main()
