r"""Consistency distillation of a pixel prior (docs/method.md §3.3; issue [consistency]).

Owns :class:`ConsistencyDistillation`, the LightningModule that turns any pixel prior of the contract (a DDPM
ε / v / x0 ``UNet2DModel``, e.g. the shipped ``digits`` and ``photos`` priors) into a **consistency model**:
one call maps a noisy input to a clean *sample*, not to the Tweedie mean. LCM-style consistency distillation
(Song et al. 2023, Algorithm 2; Luo et al. 2023, LCM):

* skip-step grid :math:`t_0 = 0 < t_1 < \dots < t_N = T-1` with :math:`t_n = nk - 1`, :math:`k = T/N`
  (:func:`consistency_grid`; the grid diffusers' ``LCMScheduler`` samples on with ``original_inference_steps=N``);
* per sample :math:`n \sim \mathcal U\{1..N\}`, :math:`z = a_{t_n}x_0 + b_{t_n}\varepsilon`; one teacher DDIM step
  (η = 0) :math:`z \to \hat z` at :math:`t_{n-1}`;
* student :math:`f_\theta(z, t) = c_\text{skip}(t) z + c_\text{out}(t)\hat x_{0,\theta}(z, t)` (LCM boundary
  scalings, :func:`ud2m.priors.base.cm_boundary_scalings`), initialised from the teacher;
* loss :math:`d(f_\theta(z, t_n), \mathrm{sg}\,f_{\theta^-}(\hat z, t_{n-1}))` with :math:`\theta^-` an EMA of
  :math:`\theta` (``target="ema"``, μ = ``target_decay``) or :math:`\theta` itself (``target="self"``, improved
  consistency training), :math:`d` the pseudo-Huber distance :math:`\sqrt{\lVert a-b\rVert^2 + c^2} - c`,
  :math:`c = 0.00054\sqrt{\dim}` (Song & Dhariwal 2023), or the squared L2 distance per pixel.

Three network calls per step (student with backward, teacher, target).

``method="trajectory"`` [ours; docs/method.md §3.3 revision] regresses the student directly onto the end point of the
teacher's probability-flow ODE: M trajectories of the teacher's DDIM on the grid (η = 0, clipped x̂0, the sampler of
the teacher's own data card) are computed once from fixed seeds (M·N teacher calls, batched, no gradient), and each
step draws (trajectory m, grid point n) pairs: :math:`d(f_\theta(z^m_{t_n}, t_n), x^m_\text{end})`. This is the
consistency function by definition (f maps every point of a trajectory to its origin; Song et al. 2023, Eq. 3),
without the bootstrap that makes CD propagate consistency one grid interval at a time: one student call per step. It
is the default because CD measurably failed our budget (the measurement is in docs/prior_training.md).

The export
(:meth:`ConsistencyDistillation.save_pretrained`) is a diffusers ``DDPMPipeline`` folder whose scheduler is an
``LCMScheduler``: diffusers samples it as a consistency model, and
:meth:`ud2m.priors.pixel.PixelDiffusionPrior.from_pretrained` loads it with ``boundary="lcm"``.

Run (docs/prior_training.md)::

    python train.py prior distil --config configs/priors/digits_cm.yaml
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from diffusers import DDPMPipeline, LCMScheduler

from ud2m.priors.base import cm_boundary_scalings, x0_from_prediction
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.schedules import consistency_grid
from ud2m.solvers.steps import consistency_sampling, ddim_step
from ud2m.training.base_cli import ModuleCLI
from ud2m.training.callbacks import EMA
from ud2m.training.module import mix_seed
from ud2m.training.prior_module import AdamWWarmup
from ud2m.utils import append_dims, randn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ pure math
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    r"""Per-sample pseudo-Huber distance :math:`\sqrt{\lVert a-b\rVert_2^2 + c^2} - c` ``(B,)`` (Song & Dhariwal
    2023, §3.3): L2-like for large errors, a squared error near 0; exactly 0 when ``a == b``."""
    return ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def consistency_function(
    x0_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, *, timestep_scaling: float, sigma_data: float
) -> torch.Tensor:
    r""":math:`f(z, t) = c_\text{skip}(t) z + c_\text{out}(t)\hat x_0(z, t)` (docs/method.md §3.1, LCM scalings)."""
    c_skip, c_out = cm_boundary_scalings(t.to(z.dtype), timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    return append_dims(c_skip, z.ndim) * z + append_dims(c_out, z.ndim) * x0_hat


# ------------------------------------------------------------------------------------------------ the module
class ConsistencyDistillation(AdamWWarmup, pl.LightningModule):
    r"""Distil a frozen pixel prior (the teacher) into a consistency model (docs/method.md §3.3).

    Args:
        teacher: the teacher's diffusers folder (``PixelDiffusionPrior.from_pretrained``; a DDPM, not a CM).
        method: ``"trajectory"`` (regression onto the teacher's ODE end points) or ``"cd"`` (LCM-style consistency
            distillation with a one-step teacher DDIM target).
        num_trajectories: M, teacher trajectories of ``"trajectory"``: computed at the start of every fit (also
            a resumed one: they are a deterministic function of the seed, not saved) on every DDP rank.
        trajectory_batch: batch size of the trajectory computation.
        num_points: :math:`N`, points of the skip-step grid (:func:`consistency_grid`; LCM uses 50, k = 20).
        target: ``"ema"`` (:math:`\theta^-` = EMA of the student, LCM) or ``"self"`` (:math:`\theta^- = \theta`
            without gradient, improved consistency training).
        target_decay: μ of the ``"ema"`` target.
        distance: ``"huber"`` (pseudo-Huber, :func:`pseudo_huber`) or ``"l2"`` (mean squared error per pixel).
        huber_c: c of the pseudo-Huber distance; None: :math:`0.00054\sqrt{\dim}`.
        clip_teacher: clip the teacher's x̂0 to [-1, 1] in its DDIM step (None: the teacher scheduler's
            ``clip_sample``, as diffusers' DDIM pipeline samples it).
        prediction_type: how the student's output is read (``epsilon``, ``v_prediction``, ``sample``; None: as
            the teacher). The student starts from the teacher's weights whatever this is. ``v_prediction`` by
            default: an ε output cannot express a one-call sample at t = 999 on a linear β schedule
            (x̂0 = (z − b ε̂)/a amplifies ε̂'s error 1/a_999 ≈ 156-fold; docs/prior_training.md §6).
        timestep_scaling: κ of the boundary scalings (10: c_skip(0) = 1 and c_skip(19) ≈ 7e-6, as LCM).
        sigma_data: σ_d of the boundary scalings (0.5, fixed by diffusers' ``LCMScheduler``).
        lr, betas, weight_decay, warmup_steps, clip_norm: AdamW, linear warm-up, global-norm clipping.
        ema_halflife_steps: half-life of the exported EMA (:class:`~ud2m.training.callbacks.EMA`); None: off.
        val_num_samples: samples drawn at each validation.
        val_steps: CM step counts of the validation sample grids (e.g. one-step and four-step).
        seed: base seed of every generator here.
    """

    def __init__(
        self,
        teacher: str,
        *,
        method: Literal["trajectory", "cd"] = "trajectory",
        num_trajectories: int = 2048,
        trajectory_batch: int = 256,
        num_points: int = 25,
        target: Literal["ema", "self"] = "ema",
        target_decay: float = 0.95,
        distance: Literal["huber", "l2"] = "huber",
        huber_c: float | None = None,
        clip_teacher: bool | None = None,
        prediction_type: str | None = "v_prediction",
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        clip_norm: float | None = 1.0,
        ema_halflife_steps: int | None = None,
        val_num_samples: int = 16,
        val_steps: tuple[int, ...] = (1, 4),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if method not in ("trajectory", "cd"):
            raise ValueError(f"method: expected 'trajectory' or 'cd', got {method!r}")
        if target not in ("ema", "self"):
            raise ValueError(f"target: expected 'ema' or 'self', got {target!r}")
        if distance not in ("huber", "l2"):
            raise ValueError(f"distance: expected 'huber' or 'l2', got {distance!r}")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay: expected 0 <= mu < 1, got {target_decay}")
        self.teacher = PixelDiffusionPrior.from_pretrained(teacher)  # frozen, eval mode (the prior contract)
        if self.teacher.boundary != "none":
            raise ValueError(f"{teacher}: the teacher is already a consistency model (LCMScheduler config)")
        self.grid = torch.tensor(consistency_grid(num_points, self.teacher.schedule.num_train_timesteps))
        self.unet = copy.deepcopy(self.teacher.net).requires_grad_(True).train()  # student, initialised as teacher
        use_ema_target = method == "cd" and target == "ema"
        self.target_unet = copy.deepcopy(self.unet).requires_grad_(False).eval() if use_ema_target else None
        self.trajectories: tuple[torch.Tensor, torch.Tensor] | None = None  # (states, ends); not in checkpoints
        self.val_trajectories: tuple[torch.Tensor, torch.Tensor] | None = None  # held-out seeds
        config = self.teacher.scheduler_config
        self.clip_teacher = bool(config.get("clip_sample", False)) if clip_teacher is None else clip_teacher

    # ------------------------------------------------------------------------------------------------ math wiring
    @property
    def prediction_type(self) -> str:
        """How the student's output is read (``prediction_type``, default the teacher's)."""
        return self.hparams.prediction_type or self.teacher.prediction_type

    def consistency(self, unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`f(z, t)` of ``unet`` read as the exported prior reads it (:func:`consistency_function`)."""
        a_t, b_t = self.teacher.scales(t)
        x0_hat = x0_from_prediction(z, unet(z, t).sample, a_t, b_t, self.prediction_type)
        hp = self.hparams
        return consistency_function(x0_hat, z, t, timestep_scaling=hp.timestep_scaling, sigma_data=hp.sigma_data)

    def teacher_step(self, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        r"""One DDIM step (η = 0) of the teacher from ``t`` to ``t_prev`` (1 NFE): :math:`\hat z`."""
        x0_hat = self.teacher.predict_x0(z, t)
        if self.clip_teacher:
            x0_hat = x0_hat.clamp(-1, 1)
        a, b = self.teacher.scales(t)
        a_prev, b_prev = self.teacher.scales(t_prev)
        return ddim_step(z, x0_hat, a=a, b=b, a_next=a_prev, b_next=b_prev, eta=0.0, xi=torch.zeros_like(z))

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample ``(B,)`` distance of ``distance`` (pseudo-Huber or per-pixel MSE)."""
        if self.hparams.distance == "l2":
            return (a - b).pow(2).flatten(1).mean(1)
        c = self.hparams.huber_c if self.hparams.huber_c is not None else 0.00054 * a[0].numel() ** 0.5
        return pseudo_huber(a, b, c)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r"""Per-sample consistency-distillation loss ``(B,)`` (docs/method.md §3.3).

        Args:
            x0: clean images ``(B, C, H, W)`` on [-1, 1].
            t, t_prev: ``(B,)`` grid times :math:`t_n > t_{n-1}` (equal times give exactly 0 at any weights).
            eps: noise ``(B, C, H, W)``.
        """
        t, t_prev = t.to(x0.dtype), t_prev.to(x0.dtype)
        z = self.teacher.add_noise(x0, t, eps)
        with torch.no_grad():
            z_prev = self.teacher_step(z, t, t_prev)
            target_unet = self.target_unet if self.target_unet is not None else self.unet
            target = self.consistency(target_unet, z_prev, t_prev)
        return self.distance(self.consistency(self.unet, z, t), target)

    @torch.no_grad()
    def teacher_trajectories(
        self, num: int, shape: tuple[int, ...], key: str = "trajectory"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``num`` teacher DDIM trajectories on the grid (η = 0, clipped x̂0), trajectory ``m`` from the seed
        ``(seed, key, m)``: states :math:`z_{t_n}` ``(M, N, *shape)`` (fp16, n = 1..N) and end points
        ``(M, *shape)`` (fp32, the x̂0 of the last step: the teacher's DDIM sample)."""
        grid = self.grid.to(self.device, torch.float32)
        N = len(grid) - 1
        states = torch.empty((num, N, *shape), dtype=torch.float16)
        ends = torch.empty((num, *shape))
        for start in range(0, num, self.hparams.trajectory_batch):
            idx = range(start, min(start + self.hparams.trajectory_batch, num))
            gens = [torch.Generator(self.device).manual_seed(mix_seed(self.hparams.seed, key, m)) for m in idx]
            z = randn((len(idx), *shape), gens, device=self.device)
            for n in range(N, 0, -1):  # t_N = T - 1 down to t_1; the step from t_1 lands on the boundary t_0 = 0
                states[idx.start : idx.stop, n - 1] = z.to(states.dtype).cpu()
                t = grid[n].expand(len(idx))
                if n == 1:
                    x0_hat = self.teacher.predict_x0(z, t)
                    ends[idx.start : idx.stop] = (x0_hat.clamp(-1, 1) if self.clip_teacher else x0_hat).cpu()
                else:
                    z = self.teacher_step(z, t, grid[n - 1].expand(len(idx)))
        return states, ends

    def trajectory_loss(self, states: torch.Tensor, ends: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        r"""Per-sample ``(B,)`` :math:`d(f_\theta(z_{t_n}, t_n), x_\text{end})` for states ``(B, *shape)`` at grid
        indices ``n`` ``(B,)`` (1..N)."""
        t = self.grid.to(self.device)[n].to(torch.float32)
        return self.distance(self.consistency(self.unet, states.float(), t), ends)

    def on_fit_start(self) -> None:
        """Compute the teacher trajectories (``method="trajectory"``) once per process, before the first step."""
        if self.hparams.method != "trajectory" or self.trajectories is not None:
            return
        cfg = self.teacher.net.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        logger.info("computing %d teacher trajectories of %d steps", self.hparams.num_trajectories, len(self.grid) - 1)
        self.trajectories = self.teacher_trajectories(self.hparams.num_trajectories, shape)
        self.val_trajectories = self.teacher_trajectories(self.hparams.val_num_samples, shape, key="val_trajectory")

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Draw n, ε (``cd``) or trajectory/grid pairs (``trajectory``) per sample, with generators seeded by
        ``(seed, step, rank)``; log ``train/loss``. ``trajectory`` uses the batch only for its size."""
        x0 = batch["x"]
        g = self._generator("train", self.global_step)
        N = len(self.grid) - 1
        if self.hparams.method == "trajectory":
            states, ends = self.trajectories
            m = torch.randint(0, len(ends), (x0.shape[0],), generator=g, device=self.device).cpu()
            n = torch.randint(1, N + 1, (x0.shape[0],), generator=g, device=self.device).cpu()
            loss = self.trajectory_loss(states[m, n - 1].to(self.device), ends[m].to(self.device), n).mean()
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x0.shape[0])
            return loss
        n = torch.randint(1, N + 1, (x0.shape[0],), generator=g, device=self.device)
        grid = self.grid.to(self.device)
        eps = randn(x0.shape, g, device=self.device, dtype=x0.dtype)
        loss = self.loss(x0, grid[n], grid[n - 1], eps).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x0.shape[0])
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        r""":math:`\theta^- \leftarrow \mu\theta^- + (1-\mu)\theta` after each optimiser step (``target="ema"``)."""
        if self.target_unet is None:
            return
        mu = self.hparams.target_decay
        for p_target, p in zip(self.target_unet.parameters(), self.unet.parameters(), strict=True):
            p_target.lerp_(p.detach(), 1.0 - mu)

    # ------------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        """``val/loss`` (the one-interval self-consistency on data, fixed noise; 0 for a perfect CM) at every grid
        interval, ``val/trajectory_loss`` on held-out teacher trajectories; CM samples of ``val_steps``."""
        x0 = batch["x"]
        B = x0.shape[0]
        g = self._generator("val", batch_idx)
        N = len(self.grid) - 1
        n = torch.arange(B, device=self.device) % N + 1  # sample i on interval i mod N
        grid = self.grid.to(self.device)
        eps = randn(x0.shape, g, device=self.device, dtype=x0.dtype)
        self.log("val/loss", self.loss(x0, grid[n], grid[n - 1], eps).mean(), sync_dist=True, batch_size=B)
        if self.val_trajectories is not None and batch_idx == 0:  # held-out trajectories, every grid point
            states, ends = self.val_trajectories
            M = len(ends)
            k = torch.arange(M * N) // N
            n_all = torch.arange(M * N) % N + 1
            loss = self.trajectory_loss(states[k, n_all - 1].to(self.device), ends[k].to(self.device), n_all)
            self.log("val/trajectory_loss", loss.mean(), sync_dist=True, batch_size=M)
        if batch_idx != 0 or self.hparams.val_num_samples <= 0:
            return None
        out = {"x": x0}
        for steps in self.hparams.val_steps:
            out[f"x_hat_{steps}step"] = self.sample(self.hparams.val_num_samples, tuple(x0.shape[1:]), steps)
        return out

    def student_prior(self) -> PixelDiffusionPrior:
        """A frozen copy of the student (its current weights) as a prior of the contract, ``boundary="lcm"``."""
        return PixelDiffusionPrior(copy.deepcopy(self.unet), self.scheduler_config()).to(self.device)

    def sample(self, num_samples: int, image_shape: tuple[int, ...], num_steps: int, *, seed: int | None = None):
        """``num_samples`` CM samples with ``num_steps`` calls on diffusers' LCM grid, sample ``i`` from
        seed ``(seed, i)`` (:func:`ud2m.solvers.steps.consistency_sampling`)."""
        seed = self.hparams.seed if seed is None else seed
        gens = [torch.Generator(self.device).manual_seed(mix_seed(seed, "sample", i)) for i in range(num_samples)]
        timesteps = lcm_timesteps(self.scheduler_config(), num_steps)
        shape = (num_samples, *image_shape)
        return consistency_sampling(self.student_prior(), shape, timesteps, generator=gens, device=self.device)

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        """Train mode for the student only: the teacher (a prior) and the EMA target always run in eval mode."""
        super().train(mode)
        if self.target_unet is not None:
            self.target_unet.eval()
        return self

    # ------------------------------------------------------------------------------------------------ export
    def scheduler_config(self) -> dict[str, Any]:
        """The ``LCMScheduler`` config of the student: the teacher's betas, the grid and κ of this distillation."""
        teacher = dict(self.teacher.scheduler_config)
        scheduler = LCMScheduler(
            num_train_timesteps=teacher.get("num_train_timesteps", 1000),
            beta_start=teacher.get("beta_start", 1e-4),
            beta_end=teacher.get("beta_end", 0.02),
            beta_schedule=teacher.get("beta_schedule", "linear"),
            trained_betas=teacher.get("trained_betas"),
            prediction_type=self.prediction_type,
            original_inference_steps=len(self.grid) - 1,
            timestep_scaling=self.hparams.timestep_scaling,
            clip_sample=False,
            set_alpha_to_one=True,
        )
        return dict(scheduler.config)

    def save_pretrained(self, folder: str | Path, ema: EMA | None = None) -> Path:
        """Write a diffusers ``DDPMPipeline`` folder with an ``LCMScheduler`` (``unet/``, ``scheduler/``).

        ``DiffusionPipeline.from_pretrained(folder)`` samples it as a consistency model;
        ``PixelDiffusionPrior.from_pretrained(folder)`` loads it with ``boundary="lcm"``.
        """
        with ema.swapped(self) if ema is not None and ema.shadow is not None else contextlib.nullcontext():
            unet = copy.deepcopy(self.unet).cpu().eval().float()
        scheduler = LCMScheduler.from_config(self.scheduler_config())
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
        return Path(folder)

    def _generator(self, *key: int | str) -> torch.Generator:
        """A generator on this device seeded by ``(seed, key..., rank)``."""
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.hparams.seed, *key, self.global_rank))


def lcm_timesteps(scheduler_config: dict[str, Any], num_steps: int) -> list[int]:
    """The ``num_steps`` sampling times of diffusers' ``LCMScheduler`` for this config (e.g. 4: 999, 759, 499, 259)."""
    scheduler = LCMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def export_distilled(ckpt: str, out: str, use_ema: bool = True):
    """Export a ``.ckpt`` of :class:`ConsistencyDistillation` to a diffusers folder (the student, EMA when saved)."""
    from ud2m.training.callbacks import ema_from_checkpoint

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = ConsistencyDistillation.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return model.save_pretrained(out, ema=ema_from_checkpoint(checkpoint) if use_ema else None)


class DistilCLI(ModuleCLI):
    """``LightningCLI(ConsistencyDistillation, <any LightningDataModule>)`` (``train.py prior distil``)."""

    module_class = ConsistencyDistillation
