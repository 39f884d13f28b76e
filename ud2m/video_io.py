"""Video files in and out (issue [video]), with the conventions of docs/method.md §1.1 and §1.3: files on [0, 1],
the library on [-1, 1]; a video read here is ``(T, C, H, W)`` (add a batch axis and ``transpose(1, 2)`` for the
solvers' ``(B, C, T, H, W)``).

Sources (:func:`read_video`, :func:`discover_videos`):

- a video file: ``.mp4`` / ``.mov`` / ``.avi`` / ``.mkv`` / ``.webm`` (through ffmpeg) or an animated ``.gif``;
- a folder of frame images (PNG / JPEG / TIFF / ..., read by :func:`ud2m.io.load_image`), frames sorted by name;
- a ``.npy`` array ``(T, H, W, C)`` or ``(T, H, W)``, uint8 (0..255), uint16 or float on [0, 1];
- the project's clips (``clips:val``, ``clips:train``, ``clips:<i>``, ``clips:val:<i>``, ``clips:train:<i>``): the
  9-frame 64x64 RGB clips with known motion that the offline video prior trains on (``ud2m.training.clips``,
  ``configs/priors/clips.yaml``), made deterministically from the bundled photographs. ``clips:val`` are
  :data:`CLIPS_PER_SPLIT` clips of the two held-out photographs (coffee, immunohistochemistry; clip i of photograph
  i mod 2, motion from the validation seed, so clips 0 and 1 are exactly the training run's validation clips),
  ``clips:train`` as many of the eight training photographs (the training motion law; not necessarily clips the
  prior saw), ``clips:<i>`` is ``clips:val:<i>``.

Writing (:func:`write_video`): MP4 (H.264, ``yuv420p``, CRF 10) through the ffmpeg binary that the
``imageio-ffmpeg`` wheel ships, else a GIF with a logged note; optionally the frames as a folder of 8-bit PNGs,
which is the lossless form.

Why imageio: it is small and well kept, reads and writes GIF (through Pillow) and image sequences natively, and
reaches MP4 and the other containers through ``imageio-ffmpeg``, whose wheel bundles a static ffmpeg executable, so
no system package, compiler or PyAV build is needed (offline machines included). torchvision's video IO needs PyAV
(and is being deprecated), OpenCV drags in a large binary and its own codec set.

Fidelity: PNG folders and ``.npy`` arrays are exact at 8 bits. GIF is exact for frames of at most 256 colours each
(palette); Pillow merges consecutive identical frames into one longer frame, so GIFs written here carry a comment
``ud2m frames=T`` and the reader expands merged frames back by their duration (other GIFs are read frame by frame
as stored). MP4 is lossy even at high quality: 4:2:0 chroma subsampling and the RGB <-> YCbCr rounding leave about
37 dB PSNR on a 64x64 clip at CRF 10 (less on noise-like or saturated high-frequency colour), so PNG folders are the
form to evaluate from.

Layering: this module imports ``ud2m.training.clips`` lazily, inside the clip source only (the clips must be the
training module's, bit for bit). It therefore belongs at the top of the import-linter layers, next to
``ud2m.cli``: lower layers (solvers, operators, priors, training) must not import it.
"""

from __future__ import annotations

import functools
import glob
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ud2m.io import IMAGE_SUFFIXES, _to_float01, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPS_PER_SPLIT",
    "CLIP_FRAMES",
    "CLIP_SIZE",
    "CLIP_TRAIN_PHOTOS",
    "CLIP_VAL_PHOTOS",
    "FFMPEG_SUFFIXES",
    "VIDEO_SUFFIXES",
    "clip_names",
    "discover_videos",
    "ffmpeg_available",
    "read_video",
    "stack_videos",
    "video_stem",
    "write_video",
]

#: Containers read and written through ffmpeg (``imageio-ffmpeg``).
FFMPEG_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
#: Every single-file video format: ffmpeg containers, animated GIF and ``.npy`` arrays.
VIDEO_SUFFIXES = (*FFMPEG_SUFFIXES, ".gif", ".npy")

# The clips of configs/priors/clips.yaml (tests/test_video_io.py checks that these agree with the config).
CLIP_VAL_PHOTOS = ("skimage:coffee", "skimage:immunohistochemistry")
CLIP_TRAIN_PHOTOS = (
    "skimage:astronaut",
    "skimage:chelsea",
    "skimage:rocket",
    "skimage:hubble_deep_field",
    "skimage:retina",
    "sklearn:china",
    "sklearn:flower",
    "matplotlib:grace_hopper",
)
CLIP_FRAMES, CLIP_SIZE, CLIP_SEED = 9, 64, 0
CLIP_MOTION = {"max_pan": 3.0, "max_zoom": 0.02, "max_rotation": 2.0}  # PhotoClips' defaults
#: Clips listed by ``clips:val`` and ``clips:train`` (any index is readable with ``clips:val:<i>``).
CLIPS_PER_SPLIT = 8

