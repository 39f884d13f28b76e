r"""Lightning callbacks of UD2M training (docs/method.md §7.7, §9; house-style J): EMA, image logging and export.

- :class:`EMA`: exponential moving average of the trainable generator tensors (LoRA, learned scalars) in the
  half-life form of EDM (Karras et al., 2022, ``training_loop.py``), :math:`\beta = 0.5^{1/h}` per step; its state
  lives in the Lightning checkpoint (exact resume) and it is swapped in for validation, testing and export.
- :class:`ImageLogger`: rank-zero images of the first validation batch (x, lifted y, x̂0, per-block iterates) through
  the logger's API (TensorBoard ``add_image``) or as PNG files for any other logger.
- :class:`ExportOnTrainEnd`: writes the sampling folder of §9 (``ud2m.export.export_checkpoint``) when ``fit`` ends,
  with the EMA weights when an :class:`EMA` callback is present.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ EMA
def tracked_parameters(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
    """The generator's trainable tensors by state-dict name (``sampler.*`` with ``requires_grad``)."""
    root = getattr(pl_module, "sampler", pl_module)
    prefix = "sampler." if root is not pl_module else ""
    return {prefix + name: p for name, p in root.named_parameters() if p.requires_grad}


class EMA(pl.Callback):
    r"""EMA of the trainable generator tensors, EDM half-life form (docs/method.md §7.7).

    After every generator update (every increase of ``trainer.global_step``; skipped steps do not count),
    :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` with :math:`\beta = 0.5^{1/h}`, so a weight's
    contribution halves every :math:`h` steps. The shadow tensors are fp32 copies on the module's device, saved in
    the checkpoint (:meth:`state_dict`), swapped into the model for validation/test (:meth:`swapped`) and used by
    :class:`ExportOnTrainEnd` and ``train.py export``.

    Args:
        halflife_steps: :math:`h` in generator updates (1000 [ours]).
    """

    def __init__(self, halflife_steps: int = 1000) -> None:
        if halflife_steps <= 0:
            raise ValueError(f"EMA: halflife_steps must be positive, got {halflife_steps}")
        self.halflife_steps = int(halflife_steps)
        self.beta = 0.5 ** (1.0 / self.halflife_steps)
        self.shadow: dict[str, torch.Tensor] | None = None
        self.last_step = -1  # global_step of the last update
        self._backup: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start from the current weights, or move a restored shadow to the module's device."""
        params = tracked_parameters(pl_module)
        if self.shadow is None:
            self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
            self.last_step = trainer.global_step
            return
        if set(self.shadow) != set(params):
            raise KeyError(f"EMA state does not match the model: {sorted(set(self.shadow) ^ set(params))[:5]}")
        self.shadow = {name: v.to(params[name].device) for name, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Update after each generator step (no update when the step was skipped by the NaN guard)."""
        if self.shadow is None or trainer.global_step == self.last_step:
            return
        for name, p in tracked_parameters(pl_module).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.beta)
        self.last_step = trainer.global_step

    @contextlib.contextmanager
    def swapped(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Context in which the model holds the EMA weights (the training weights are restored on exit)."""
        if self.shadow is None or self._backup is not None:
            yield
            return
        params = tracked_parameters(pl_module)
        with torch.no_grad():
            self._backup = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._backup[name])
            self._backup = None

    def _enter(self, pl_module: pl.LightningModule) -> None:
        self._context = self.swapped(pl_module)
        self._context.__enter__()

    def _exit(self) -> None:
        context, self._context = getattr(self, "_context", None), None
        if context is not None:
            context.__exit__(None, None, None)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate with the EMA weights."""
        self._enter(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to the training weights."""
        self._exit()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Test with the EMA weights."""
        if self.shadow is None:  # `trainer.test(ckpt_path=...)` restores the state without fitting
            self.on_fit_start(trainer, pl_module)
        self._enter(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to the training weights."""
        self._exit()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written while the EMA weights are swapped in must still hold the training weights."""
        if self._backup is not None:
            checkpoint["state_dict"].update(self._backup)

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors, half-life and the step of the last update (exact resume)."""
        return {"halflife_steps": self.halflife_steps, "last_step": self.last_step, "shadow": self.shadow}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the half-life must match this callback's)."""
        if int(state_dict["halflife_steps"]) != self.halflife_steps:
            raise ValueError(
                f"EMA: checkpoint half-life {state_dict['halflife_steps']} differs from {self.halflife_steps}"
            )
        self.last_step = int(state_dict["last_step"])
        self.shadow = None if state_dict["shadow"] is None else dict(state_dict["shadow"])


