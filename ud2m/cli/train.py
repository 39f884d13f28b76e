"""The training entry point behind ``train.py``, ``ud2m-train`` and ``python -m ud2m train``: ``LightningCLI`` over
:class:`ud2m.training.module.UnfoldedDistillation`, plus ``export`` and the base-prior commands (``prior fit``,
``prior distil``, ``prior export``, ``prior card``). docs/training.md and docs/prior_training.md show every command.

    ud2m-train fit --config configs/quickstart.yaml
    ud2m-train export --ckpt <run>/checkpoints/last.ckpt --out exports/my_model
    ud2m-train prior distil --config configs/priors/digits_cm.yaml
"""

from __future__ import annotations

import sys


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