_GIF_COMMENT = re.compile(rb"ud2m frames=(\d+)")


# ---------------------------------------------------------------------------------------------- the clips source
def clip_names(split: str = "val", count: int = CLIPS_PER_SPLIT) -> list[str]:
    """``clips:<split>:<i>`` for i < ``count`` (``split``: ``"val"`` or ``"train"``)."""
    if split not in ("val", "train"):
        raise FileNotFoundError(f"clips:{split}: expected clips:val, clips:train, clips:<i> or clips:<split>:<i>")
    return [f"clips:{split}:{i}" for i in range(count)]


def _parse_clip(source: str) -> tuple[str, int]:
    parts = source.split(":")[1:]
    if len(parts) == 1 and parts[0].isdigit():
        return "val", int(parts[0])
    if len(parts) == 2 and parts[0] in ("val", "train") and parts[1].isdigit():
        return parts[0], int(parts[1])
    raise FileNotFoundError(
        f"{source}: expected clips:<i>, clips:val:<i> or clips:train:<i> (one clip), or clips:val / clips:train"
    )


@functools.cache
def _clip_dataset(split: str):
    """The ``ClipDataset`` of a split, as ``PhotoClips`` builds it from configs/priors/clips.yaml (lazy import:
    see the module docstring on layering)."""
    from ud2m.training.clips import ClipDataset, PhotoClips

    data = PhotoClips(
        [*CLIP_TRAIN_PHOTOS, *CLIP_VAL_PHOTOS], frames=CLIP_FRAMES, channels=3 * CLIP_FRAMES, image_size=CLIP_SIZE,
        val_sources=list(CLIP_VAL_PHOTOS), seed=CLIP_SEED, **CLIP_MOTION,
    )  # fmt: skip
    data.setup()
    ds = data.datasets[split]
    # the same images, seed and motion law; an unbounded length so that any index is a clip
    return ClipDataset(
        ds.images, ds.keys, frames=ds.frames, size=ds.size, seed=ds.seed, length=2**31 - 1, motion=ds.motion
    )


def _read_clip(source: str) -> torch.Tensor:
    from ud2m.training.clips import unstack

    split, i = _parse_clip(source)
    x = _clip_dataset(split)[i]["x"]  # (T*C, H, W), frame-major
    return unstack(x, CLIP_FRAMES).transpose(0, 1).contiguous().float()  # (T, C, H, W)


# ---------------------------------------------------------------------------------------------- reading
def _check_count(frames: torch.Tensor, expected: int | None, source: str) -> torch.Tensor:
    if expected is not None and frames.shape[0] != expected:
        raise ValueError(f"{source}: expected {expected} frames, got {frames.shape[0]}")
    return frames


def _from_array(arr: np.ndarray, source: str) -> torch.Tensor:
    """``(T, H, W[, C])`` array (uint8 / uint16 / float on [0, 1]) -> ``(T, C, H, W)`` on [-1, 1]."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 2, 3, 4) or arr.shape[0] < 1:
        raise ValueError(f"{source}: expected frames (T, H, W) or (T, H, W, C) with C in 1..4, got {arr.shape}")
    if arr.shape[-1] in (2, 4):
        logger.warning("%s: alpha channel dropped", source)
        arr = arr[..., :-1]
    x01 = _to_float01(np.ascontiguousarray(arr), source)
    return torch.from_numpy(x01).permute(0, 3, 1, 2).contiguous() * 2 - 1


def _read_folder(path: Path) -> torch.Tensor:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path}: no frame images in the folder (suffixes {', '.join(IMAGE_SUFFIXES)})")
    frames = [load_image(f)[0] for f in files]
    sizes = {tuple(f.shape[-2:]) for f in frames}
    if len(sizes) > 1:
        first = frames[0].shape[-2:]
        odd = next(f for f, x in zip(files, frames, strict=True) if x.shape[-2:] != first)
        raise ValueError(
            f"{path}: frames of different sizes: {files[0].name} is {tuple(first)}, {odd.name} is "
            f"{tuple(frames[files.index(odd)].shape[-2:])}"
        )
    if len({f.shape[0] for f in frames}) > 1:  # gray and colour frames: replicate the gray ones
        logger.info("%s: gray and colour frames mixed; gray frames replicated to RGB", path)
        frames = [f.expand(3, -1, -1) for f in frames]
    return torch.stack(frames)


def _read_gif(path: Path) -> torch.Tensor:
    """Frames of an animated GIF (Pillow composites delta frames); a GIF of :func:`write_video` gets its merged
    repeated frames back from their durations."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            comment = im.info.get("comment", b"")
            frames, durations = [], []
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                durations.append(int(frame.info.get("duration", 0) or 0))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable GIF ({err})") from err
    match = _GIF_COMMENT.search(comment if isinstance(comment, bytes) else str(comment).encode())
    if match and len(frames) < int(match.group(1)) and min(durations) > 0:
        base = sum(durations) / int(match.group(1))  # one written frame's duration (not the shortest kept frame:
        repeats = [max(1, round(d / base)) for d in durations]  # every kept frame may stand for several)
        if sum(repeats) == int(match.group(1)):
            frames = [f for f, r in zip(frames, repeats, strict=True) for _ in range(r)]
    return _from_array(np.stack(frames), str(path))


