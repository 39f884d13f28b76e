"""The one place that touches Lightning internals (issue [api], code layout): everything else uses Lightning's public
API. Each function here says which internal it reads and what happens when a Lightning release removes it; the
tests (tests/test_cli_configs.py) check both the CLI and the plain-Python behaviour on the installed version."""

from __future__ import annotations

from typing import Any


def cli_hyperparameters() -> dict[str, Any] | None:
    """The hyperparameters LightningCLI is instantiating a module with (its parsed ``class_path``/``init_args``
    config), or None outside LightningCLI.

    Reads ``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters``, the context variable that
    LightningCLI sets around module instantiation. If a Lightning release removes it, this returns None, and modules
    then keep their injected objects out of ``hparams`` as in plain Python (checkpoints stay loadable through the
    CLI's saved config).
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        return None
    return _given_hyperparameters.get()
