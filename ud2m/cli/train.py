"""The training entry point behind ``train.py``, ``ud2m-train`` and ``python -m ud2m train``: ``LightningCLI`` over
:class:`ud2m.training.module.UnfoldedDistillation`, plus ``export`` and the base-prior commands (``prior fit``,
``prior distil``, ``prior export``, ``prior card``). docs/training.md and docs/prior_training.md show every command.

    ud2m-train fit --config configs/quickstart.yaml
    ud2m-train export --ckpt <run>/checkpoints/last.ckpt --out exports/my_model
    ud2m-train prior distil --config configs/priors/digits_cm.yaml
"""

from __future__ import annotations

import sys

from ud2m.cli.errors import run_command, strip_debug

COMMANDS = """commands of train.py / ud2m-train:
  fit | validate | test | predict ...     UD2M training (LightningCLI; its options follow)
  export --ckpt CKPT --out DIR            export a UD2M checkpoint for sample.py --checkpoint
  prior fit ...                           train a pixel diffusion prior (docs/prior_training.md)
  prior distil ...                        distil a pixel prior into a consistency model
  prior export --ckpt CKPT --out DIR      export a prior (or a distilled consistency model) checkpoint
  prior card --prior DIR --run RUN ...    write a prior's data card (card.json, samples.png)
"""


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

    if argv[:1] in (["-h"], ["--help"]):
        print(COMMANDS)
    UD2MCLI(args=None if args is None else argv)  # None: LightningCLI reads sys.argv itself


def cli() -> None:
    """The shell entry point (``train.py``, ``ud2m-train``, ``python -m ud2m train``): :func:`main` with user errors
    as two readable lines and exit status 2 (``--debug``: the traceback; :mod:`ud2m.cli.errors`)."""
    from ud2m.training.base_cli import ParserSettings

    argv, debug = strip_debug(sys.argv[1:])
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv itself
    ParserSettings.exit_on_error = False
    run_command("train.py", main, argv, debug=debug)
