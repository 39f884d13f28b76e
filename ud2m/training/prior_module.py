r"""Training a pixel diffusion prior on your own domain (issue "[quickstart]", "Base priors trained by the project").

Owns :class:`DiffusionPriorTraining`, the LightningModule of the denoising objective of Ho et al. (2020, DDPM,
Algorithm 1 and Eq. 14): per sample :math:`t \sim \mathcal U\{0,\dots,T-1\}`, :math:`\varepsilon\sim\mathcal N(0,I)`,
:math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon` and
:math:`L = \lVert f_\theta(x_t, t) - \text{target}\rVert^2` with the target :math:`\varepsilon`, :math:`v` or
:math:`x_0` (``prediction_type``, diffusers names); the validation sampler (DDIM, Song et al. 2021, :math:`\eta=0`);
the export to a diffusers ``DDIMPipeline`` folder (:meth:`DiffusionPriorTraining.save_pretrained`,
:class:`SavePriorOnTrainEnd`) that :meth:`ud2m.priors.pixel.PixelDiffusionPrior.from_pretrained` loads, so a UD2M
sampler can then be distilled on it; and :class:`PriorCLI`, the LightningCLI of this module.

The schedule tables come from :class:`ud2m.priors.vp.VPSchedule` (exactly diffusers' float32 :math:`\bar\alpha`),
the x0 conversion from :func:`ud2m.priors.base.x0_from_prediction` and the DDIM update from
:func:`ud2m.solvers.steps.ddim_step`, so the trained network is read exactly as the prior wrapper reads it.
Randomness comes from generators seeded by ``(seed, global_step, rank)``; global RNGs are never touched here.

Run (docs/prior_training.md)::

    python train.py prior fit --config configs/priors/digits.yaml
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from ud2m.priors.base import x0_from_prediction
from ud2m.priors.vp import VPSchedule
from ud2m.solvers.steps import ddim_step
from ud2m.training.base_cli import ModuleCLI, parser_kwargs
from ud2m.training.callbacks import EMA, ema_from_checkpoint, find_ema
from ud2m.training.module import _injected_objects, mix_seed
from ud2m.utils import append_dims, copy_safetensors_into, rand, randn

logger = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction", "sample"]
#: β end points of diffusers' schedules (Ho et al. linear; the Stable Diffusion "scaled_linear").
SUBCOMMANDS = ("fit", "validate", "test", "predict")
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


# ------------------------------------------------------------------------------------------------ pure math
def diffusion_target(
    x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    r"""Regression target of the network for :math:`x_t = a_t x_0 + b_t\varepsilon` (VP: :math:`a_t^2+b_t^2=1`).

    ``epsilon``: :math:`\varepsilon` (Ho et al. 2020, Eq. 14); ``v_prediction``: :math:`v = a_t\varepsilon - b_t x_0`
    (Salimans & Ho 2022); ``sample``: :math:`x_0`. Inverse of :func:`ud2m.priors.base.x0_from_prediction`.

    Args:
        x0: clean images ``(B, C, H, W)``.
        eps: the noise ``(B, C, H, W)``.
        a_t, b_t: ``(B,)`` scales.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return append_dims(a_t, eps.ndim) * eps - append_dims(b_t, x0.ndim) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")


