"""Image files in and out, with the value-range conventions of docs/method.md §1.1 (files on [0, 1], library on
[-1, 1]) and clear errors for bad inputs. Also resolves the built-in photographs of ``skimage.data``
(``"skimage:astronaut"``), which ship with scikit-image and need no download, and expands an input specification
(one file, a folder or a glob) into a sorted list of image sources for ``sample.py``.

Formats: PNG / JPEG / TIFF / BMP / WebP, 8 or 16 bit, gray or RGB (an alpha channel is dropped with a warning).
16-bit colour TIFFs are read with ``tifffile`` when it is installed; Pillow reads 16-bit colour PNGs at 8 bits only,
which is logged.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Prefixes of photographs bundled with installed packages (no download): ``skimage:astronaut``, ``sklearn:china``,
#: ``matplotlib:grace_hopper``.
PHOTO_PREFIXES = ("skimage:", "sklearn:", "matplotlib:")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
INTEGER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # formats without floating-point pixels
_GLOB_CHARS = frozenset("*?[")


def _to_float01(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:  # NaN would pass the range test below and propagate to an all-black result
            raise ValueError(f"{source}: {bad} of {arr.size} pixel values are not finite (NaN or Inf)")
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
    """Read an image file (PNG/JPEG/TIFF/BMP/WebP, 8 or 16 bit) or ``skimage:<name>`` as an (H, W[, C]) array.

    Raises:
        FileNotFoundError: for a missing file or an unknown ``skimage:`` name.
        ValueError: for a file that is not a readable image.
    """
    source = str(source)
    if source.startswith(PHOTO_PREFIXES):
        return _bundled_photo_array(source)
    if source.startswith("digits:"):
        return _digit_array(source)
    path = _existing_file(source)
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tiff(path)
        if arr is not None:
            return arr
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.uint16 if img.mode != "I" else np.int32)
                if arr.min() < 0 or arr.max() > 65535:  # 32-bit integer images: refuse rather than wrap around
                    lo, hi = arr.min(), arr.max()
                    raise ValueError(f"{path}: integer pixel values must lie in [0, 65535], got [{lo}, {hi}]")
                return arr.astype(np.uint16)
            _warn_16bit_colour_png(path, img)
            return np.asarray(img.convert("RGBA" if "A" in img.mode else ("L" if img.mode in ("L", "1") else "RGB")))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image file ({err})") from err


def split_train_val(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of ``names`` (indices into ``names``, each list in ascending order).

    The names are sorted first, so the split does not depend on the listing order of the file system; then a
    ``random.Random(seed)`` permutation picks ``n_val = round(val_fraction * n)`` validation items, at least one
    when ``val_fraction > 0`` and ``n >= 2``, and at most ``n - 1``.

    >>> split_train_val(["a", "b", "c", "d"], 0.0, seed=0)
    ([0, 1, 2, 3], [])
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n = len(names)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    order = sorted(range(n), key=lambda i: names[i])
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------------------------------------- built-in digits
#: Held-out share and seed of the built-in digits split (the same split as ``data/make_shards.py --from_digits``).
DIGITS_VAL_FRACTION, DIGITS_SEED = 0.05, 0


@functools.cache
def digits32() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16) bilinearly upsampled to 32x32, on [0, 1]:
    ``(1797, 32, 32)`` float32. They ship inside scikit-learn: no download."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    x01 = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # (N, 1, 8, 8)
    up = F.interpolate(x01, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return up[:, 0].numpy()


def digits_names(split: str = "all") -> list[str]:
    """``digits:NNNN`` sources of the built-in digits: ``"all"``, or the deterministic ``"train"`` / ``"val"`` split
    (:func:`split_train_val` on the names, 5 % held out, seed 0)."""
    names = [f"digits:{i:04d}" for i in range(digits32().shape[0])]
    if split == "all":
        return names
    if split not in ("train", "val"):
        raise FileNotFoundError(f"digits:{split}: expected digits:all, digits:train, digits:val or digits:<index>")
    train, val = split_train_val(names, DIGITS_VAL_FRACTION, DIGITS_SEED)
    return [names[i] for i in (train if split == "train" else val)]


def _digit_array(source: str) -> np.ndarray:
    key = source.split(":", 1)[1]
    if not key.isdigit() or int(key) >= digits32().shape[0]:
        raise FileNotFoundError(f"{source}: expected digits:<index> with index < {digits32().shape[0]}")
    return digits32()[int(key)]


def _bundled_photo_array(source: str) -> np.ndarray:
    """A photograph that ships inside an installed package: ``skimage:<name>`` (``skimage.data``),
    ``sklearn:<name>`` (scikit-learn's sample images, e.g. ``china``) or ``matplotlib:<name>`` (its sample data,
    e.g. ``grace_hopper``)."""
    prefix, name = source.split(":", 1)
    if prefix == "skimage":
        from skimage import data

        if not hasattr(data, name):
            raise FileNotFoundError(f"{source}: skimage.data has no image called {name!r}")
        return np.asarray(getattr(data, name)())
    if prefix == "sklearn":
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        by_name = {Path(f).stem: im for f, im in zip(images.filenames, images.images, strict=True)}
        if name not in by_name:
            raise FileNotFoundError(f"{source}: scikit-learn's sample images are {sorted(by_name)}, not {name!r}")
        return np.asarray(by_name[name])
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    matches = sorted(p for p in folder.glob(f"{name}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        raise FileNotFoundError(f"{source}: no image called {name!r} in matplotlib's sample data ({folder})")
    return read_array(matches[0])


def _existing_file(source: str | Path) -> Path:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path


def _read_tiff(path: Path) -> np.ndarray | None:
    """16-bit colour TIFFs need ``tifffile`` (Pillow reduces them to 8 bits); None when it is not installed."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        arr = np.asarray(tifffile.imread(path))
    except Exception as err:  # tifffile raises its own TiffFileError, ValueError, ...
        raise ValueError(f"{path}: not a readable TIFF image ({err})") from err
    return arr[0] if arr.ndim == 4 else arr  # multi-page: first page


