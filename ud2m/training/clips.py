"""Video clips with known motion made from still photographs (issue [video]): the training data of the project's
own offline video prior.

A clip of T frames is a square window moving over one photograph: its centre pans at a constant velocity, its side
zooms geometrically and it rotates at a constant rate,

.. math:: c_t = c_0 + v\\,t, \\qquad s_t = s_0\\,e^{r t}, \\qquad \\theta_t = \\omega\\,t, \\qquad t = 0, \\dots, T-1,

and frame t samples the photograph bilinearly on that window (one ``affine_grid`` + ``grid_sample`` for all frames).
The motion is drawn per clip from its own seed, chosen so that every frame stays inside the photograph. A clip is
returned with its frames stacked along channels, ``x`` of shape ``(T*C, H, W)`` (frame-major), which is what a pixel
UNet over stacked frames trains on (``train.py prior fit --config configs/priors/clips.yaml``); :func:`unstack` gives
``(C, T, H, W)`` back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ud2m.training.data import ImageFolderImages
from ud2m.utils import seed_for


def clip_motion(
    hw: tuple[int, int], size: int, frames: int, generator: torch.Generator, *, max_pan: float, max_zoom: float,
    max_rotation: float, scale_range: tuple[float, float] = (1.0, 1.5),
) -> dict[str, float]:  # fmt: skip
    """Draw one clip's motion on an ``H x W`` photograph: window side ``s0`` (``size`` times a factor of
    ``scale_range``), pan ``(vx, vy)`` in pixels per frame, log-zoom rate ``r`` per frame and rotation ``omega`` in
    radians per frame, and a start centre ``(cx, cy)`` that keeps every (rotated) window inside the photograph; the
    motion is scaled down when the photograph is too small for it."""
    H, W = hw

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    s0 = size * uniform(*scale_range)
    vx, vy = uniform(-max_pan, max_pan), uniform(-max_pan, max_pan)
    r, omega = uniform(-max_zoom, max_zoom), math.radians(uniform(-max_rotation, max_rotation))
    span = frames - 1
    for _ in range(8):  # shrink the motion until the whole path fits
        half = s0 * math.exp(max(0.0, r) * span) * math.sqrt(2) / 2  # largest half-diagonal over the clip
        x_lo, x_hi = half + max(0.0, -vx * span), W - 1 - half - max(0.0, vx * span)
        y_lo, y_hi = half + max(0.0, -vy * span), H - 1 - half - max(0.0, vy * span)
        if x_lo <= x_hi and y_lo <= y_hi:
            return {"s0": s0, "vx": vx, "vy": vy, "r": r, "omega": omega, "cx": uniform(x_lo, x_hi),
                    "cy": uniform(y_lo, y_hi)}  # fmt: skip
        vx, vy, r, s0 = vx / 2, vy / 2, r / 2, max(size, s0 / 1.2)
    raise ValueError(f"a {H}x{W} photograph is too small for {size}x{size} clip windows")


def clip_frames(
    image: torch.Tensor, motion: dict[str, float], frames: int, size: int, *, clamp: bool = True
) -> torch.Tensor:
    """``(T, C, size, size)``: the frames of ``motion`` (see :func:`clip_motion`) sampled from ``image`` ``(C, H, W)``
    (``clamp``: to [-1, 1], against rounding; off for images on another scale).

    Frame t's window maps output coordinates ``(u, v)`` in [-1, 1] to the pixel
    ``c_t + (s_t / 2) R(theta_t) (u, v)``, written as one affine map per frame in ``grid_sample``'s normalised
    coordinates.
    """
    C, H, W = image.shape
    t = torch.arange(frames, dtype=torch.float64)
    s = motion["s0"] * torch.exp(motion["r"] * t)
    theta_t = motion["omega"] * t
    cx, cy = motion["cx"] + motion["vx"] * t, motion["cy"] + motion["vy"] * t
    cos, sin = torch.cos(theta_t), torch.sin(theta_t)
    theta = torch.stack(
        [
            torch.stack([s * cos / W, -s * sin / W, (2 * cx + 1) / W - 1], dim=-1),
            torch.stack([s * sin / H, s * cos / H, (2 * cy + 1) / H - 1], dim=-1),
        ],
        dim=1,
    ).to(image.dtype)  # (T, 2, 3)
    grid = F.affine_grid(theta, [frames, C, size, size], align_corners=False)
    out = F.grid_sample(
        image.expand(frames, C, H, W), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.clamp(-1.0, 1.0) if clamp else out


def stack(frames: torch.Tensor) -> torch.Tensor:
    """``(..., T, C, H, W)`` -> ``(..., T*C, H, W)`` (frame-major channels)."""
    return frames.flatten(-4, -3)


def unstack(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``(..., T*C, H, W)`` -> ``(..., C, T, H, W)``, the video layout of the priors (docs/method.md §1.3)."""
    *lead, TC, H, W = x.shape
    return x.reshape(*lead, frames, TC // frames, H, W).transpose(-4, -3)


class ClipDataset(Dataset):
    """Clips of in-memory photographs: item ``i`` (or ``(i, seed)`` from :func:`~ud2m.training.data.epoch_order`)
    is a clip of photograph ``i % n`` whose motion is drawn from its seed (validation: a fixed seed per item)."""

    def __init__(self, images: list[torch.Tensor], keys: list[str], *, frames: int, size: int, seed: int,
                 length: int | None, motion: dict[str, float]) -> None:  # fmt: skip
        self.images, self.keys, self.frames, self.size, self.seed = images, keys, frames, size, seed
        self.length = len(images) if length is None else int(length)
        self.motion = motion

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        i, seed = item if isinstance(item, tuple) else (item, seed_for(self.seed, item))
        j = i % len(self.images)
        g = torch.Generator().manual_seed(seed)
        motion = clip_motion(tuple(self.images[j].shape[-2:]), self.size, self.frames, g, **self.motion)
        x = stack(clip_frames(self.images[j], motion, self.frames, self.size))
        return {"x": x, "key": f"{self.keys[j]}-{seed:019d}"}


class PhotoClips(ImageFolderImages):
    """Clips with known motion (pans, zooms, slow rotations) over photographs, frames stacked along channels.

    The photographs, their split (``val_sources``) and the epoch/resume machinery are :class:`ImageFolderImages`'s.

    Args:
        root: photographs (folder or list of sources such as ``skimage:astronaut``).
        frames: T, frames per clip.
        channels: channels of a batch item, ``frames`` times the photographs' channels (27 = 9 RGB frames); it is
            linked into the prior's UNet like an image module's channels.
        image_size: frame side.
        max_pan: largest pan speed, pixels of the photograph per frame.
        max_zoom: largest |log-zoom| per frame.
        max_rotation: largest rotation speed, degrees per frame.
        **kwargs: the other arguments of :class:`ImageFolderImages` (batch_size, seed, samples_per_epoch, ...).
    """

    def __init__(
        self,
        root: str | list[str],
        *,
        frames: int = 9,
        channels: int = 27,
        image_size: int = 64,
        max_pan: float = 3.0,
        max_zoom: float = 0.02,
        max_rotation: float = 2.0,
        **kwargs,
    ) -> None:
        if frames < 1 or channels % frames:
            raise ValueError(f"PhotoClips: channels ({channels}) must be a multiple of frames ({frames})")
        if channels // frames not in (1, 3):
            raise ValueError(f"PhotoClips: {channels} channels / {frames} frames: frames must be gray (1) or RGB (3)")
        if kwargs.get("rot90") or kwargs.get("zoom") is not None:
            raise ValueError("PhotoClips: rot90 and zoom are image-crop options; a clip's motion is its augmentation")
        super().__init__(root, image_size=image_size, channels=channels, random_flip=False, **kwargs)
        self.frames = frames
        self.motion = {"max_pan": max_pan, "max_zoom": max_zoom, "max_rotation": max_rotation}

    @property
    def image_channels(self) -> int:
        """Channels of one photograph (and of one frame)."""
        return self.channels // self.frames

    def make_dataset(self, split: str, images: list[torch.Tensor], keys: list[str]) -> ClipDataset:
        """Clips of the split's photographs (``samples_per_epoch`` items per training epoch)."""
        length = self.samples_per_epoch if split == "train" else None
        seed = self.seed if split == "train" else seed_for(self.seed, 1)  # validation clips: their own seeds
        return ClipDataset(
            images, keys, frames=self.frames, size=self.image_size, seed=seed, length=length, motion=self.motion
        )