def ddim_timesteps(num_steps: int, num_train_timesteps: int) -> list[int]:
    """Decreasing DDIM grid with diffusers' ``leading`` spacing, e.g. 20 of 1000: ``[950, 900, ..., 50, 0]``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps: expected 1 <= num_steps <= {num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    return [k * stride for k in reversed(range(num_steps))]


def sample_ddim(
    predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: VPSchedule,
    shape: Sequence[int],
    *,
    num_steps: int = 20,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Unconditional DDIM sampling (Song et al. 2021, Eq. 12) from :math:`x_{t_0}\sim\mathcal N(0, I)`.

    At each grid time :math:`t_k`: :math:`\hat x_0 = \text{predict\_x0}(x, t_k)`, then
    :func:`ud2m.solvers.steps.ddim_step` to :math:`t_{k+1}`; the last grid point (:math:`t=0`) returns
    :math:`\hat x_0`. No ``no_grad`` here: callers choose (Lightning validation already runs without grad).

    Args:
        predict_x0: ``(x (B, C, H, W), t (B,)) -> x0_hat``.
        schedule: the VP schedule of the network.
        shape: ``(B, C, H, W)``.
        num_steps: DDIM steps (network calls).
        eta: DDIM stochasticity (0: deterministic given the initial noise).
        generator: a generator or a list of B generators (§1.5).
        device: device of the samples.

    Returns:
        ``(B, C, H, W)`` samples.
    """
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps)
    x = randn(shape, generator, device=device)  # (B, C, H, W)
    B = x.shape[0]
    for k, t in enumerate(ts):
        t_b = torch.full((B,), float(t), device=x.device)
        x0_hat = predict_x0(x, t_b)
        if k == len(ts) - 1:  # t = 0: the clean estimate is the sample
            return x0_hat
        a, b = schedule.scales(t_b)
        a_next, b_next = schedule.scales(torch.full((B,), float(ts[k + 1]), device=x.device))
        xi = randn(shape, generator, device=x.device) if eta > 0 else torch.zeros_like(x)
        x = ddim_step(x, x0_hat, a=a, b=b, a_next=a_next, b_next=b_next, eta=eta, xi=xi)
    return x


