"""The shared shape of the project's two training CLIs (:class:`ud2m.training.cli.UD2MCLI`,
:class:`ud2m.training.prior_module.PriorCLI`): one LightningModule, any LightningDataModule (``data.class_path``), a
``checkpoint`` section that keeps ``last.ckpt``, and links from the data section into the model."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


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
        # our frozen priors (and an EMA target) are in eval mode by design (algorithms.md §3.1): not a user's problem
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            self.module_class,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The ``checkpoint`` section (``save_last`` on) and :attr:`data_links`."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        for source, target in self.data_links:
            parser.link_arguments(source, target)