def ema_from_checkpoint(checkpoint: dict[str, Any]) -> EMA | None:
    """The :class:`EMA` callback saved in a loaded Lightning checkpoint (``torch.load`` dict), restored; None when
    the checkpoint holds no EMA shadow."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith(EMA.__qualname__) and isinstance(state, dict) and state.get("shadow") is not None:
            ema = EMA(int(state["halflife_steps"]))
            ema.load_state_dict(state)
            return ema
    return None


def find_ema(trainer: pl.Trainer) -> EMA | None:
    """The trainer's :class:`EMA` callback, if any."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


# ------------------------------------------------------------------------------------------------ images
def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


class ImageLogger(pl.Callback):
    """Log the first validation batch: x, lift(y), x̂0 and the per-block iterates of the last grid point.

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` the grids go to ``add_image`` (tag ``val/<name>``);
    with any other logger (or none) they are written as PNG files under ``<log_dir>/images`` (or ``out_dir``).
    Rank zero only; nothing happens during the sanity check.

    Args:
        max_images: images per grid.
        every_n_validations: log every n-th validation run.
        out_dir: folder for PNG files (default: ``trainer.log_dir/images``).
        frames: clips with their frames stacked along channels (``T*C`` channels, :mod:`ud2m.training.clips`):
            each clip is drawn as a strip of its ``frames`` frames, one clip per row.
    """

    def __init__(
        self, max_images: int = 4, every_n_validations: int = 1, out_dir: str | None = None, frames: int | None = None
    ) -> None:
        self.max_images, self.every_n_validations, self.out_dir = max_images, every_n_validations, out_dir
        self.frames = frames
        self._validations = 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count validation runs."""
        if not trainer.sanity_checking:
            self._validations += 1

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args
    ) -> None:
        """Log the images returned by ``validation_step`` for batch 0."""
        if batch_idx != 0 or not isinstance(outputs, dict) or trainer.sanity_checking:
            return
        if self._validations % self.every_n_validations:
            return
        for name, grid in self.grids(outputs).items():
            self.write(trainer, f"val/{name}", grid)

    def grids(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``(3 or 1, H', W')`` grids on [0, 1]: one per image kind (``x``, ``y``, ``x_hat*``), plus ``iterates``
        (blocks of the last step)."""
        from torchvision.utils import make_grid

        n = self.max_images
        kinds = [k for k in outputs if k in ("x", "y") or k.startswith("x_hat")]  # x_hat, x_hat_1step, ...
        if self.frames:  # (n, T*C, H, W) clips -> (n, C, H, T*W) strips, one per row
            T = self.frames
            strips = {k: outputs[k][:n].unflatten(1, (T, -1)).permute(0, 2, 3, 1, 4).flatten(3) for k in kinds}
            return {k: make_grid(_to_unit(v), nrow=1) for k, v in strips.items()}
        out = {k: make_grid(_to_unit(outputs[k][:n]), nrow=n) for k in kinds if torch.is_tensor(outputs[k])}
        steps = outputs.get("iterates") or []
        blocks = [b["x"][0] for b in (steps[-1].get("blocks", []) if steps else [])]
        blocks = [x for x in blocks if x.shape == outputs["x"].shape[1:]]  # pixel-space iterates only
        if blocks:
            out["iterates"] = make_grid(_to_unit(torch.stack(blocks)), nrow=len(blocks))
        return out

    def write(self, trainer: pl.Trainer, tag: str, grid: torch.Tensor) -> None:
        """Through TensorBoard when it is the logger, else a PNG file."""
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
            return
        from ud2m.io import save_image

        root = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "images")
        save_image(grid * 2 - 1, root / f"step{trainer.global_step:07d}_{tag.replace('/', '_')}.png")