# ------------------------------------------------------------------------------------------------ optimisation
class AdamWWarmup:
    """The optimisation of the prior modules (:class:`DiffusionPriorTraining`, and the consistency distillation of
    :mod:`ud2m.training.consistency_module`): AdamW on ``self.unet`` with a per-step linear warm-up, global-norm
    clipping at ``clip_norm`` and an EMA callback when ``ema_halflife_steps`` is set (the module's hyperparameters
    ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``clip_norm``, ``ema_halflife_steps``); logs ``train/lr``.
    Mix in before ``pl.LightningModule``."""

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW plus a per-step linear warm-up (``LambdaLR``, resumed exactly from the checkpoint)."""
        hp = self.hparams
        opt = torch.optim.AdamW(self.unet.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        warmup = max(int(hp.warmup_steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log ``train/lr``, the learning rate of this step (warm-up included)."""
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping at ``clip_norm`` unless the Trainer sets ``gradient_clip_val``."""
        value = gradient_clip_val if gradient_clip_val is not None else self.hparams.clip_norm
        if value is not None:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_callbacks(self) -> list[pl.Callback]:
        """An EMA callback when ``ema_halflife_steps`` is set (it replaces an EMA given to the Trainer)."""
        if self.hparams.ema_halflife_steps is None:
            return []
        return [EMA(halflife_steps=self.hparams.ema_halflife_steps)]


# ------------------------------------------------------------------------------------------------ warm start
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_unet_weights(path: str | Path, unet: torch.nn.Module) -> Path:
    """Copy an exported prior's UNet weights into ``unet`` (in place) and return the file read.

    ``path``: a prior folder (``unet/diffusion_pytorch_model.safetensors`` inside), its ``unet/`` folder or the
    ``.safetensors`` file. Read with safetensors (no unpickling). Every tensor must match by name and shape.

    Raises:
        FileNotFoundError: naming the path, when no weights file is there.
        ValueError: naming the file and the first missing, unexpected or differently shaped tensor.
    """
    path = Path(path)
    candidates = [path] if path.suffix == ".safetensors" else [path / "unet" / UNET_WEIGHTS, path / UNET_WEIGHTS]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"init_from: no UNet weights at {path} (looked for {', '.join(map(str, candidates))})")
    try:
        copy_safetensors_into(unet.state_dict(), file, what="this UNet")
    except ValueError as err:
        raise ValueError(f"init_from: {err}") from None
    logger.info("init_from: started from the weights of %s", file)
    return file


# ------------------------------------------------------------------------------------------------ the module
class DiffusionPriorTraining(AdamWWarmup, pl.LightningModule):
    r"""Train a pixel ``UNet2DModel`` with the DDPM objective (Ho et al. 2020, Algorithm 1) and export it.

    Loss per sample: :math:`\lVert f_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t) -
    \text{target}\rVert^2` averaged over pixels (:func:`diffusion_target`), batch mean, AdamW with a linear warm-up,
    global-norm gradient clipping. Validation logs ``val/loss`` at fixed times ``val_timesteps`` with fixed noise and
    returns ``{"x", "x_hat"}`` (held-out images, DDIM samples from fixed seeds) for
    :class:`ud2m.training.callbacks.ImageLogger`. With :class:`ud2m.training.callbacks.EMA` (``ema_halflife_steps``)
    validation and export use the EMA weights.

    Args:
        unet: the network (``out_channels == in_channels``); injected with ``class_path`` in configs.
        beta_schedule: diffusers β schedule (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``).
        beta_start, beta_end: β end points (None: the usual values of ``beta_schedule``).
        num_train_timesteps: :math:`T`.
        prediction_type: what the network predicts (``epsilon``, ``v_prediction``, ``sample``).
        lr: AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up length in optimiser steps (0: constant).
        clip_norm: global gradient-norm clip (None: off; a Trainer ``gradient_clip_val`` takes precedence).
        ema_halflife_steps: EMA half-life in steps (EDM form, :class:`~ud2m.training.callbacks.EMA`); None: off.
        val_timesteps: fixed times of ``val/loss`` (sample ``i`` of a batch uses ``val_timesteps[i % len]``).
        val_num_samples: DDIM samples drawn at each validation (batch 0).
        val_num_steps: DDIM steps of the validation samples.
        seed: base seed of every generator used in training and validation.
        init_from: start from the weights of an exported prior instead of ``unet``'s initialisation: a prior folder
            (``DDIMPipeline`` layout, as :meth:`save_pretrained` writes), its ``unet/`` folder or the ``.safetensors``
            file itself (:func:`load_unet_weights`); the optimiser, the EMA and the step count start afresh. Use
            another ``seed`` (and data seed) than the first run's, or the continuation replays its draws.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        *,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        beta_start: float | None = None,
        beta_end: float | None = None,
        num_train_timesteps: int = 1000,
        prediction_type: PredictionType = "epsilon",
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        clip_norm: float | None = 1.0,
        ema_halflife_steps: int | None = 1000,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        val_num_samples: int = 16,
        val_num_steps: int = 20,
        seed: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=_injected_objects(unet=unet))
        if unet.config.out_channels != unet.config.in_channels:
            raise ValueError(
                f"unet: expected out_channels == in_channels ({unet.config.in_channels}), got "
                f"{unet.config.out_channels} (learned variance is not trained here)"
            )
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")
        bad_t = [t for t in val_timesteps if not 0 <= t < num_train_timesteps]
        if bad_t:
            raise ValueError(f"val_timesteps: expected integers in [0, {num_train_timesteps - 1}], got {bad_t}")
        if init_from is not None:
            load_unet_weights(init_from, unet)
        self.unet = unet
        self.schedule = VPSchedule.from_config(self.scheduler_config())

    # ------------------------------------------------------------------------------------------------ schedule
    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers ``DDIMScheduler`` config of this prior (written to ``scheduler/`` on export)."""
        hp = self.hparams
        start, end = BETA_RANGES.get(hp.beta_schedule, (1e-4, 0.02))
        scheduler = DDIMScheduler(
            num_train_timesteps=hp.num_train_timesteps,
            beta_schedule=hp.beta_schedule,
            beta_start=start if hp.beta_start is None else hp.beta_start,
            beta_end=end if hp.beta_end is None else hp.beta_end,
            prediction_type=hp.prediction_type,
            clip_sample=True,  # diffusers' DDPM default: DDIMPipeline clips x0_hat to the data range [-1, 1]
        )
        return dict(scheduler.config)

    # ------------------------------------------------------------------------------------------------ math wiring
    def network(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output ``f_theta(x_t, t)`` for ``(B, C, H, W)`` and ``(B,)`` float times."""
        return self.unet(x_t, t).sample

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""Clean estimate :math:`\hat x_0(x_t, t)`, read exactly as :class:`PixelDiffusionPrior` reads the net."""
        t = t.to(torch.float64 if x_t.dtype == torch.float64 else torch.float32)
        a_t, b_t = self.schedule.scales(t)
        return x0_from_prediction(x_t, self.network(x_t, t), a_t, b_t, self.hparams.prediction_type)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r"""Per-sample DDPM loss ``(B,)``: pixel mean of :math:`(f_\theta(x_t, t) - \text{target})^2`.

        Args:
            x0: clean images ``(B, C, H, W)`` on [-1, 1].
            t: integer-valued times ``(B,)`` in ``[0, T-1]``.
            eps: noise ``(B, C, H, W)``.
        """
        t = t.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
        a_t, b_t = self.schedule.scales(t)  # (B,) sqrt(abar_t), sqrt(1 - abar_t)
        x_t = append_dims(a_t, x0.ndim) * x0 + append_dims(b_t, x0.ndim) * eps  # Ho et al. Eq. 4
        target = diffusion_target(x0, eps, a_t, b_t, self.hparams.prediction_type)
        return (self.network(x_t, t) - target).pow(2).flatten(1).mean(1)

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Algorithm 1 of Ho et al. (2020): draw ``t`` and ``eps`` per sample, regress, log ``train/loss``."""
        x0 = batch["x"]  # (B, C, H, W) on [-1, 1]
        g = self._generator("train", self.global_step)
        T = self.hparams.num_train_timesteps
        t = (rand((x0.shape[0],), g, device=self.device) * T).floor().clamp(max=T - 1)  # 2. t ~ U{0..T-1}
        eps = randn(x0.shape, g, device=self.device, dtype=x0.dtype)  # 3. eps ~ N(0, I)
        loss = self.loss(x0, t, eps).mean()  # 4. gradient step on the MSE
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        """``val/loss`` at the fixed ``val_timesteps`` with fixed noise; DDIM samples for batch 0."""
        x0 = batch["x"]
        B = x0.shape[0]
        g = self._generator("val", batch_idx)  # same noise at every validation
        val_t = torch.tensor(self.hparams.val_timesteps, device=self.device)
        t = val_t.repeat(B // val_t.numel() + 1)[:B]  # sample i at val_timesteps[i % len]
        eps = randn(x0.shape, g, device=self.device, dtype=x0.dtype)
        self.log("val/loss", self.loss(x0, t, eps).mean(), sync_dist=True, batch_size=B)
        if batch_idx != 0 or self.hparams.val_num_samples <= 0:
            return None
        return {"x": x0, "x_hat": self.sample(self.hparams.val_num_samples, tuple(x0.shape[1:]))}

    def sample(self, num_samples: int, image_shape: tuple[int, int, int], *, seed: int | None = None) -> torch.Tensor:
        """``num_samples`` DDIM samples (``val_num_steps`` steps, eta 0), sample ``i`` from seed ``(seed, i)``."""
        seed = self.hparams.seed if seed is None else seed
        gens = [torch.Generator(self.device).manual_seed(mix_seed(seed, "sample", i)) for i in range(num_samples)]
        shape = (num_samples, *image_shape)
        return sample_ddim(
            self.predict_x0, self.schedule, shape, num_steps=self.hparams.val_num_steps, generator=gens,
            device=self.device,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | Path, ema: EMA | None = None) -> Path:
        """Write a diffusers ``DDIMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``).

        Loadable by ``PixelDiffusionPrior.from_pretrained(folder)`` and ``DDIMPipeline.from_pretrained(folder)``.

        Args:
            folder: destination (created).
            ema: an :class:`EMA` callback whose weights are exported instead of the training weights.

        Returns:
            ``folder`` as a ``Path``.
        """
        with ema.swapped(self) if ema is not None and ema.shadow is not None else contextlib.nullcontext():
            unet = copy.deepcopy(self.unet).cpu().eval()
        if unet.dtype != torch.float32:  # exports are fp32 (PixelDiffusionPrior.from_pretrained chooses the dtype)
            unet = unet.float()
        DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(self.scheduler_config())).save_pretrained(folder)
        return Path(folder)

    def _generator(self, *key: int | str) -> torch.Generator:
        """A generator on this device seeded by ``(seed, key..., rank)``."""
        seed = mix_seed(self.hparams.seed, *key, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)


