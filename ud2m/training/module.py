r"""UD2M training wiring: the ``UnfoldedDistillation`` LightningModule (docs/method.md §7.5-7.8).

Implements one training step of UD2M (Mbakam et al., unfolded distillation of diffusion models) as fixed by §7.6:
per-sample diffusion times, the measurement simulated with the *same* operator object that the sampler's proxes,
``lift(y)`` and the logs use, one graph-keeping forward of the K-block sampler, then a discriminator update and a
generator update with manual optimisation (Lightning ``generative_adversarial_net.py`` pattern), global-norm
clipping of the generator, and a NaN/Inf guard that skips and counts a bad step instead of corrupting the weights.
Validation runs the full N-step sampler (§8) on fixed seeds and logs PSNR/SSIM (LPIPS only with a real backbone).

This module wires; the math lives in :mod:`ud2m.unfolded`, :mod:`ud2m.losses`, :mod:`ud2m.operators`.
Randomness comes from generators seeded by ``(seed, global_step, rank)``; global RNGs are never touched here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from ud2m.discriminator import conditioning
from ud2m.losses import UD2MLoss, discriminator_loss, gradient_penalty, l2_weight, lpips_loss
from ud2m.metrics import psnr, ssim
from ud2m.operators.base import Operator
from ud2m.operators.noise import measure
from ud2m.operators.random import OperatorGenerator, sample_sigma_y
from ud2m.perceptual import make_lpips
from ud2m.training.lightning_compat import cli_hyperparameters
from ud2m.unfolded import UnfoldedSampler, sample_ud2m
from ud2m.utils import rand, randn

logger = logging.getLogger(__name__)

T_MIN, T_MAX = 1, 999  # §7.6 step 1: t ~ U{1, ..., 999} per sample


LR_DECAYS = ("constant", "cosine")


def lr_factor(step: int, warmup_steps: int, decay: str, max_steps: int | None) -> float | None:
    """The learning-rate factor at ``step`` (0-based): linear warm-up over ``warmup_steps``, then 1 (``"constant"``)
    or half a cosine period down to 0 at ``max_steps`` (``"cosine"``); None when nothing changes the rates (constant,
    no warm-up). A cosine without a finite ``max_steps`` (-1 or None: an epoch-bounded run) is refused."""
    if decay == "constant" and warmup_steps <= 0:
        return None
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if max_steps is None or max_steps <= 0:
        raise ValueError("lr_decay='cosine' needs trainer.max_steps (the length of the decay)")
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def mix_seed(*values: int | str) -> int:
    """A 63-bit seed from an ordered tuple of values (stable across processes, unlike ``hash``).

    >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
    True
    """
    digest = hashlib.sha256("/".join(str(v) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class UnfoldedDistillation(pl.LightningModule):
    r"""Train a UD2M sampler (LoRA + learned scalars) against a conditional discriminator (docs/method.md §7.6).

    Generator loss :math:`\omega_{l2} L_{l2} + \omega_{ps} L_{ps} + \omega_{adv} L^G_{adv}` and discriminator loss
    :math:`L_D + \omega_{gp} GP` of §7.5, with the AdamW defaults of §7.7. One trainer step (``global_step``) is one
    generator update; the ``d_steps_per_g`` discriminator updates of a step do not advance it.

    Args:
        sampler: the unfolded sampler (frozen prior + LoRA + scalars); its :meth:`generator_parameters` are trained.
        discriminator: ``D(x, c) -> (B,)`` logits, or None for L2 (+ LPIPS) training only.
        operator: a fixed operator, a random operator generator (§2.7, one draw per step), or None when every
            batch is paired (carries ``y`` and ``params``, see :mod:`ud2m.training.data`).
        sigma_y: noise std on the [0, 1] scale: a float, or a ``(low, high)`` log-uniform range drawn per sample.
        consistency_loss: ``"energy"`` (default [ours]: the energy score of two samples drawn with independent
            re-noise, a proper scoring rule whose optimum is the conditional law, :func:`ud2m.losses.energy_score`;
            one extra K-block forward per step) or ``"l2"`` (the paper's conditional-consistency L2, whose optimum is
            the conditional mean; measured to collapse the sampler to the mean, §7.5).
        omega_l2: weight of the consistency loss (L2 or energy score).
        omega_lpips: weight of the LPIPS loss (0 disables it).
        omega_adv: weight of the generator's adversarial loss (0, or no discriminator, disables the GAN).
        omega_gp: weight of the zero-centred gradient penalty in the discriminator loss. Default 0.01, the
            reference's LSUN and MNIST value and every shipped config's; its ImageNet value 10 silences the
            discriminator on our problems (logits stay at 0: the Gaussian study equals its no-D row and the digits
            quick start loses 0.8 dB, README "Sampler design").
        l2_weighting: ``"max_snr1"`` (default [ours]: max(SNR_t, 1), √ of it on the energy score, so the score is
            measured in units of the conditional law's own spread at every t), ``"none"`` (the paper; the default
            until the Gaussian study measured its small-t blocks failing: with the discriminator W2 at N = 8 3.10
            against 0.80, README "Sampler design"), ``"snr"`` (reference code) or ``"min_snr"`` (§7.5); weights
            either consistency loss per sample.
        adv_weighting: ``"none"`` (paper) or ``"nu"`` [ours]: the generator's adversarial term weighted per sample
            by 1 − ᾱ_t (:func:`ud2m.losses.adv_weight`); the discriminator's own loss is unweighted.
        adv_loss: the generator's adversarial loss on D's logits, ``"non_saturating"`` (paper) or ``"minimax"``
            [ours: the option] (:func:`ud2m.losses.generator_adversarial`); D's own loss is the same BCE for both.
        perceptual_net: LPIPS backbone (``"vgg"`` for the UD2M loss).
        perceptual_weights: local path of the torchvision backbone weights (no download ever).
        allow_random_lpips: use a random-backbone LPIPS when no weights exist (plumbing only; logged as
            ``train/lpips_random_backbone = 1`` and never reported as ``val/lpips``).
        lr_g: generator learning rate.
        lr_d: discriminator learning rate.
        betas: AdamW betas of both optimisers.
        weight_decay_d: discriminator weight decay (the generator's groups carry their own, §7.7).
        warmup_steps: linear learning-rate warm-up length (0: constant).
        lr_decay: ``"constant"`` (default) or ``"cosine"`` [ours]: after the warm-up, both learning rates follow
            :math:`\tfrac12(1 + \cos(\pi s/S))` of their value, s the steps since the warm-up and S the rest of
            ``trainer.max_steps`` (the EMA then averages ever smaller updates).
        clip_norm: global gradient-norm clip of the generator (None: no clipping).
        d_steps_per_g: discriminator updates per generator update.
        adv_start_step: first step with the discriminator and adversarial loss (plain L2 + LPIPS before).
        adv_end_step: first step without them again (None: to the end) [ours]: the consistency loss alone finishes
            the training (docs/method.md §7.5).
        t_max: largest training time, ``t ~ U{1..t_max}`` (§7.6; default 999). A sampler started later
            (``sample_ud2m``'s ``t_start``, §8 revision [ours]) never calls its blocks above its start, so training
            can spend every step where it samples: with ``t_max < 999`` validation samples from ``t_start = t_max``
            and the export records it as the sampler's default start.
        val_num_steps: N of the validation sampler (§8).
        val_eta: DDIM eta of the validation sampler.
        prompt: text prompt of text-conditioned priors (None: the empty prompt); ignored by other priors.
        seed: base seed of every generator used in training and validation.
        ema_halflife_steps: add an :class:`ud2m.training.callbacks.EMA` callback with this half-life (None: off).
    """

    def __init__(
        self,
        sampler: UnfoldedSampler,
        discriminator: nn.Module | None = None,
        *,
        operator: Operator | OperatorGenerator | None = None,
        sigma_y: float | tuple[float, float] = 0.01,
        consistency_loss: Literal["energy", "l2"] = "energy",
        omega_l2: float = 1.0,
        omega_lpips: float = 0.1,
        omega_adv: float = 0.1,
        omega_gp: float = 0.01,
        l2_weighting: Literal["none", "snr", "min_snr", "max_snr1"] = "max_snr1",
        adv_weighting: Literal["none", "nu"] = "none",
        adv_loss: Literal["non_saturating", "minimax"] = "non_saturating",
        perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg",
        perceptual_weights: str | None = None,
        allow_random_lpips: bool = False,
        lr_g: float = 1e-4,
        lr_d: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay_d: float = 0.01,
        warmup_steps: int = 0,
        lr_decay: str = "constant",
        clip_norm: float | None = 1.0,
        d_steps_per_g: int = 1,
        adv_start_step: int = 0,
        adv_end_step: int | None = None,
        t_max: int = T_MAX,
        val_num_steps: int = 3,
        val_eta: float = 1.0,
        prompt: str | None = None,
        seed: int = 0,
        ema_halflife_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=_injected_objects(sampler=sampler, discriminator=discriminator, operator=operator)
        )
        _check_sigma_y(sigma_y)
        if d_steps_per_g < 1:
            raise ValueError(f"d_steps_per_g: expected an integer >= 1, got {d_steps_per_g}")
        if not T_MIN <= t_max <= T_MAX:
            raise ValueError(f"t_max: expected an integer in [{T_MIN}, {T_MAX}], got {t_max}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay: expected one of {LR_DECAYS}, got {lr_decay!r}")
        if adv_end_step is not None and adv_end_step <= adv_start_step:
            raise ValueError(
                f"adv_end_step: expected a step after adv_start_step = {adv_start_step}, got {adv_end_step}"
            )
        self.automatic_optimization = False
        self.sampler = sampler
        self.discriminator = discriminator if omega_adv > 0 else None
        _check_state_channels(self.discriminator, sampler)
        self.operator = operator
        self.perceptual = (
            make_lpips(perceptual_net, perceptual_weights, allow_random_backbone=allow_random_lpips)
            if omega_lpips > 0
            else None
        )
        self.generator_loss = UD2MLoss(
            consistency_loss,
            omega_l2=omega_l2,
            omega_lpips=omega_lpips,
            omega_adv=omega_adv,
            weighting=None if l2_weighting == "none" else functools.partial(l2_weight, kind=l2_weighting),
            adv_weighting=adv_weighting,
            adv_loss=adv_loss,
            perceptual=self.perceptual,
        )
        self.skipped_steps = 0
        self._cond: Any = None
        self._paired_ops: dict[str, Operator] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def configure_optimizers(self):
        """AdamW for the generator (LoRA wd 0.01, scalars wd 0, from the sampler) and the discriminator (§7.7)."""
        hp = self.hparams
        if hp.lr_decay == "cosine" and self._trainer is not None and not self.trainer.max_steps > 0:
            raise ValueError("lr_decay='cosine' needs trainer.max_steps (the length of the decay); got an open run")
        groups = self.sampler.generator_parameters()
        for group in groups:  # e.g. a learned initialiser trains at lr × 0.1 (§7.2)
            group["lr"] = hp.lr_g * group.get("lr_scale", 1.0)
        opt_g = torch.optim.AdamW(groups, lr=hp.lr_g, betas=tuple(hp.betas), eps=1e-8)
        if self.discriminator is None:
            return opt_g
        d_params = self.discriminator.parameters()
        opt_d = torch.optim.AdamW(d_params, lr=hp.lr_d, betas=tuple(hp.betas), weight_decay=hp.weight_decay_d)
        return [opt_g, opt_d]

    def configure_callbacks(self) -> list[pl.Callback]:
        """An EMA callback when ``ema_halflife_steps`` is set (it replaces an EMA given to the Trainer)."""
        if self.hparams.ema_halflife_steps is None:
            return []
        from ud2m.training.callbacks import EMA

        return [EMA(halflife_steps=self.hparams.ema_halflife_steps)]

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One UD2M step (§7.6): simulate, one sampler forward, D update(s), G update, log."""
        g = self._generator("train", self.global_step, self.skipped_steps)
        x0 = batch["x"]  # (B, C, H, W) on [-1, 1]
        op, sigma_y, y = self._measurement(batch, g)  # 3.
        t, x_t = self._diffuse(x0, g)  # 1.-2.
        x0_hat = self.sampler(x_t, t, y, op, sigma_y, cond=self._condition(), generator=g)  # 4. K blocks, graph kept
        x0_hat_2 = None
        if self.hparams.consistency_loss == "energy":  # a second sample of p(x0 | x_t, y): independent re-noise
            x0_hat_2 = self.sampler(x_t, t, y, op, sigma_y, cond=self._condition(), generator=g)
        c = self._d_condition(op, y, x_t, t, x0)  # identical for real and fake (§7.4)
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        logs: dict[str, Any] = {}
        adversarial = opt_d is not None and self._adversarial_at(self.global_step)
        self._set_learning_rates(opt_g, opt_d)
        logs["lr_g"] = opt_g.param_groups[0]["lr"]  # after warm-up: lr_g (the LoRA group; scalars use their scale)
        if opt_d is not None:
            logs["lr_d"] = opt_d.param_groups[0]["lr"]
        ok_d = True
        if adversarial:  # 5. D update on (x0, sg(x0_hat))
            for _ in range(self.hparams.d_steps_per_g):
                ok_d &= self._discriminator_update(opt_d, x0, x0_hat.detach(), c, g, logs)
        self.toggle_optimizer(opt_g)  # 6. G update, D frozen
        loss_g = self._generator_loss(x0, (x0_hat, x0_hat_2), c, t, adversarial, logs)
        ok_g = self._guarded_step(opt_g, loss_g, "g", logs, clip_norm=self.hparams.clip_norm, counted=True)
        self.untoggle_optimizer(opt_g)
        self.skipped_steps += int(not (ok_d and ok_g))
        self._log_train(logs, x0.shape[0])  # 7.

    def _adversarial_at(self, step: int) -> bool:
        """Whether step ``step`` trains the discriminator and uses the adversarial loss: ``adv_start_step <= step <
        adv_end_step``."""
        end = self.hparams.get("adv_end_step")
        return self.hparams.adv_start_step <= step and (end is None or step < end)

    def _diffuse(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """§7.6 steps 1-2: ``t ~ U{1..t_max}`` per sample and ``x_t = a_t z0 + b_t eps`` (latent priors:
        z0 = E(x0))."""
        prior = self.sampler.prior
        u = rand((x0.shape[0],), g, device=self.device)
        t_max = self.hparams.get("t_max", T_MAX)
        t = (T_MIN + torch.floor(u * (t_max - T_MIN + 1))).clamp(T_MIN, t_max)  # (B,) integer-valued floats
        with torch.no_grad():  # the clean target needs no graph
            z0 = prior.encode(x0)
        eps = randn(z0.shape, g, device=self.device, dtype=z0.dtype)
        return t, prior.add_noise(z0, t, eps)

    def _measurement(self, batch: dict[str, Any], g: torch.Generator) -> tuple[Operator, torch.Tensor, torch.Tensor]:
        """``(op, sigma_y (B,), y)``: the stored pair of a paired batch, else ``y = measure(op, x0, sigma_y)``."""
        x0 = batch["x"]
        if "y" in batch:
            return self._paired(batch)
        op = self.operator
        if op is None:
            raise ValueError("UnfoldedDistillation: operator is None but the batch carries no stored 'y' (paired data)")
        if isinstance(op, OperatorGenerator):
            op = op(x0.shape[0], tuple(x0.shape[-2:]), g, self.device)
        sigma_y = self._sigma_y(x0.shape[0], g)
        with torch.autocast(device_type=self.device.type, enabled=False):  # operators run in fp32 (§1.4)
            return op, sigma_y, measure(op, x0.float(), sigma_y, g)

    def _sigma_y(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        """Fixed ``sigma_y`` or a per-sample log-uniform draw (§2.7), ``(B,)``."""
        s = self.hparams.sigma_y
        if isinstance(s, int | float):
            return torch.full((batch_size,), float(s), device=self.device)
        return sample_sigma_y(batch_size, g, float(s[0]), float(s[1]), device=self.device)

    def _paired(self, batch: dict[str, Any]) -> tuple[Operator, torch.Tensor, torch.Tensor]:
        """Operator rebuilt from the shard's ``params`` (one shared spec per batch) and the stored ``y``."""
        from ud2m.operators.presets import instantiate_operator

        if any("operator" not in p for p in batch["params"]):  # make_shards.py --simulate: a degradation per sample
            task = next(p.get("simulate") for p in batch["params"] if "operator" not in p)
            raise ValueError(
                f"paired batch from `make_shards.py --simulate {task}` shards: every sample has its own random "
                "degradation, and UD2M needs one known operator per batch; write the shards with --operator, or "
                "train on the clean images (degraded on the fly)"
            )
        specs = {json.dumps(p["operator"], sort_keys=True) for p in batch["params"]}
        if len(specs) != 1:
            raise ValueError(
                f"paired batch mixes {len(specs)} operator specifications; write one operator per shard set"
            )
        (spec,) = specs
        if spec not in self._paired_ops:
            self._paired_ops[spec] = instantiate_operator(json.loads(spec), source="paired shard").to(self.device)
        sigma_y = torch.tensor([float(p["sigma_y"]) for p in batch["params"]], device=self.device)
        return self._paired_ops[spec], sigma_y, batch["y"].float()

    def _d_condition(self, op, y, x_t, t, x0) -> torch.Tensor | None:
        """The discriminator's conditioning (``lift(y)``, and ``x_t`` and ``t`` by default), §7.4 revision."""
        if self.discriminator is None:
            return None
        condition = getattr(self.discriminator, "condition", ("y",))
        with torch.autocast(device_type=self.device.type, enabled=False):  # operators run in fp32 (§1.4)
            lift_y = op.lift(y.float())
        return conditioning(condition, lift_y=lift_y, x_t=x_t, t=t, size=tuple(x0.shape[-2:]))

    def _discriminator(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``D(x, c)`` in fp32 with autocast disabled (§1.4)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.discriminator(x.float(), c.float())

    def _discriminator_update(self, opt_d, x0, x0_hat, c, g, logs: dict) -> bool:
        """§7.6 step 5: ``L_D + omega_gp GP`` on ``(x0, sg(x0_hat))``; returns False when the step was skipped."""
        self.toggle_optimizer(opt_d)
        d_real, d_fake = self._discriminator(x0, c), self._discriminator(x0_hat, c)
        gp = gradient_penalty(self._discriminator, x0, x0_hat, c, generator=g)
        loss_d = discriminator_loss(d_real, d_fake).mean() + self.hparams.omega_gp * gp.mean()
        logs.update({"d_real": d_real.mean(), "d_fake": d_fake.mean(), "gp": gp.mean(), "loss_d": loss_d})
        ok = self._guarded_step(opt_d, loss_d, "d", logs, clip_norm=None, counted=False)
        self.untoggle_optimizer(opt_d)
        return ok

    def _generator_loss(self, x0, samples, c, t, adversarial: bool, logs: dict) -> torch.Tensor:
        r""":class:`~ud2m.losses.UD2MLoss` (§7.5) on ``samples = (x0_hat, x0_hat_2)`` (the second is None with the L2
        loss); its terms go to ``logs``."""
        x0_hat, x0_hat_2 = samples
        alpha_bar = 1 - self.sampler.prior.schedule.nu(t)  # VP-equivalent ᾱ_t for every family
        d_fake = self._discriminator(x0_hat, c) if adversarial else None
        loss, terms = self.generator_loss(x0_hat, x0_hat_2, x0, alpha_bar, d_fake)
        logs.update(terms)
        return loss

    def _guarded_step(self, opt, loss: torch.Tensor, name: str, logs: dict, *, clip_norm, counted: bool) -> bool:
        """Backward, NaN/Inf guard, optional clipping and the optimiser step; False when the step was skipped.

        The decision is reduced over ranks (any rank bad -> every rank skips), so DDP replicas stay identical.
        ``counted=False`` steps through the strategy (precision plugin included) without advancing
        ``global_step``, so that one trainer step is one generator update.
        """
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        logs[f"grad_norm_{name}"] = norm
        bad = not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            opt.zero_grad(set_to_none=True)
            logger.warning("step %d: non-finite %s loss or gradient; update skipped", self.global_step, name)
            return False
        if clip_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=clip_norm, gradient_clip_algorithm="norm")
        if counted:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)
        return True

    def _set_learning_rates(self, opt_g, opt_d) -> None:
        """Linear warm-up, then the ``lr_decay`` rule, from the step count (stateless, so a resumed run gets the same
        rates)."""
        factor = lr_factor(self.global_step, self.hparams.warmup_steps, self.hparams.lr_decay, self.trainer.max_steps)
        if factor is None:
            return
        for opt, lr in ((opt_g, self.hparams.lr_g), (opt_d, self.hparams.lr_d)):
            for group in [] if opt is None else opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0) * factor

    def _log_train(self, logs: dict[str, Any], batch_size: int) -> None:
        """``train/*`` losses, gradient norms, learned scalars, skipped steps and skipped (corrupt) samples."""
        for name, value in self.sampler.scalars().items():
            value = torch.as_tensor(value).detach().float()
            logs[name] = value.mean()
            if value.ndim == 1 and value.numel() > 1:  # untied constants: one per block
                logs.update({f"{name}/block_{k}": v for k, v in enumerate(value)})
            elif value.ndim == 2:  # time tables (time_knots > 1): one value per (block row, knot)
                logs.update({f"{name}/row_{k}_knot_{j}": v for (k, j), v in _indexed(value)})
        logs["skipped_steps"] = float(self.skipped_steps)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "skipped_samples"):  # corrupt shard members skipped by the data module
            logs["skipped_samples"] = float(datamodule.skipped_samples)
        logs = {f"train/{k}": (v.detach().float() if torch.is_tensor(v) else float(v)) for k, v in logs.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """Full N-step sampler on fixed seeds; ``val/psnr``, ``val/ssim`` (``val/lpips`` with a real backbone)."""
        return self._common_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """As :meth:`validation_step`, logged under ``test/``."""
        return self._common_step(batch, batch_idx, "test")

    def sampler_start(self) -> int | None:
        """The sampler's start implied by the training times: ``t_max`` when below 999, else None (from noise)."""
        t_max = int(self.hparams.get("t_max", T_MAX))
        return t_max if t_max < T_MAX else None

    def _common_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> dict[str, Any] | None:
        """Sample with N steps (§8); return images (x, lifted y, x_hat, per-block iterates) for batch 0."""
        g = self._generator(stage, batch_idx)  # same seeds at every evaluation
        x0 = batch["x"]
        op, sigma_y, y = self._measurement(batch, g)
        iterates: list[dict] = []
        x_hat = sample_ud2m(
            self.sampler, op, y, sigma_y, x_shape=tuple(x0.shape), num_steps=self.hparams.val_num_steps,
            eta=self.hparams.val_eta, t_start=self.sampler_start(), cond=self._condition(), generator=g,
            callback=iterates.append if batch_idx == 0 else None,
        )  # fmt: skip
        metrics = {f"{stage}/psnr": psnr(x_hat, x0).mean(), f"{stage}/ssim": ssim(x_hat, x0).mean()}
        if self.perceptual is not None and not self.perceptual.random_backbone:
            metrics[f"{stage}/lpips"] = lpips_loss(self.perceptual, x_hat.clamp(-1, 1), x0).mean()
        self.log_dict(metrics, sync_dist=True, batch_size=x0.shape[0])
        if batch_idx != 0:
            return None
        return {"x": x0, "y": op.lift(y), "x_hat": x_hat, "iterates": iterates}

    # ------------------------------------------------------------------------------------------------ state
    def _condition(self) -> Any:
        """Prompt embedding of text-conditioned priors (computed once, frozen encoders), None otherwise."""
        prior = self.sampler.prior
        if not getattr(prior, "text_encoders", None):
            return None
        if self._cond is None:
            with torch.no_grad():
                self._cond = prior.encode_prompt(self.hparams.prompt or "")
        return self._cond.to(device=self.device)

    def _generator(self, *key: int | str) -> torch.Generator:
        """A generator on this device seeded by ``(seed, key..., rank)``."""
        seed = mix_seed(self.hparams.seed, *key, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def frozen_parameter_names(self) -> set[str]:
        """Names (state-dict keys) of the frozen parameters: the base prior and the LPIPS net."""
        return {name for name, p in self.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base weights (rebuilt from the config on load) and keep the skipped-step count."""
        frozen = self.frozen_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["ud2m"] = {"skipped_steps": self.skipped_steps, "frozen_omitted": sorted(frozen)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the omitted frozen weights from this (config-built) model, so loading stays strict for everything
        else; restore the skipped-step count."""
        state = checkpoint["state_dict"]
        for name, p in self.named_parameters():
            if not p.requires_grad and name not in state:
                state[name] = p.detach()
        self.skipped_steps = int(checkpoint.get("ud2m", {}).get("skipped_steps", 0))


def _injected_objects(**objects: Any) -> list[str]:
    """Names of injected objects to keep out of ``hparams`` (no pickled modules in checkpoints).

    Under LightningCLI the hyperparameters are the parsed config (``class_path``/``init_args``), which is what
    ``load_from_checkpoint`` needs, so nothing is ignored there.
    """
    if cli_hyperparameters() is not None:
        return []
    return [name for name, obj in objects.items() if obj is not None]


def _indexed(table: torch.Tensor):
    """``((row, column), value)`` pairs of a 2-d tensor."""
    return [((k, j), table[k, j]) for k in range(table.shape[0]) for j in range(table.shape[1])]


def _check_state_channels(discriminator: nn.Module | None, sampler: UnfoldedSampler) -> None:
    """A discriminator conditioned on x_t must be built for the prior's state channels (latents of latent priors)."""
    if discriminator is None or "x_t" not in getattr(discriminator, "condition", ()):
        return
    C, (H, W) = discriminator.in_channels, discriminator.image_size
    state = sampler.prior.latent_shape((1, C, H, W))[1]
    if state != discriminator.state_channels:
        raise ValueError(
            f"discriminator: conditioned on x_t, which has {state} channels for this prior, but it was built for "
            f"{discriminator.state_channels}; set the discriminator's state_channels: {state}"
        )


def _check_sigma_y(sigma_y: float | tuple[float, float]) -> None:
    if isinstance(sigma_y, int | float):
        if sigma_y < 0:
            raise ValueError(f"sigma_y: expected >= 0, got {sigma_y}")
        return
    if len(sigma_y) != 2 or not 0 < sigma_y[0] <= sigma_y[1]:
        raise ValueError(f"sigma_y: expected a float or a range (low, high) with 0 < low <= high, got {sigma_y}")