# ------------------------------------------------------------------------------------------------ export
class ExportOnTrainEnd(pl.Callback):
    """Write the sampling folder of docs/method.md §9 when ``fit`` ends (rank zero), EMA weights when available.

    A folder that already holds an export (its ``ud2m.json``) is refused when ``fit`` is set up, before any training
    step, unless ``overwrite`` is set: a finished model is never replaced silently (e.g. by a second run of the same
    config, or a resumed run).

    Args:
        out_dir: destination folder (``ud2m.json``, ``adapter/``, ``scalars.safetensors``, ...).
        use_ema: export the EMA weights when an :class:`EMA` callback is present.
        num_steps: default N of the exported sampler (§8).
        eta: default DDIM eta of the exported sampler.
        t_start: default first grid time of the exported sampler (None: 999, the paper's start from noise; a later
            start tuned on training images, ``sample_ud2m``'s ``t_start``, §8 revision).
        final_gamma: default weight of the sampler's closing data step (None: none, the paper's output;
            ``sample_ud2m``'s ``final_gamma``, §8 revision).
        residual_renoise: default re-noise rule of the sampler (None: the trained block's; ``sample_ud2m``'s
            ``residual_renoise``, §8 revision).
        overwrite: replace an export that already exists in ``out_dir``.
        best: export the weights of the validation with the best value of this logged metric (e.g. ``"val/psnr"``)
            instead of the last ones: on few training images a long run can pass its best (the photos benchmark's
            4,000-step run peaked at 1,000-2,000 steps while its discriminator pulled away). The weights validated
            (the EMA's with ``use_ema``) are kept in memory and in checkpoints; the manifest records the step and
            value (``training.selected``).
        mode: ``"max"`` or ``"min"``: which value of ``best`` is best.
    """

    def __init__(
        self,
        out_dir: str,
        use_ema: bool = True,
        num_steps: int = 3,
        eta: float = 1.0,
        overwrite: bool = False,
        best: str | None = None,
        mode: str = "max",
        t_start: int | None = None,
        final_gamma: float | None = None,
        residual_renoise: bool | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"ExportOnTrainEnd: mode must be 'max' or 'min', got {mode!r}")
        self.out_dir, self.use_ema, self.num_steps, self.eta = out_dir, use_ema, num_steps, eta
        self.t_start, self.final_gamma, self.residual_renoise = t_start, final_gamma, residual_renoise
        sampler_entry(num_steps, eta, t_start, final_gamma)  # bad values are refused before training, not after
        self.overwrite, self.best, self.mode = overwrite, best, mode
        self.selected: dict[str, Any] | None = None  # {"metric", "value", "step"} of the kept weights
        self.kept: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``best``: keep the validated weights when the metric improved."""
        if self.best is None or trainer.sanity_checking or self.best not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.best])
        better = self.selected is None or (
            value > self.selected["value"] if self.mode == "max" else value < self.selected["value"]
        )
        if not better:
            return
        ema = find_ema(trainer) if self.use_ema else None
        source = ema.shadow if ema is not None and ema.shadow is not None else tracked_parameters(pl_module)
        self.kept = {name: t.detach().float().cpu().clone() for name, t in source.items()}
        self.selected = {"metric": self.best, "value": value, "step": int(trainer.global_step)}

    def state_dict(self) -> dict[str, Any]:
        """The kept weights and their selection (exact resume)."""
        return {"selected": self.selected, "kept": self.kept}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.selected, self.kept = state_dict.get("selected"), state_dict.get("kept")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse an existing export before training starts (rank zero looks; every rank raises together)."""
        from ud2m.export import check_export_target

        if stage != "fit":
            return
        error = None
        if trainer.is_global_zero:
            try:
                check_export_target(self.out_dir, overwrite=self.overwrite, how_to_overwrite="overwrite: true")
            except FileExistsError as err:
                error = f"ExportOnTrainEnd: {err}"
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise FileExistsError(error)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export (rank zero writes; every rank waits for it): the kept best weights with ``best``, else the last
        (EMA) ones."""
        ema = find_ema(trainer) if self.use_ema else None
        if trainer.is_global_zero:
            if self.kept is not None:
                context, steps = _holding(pl_module, self.kept), self.selected["step"]
            else:
                context = ema.swapped(pl_module) if ema is not None else contextlib.nullcontext()
                steps = trainer.global_step
            with context:
                path = export_module(
                    pl_module, self.out_dir, ema=ema is not None, num_steps=self.num_steps, eta=self.eta,
                    t_start=self.t_start, final_gamma=self.final_gamma, residual_renoise=self.residual_renoise,
                    steps=steps, data=_describe_data(trainer), selected=self.selected,
                )  # fmt: skip
            logger.info("exported the UD2M sampler to %s (%s)", path, self.selected or "last weights")
        trainer.strategy.barrier("ud2m-export")


@contextlib.contextmanager
def _holding(pl_module: pl.LightningModule, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Context in which the generator holds ``weights`` (the training weights are restored on exit)."""
    params = tracked_parameters(pl_module)
    with torch.no_grad():
        backup = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(backup[name])


