r"""Video views of image priors (docs/method.md §1.3, §3.1, §6.2, §6.5): the prior contract on videos
``(B, C, T, H, W)`` for networks that were trained on images.

* :class:`FrameStackedPrior`: a pixel UNet that sees the T frames of a clip **stacked along channels**
  (``in_channels = T*C``, frame-major: channels ``t*C .. t*C + C - 1`` are frame t), e.g. the project's own
  offline video prior, a DDPM over 9-frame 64x64 RGB clips (27 channels, ``configs/priors/clips.yaml``). It is
  a video prior for LVTINO's video step (§6.2 step 1): one call denoises the whole clip jointly.
* :class:`FrameWisePrior`: any image prior applied to every frame independently, in chunks of ``frame_batch``
  frames (§6.5), for LVTINO's image step (§6.2 step 3) and its frame-wise LATINO fallback. One :meth:`predict_x0`
  is one "image NFE" in the paper's convention (a sweep over the T frames); the wrapped prior's own ``nfe`` counts
  the raw network calls (one per chunk).

The stacking helpers are re-implemented here (two lines each) rather than imported from
``ud2m.training.clips``, which priors may not import (layering, pyproject ``[tool.importlinter]``); they use the
same frame-major layout as ``clips.stack``/``clips.unstack``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from ud2m.priors.base import Prior
from ud2m.priors.pixel import PixelDiffusionPrior

__all__ = ["FrameStackedPrior", "FrameWisePrior", "stack_frames", "unstack_frames"]


# ---------------------------------------------------------------------------------------------------- layouts
def stack_frames(x: torch.Tensor) -> torch.Tensor:
    """Video ``(B, C, T, H, W)`` -> ``(B, T*C, H, W)``, frame-major channels (as ``ud2m.training.clips.stack``)."""
    return x.transpose(1, 2).flatten(1, 2)


def unstack_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(B, T*C, H, W)`` -> video ``(B, C, T, H, W)``, the inverse of :func:`stack_frames`."""
    B, TC, H, W = x.shape
    return x.reshape(B, frames, TC // frames, H, W).transpose(1, 2)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """Video ``(B, C, T, H, W)`` -> frames ``(B*T, C, H, W)``, sample-major (docs/method.md §1.3)."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def _check_video_shape(prior: Prior, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    x_shape = tuple(x_shape)
    if len(x_shape) != 5:
        raise ValueError(f"{type(prior).__name__}: expected a video (B, C, T, H, W), got shape {x_shape}")
    return x_shape


# ---------------------------------------------------------------------------------------------------- stacked
class FrameStackedPrior(Prior):
    r"""A pixel prior over T frames stacked along channels, seen as a video prior (docs/method.md §3.1, §6.2).

    With :math:`s(x)` the frame-major stacking ``(B, C, T, H, W) -> (B, T C, H, W)`` and :math:`\hat x_0^{px}` the
    wrapped pixel prior's one-step estimate, :math:`\hat x_0(z_t, t) = s^{-1}(\hat x_0^{px}(s(z_t), t))`: one
    UNet call per clip (1 NFE). The schedule (``scales``, ``sigma``, ``t_of_sigma``) and the NFE counter are the
    wrapped prior's; ``encode``/``decode`` are the identity (pixel space).

    Args:
        prior: a loaded :class:`~ud2m.priors.pixel.PixelDiffusionPrior` with ``in_channels = frames * C``.
        frames: T, the number of frames the UNet was trained on.

    Raises:
        ValueError: if ``frames`` is not a positive divisor of the UNet's ``in_channels``.
    """

    def __init__(self, prior: PixelDiffusionPrior, frames: int) -> None:
        if not isinstance(prior, PixelDiffusionPrior):
            raise TypeError(f"FrameStackedPrior: expected a PixelDiffusionPrior, got {type(prior).__name__}")
        in_ch = prior.latent_channels
        if int(frames) != frames or frames < 1 or in_ch % frames:
            raise ValueError(
                f"FrameStackedPrior: frames must be a positive divisor of the UNet's in_channels ({in_ch}), "
                f"got frames = {frames}"
            )
        super().__init__(
            None,
            schedule=prior.schedule,
            prediction_type=prior.prediction_type,
            boundary=prior.boundary,
            timestep_scaling=prior.timestep_scaling,
            sigma_data=prior.sigma_data,
        )
        # registered after Prior.__init__'s freeze: the wrapped prior keeps its own parameter flags
        self.pixel_prior = prior
        self.frames = int(frames)
        self.frame_channels = in_ch // self.frames

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, frames: int | None = None, **kwargs: Any) -> FrameStackedPrior:
        """Load a stacked-frame pixel prior folder (``PixelDiffusionPrior.from_pretrained`` layout, e.g.
        ``ud2m/assets/priors/clips``).

        Args:
            path: diffusers folder (or hub id) of the stacked UNet.
            frames: T; default ``in_channels // 3`` (RGB frames).
            **kwargs: passed to :meth:`PixelDiffusionPrior.from_pretrained` (``dtype``, ``device``, ...).

        Raises:
            ValueError: if ``frames`` is not given and ``in_channels`` is not a multiple of 3, or if ``frames``
                does not divide ``in_channels``.
        """
        prior = PixelDiffusionPrior.from_pretrained(path, **kwargs)
        if frames is None:
            in_ch = prior.latent_channels
            if in_ch % 3:
                raise ValueError(
                    f"FrameStackedPrior.from_pretrained({path}): in_channels = {in_ch} is not a multiple of 3 RGB "
                    "channels; pass frames= explicitly"
                )
            frames = in_ch // 3
        return cls(prior, frames)

    # ------------------------------------------------------------------ counters (delegated)
    @property
    def nfe(self) -> int:
        """Network calls, counted by the wrapped pixel prior."""
        inner = self._modules.get("pixel_prior")
        return 0 if inner is None else inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        inner = self._modules.get("pixel_prior")
        if inner is not None:  # Prior.__init__ sets nfe = 0 before the wrapped prior is registered
            inner.nfe = value

    # ------------------------------------------------------------------ shapes
    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Videos ``(B, C, T, H, W)`` with ``T = frames``, ``C*T = in_channels`` and H, W multiples of the UNet's
        downsampling factor.

        Raises:
            ValueError: naming the expected and actual values.
        """
        x_shape = _check_video_shape(self, x_shape)
        _, c, t, h, w = x_shape
        if t != self.frames or c != self.frame_channels:
            raise ValueError(
                f"FrameStackedPrior: the prior takes T = {self.frames} frames of C = {self.frame_channels} channels "
                f"({self.pixel_prior.latent_channels} stacked channels), got T = {t}, C = {c} (shape {x_shape})"
            )
        f = self.pixel_prior.downsampling_factor
        if h % f or w % f:
            raise ValueError(f"FrameStackedPrior: H and W must be multiples of {f}, got H = {h}, W = {w}")

    def latent_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Pixel space: the video shape itself (after :meth:`check_shape`)."""
        self.check_shape(x_shape)
        return tuple(x_shape)

    # ------------------------------------------------------------------ the denoiser
    def predict_x0(self, z_t: torch.Tensor, t: float | torch.Tensor, cond: Any = None) -> torch.Tensor:
        r""":math:`s^{-1}(\hat x_0^{px}(s(z_t), t, c))` for a video ``z_t`` ``(B, C, T, H, W)``: one UNet call
        (counted once in :attr:`nfe`), fp32 output (fp64 for fp64 input)."""
        if not torch.is_tensor(z_t):
            raise ValueError(f"z_t: expected a video tensor (B, C, T, H, W), got {type(z_t).__name__}")
        self.check_shape(z_t.shape)
        return unstack_frames(self.pixel_prior.predict_x0(stack_frames(z_t), t, cond), self.frames)


