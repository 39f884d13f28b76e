"""Image files in and out, with the value-range conventions of algorithms.md §1.1 (files on [0, 1], library on
[-1, 1]) and clear errors for bad inputs. Also resolves the built-in photographs of ``skimage.data``
(``"skimage:astronaut"``), which ship with scikit-image and need no download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _to_float01(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{source}: float image values must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        return arr.astype(np.float32)
    raise ValueError(f"{source}: unsupported pixel type {arr.dtype} (expected 8/16-bit integers or floats in [0, 1])")


def _channels_first(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{source}: expected a gray or RGB(A) image, got array shape {arr.shape}")
    if arr.shape[-1] in (2, 4):
        logger.warning("%s: alpha channel dropped", source)
        arr = arr[..., :-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_array(source: str | Path) -> np.ndarray:
    """Read an image file (PNG/JPEG/TIFF/BMP/WebP, 8 or 16 bit) or ``skimage:<name>`` as an (H, W[, C]) array."""
    source = str(source)
    if source.startswith("skimage:"):
        from skimage import data

        name = source.split(":", 1)[1]
        if not hasattr(data, name):
            raise FileNotFoundError(f"{source}: skimage.data has no image called {name!r}")
        return np.asarray(getattr(data, name)())
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img, dtype=np.uint16 if img.mode != "I" else np.int32).astype(np.uint16)
            return np.asarray(img.convert("RGBA" if "A" in img.mode else ("L" if img.mode in ("L", "1") else "RGB")))
    except UnidentifiedImageError as err:
        raise ValueError(f"{path}: not a readable image file ({err})") from err


def load_image(source: str | Path, *, channels: int | None = None) -> torch.Tensor:
    """Load one image as a ``(1, C, H, W)`` float32 tensor on [-1, 1].

    Args:
        source: a file path or ``skimage:<name>``.
        channels: convert to 1 (luminance) or 3 (replicated gray) channels; ``None`` keeps the file's.
    """
    x01 = _channels_first(_to_float01(read_array(source), str(source)), str(source))
    t = torch.from_numpy(x01)[None]
    if channels == 1 and t.shape[1] == 3:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels == 3 and t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif channels not in (None, t.shape[1]):
        raise ValueError(f"{source}: cannot convert {t.shape[1]} channels to {channels}")
    return 2 * t - 1


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size x size`` crop of a ``(B, C, H, W)`` batch (clear error if the image is smaller)."""
    H, W = x.shape[-2:]
    if size > min(H, W):
        raise ValueError(f"crop size {size} is larger than the image {H}x{W}")
    top, left = (H - size) // 2, (W - size) // 2
    return x[..., top : top + size, left : left + size]


def save_image(x: torch.Tensor, path: str | Path) -> None:
    """Save one ``(C, H, W)`` or ``(1, C, H, W)`` image on [-1, 1] as an 8-bit PNG (clamped to [0, 1])."""
    from PIL import Image

    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    arr = (((x + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR on [0, 1] after clamping (algorithms.md §10.1), inputs on [-1, 1]; returns ``(B,)``."""
    a = ((x_hat + 1) / 2).clamp(0, 1)
    b = ((x + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))
