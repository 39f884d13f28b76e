"""Inpainting and denoising: diagonal operators with closed-form proxes (docs/method.md §2.2).

Masks are ``(B or 1, 1, H, W)`` in {0, 1} (1 = observed), shared across channels; missing entries of y are 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ud2m.operators.base import LinearOperator
from ud2m.operators.blur import check_batch
from ud2m.utils import append_dims, broadcast_eps, rand


def as_mask(mask: torch.Tensor) -> torch.Tensor:
    """Validate a mask and bring it to ``(B or 1, 1, H, W)`` float."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"Inpainting: mask must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    mask = mask.float()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("Inpainting: mask values must be 0 (missing) or 1 (observed)")
    return mask


def load_mask(path: str | Path, threshold: float = 0.5) -> torch.Tensor:
    """Load a mask image (white = observed): grayscale in [0, 1] thresholded at ``threshold``."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        img = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    except Exception as err:  # PIL raises several types for non-images
        raise ValueError(f"cannot read mask image {path}: {err}") from err
    return torch.from_numpy((img >= threshold).astype(np.float32))


class Inpainting(LinearOperator):
    r""":math:`A x = M \odot x` with a {0, 1} mask per sample (or shared).

    Args:
        mask: ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` tensor, or a path to a mask image (white = observed).
    """

    def __init__(self, mask: torch.Tensor | str, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(mask, (str, Path)):
            mask = load_mask(mask)
        self.register_buffer("mask", as_mask(mask))

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"Inpainting: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        check_batch(self.mask.shape[0], x.shape[0], self, "mask")
        if self.mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"Inpainting: mask is {tuple(self.mask.shape[-2:])} but the image is {tuple(x.shape[-2:])}"
            )
        return self.mask.to(x.dtype)

    def at_size(self, hw: tuple[int, int]) -> Inpainting:
        """This operator for ``H x W`` images: itself at its mask's size; a given mask is a fixed-size asset, so any
        other size is refused naming the one it takes (:class:`RandomInpainting` and :class:`BoxInpainting` redraw)."""
        if tuple(hw) == tuple(self.mask.shape[-2:]):
            return self
        H, W = self.mask.shape[-2:]
        raise ValueError(
            f"{type(self).__name__}: its mask is a fixed {H}x{W} asset and takes only {H}x{W} images, got "
            f"{hw[0]}x{hw[1]}"
        )

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`M \\odot x`."""
        return self._mask_for(x) * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Self-adjoint."""
        return self._mask_for(y) * y

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        r"""Closed form :math:`(z + \gamma M y)/(1 + \gamma M)` (holes keep z)."""
        m = self._mask_for(z)
        g = append_dims(gamma, z.ndim)
        return (z + g * m * y) / (1 + g * m)

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self._mask_for(z)
        return m * y + (1 - m) * z

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        """:math:`M y / (1 + \\epsilon)`."""
        return self._mask_for(y) * y / (1 + broadcast_eps(eps, y))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`M \\odot y`."""
        return self._mask_for(y) * y

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor:
        """The mask itself."""
        return self._mask_for(y)


def _size2(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


class RandomInpainting(Inpainting):
    """Bernoulli mask: each pixel observed with probability ``p_obs`` (UD2M "random", 30 % observed).

    Args:
        image_size: ``H`` or ``(H, W)``.
        p_obs: probability that a pixel is observed.
        batch_size: number of independent masks (1 = shared by the batch).
        seed: seed of the mask draw (the mask is stored as a buffer, so runs can be replayed).
    """

    def __init__(
        self, image_size: int | tuple[int, int], p_obs: float = 0.3, *, batch_size: int = 1, seed: int = 0, **kw
    ) -> None:
        if not 0 < p_obs <= 1:
            raise ValueError(f"RandomInpainting: p_obs must be in (0, 1], got {p_obs}")
        gen = torch.Generator().manual_seed(seed)
        H, W = _size2(image_size)
        super().__init__((rand((batch_size, 1, H, W), gen) < p_obs).float(), **kw)
        self._args = dict(p_obs=p_obs, batch_size=batch_size, seed=seed, **kw)

    def at_size(self, hw: tuple[int, int]) -> RandomInpainting:
        """The same law drawn for ``H x W`` images (same ``p_obs`` and seed): a mask is only defined per size."""
        if tuple(hw) == tuple(self.mask.shape[-2:]):
            return self
        return RandomInpainting(tuple(hw), **self._args).to(self.mask.device)


class BoxInpainting(Inpainting):
    """A missing square (or rectangle) box.

    Args:
        image_size: ``H`` or ``(H, W)``.
        box_size: side in pixels (int), a fraction of H (float < 1), or ``(h, w)``.
        position: ``"center"``, ``"random"`` (uniform per sample) or ``(top, left)``.
        batch_size: number of masks (only matters for ``"random"``).
        seed: seed of the random positions.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        box_size: int | float | tuple[int, int] = 0.5,
        *,
        position: str | tuple[int, int] = "center",
        batch_size: int = 1,
        seed: int = 0,
        **kw,
    ) -> None:
        H, W = _size2(image_size)
        bh, bw = _box_hw(box_size, H, W)
        gen = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch_size, 1, H, W)
        for i in range(batch_size):  # a loop over a handful of masks at construction, not in the math path
            top, left = _box_position(position, H, W, bh, bw, gen)
            mask[i, :, top : top + bh, left : left + bw] = 0
        super().__init__(mask, **kw)
        self._box = (H, W, bh, bw, position)
        self._args = dict(batch_size=batch_size, seed=seed, **kw)

    def at_size(self, hw: tuple[int, int]) -> BoxInpainting:
        """The same box for ``H x W`` images: its side and a given ``(top, left)`` scaled by the size ratio (a
        256² preset's 128-pixel centred box is a 16-pixel one at 32²); ``"center"`` and ``"random"`` kept."""
        if tuple(hw) == tuple(self.mask.shape[-2:]):
            return self
        H0, W0, bh, bw, position = self._box
        H, W = hw
        box = (max(1, round(bh * H / H0)), max(1, round(bw * W / W0)))
        if not isinstance(position, str):
            position = (round(position[0] * H / H0), round(position[1] * W / W0))
            position = (min(position[0], H - box[0]), min(position[1], W - box[1]))
        return BoxInpainting((H, W), box, position=position, **self._args).to(self.mask.device)


def _box_hw(box_size, H: int, W: int) -> tuple[int, int]:
    if isinstance(box_size, float) and box_size < 1:
        bh = bw = round(box_size * H)
    elif isinstance(box_size, (int, float)):
        bh = bw = int(box_size)
    else:
        bh, bw = (int(v) for v in box_size)
    if not (0 < bh <= H and 0 < bw <= W):
        raise ValueError(f"BoxInpainting: box {bh}x{bw} does not fit in the image {H}x{W}")
    return bh, bw


def _box_position(position, H, W, bh, bw, gen) -> tuple[int, int]:
    if position == "center":
        return (H - bh) // 2, (W - bw) // 2
    if position == "random":
        top = int(torch.randint(0, H - bh + 1, (1,), generator=gen))
        left = int(torch.randint(0, W - bw + 1, (1,), generator=gen))
        return top, left
    top, left = (int(v) for v in position)
    if not (0 <= top <= H - bh and 0 <= left <= W - bw):
        raise ValueError(f"BoxInpainting: box at ({top}, {left}) of size {bh}x{bw} leaves the image {H}x{W}")
    return top, left


class Denoising(LinearOperator):
    """:math:`A = I` (pure denoising)."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return y

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """:math:`(z + \\gamma y)/(1 + \\gamma)`."""
        g = append_dims(gamma, z.ndim)
        return (z + g * y) / (1 + g)

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        """:math:`y / (1 + \\epsilon)`."""
        return y / (1 + broadcast_eps(eps, y))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` itself."""
        return y