# ---------------------------------------------------------------------------------------------------- frame-wise
def _frame_rows(v: Any, batch_size: int, frames: int, rows: slice) -> Any:
    """Per-frame rows ``rows`` of a per-video value: tensors (or dataclass fields) of batch B are repeated over the
    T frames (sample-major) and sliced; batch-1 values and None pass through unchanged."""
    if torch.is_tensor(v):
        if v.ndim >= 1 and v.shape[0] == batch_size > 1:
            return v.repeat_interleave(frames, dim=0)[rows]
        return v
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: _frame_rows(getattr(v, f.name), batch_size, frames, rows) for f in dataclasses.fields(v)}
        return dataclasses.replace(v, **fields)
    return v


class FrameWisePrior(Prior):
    r"""An image prior applied to every frame of a video, in chunks of ``frame_batch`` frames (docs/method.md §6.5).

    Layouts: data videos ``(B, C, T, H, W)``; latents **frame-major** ``(B, T, c, h, w)`` (frame t of video b is
    the image latent :math:`E_I(x_{b,:,t})`). Noise drawn for a latent of this shape from a list of B generators
    (§1.5) therefore gives video b the same numbers, in the same order, as the image prior run on its T frames
    ``(T, C, H, W)`` with generator b: that is what makes the frame-wise LATINO fallback of LVTINO equal to
    :func:`~ud2m.solvers.latino_algorithms.latino` on each video's frames.

    :meth:`predict_x0` is one "image NFE" (one sweep over the frames, counted once in :attr:`nfe`); the wrapped
    prior counts its raw network calls, :math:`\lceil BT/\text{frame\_batch}\rceil` per sweep. Conditions of
    batch 1 are shared by all frames, conditions of batch B are repeated over each video's frames.

    Args:
        prior: the image prior (pixel, latent consistency, ...).
        frame_batch: frames per network call (default 8; the LVTINO reference used 1).
    """

    def __init__(self, prior: Prior, frame_batch: int = 8) -> None:
        if int(frame_batch) != frame_batch or frame_batch < 1:
            raise ValueError(f"FrameWisePrior: frame_batch must be a positive integer, got {frame_batch}")
        super().__init__(None, schedule=prior.schedule, prediction_type=prior.prediction_type)
        self.image_prior = prior  # after Prior.__init__'s freeze (the wrapped prior keeps its own flags)
        self.frame_batch = int(frame_batch)

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.frame_batch, n)) for i in range(0, n, self.frame_batch)]

    @property
    def is_latent(self) -> bool:
        """The image prior's: :meth:`decode` here only moves the frame axis for a pixel image prior."""
        return self.image_prior.is_latent

    @property
    def data_range(self) -> tuple[float, float] | None:
        """The image prior's data range."""
        return self.image_prior.data_range

    # ------------------------------------------------------------------ shapes
    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """A video ``(B, C, T, H, W)`` whose frames ``(C, H, W)`` the image prior accepts.

        Raises:
            ValueError: naming the expected and actual values.
        """
        B, C, T, H, W = _check_video_shape(self, x_shape)
        self.image_prior.check_shape((B * T, C, H, W))

    def latent_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(B, T, c, h, w)`` with ``(c, h, w)`` the image prior's latent of one frame."""
        B, C, T, H, W = _check_video_shape(self, x_shape)
        return (B, T, *self.image_prior.latent_shape((1, C, H, W))[1:])

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frame latents ``(B, T, c, h, w)`` of a video ``(B, C, T, H, W)``, encoded in chunks."""
        self.check_shape(x.shape)
        B, T = x.shape[0], x.shape[2]
        frames = _frames_to_batch(x)
        z = torch.cat([self.image_prior.encode(frames[r]) for r in self._chunks(B * T)])
        return z.reshape(B, T, *z.shape[1:])

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Video ``(B, C, T, H, W)`` from frame latents ``(B, T, c, h, w)``, decoded in chunks."""
        if z0.ndim != 5:
            raise ValueError(f"FrameWisePrior.decode: expected frame latents (B, T, c, h, w), got {tuple(z0.shape)}")
        B, T = z0.shape[:2]
        flat = z0.flatten(0, 1)
        x = torch.cat([self.image_prior.decode(flat[r]) for r in self._chunks(B * T)])
        return x.reshape(B, T, *x.shape[1:]).transpose(1, 2)

    def encode_prompt(self, prompts: str | list[str] | None) -> Any:
        """The image prior's conditioning (shared by every frame)."""
        return self.image_prior.encode_prompt(prompts)

    # ------------------------------------------------------------------ the denoiser
    def _predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The image prior's estimate on every frame latent, ``frame_batch`` frames per call."""
        if z_t.ndim != 5:
            raise ValueError(f"FrameWisePrior: expected frame latents (B, T, c, h, w), got {tuple(z_t.shape)}")
        B, T = z_t.shape[:2]
        flat, t_frames = z_t.flatten(0, 1), t.repeat_interleave(T)
        out = [
            self.image_prior.predict_x0(flat[r], t_frames[r], _frame_rows(cond, B, T, r)) for r in self._chunks(B * T)
        ]
        return torch.cat(out).reshape(z_t.shape)

    def calls_per_sweep(self, batch_size: int, frames: int) -> int:
        r"""Raw network calls of one :meth:`predict_x0` on ``batch_size`` videos of ``frames`` frames:
        :math:`\lceil BT/\text{frame\_batch}\rceil`."""
        return math.ceil(batch_size * frames / self.frame_batch)