def _warn_16bit_colour_png(path: Path, img) -> None:
    if img.format == "PNG" and img.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
        logger.warning("%s: 16-bit colour PNG read at 8 bits (Pillow limitation); use TIFF to keep 16 bits", path)


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(25)  # 8-byte signature, IHDR length + type, width, height, then the bit depth
    return header[24] if len(header) == 25 else 8


def image_size(source: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file without decoding its pixels (``skimage:`` images are loaded).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file that is not a readable image.
    """
    source = str(source)
    if source.startswith((*PHOTO_PREFIXES, "digits:")):
        arr = read_array(source)
        return int(arr.shape[0]), int(arr.shape[1])
    path = _existing_file(source)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image file ({err})") from err


def check_image_values(source: str | Path) -> None:
    """Check the pixel values of an image without keeping them: finite, and on [0, 1] for floating-point pixels.

    Only formats that can store floating-point pixels (TIFF and any suffix other than PNG / JPEG / BMP / WebP) are
    decoded; 8/16-bit integer formats and the bundled images hold valid values by construction.

    Raises:
        ValueError: naming the file, for NaN / Inf or out-of-range float values (as :func:`load_image` would).
    """
    source = str(source)
    if source.startswith((*PHOTO_PREFIXES, "digits:")) or Path(source).suffix.lower() in INTEGER_SUFFIXES:
        return
    _to_float01(read_array(source), source)


def discover_images(spec: str | Path) -> list[str]:
    """Expand an input specification into a sorted list of image sources.

    Args:
        spec: one image file, a folder (its files with an image suffix, not recursive), a glob pattern
            (``"photos/*.png"``, ``"data/**/*.tif"``), ``skimage:<name>`` or the built-in digits
            (``digits:val`` the held-out split, ``digits:train``, ``digits:all``, ``digits:<index>``).

    Returns:
        The sources as strings; other files in a folder or glob match are skipped with a log message.

    Raises:
        FileNotFoundError: for a missing path, or a folder / pattern without any image file.
    """
    spec = str(spec)
    if spec.startswith(PHOTO_PREFIXES):
        return [spec]
    if spec.startswith("digits:"):  # built-in digits: digits:val (held out), digits:train, digits:all, digits:<i>
        key = spec.split(":", 1)[1]
        return [spec] if key.isdigit() else digits_names(key)
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        candidates, where = sorted(p for p in path.iterdir() if p.is_file()), f"folder {path}"
    elif _GLOB_CHARS & set(spec):
        candidates, where = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()), spec
    else:
        raise FileNotFoundError(f"input not found: {spec} (expected an image file, a folder, a glob or skimage:<name>)")
    images = [str(p) for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < len(candidates):
        logger.info("%s: skipped %d file(s) without an image suffix", where, len(candidates) - len(images))
    if not images:
        raise FileNotFoundError(f"{where}: no image files (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return images


def source_stem(source: str | Path) -> str:
    """Output name stem of a source: the file stem, or ``<name>`` for ``skimage:<name>``."""
    source = str(source)
    if source.startswith("digits:"):
        return "digit_" + source.split(":", 1)[1]
    return source.split(":", 1)[1] if source.startswith(PHOTO_PREFIXES) else Path(source).stem


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


def save_image(x: torch.Tensor, path: str | Path, *, bits: int = 8) -> None:
    """Save one ``(C, H, W)`` or ``(1, C, H, W)`` image on [-1, 1] as a PNG (clamped to [0, 1]).

    Args:
        x: the image on [-1, 1].
        path: destination (parent folders are created).
        bits: 8, or 16 for single-channel images (Pillow writes 16-bit gray only).
    """
    from PIL import Image

    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    if bits not in (8, 16) or (bits == 16 and x.shape[0] != 1):
        raise ValueError(f"save_image: bits must be 8, or 16 for one channel; got bits={bits}, {x.shape[0]} channels")
    unit = ((x + 1) / 2).clamp(0, 1)
    dtype, top = (torch.uint8, 255) if bits == 8 else (torch.int32, 65535)
    arr = (unit * top).round().to(dtype).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray(arr[..., 0].astype(np.uint16)).save(path)
    else:
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


# ---------------------------------------------------------------------------------------------- result tables
RESULTS_JSON, RESULTS_CSV = "metrics.json", "metrics.csv"
SUMMARY_KEYS = ("psnr", "psnr_sample0", "ssim", "lpips", "data_consistency", "nfe", "seconds", "peak_memory_mb")


def summarize(rows: list[dict[str, Any]], keys: tuple[str, ...] = SUMMARY_KEYS) -> dict[str, Any]:
    """Mean and (population) std over rows of each numeric column in ``keys``; None / non-finite values skipped."""
    summary: dict[str, Any] = {"num_images": len(rows)}
    for key in keys:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if vals:
            summary[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return summary


def read_results(folder: str | Path) -> dict[str, Any]:
    """The content of ``<folder>/metrics.json`` (``{"run", "summary", "images"}``), or ``{}`` when absent.

    Raises:
        ValueError: for a file that is not valid JSON.
    """
    path = Path(folder) / RESULTS_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed results file ({err})") from err


def write_results(
    folder: str | Path, run: dict[str, Any], rows: list[dict[str, Any]], *, keys: tuple[str, ...] = SUMMARY_KEYS
) -> dict[str, Any]:
    """Write ``metrics.json`` (``{"run", "summary", "images"}``) and ``metrics.csv`` (one row per image or video) in
    ``folder``; ``keys``: the columns summarised (:func:`summarize`). Returns the JSON content."""
    result = {"run": run, "summary": summarize(rows, keys), "images": rows}
    folder = Path(folder)
    (folder / RESULTS_JSON).write_text(json.dumps(result, indent=2))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / RESULTS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return result
