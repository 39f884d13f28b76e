"""The LightningCLI of UD2M training (house-style K) and the ``train.py export`` / ``train.py prior export`` commands
(docs/method.md §9).

``UD2MCLI`` = ``LightningCLI(UnfoldedDistillation, <any LightningDataModule>)``: experiments are YAML files under
``configs/experiments/`` that choose the prior, operator, discriminator and data through ``class_path``/``init_args``;
every default lives in the type-hinted signatures. Shared values are linked once (``link_arguments``): the data's
``image_size``/``channels`` feed the discriminator. A ``checkpoint`` section configures the always-present
``ModelCheckpoint`` (``save_last=True`` by default, so ``last.ckpt`` allows exact resume).

Pretrained priors load through a classmethod, which jsonargparse cannot name as a ``class_path``; the two
``Pretrained*Prior`` names below are classes made from those loaders (``jsonargparse.class_from_function``), so a
config says ``class_path: ud2m.training.cli.PretrainedPixelPrior`` with ``init_args: {path_or_hub_id: ...}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jsonargparse import class_from_function

from ud2m.export import check_export_target
from ud2m.priors.latent import LatentConsistencyPrior
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.training.base_cli import ModuleCLI, parser_kwargs
from ud2m.training.callbacks import describe_data, ema_from_checkpoint, export_module, sampler_entry
from ud2m.training.module import UnfoldedDistillation

logger = logging.getLogger(__name__)

#: ``PixelDiffusionPrior.from_pretrained`` as a class for configs (local folder or hub id).
PretrainedPixelPrior = class_from_function(
    PixelDiffusionPrior.from_pretrained, PixelDiffusionPrior, name="PretrainedPixelPrior"
)
#: ``LatentConsistencyPrior.from_pretrained`` as a class for configs (SD/LCM/SDXL folders or hub ids).
PretrainedLatentPrior = class_from_function(
    LatentConsistencyPrior.from_pretrained, LatentConsistencyPrior, name="PretrainedLatentPrior"
)


class UD2MCLI(ModuleCLI):
    """``LightningCLI`` for :class:`UnfoldedDistillation` (which owns its two AdamW optimisers, §7.7) with any
    ``LightningDataModule``; the data's ``image_size`` and ``channels`` are linked into the discriminator.

    Args:
        args: command-line style list or a dict config (``None``: ``sys.argv``).
        run: run the subcommand (``False``: only parse and instantiate, as the config tests do).
        **kwargs: further ``LightningCLI`` arguments.
    """

    module_class = UnfoldedDistillation
    data_links = (
        ("data.init_args.image_size", "model.discriminator.init_args.image_size"),
        ("data.init_args.channels", "model.discriminator.init_args.in_channels"),
    )


# ------------------------------------------------------------------------------------------------ export command
def export(
    ckpt: Path,
    out: Path,
    use_ema: bool = True,
    num_steps: int = 3,
    eta: float = 1.0,
    overwrite: bool = False,
    t_start: int | None = None,
    final_gamma: float | None = None,
    residual_renoise: bool | None = None,
) -> Path:
    """Export a training checkpoint (``last.ckpt``) to the sampling folder of docs/method.md §9.

    The model is rebuilt from the configuration stored in the checkpoint by LightningCLI (frozen base weights are
    reloaded from their original path), the trainable weights are loaded, and the EMA weights replace them when the
    checkpoint holds an EMA state and ``use_ema`` is set. The manifest is built from that same stored configuration
    (base-model path and SHA-256, operator ``class_path``/``init_args``, data), exactly as
    :class:`~ud2m.training.callbacks.ExportOnTrainEnd` builds it at the end of ``fit``.

    Args:
        ckpt: a ``.ckpt`` written by ``train.py fit``.
        out: destination folder.
        use_ema: export the EMA weights when present.
        num_steps: default N of the exported sampler.
        eta: default DDIM eta of the exported sampler.
        overwrite: replace an export that already exists in ``out``.
        t_start: default first grid time of the exported sampler (None: 999; §8 revision).
        final_gamma: default weight of the sampler's closing data step (None: none; §8 revision).
        residual_renoise: default re-noise rule of the sampler (None: the trained block's; §8 revision).

    Returns:
        the export folder.

    Raises:
        FileExistsError: when ``out`` already holds an export and ``overwrite`` is not set.
        ValueError: for a checkpoint without the LightningCLI configuration (not written by ``train.py fit``).
    """
    check_export_target(out, overwrite=overwrite, how_to_overwrite="--overwrite true")
    sampler_entry(num_steps, eta, t_start, final_gamma)  # bad values are refused before the checkpoint is read
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    config = checkpoint.get("hyper_parameters", {})
    if not isinstance(config.get("sampler"), dict) or "class_path" not in config["sampler"]:
        raise ValueError(
            f"{ckpt}: the checkpoint holds no LightningCLI configuration of the sampler (hyper_parameters.sampler); "
            "export checkpoints written by `train.py fit`, or export a module with ExportOnTrainEnd"
        )
    model = UnfoldedDistillation.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    ema = ema_from_checkpoint(checkpoint) if use_ema else None
    shadow = None if ema is None else ema.shadow
    if shadow is not None:
        _, unexpected = model.load_state_dict(shadow, strict=False)  # frozen tensors are not in the EMA
        if unexpected:
            raise KeyError(f"{ckpt}: EMA state names tensors the model does not have, e.g. {unexpected[:5]}")
    data = checkpoint.get("datamodule_hyper_parameters", {})
    name = str(data.get("_class_path", "unknown")).rsplit(".", 1)[-1]
    return export_module(
        model, out, ema=shadow is not None, num_steps=num_steps, eta=eta, t_start=t_start, final_gamma=final_gamma,
        residual_renoise=residual_renoise, steps=checkpoint["global_step"],
        data=describe_data(name, data.get("train_shards") or data.get("root")), config=config,
    )  # fmt: skip


def export_command(argv: list[str]) -> Path:
    """``train.py export ...`` and ``train.py prior export ...``: ``--ckpt C --out O [--use_ema ...]``; the older
    positional form ``C O`` (the first two words before any option) is still accepted.

    Args:
        argv: the command line after ``train.py`` (starting with ``export`` or ``prior export``).

    Returns:
        the export folder.
    """
    from jsonargparse import auto_cli

    prior = argv[:1] == ["prior"]
    args = argv[2:] if prior else argv[1:]
    named: list[str] = []
    for option, value in zip(("--ckpt", "--out"), args, strict=False):  # leading words: the positional form
        if value.startswith("-"):
            break
        named += [option, value]
    args = [*named, *args[len(named) // 2 :]]
    if prior:
        from ud2m.training.prior_module import export_prior

        return auto_cli(export_prior, args=args, as_positional=False, **parser_kwargs())
    return auto_cli(export, args=args, as_positional=False, **parser_kwargs())