def _describe_data(trainer: pl.Trainer) -> str:
    dm = getattr(trainer, "datamodule", None)
    if dm is None:
        return "unknown"
    source = getattr(dm, "train_shards", None) or getattr(dm, "root", None)
    return describe_data(type(dm).__name__, source)


def describe_data(class_name: str, source: Any) -> str:
    """The ``training.data`` entry of the manifest: ``"WebDatasetImages(<shards>)"``, or the class name alone."""
    return f"{class_name}({source})" if source is not None else class_name


def export_module(
    pl_module: pl.LightningModule,
    out_dir: str | Path,
    *,
    ema: bool,
    num_steps: int = 3,
    eta: float = 1.0,
    t_start: int | None = None,
    final_gamma: float | None = None,
    residual_renoise: bool | None = None,
    steps: int = 0,
    data: str = "unknown",
    config: Mapping[str, Any] | None = None,
    selected: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``pl_module.sampler`` with ``ud2m.export.export_checkpoint``, building the manifest sections of §9
    from the module (base-model reference from the LightningCLI config when present, operator, sampler, training).

    ``config`` is the module's parsed LightningCLI configuration (``class_path``/``init_args`` of ``sampler`` and
    ``operator``); it defaults to ``pl_module.hparams``, which hold it during ``fit``. A module rebuilt by
    ``load_from_checkpoint`` does not (its hyperparameters are the built objects, left out of ``hparams``), so
    ``train.py export`` passes the checkpoint's ``hyper_parameters``.
    """
    from ud2m.export import export_checkpoint

    hp = pl_module.hparams if config is None else config
    training = {
        "steps": int(steps),
        "seed": int(hp["seed"]),
        "l2_weighting": hp["l2_weighting"],
        "consistency_loss": hp.get("consistency_loss", "l2"),
        "loss_weights": {name: hp[f"omega_{name}"] for name in ("l2", "lpips", "adv", "gp")},
        "lpips_backbone": hp["perceptual_net"],
        "data": data,
        "prompt": hp.get("prompt"),
    }
    if selected is not None:  # ExportOnTrainEnd(best=...): the weights of the best validation, not the last
        training["selected"] = dict(selected)
    return Path(
        export_checkpoint(
            pl_module.sampler,
            out_dir,
            base_model=base_model_reference(pl_module, hp),
            operator=operator_reference(pl_module, hp),
            sampler=sampler_entry(
                num_steps,
                eta,
                t_start if t_start is not None else _trained_start(pl_module),
                final_gamma,
                residual_renoise,
            ),
            training=training,
            ema=ema,
        )
    )


def _trained_start(pl_module: pl.LightningModule) -> int | None:
    """The start a module trained only up to ``t_max < 999`` samples from (§7.6, §8 revisions), else None."""
    start = getattr(pl_module, "sampler_start", None)
    return start() if callable(start) else None


def sampler_entry(
    num_steps: int,
    eta: float,
    t_start: int | None = None,
    final_gamma: float | None = None,
    residual_renoise: bool | None = None,
) -> dict[str, Any]:
    """The manifest's ``sampler`` section (§9): N, the quadratic grid, η and, when set, the tuned start ``t_start``,
    the closing data step's weight ``final_gamma`` and the re-noise rule ``residual_renoise`` (§8 revisions)."""
    from ud2m.unfolded import check_final_gamma

    entry: dict[str, Any] = {"num_steps": int(num_steps), "grid": "quadratic", "eta": float(eta)}
    if t_start is not None:
        if not 1 <= t_start <= 999:  # refused before anything is written
            raise ValueError(f"t_start: expected a first sampler time in [1, 999] (None: 999), got {t_start}")
        entry["t_start"] = int(t_start)
    check_final_gamma(final_gamma)  # refused before anything is written
    if final_gamma is not None:
        entry["final_gamma"] = float(final_gamma)
    if residual_renoise is not None:
        entry["residual_renoise"] = bool(residual_renoise)
    return entry


