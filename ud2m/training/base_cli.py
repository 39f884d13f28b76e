"""The shared shape of the project's two training CLIs (:class:`ud2m.training.cli.UD2MCLI`,
:class:`ud2m.training.prior_module.PriorCLI`): one LightningModule, any LightningDataModule (``data.class_path``), a
``checkpoint`` section that keeps ``last.ckpt``, and links from the data section into the model."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

logger = logging.getLogger(__name__)

# Warnings of our dependencies' own calls into each other, which a user can do nothing about (issue [api], hygiene).
IRRELEVANT_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",  # our frozen priors are in eval mode by design (§3.1)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper on torch >= 2.9
    r"(?s).*``instantiate_classes`` was deprecated.*",  # LightningCLI on jsonargparse >= 4.49
    r"(?s).*By default only one JsonargparseDeprecationWarning per type is shown.*",
)


class ParserSettings:
    """``exit_on_error`` of every jsonargparse parser of the training commands. True (argparse's default) prints the
    usage and exits; the shell entry points set it False, so that an option error is raised and printed in one or
    two lines by :func:`ud2m.cli.errors.run_command` instead of after the whole usage text."""

    exit_on_error = True


def parser_kwargs() -> dict[str, bool]:
    """Keyword arguments for the training commands' parsers (:class:`ParserSettings`)."""
    return {"exit_on_error": ParserSettings.exit_on_error}


def remove_failed_log_dir(log_dir: str | Path | None, started: float, global_step: int) -> bool:
    """Remove the log folder of a run that failed before its first step (issue [api] 8: no empty ``version_0``
    left behind): only when every file in it was written by this run (not older than ``started``, so a reused
    folder is never touched). Returns whether it was removed."""
    if log_dir is None or global_step > 0 or not Path(log_dir).is_dir():
        return False
    files = [p for p in Path(log_dir).rglob("*") if p.is_file()]
    if any(p.stat().st_mtime < started for p in files):
        return False
    shutil.rmtree(log_dir)
    logger.info("removed the log folder %s of the failed run (it held nothing from a training step)", log_dir)
    return True


class ModuleCLI(LightningCLI):
    """``LightningCLI(module_class, <any LightningDataModule>)``; subclasses set the two class attributes.

    The module owns its optimisers (``auto_configure_optimizers=False``); the seed defaults to 0 and the saved config
    is overwritten on a rerun.

    Args:
        args: command-line style list or a dict config (``None``: ``sys.argv``).
        run: run the subcommand (``False``: only parse and instantiate).
        **kwargs: further ``LightningCLI`` arguments.

    Attributes:
        module_class: the LightningModule.
        data_links: ``(source, target)`` argument links, e.g. the data's channels into the model.
    """

    module_class: type
    data_links: tuple[tuple[str, str], ...] = ()

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        for message in IRRELEVANT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", parser_kwargs())
        super().__init__(
            self.module_class,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; if it fails before the first step, remove the log folder it created."""
        started = time.time() - 1.0  # file systems with coarse timestamps
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.is_global_zero:
                remove_failed_log_dir(trainer.log_dir, started, trainer.global_step)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The ``checkpoint`` section (``save_last`` on) and :attr:`data_links`."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        for source, target in self.data_links:
            parser.link_arguments(source, target)