def ffmpeg_available() -> bool:
    """Whether ``imageio-ffmpeg`` and its ffmpeg executable are usable (MP4 reading and writing)."""
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).is_file()
    except (ImportError, RuntimeError, OSError):
        return False


def _read_ffmpeg(path: Path) -> torch.Tensor:
    if not ffmpeg_available():
        raise RuntimeError(f"{path}: reading {path.suffix} videos needs imageio-ffmpeg (pip install imageio-ffmpeg)")
    import imageio.v3 as iio

    try:
        arr = iio.imread(path, plugin="FFMPEG", index=None)
    except Exception as err:  # imageio/ffmpeg raise OSError, RuntimeError, IndexError, ... for broken files
        raise ValueError(f"{path}: not a readable video ({type(err).__name__}: {err})") from err
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"{path}: not a readable video (decoded an array of shape {arr.shape})")
    return _from_array(arr, str(path))


def _read_npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    return _from_array(arr, str(path))


def read_video(source: str | Path, *, expected_frames: int | None = None) -> torch.Tensor:
    """Read one video as ``(T, C, H, W)`` float32 on [-1, 1] (docs/method.md §1.1).

    Args:
        source: a video file (``.mp4`` and the other :data:`FFMPEG_SUFFIXES`, ``.gif``), a ``.npy`` array
            ``(T, H, W[, C])`` (uint8, uint16, or float on [0, 1]), a folder of frame images (sorted by name), or a
            clip ``clips:<i>`` / ``clips:val:<i>`` / ``clips:train:<i>`` (module docstring).
        expected_frames: when given, the number of frames the video must have.

    Raises:
        FileNotFoundError: missing file or folder, a folder without frame images, a malformed ``clips:`` name.
        ValueError: an unreadable file, frames of different sizes in a folder, values outside [0, 1] or not
            finite, or a frame count other than ``expected_frames`` (each message names the source).
        RuntimeError: an ffmpeg container when ``imageio-ffmpeg`` is not installed.
    """
    src = str(source)
    if src.startswith("clips:"):
        return _check_count(_read_clip(src), expected_frames, src)
    path = Path(src).expanduser()
    if path.is_dir():
        frames = _read_folder(path)
    elif not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    elif path.suffix.lower() == ".npy":
        frames = _read_npy(path)
    elif path.suffix.lower() == ".gif":
        frames = _read_gif(path)
    elif path.suffix.lower() in FFMPEG_SUFFIXES:
        frames = _read_ffmpeg(path)
    else:
        raise ValueError(
            f"{path}: not a video (expected a folder of frames or a file ending in {', '.join(VIDEO_SUFFIXES)})"
        )
    return _check_count(frames, expected_frames, str(path))


