"""Tiny pixel-prior builders for tests and CLI smoke runs: random weights from config, offline, milliseconds.

The networks are real diffusers ``UNet2DModel`` instances (same code paths as the released DDPM checkpoints), only
small. Latent and video tiny builders live in ``tiny_latent.py`` / ``tiny_video.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from ud2m.priors.pixel import PixelDiffusionPrior


def tiny_pixel_unet(
    *,
    sample_size: int = 16,
    in_channels: int = 3,
    block_out_channels: tuple[int, ...] = (16, 32),
    attention: bool = True,
    learned_variance: bool = False,
    num_class_embeds: int | None = None,
    seed: int = 0,
) -> UNet2DModel:
    """A small random ``UNet2DModel`` (about 0.18M parameters with the defaults, ~12 ms per call on one CPU core).

    Args:
        sample_size: nominal image size.
        in_channels: image channels.
        block_out_channels: channels per resolution (one down block each).
        attention: use an attention block at the lowest resolution.
        learned_variance: output ``2·in_channels`` channels like guided-diffusion models.
        num_class_embeds: number of classes for a class-conditional UNet, None for unconditional.
        seed: seed of a local generator for the random weights (global RNG state is restored).
    """
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=2 * in_channels if learned_variance else in_channels,
            layers_per_block=1,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=8,
            attention_head_dim=8,
            num_class_embeds=num_class_embeds,
        )
    return unet.eval()


def tiny_scheduler_config(
    *, beta_schedule: str = "linear", prediction_type: str = "epsilon", num_train_timesteps: int = 1000
) -> dict[str, Any]:
    """A DDIM scheduler config (no sample clipping, so DDIM sampling is the plain affine update)."""
    betas = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}.get(beta_schedule, (1e-4, 0.02))
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=betas[0],
        beta_end=betas[1],
        prediction_type=prediction_type,
        clip_sample=False,
    )
    return dict(scheduler.config)


def tiny_pixel_prior(
    *, prediction_type: str = "epsilon", beta_schedule: str = "linear", **unet_kwargs: Any
) -> PixelDiffusionPrior:
    """A :class:`PixelDiffusionPrior` on :func:`tiny_pixel_unet` (keyword arguments go to the UNet builder)."""
    config = tiny_scheduler_config(beta_schedule=beta_schedule, prediction_type=prediction_type)
    return PixelDiffusionPrior(tiny_pixel_unet(**unet_kwargs), config)


def save_tiny_pixel_pipeline(folder: str | Path, prior: PixelDiffusionPrior | None = None) -> Path:
    """Write a diffusers ``DDIMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``) for CLI tests.

    Args:
        folder: destination (created).
        prior: the prior to save; a fresh :func:`tiny_pixel_prior` by default.

    Returns:
        ``folder`` as a ``Path``; ``PixelDiffusionPrior.from_pretrained(folder)`` reloads it.
    """
    prior = prior if prior is not None else tiny_pixel_prior()
    scheduler = DDIMScheduler.from_config(prior.scheduler_config)
    DDIMPipeline(unet=prior.net, scheduler=scheduler).save_pretrained(folder)
    return Path(folder)