def _config(value: Any) -> dict[str, Any]:
    """A ``{class_path, init_args}`` config as a plain dict (jsonargparse Namespaces included), else ``{}``."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return dict(value) if isinstance(value, dict) and "class_path" in value else {}


def base_model_reference(pl_module: pl.LightningModule, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``family`` (``"pixel"``/``"latent"``, as ``sample.py`` names them) and ``id_or_path``/``subfolder`` of the
    frozen prior from the LightningCLI config (``config``, default ``pl_module.hparams``; absolute when local, None
    without a config). ``ud2m.export`` fills the prediction type, dtype, scheduler and the SHA-256 of a local
    folder."""
    config = pl_module.hparams if config is None else config
    prior_cfg = _config(_config(config.get("sampler")).get("init_args", {}).get("prior"))
    args = prior_cfg.get("init_args", {}) or {}
    source = args.get("path_or_hub_id")
    if source is not None and Path(str(source)).expanduser().exists():
        source = str(Path(str(source)).expanduser().resolve())
    reference = {"family": "latent" if pl_module.sampler.latent else "pixel", "id_or_path": source}
    if args.get("subfolder") is not None:
        reference["subfolder"] = args["subfolder"]
    return reference


def operator_reference(pl_module: pl.LightningModule, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The training operator (or generator) as ``class_path``/``init_args`` plus ``sigma_y`` (§9), from the
    LightningCLI config (``config``, default ``pl_module.hparams``)."""
    hp = pl_module.hparams if config is None else config
    spec = _config(hp.get("operator"))
    if not spec and pl_module.operator is not None:
        cls = type(pl_module.operator)
        spec = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": None}
    sigma_y = hp["sigma_y"] if isinstance(hp["sigma_y"], int | float) else list(hp["sigma_y"])
    is_generator = not isinstance(pl_module.operator, torch.nn.Module) and pl_module.operator is not None
    return {**spec, "sigma_y": sigma_y, "generator": spec.get("class_path") if is_generator else None}