def discover_videos(spec: str | Path) -> list[str]:
    """Expand an input specification into a sorted list of video sources for :func:`read_video`.

    Args:
        spec: ``clips:val`` / ``clips:train`` (:data:`CLIPS_PER_SPLIT` clips each), one clip (``clips:<i>``,
            ``clips:val:<i>``, ``clips:train:<i>``), a video file, a folder of video files (its files with a
            :data:`VIDEO_SUFFIXES` suffix), a folder of frame images (one video), a folder of such folders (one
            video each), or a glob of video files.

    Raises:
        FileNotFoundError: for a missing path or a folder / pattern without any video.
    """
    spec = str(spec)
    if spec.startswith("clips:"):
        key = spec.split(":", 1)[1]
        if key in ("val", "train"):
            return clip_names(key)
        split, i = _parse_clip(spec)
        return [f"clips:{split}:{i}"]
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        entries = sorted(path.iterdir())
        videos = [str(p) for p in entries if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
        if videos:
            return videos
        if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
            return [str(path)]  # a folder of frames is one video
        folders = [
            str(p) for p in entries if p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir())
        ]
        if folders:
            return folders
        raise FileNotFoundError(f"{path}: no videos (files {', '.join(VIDEO_SUFFIXES)}, frame images or frame folders)")
    if set("*?[") & set(spec):
        videos = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise FileNotFoundError(f"{spec}: no video files match")
        return videos
    raise FileNotFoundError(f"input not found: {spec} (expected a video file, a folder, a glob or clips:val)")


def video_stem(source: str | Path) -> str:
    """Output name stem of a video source: ``clip_val_3`` for ``clips:val:3``, else the file or folder name."""
    source = str(source)
    if source.startswith("clips:"):
        split, i = _parse_clip(source)
        return f"clip_{split}_{i}"
    return Path(source).stem


# ---------------------------------------------------------------------------------------------- writing
def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(T, C, H, W)`` (or ``(1, C, T, H, W)``) on [-1, 1] -> ``(T, H, W, C)`` uint8 (clamped, rounded)."""
    if not torch.is_tensor(frames):
        raise TypeError(f"write_video: expected a tensor, got {type(frames).__name__}")
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"write_video: one video at a time, got a batch of {frames.shape[0]} (B, C, T, H, W)")
        frames = frames[0].transpose(0, 1)
    if frames.ndim != 4 or frames.shape[1] not in (1, 3) or frames.shape[0] < 1:
        raise ValueError(f"write_video: expected frames (T, C, H, W) with C = 1 or 3, got {tuple(frames.shape)}")
    unit = ((frames.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write_gif(arr: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=False,
        comment=f"ud2m frames={len(images)}".encode(),
    )  # fmt: skip


def _write_mp4(arr: np.ndarray, path: Path, fps: float) -> None:
    import imageio.v3 as iio

    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    H, W = arr.shape[1:3]
    pixelformat = "yuv420p" if H % 2 == 0 and W % 2 == 0 else "yuv444p"  # 4:2:0 needs even sides
    iio.imwrite(
        path, arr, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat=pixelformat, macro_block_size=1,
        output_params=["-crf", "10"], ffmpeg_log_level="error",
    )  # fmt: skip


def write_video(
    frames: torch.Tensor, path: str | Path, fps: float = 8, *, frames_dir: str | Path | None = None
) -> Path:
    """Write one video on [-1, 1] (clamped to [0, 1], 8 bits).

    Args:
        frames: ``(T, C, H, W)`` or one video ``(1, C, T, H, W)``, C = 1 or 3.
        path: ``.mp4`` (and the other :data:`FFMPEG_SUFFIXES`; H.264, CRF 10) or ``.gif``. Without ffmpeg an MP4 is
            written as a GIF next to it (same stem), with a logged note.
        fps: frames per second.
        frames_dir: also write the frames as ``frame_0000.png``, ... into this folder (lossless).

    Returns:
        The path of the video actually written.
    """
    arr = _to_uint8(frames)
    if not fps > 0:
        raise ValueError(f"write_video: fps must be positive, got {fps}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*FFMPEG_SUFFIXES, ".gif"):
        raise ValueError(f"write_video: {path}: expected a suffix among {', '.join((*FFMPEG_SUFFIXES, '.gif'))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in FFMPEG_SUFFIXES and not ffmpeg_available():
        gif = path.with_suffix(".gif")
        logger.warning("write_video: imageio-ffmpeg is not available; writing %s as a GIF instead of %s", gif, path)
        path, suffix = gif, ".gif"
    if suffix == ".gif":
        _write_gif(arr, path, fps)
    else:
        _write_mp4(arr, path, fps)
    if frames_dir is not None:
        from PIL import Image

        folder = Path(frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for t, a in enumerate(arr):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"frame_{t:04d}.png")
    return path


def stack_videos(videos: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(T, C, H, W)`` videos of one shape -> a batch ``(B, C, T, H, W)`` for the solvers (docs/method.md §1.3)."""
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"stack_videos: videos of different shapes {sorted(shapes)}")
    return torch.stack(list(videos)).transpose(1, 2)