class SavePriorOnTrainEnd(pl.Callback):
    """Export the trained prior (:meth:`DiffusionPriorTraining.save_pretrained`) when ``fit`` ends, on rank zero.

    Args:
        out_dir: destination diffusers folder.
        use_ema: export the EMA weights when an :class:`EMA` callback is present.
    """

    def __init__(self, out_dir: str, use_ema: bool = True) -> None:
        self.out_dir, self.use_ema = out_dir, use_ema

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export (rank zero writes; every rank waits for it)."""
        ema = find_ema(trainer) if self.use_ema else None
        if trainer.is_global_zero:
            path = pl_module.save_pretrained(self.out_dir, ema=ema)
            logger.info("saved the prior (%s weights) to %s", "EMA" if ema is not None else "training", path)
        trainer.strategy.barrier("ud2m-save-prior")


def export_prior(ckpt: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Export a ``.ckpt`` written by :class:`PriorCLI` (or by ``prior distil``) to a diffusers folder (EMA weights
    when saved and wanted).

    Args:
        ckpt: a Lightning checkpoint of :class:`DiffusionPriorTraining` (LightningCLI stores the UNet config) or of
            :class:`~ud2m.training.consistency_module.ConsistencyDistillation`.
        out: destination folder.
        use_ema: use the EMA shadow weights of the checkpoint when present.
    """
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if "teacher" in checkpoint.get("hyper_parameters", {}):  # a consistency distillation (`prior distil`)
        from ud2m.training.consistency_module import export_distilled

        return export_distilled(str(ckpt), str(out), use_ema=use_ema)
    # the checkpoint holds the weights: a run's init_from (its start) need not exist any more
    model = DiffusionPriorTraining.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, init_from=None)
    return model.save_pretrained(out, ema=ema_from_checkpoint(checkpoint) if use_ema else None)


# ------------------------------------------------------------------------------------------------ CLI
class PriorCLI(ModuleCLI):
    """``LightningCLI(DiffusionPriorTraining, <any LightningDataModule>)`` with a ``checkpoint`` section.

    The data's ``channels`` and ``image_size`` are linked to the UNet's ``in_channels``/``out_channels`` and
    ``sample_size``, so a config states them once (in ``data``).

    Args:
        args: command-line style list or a dict config (``None``: ``sys.argv``).
        run: run the subcommand (``False``: only parse and instantiate).
        **kwargs: further ``LightningCLI`` arguments.
    """

    module_class = DiffusionPriorTraining  # owns AdamW + warm-up
    data_links = (
        ("data.init_args.channels", "model.unet.init_args.in_channels"),
        ("data.init_args.channels", "model.unet.init_args.out_channels"),
        ("data.init_args.image_size", "model.unet.init_args.sample_size"),
    )


def main(args: list[str] | None = None) -> None:
    """``export --ckpt C --out O`` runs :func:`export_prior`, ``card ...`` :func:`~ud2m.training.prior_card.write_card`,
    ``distil [fit|validate|...] ...`` the consistency distillation
    (:class:`~ud2m.training.consistency_module.DistilCLI`); anything else goes to :class:`PriorCLI`."""
    import sys

    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["distil"]:  # consistency distillation (docs/method.md §3.3); `fit` is the default subcommand
        from ud2m.training.consistency_module import DistilCLI

        rest = argv[1:]
        if args is None:  # the words are passed explicitly below: LightningCLI must not also read sys.argv
            sys.argv = sys.argv[:1]
        DistilCLI(args=rest if rest[:1] and rest[0] in SUBCOMMANDS else ["fit", *rest])
        return
    if argv[:1] == ["export"]:
        from jsonargparse import auto_cli

        auto_cli(export_prior, args=argv[1:], **parser_kwargs())
        return
    if argv[:1] == ["card"]:
        from jsonargparse import auto_cli

        from ud2m.training.prior_card import write_card

        auto_cli(write_card, args=argv[1:], as_positional=False, **parser_kwargs())
        return
    PriorCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    # re-import under the package name so that checkpoints record ud2m.training.prior_module, not __main__
    from ud2m.training.prior_module import main as _main

    _main()
