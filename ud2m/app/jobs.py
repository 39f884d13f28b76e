"""The pure side of the restoration page (issue [app]): form values -> the keywords of ``sample.py``'s job
(:func:`ud2m.cli.sample.sample`, typed methods of :mod:`ud2m.methods`), one run into a fresh folder, and that
folder's PNGs (videos: MP4s, docs/video.md) and ``metrics.json`` -> what the page shows. Nothing here imports
gradio, so it is tested without a browser; :mod:`ud2m.app.page` only lays the form out and calls :func:`run_form`.

Because the page runs the CLI's own job and reads back the files it wrote, every number it shows (PSNR, SSIM, NFE,
solver time) is ``sample.py``'s for the same options and seed.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import ud2m
from ud2m.cli.errors import USER_ERRORS
from ud2m.io import digits_names, read_results

PRIOR_DIR = Path(ud2m.__file__).parent / "assets" / "priors"
METHODS = ("LATINO", "DiffPIR", "DPS", "TV", "UD2M")
#: The methods of the video prior: LVTINO, and LVTINO without the video prior (frame-wise LATINO, docs/video.md §2).
VIDEO_METHODS = ("LVTINO", "LATINO (frame-wise)")
#: Degradations given by their parameters (the presets are listed per prior in :data:`PRIORS`).
KINDS = ("super-resolution", "Gaussian blur", "random inpainting", "box inpainting", "drawn mask", "denoising")
#: The family of tuned settings each degradation uses (:data:`TUNED`).
FAMILY = {
    "ud2m/mnist_sr_x4": "sr",
    "photos/sr_x4": "sr",
    "photos/deblur_gaussian": "deblur",
    "photos/inpaint_random": "inpaint_random",
    "photos/inpaint_box": "inpaint_box",
    "super-resolution": "sr",
    "Gaussian blur": "deblur",
    "random inpainting": "inpaint_random",
    "box inpainting": "inpaint_box",
    "drawn mask": "inpaint_box",
    "denoising": "deblur",
}


@dataclass(frozen=True)
class PriorChoice:
    """A shipped prior: its folder, the crop of simulated inputs, its presets and built-in held-out images; a video
    prior also names the image prior LVTINO uses frame by frame (``image_prior``)."""

    folder: Path
    size: int
    presets: tuple[str, ...]
    builtins: tuple[tuple[str, str], ...]  # (label, source)
    label: str = ""
    image_prior: Path | None = None

    @property
    def video(self) -> bool:
        """Whether this is a video prior (its runs are LVTINO's video job)."""
        return self.image_prior is not None


def _digit_builtins() -> tuple[tuple[str, str], ...]:
    return tuple((f"held-out digit {s.split(':')[1]}", s) for s in digits_names("val"))


PHOTO_BUILTINS = (
    ("held-out photo: coffee (centre 64² crop)", "skimage:coffee"),
    ("held-out photo: immunohistochemistry (centre 64² crop)", "skimage:immunohistochemistry"),
)


#: The problems A, B, C of LVTINO scaled to 9-frame 64x64 clips (docs/video.md §1), by preset.
CLIP_PROBLEMS = {"lvtino/A_clips": "A", "lvtino/B_clips": "B", "lvtino/C_clips": "C"}
CLIP_BUILTINS = tuple((f"held-out clip {i} (9 frames, 64²)", f"clips:val:{i}") for i in range(8))


def priors() -> dict[str, PriorChoice]:
    """The three shipped priors (``digits``: 32x32 gray; ``photos``: 64x64 RGB, held-out photographs of
    ``configs/priors/photos.yaml``'s validation split; ``clips``: the video prior, 9 frames of 64x64 RGB, with
    ``photos`` as LVTINO's image prior and the held-out ``clips:val`` clips)."""
    photo_presets = ("photos/sr_x4", "photos/deblur_gaussian", "photos/inpaint_random", "photos/inpaint_box")
    clips = PriorChoice(
        PRIOR_DIR / "clips", 64, tuple(CLIP_PROBLEMS), CLIP_BUILTINS, "clips (video)", PRIOR_DIR / "photos"
    )
    return {
        "digits": PriorChoice(PRIOR_DIR / "digits", 32, ("ud2m/mnist_sr_x4",), _digit_builtins()),
        "photos": PriorChoice(PRIOR_DIR / "photos", 64, photo_presets, PHOTO_BUILTINS),
        "clips": clips,
    }


# ---------------------------------------------------------------------------------------------- tuned defaults
#: Per prior and degradation family: LATINO's (t_max, gamma) of its 8-step uniform grid (None: the preset's weight
#: rule), DiffPIR's lambda (zeta 1, quadratic grid), DPS's zeta (per 1000 steps) and TV's lambda, each tuned on
#: training images by ``benchmarks/quality.py`` (``benchmarks/results/quality_{digits,photos}.json``, the README's
#: quality tables). DPS was tuned on digits only; photos reuse its zeta.
TUNED: dict[tuple[str, str], dict[str, Any]] = {
    ("digits", "sr"): {"latino": (500, 1000.0), "diffpir": 0.125, "dps": 0.3, "tv": 3.0},
    ("photos", "sr"): {"latino": (500, 100.0), "diffpir": 0.5, "dps": 0.3, "tv": 10.0},
    ("photos", "deblur"): {"latino": (500, None), "diffpir": 0.5, "dps": 0.3, "tv": 10.0},
    ("photos", "inpaint_random"): {"latino": (500, 100.0), "diffpir": 0.5, "dps": 0.3, "tv": 10.0},
    ("photos", "inpaint_box"): {"latino": (700, None), "diffpir": 1.75, "dps": 0.3, "tv": 100.0},
}
STEPS = {"LATINO": 8, "DiffPIR": 100, "DPS": 100, "TV": 0, "UD2M": 0}
#: Per clip problem: the factor on LVTINO's and frame-wise LATINO's mapped schedule times (``time_scale``) that
#: ``benchmarks/video.py`` tuned on training clips (``benchmarks/results/video.json``, problems -> tuned).
VIDEO_TUNED: dict[str, dict[str, float]] = {
    "A": {"lvtino": 0.2, "latino": 0.1},
    "B": {"lvtino": 0.2, "latino": 0.35},
    "C": {"lvtino": 0.2, "latino": 0.1},
}


def tuned(prior: str, degradation: str) -> dict[str, Any]:
    """The tuned settings of ``prior`` for ``degradation``'s family (digits: its SR values for every family)."""
    family = FAMILY.get(degradation, "sr")
    return TUNED.get((prior, family)) or TUNED[(prior, "sr")]


def method_defaults(prior: str, degradation: str, method: str) -> tuple[int, float | None]:
    """``(steps, weight)`` the form starts from: LATINO's γ (None: the preset's rule), DiffPIR's λ, DPS's ζ, TV's λ,
    the video methods' time scale; steps 0 = the method's own (UD2M: the export's N; the video methods: their
    schedule's)."""
    if method in VIDEO_METHODS:
        table = VIDEO_TUNED[CLIP_PROBLEMS.get(degradation, "A")]
        return 0, table["lvtino" if method == "LVTINO" else "latino"]
    if priors()[prior].video:
        return 0, None  # an image method on the video prior: sample_kwargs refuses it
    table = tuned(prior, degradation)
    weight = {"LATINO": table["latino"][1], "DiffPIR": table["diffpir"], "DPS": table["dps"], "TV": table["tv"]}
    return STEPS[method], weight.get(method)


# ---------------------------------------------------------------------------------------------- form -> job
@dataclass(frozen=True)
class Form:
    """The page's values. ``degradation`` is a preset name or one of :data:`KINDS`; ``weight`` is LATINO's γ,
    DiffPIR's λ, DPS's ζ, TV's λ or the video methods' time scale (None or 0: LATINO's preset rule, the video
    methods' released times); ``mask``: the drawn mask, True = missing."""

    prior: str = "digits"
    input_kind: str = "built-in"
    builtin: str = "digits:0023"
    upload: str | None = None
    crop: int = 32
    observation: bool = False
    degradation: str = "ud2m/mnist_sr_x4"
    factor: int = 4
    blur_sigma: float = 3**0.5
    p_obs: float = 0.5
    box: float = 0.5
    sigma_y: float = 0.05
    mask: Any = None
    method: str = "LATINO"
    steps: int = 8
    weight: float | None = 1000.0
    export: str = ""
    num_samples: int = 1
    seed: int = 0


def source_of(form: Form) -> str:
    """The input: the built-in image's source, or the uploaded file (a readable message when there is none)."""
    if form.input_kind == "upload":
        if not form.upload:
            raise ValueError("no file uploaded: upload an image (a clip for the video prior), or pick a built-in one")
        return str(form.upload)
    return form.builtin


def operator_of(form: Form, size: int) -> Any:
    """A preset name, or the operator object of ``form.degradation`` with the form's parameters (``size``: the
    prior's image size; masks and boxes are redrawn for the image's size by the job)."""
    from ud2m.operators import (
        BoxInpainting,
        Denoising,
        GaussianBlur,
        Inpainting,
        RandomInpainting,
        SuperResolution,
    )

    kind = form.degradation
    if kind not in KINDS:
        return kind  # a preset
    if kind == "super-resolution":  # the presets' UD2M kernel (3x3, ∝ exp(-r²/6)) at any factor
        return SuperResolution(int(form.factor), "gaussian", gaussian_sigma=3**0.5, gaussian_size=3)
    if kind == "Gaussian blur":
        return GaussianBlur(float(form.blur_sigma))
    if kind == "random inpainting":
        return RandomInpainting(size, float(form.p_obs))
    if kind == "box inpainting":
        return BoxInpainting(size, float(form.box))
    if kind == "drawn mask":
        if form.mask is None or not np.any(form.mask):
            raise ValueError("drawn mask: paint the region to fill on the mask canvas first")
        return Inpainting(mask=_resized_mask(np.asarray(form.mask, dtype=bool), input_hw(form)))
    return Denoising()


def input_hw(form: Form) -> tuple[int, int]:
    """``(H, W)`` of the image the job restores: the crop of a simulated input, else the whole file."""
    from ud2m.io import image_size

    H, W = image_size(source_of(form))
    crop = int(form.crop or 0)
    return (crop, crop) if not form.observation and 0 < crop <= min(H, W) else (H, W)


def _resized_mask(missing: np.ndarray, hw: tuple[int, int]):
    """The observed-pixel mask ``(H, W)`` (1 = observed) of a drawn ``missing`` mask at any resolution."""
    import torch
    from PIL import Image

    small = Image.fromarray(missing.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(small) < 128).float()


def painted(editor_value: dict[str, Any] | None) -> np.ndarray | None:
    """The pixels painted on an image editor's layers (``{"layers": [(H, W, 4) arrays], ...}``), True = painted;
    None when nothing was painted."""
    layers = [np.asarray(a) for a in (editor_value or {}).get("layers") or [] if a is not None]
    layers = [a[..., 3] > 0 for a in layers if a.ndim == 3 and a.shape[-1] == 4]
    return np.logical_or.reduce(layers) if layers and np.any(layers) else None


def preview(form: Form) -> np.ndarray | None:
    """The clean input (its crop when simulating) as a display image, for the mask canvas; None if unreadable."""
    from ud2m.io import center_crop, load_image

    try:
        x = load_image(source_of(form))
        hw = input_hw(form)
        x = center_crop(x, hw[0]) if hw != tuple(x.shape[-2:]) else x
    except USER_ERRORS:
        return None
    return display(to_uint8(x))


def preset_sigma_y(name: str) -> float | None:
    """The noise level σ_y of an operator preset (None for a parameter kind)."""
    if name in KINDS:
        return None
    from ud2m.operators.presets import load_preset

    return float(load_preset(name).sigma_y)


def method_of(form: Form):
    """The typed method object (:mod:`ud2m.methods`) with the form's steps and weight (the video methods: LVTINO
    with the video prior's image prior and the weight as its time scale; the schedule is the preset's)."""
    from ud2m.methods import DPS, LVTINO, UD2M, DiffPIR, Latino, TotalVariation
    from ud2m.schedules import uniform_grid
    from ud2m.solvers.weights import ConstantGamma

    steps = int(form.steps or 0) or None
    weight = float(form.weight) if form.weight else None
    if form.method in VIDEO_METHODS:
        image_prior = priors()[form.prior].image_prior or PRIOR_DIR / "photos"
        return LVTINO(image_model=str(image_prior), time_scale=weight or 1.0)
    if form.method == "LATINO":
        t_max = tuned(form.prior, form.degradation)["latino"][0]
        grid = list(uniform_grid(steps or STEPS["LATINO"], t_max=t_max))
        return Latino(timesteps=grid, weights=None if weight is None else ConstantGamma(weight))
    if form.method == "DiffPIR":
        return DiffPIR(num_steps=steps, lambda_=weight, zeta=1.0, grid="quad")
    if form.method == "DPS":
        return DPS(num_steps=steps, zeta=weight, zeta_scaling="steps")
    if form.method == "TV":
        return TotalVariation(lam=weight or 20.0)
    if form.method == "UD2M":
        return UD2M(num_steps=steps)
    raise ValueError(f"method: expected one of {METHODS + VIDEO_METHODS}, got {form.method!r}")


def sample_kwargs(form: Form, output_dir: Path) -> dict[str, Any]:
    """The keywords of :func:`ud2m.cli.sample.sample` for the form: the same job as ``sample.py`` (LPIPS off: its
    backbone weights are a download; no resume: every run has its own folder). A video prior takes the video
    methods only, and they take it only (LVTINO's ``--model`` is the video prior; frame-wise LATINO loads none)."""
    prior = priors()[form.prior]
    if prior.video != (form.method in VIDEO_METHODS):
        expected = VIDEO_METHODS if prior.video else METHODS
        raise ValueError(f"the {form.prior} prior restores with {' or '.join(expected)}, not {form.method}")
    kw: dict[str, Any] = dict(
        input=source_of(form),
        output_dir=Path(output_dir),
        method=method_of(form),
        operator=operator_of(form, prior.size),
        sigma_y=float(form.sigma_y),
        simulate=not form.observation,
        seed=int(form.seed),
        num_samples=int(form.num_samples),
        lpips=None,
        resume=False,
    )
    if form.method == "UD2M":
        if not form.export:
            raise ValueError("UD2M: pick an export (a folder with ud2m.json) in the folder you named")
        kw["checkpoint"] = Path(form.export)
    elif form.method not in ("TV", "LATINO (frame-wise)"):
        kw["model"] = str(prior.folder)
    if not form.observation and not prior.video:  # videos are restored at their own size
        kw["crop"] = int(form.crop)
    return kw


def find_exports(folder: str, limit: int = 50) -> list[str]:
    """UD2M exports (folders holding ``ud2m.json``) in ``folder`` or below it, sorted (at most ``limit``)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"export folder not found: {folder}")
    return sorted(str(p.parent) for p in root.rglob("ud2m.json"))[:limit]


# ---------------------------------------------------------------------------------------------- run -> display
@dataclass
class Result:
    """What the page shows for one run (images as ``(H, W, 3)`` uint8, upscaled for display)."""

    folder: Path
    y: np.ndarray
    restored: np.ndarray
    std: np.ndarray | None
    truth: np.ndarray | None
    row: dict[str, Any]
    wall_seconds: float
    device: str
    std_max: float | None = None
    archive: Path | None = None


def new_run_folder(root: str | Path) -> Path:
    """A fresh, not yet existing folder under ``root`` for one run (the job creates it)."""
    return Path(root) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class VideoResult:
    """What the page shows for one video run: the MP4s (GIFs without ffmpeg) the job wrote, and the truth's."""

    folder: Path
    y: Path
    restored: Path
    truth: Path | None
    row: dict[str, Any]
    wall_seconds: float
    device: str
    archive: Path | None = None


def run_form(form: Form, root: str | Path) -> Result | VideoResult:
    """Run the form's job into a fresh folder under ``root`` and read back what it wrote; bad input raises the
    job's readable ``ValueError`` / ``FileNotFoundError`` before anything is written."""
    from ud2m.cli.sample import sample

    kw = sample_kwargs(form, new_run_folder(root))
    t0 = time.perf_counter()
    result = sample(**kw)
    wall = time.perf_counter() - t0
    read = read_video_run if form.method in VIDEO_METHODS else read_run
    out = read(kw["output_dir"], result, wall)
    out.archive = Path(shutil.make_archive(str(out.folder), "zip", out.folder))
    return out


def read_video_run(
    folder: Path, result: dict[str, Any] | None = None, wall_seconds: float = float("nan")
) -> VideoResult:
    """The run's videos and its (single) metric row; a simulated run's truth (the clip the metrics compared with)
    is written next to them as ``<stem>_truth.mp4``, the one file the page adds to the job's folder."""
    from ud2m.cli.restore_video import FPS
    from ud2m.video_io import read_video, write_video

    folder = Path(folder)
    result = result or read_results(folder)
    row = result["images"][0]
    stem = row["video"]
    truth = None
    if result["run"]["options"].get("simulate", True):
        truth = write_video(read_video(row["source"]), folder / f"{stem}_truth.mp4", FPS)
    return VideoResult(
        folder=folder,
        y=_written_video(folder, f"{stem}_y"),
        restored=_written_video(folder, f"{stem}_restored"),
        truth=truth,
        row=row,
        wall_seconds=wall_seconds,
        device=str(result["run"].get("device", "")),
    )


def _written_video(folder: Path, name: str) -> Path:
    """``<name>.mp4``, or the GIF :func:`~ud2m.video_io.write_video` writes instead without ffmpeg."""
    mp4 = folder / f"{name}.mp4"
    return mp4 if mp4.is_file() else folder / f"{name}.gif"


def read_run(folder: Path, result: dict[str, Any] | None = None, wall_seconds: float = float("nan")) -> Result:
    """The run's images and its (single) metric row, from the files the job wrote in ``folder``."""
    result = result or read_results(folder)
    row = result["images"][0]
    stem = row["image"]
    std_path = folder / f"{stem}_std.png"
    std = read_png(std_path) / 65535.0 if std_path.is_file() else None  # 16-bit: value / 65535 = std on [0, 1]
    truth = _truth(row, result["run"]["options"])
    return Result(
        folder=Path(folder),
        y=display(read_png(folder / f"{stem}_y.png")),
        restored=display(read_png(folder / f"{stem}_restored.png")),
        std=None if std is None else display(heat_map(std)),
        truth=None if truth is None else display(truth),
        row=row,
        wall_seconds=wall_seconds,
        device=str(result["run"].get("device", "")),
        std_max=None if std is None else float(std.max()),
    )


def _truth(row: dict[str, Any], options: dict[str, Any]) -> np.ndarray | None:
    """The clean image the metrics compared with (the centre crop of a simulated input), as uint8."""
    if not options.get("simulate", True):
        return None
    from ud2m.io import center_crop, load_image

    x = load_image(row["source"])
    if x.shape[-2:] != (row["height"], row["width"]):
        x = center_crop(x, row["height"])
    return to_uint8(x)


def to_uint8(x) -> np.ndarray:
    """A ``(1, C, H, W)`` tensor on [-1, 1] as an ``(H, W, C)`` uint8 image (as ``save_image`` writes it)."""
    return ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    """A PNG as ``(H, W)`` or ``(H, W, C)`` (uint8, or float for 16-bit files)."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr.astype(np.float64) if arr.dtype == np.uint16 or img.mode.startswith("I") else arr


def heat_map(std: np.ndarray) -> np.ndarray:
    """A std map ``(H, W)`` as an ``(H, W, 3)`` uint8 magma heat map scaled to its maximum."""
    from matplotlib import colormaps

    scaled = std / std.max() if std.max() > 0 else std
    return (colormaps["magma"](scaled)[..., :3] * 255).round().astype(np.uint8)


def display(img: np.ndarray, min_side: int = 256) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8, upscaled by an integer factor (nearest) so that tiny digits stay visible."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    k = max(1, min_side // max(img.shape[:2]))
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1).astype(np.uint8)


def _fmt(row: dict[str, Any], key: str, unit: str = "", digits: int = 2) -> str:
    value = row.get(key)
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def metrics_markdown(result: Result | VideoResult, form: Form) -> str:
    """The metrics table of the page (PSNR / SSIM only when the truth is known)."""
    if isinstance(result, VideoResult):
        return video_metrics_markdown(result)
    row = result.row

    def fmt(key: str, unit: str = "", digits: int = 2) -> str:
        return _fmt(row, key, unit, digits)

    lines = ["| metric | value |", "|---|---|"]
    if row.get("psnr") is not None:
        lines += [f"| PSNR | {fmt('psnr', ' dB')} |", f"| SSIM | {fmt('ssim', '', 3)} |"]
        if form.num_samples > 1:
            lines.append(f"| PSNR of sample 0 | {fmt('psnr_sample0', ' dB')} |")
    lines += [
        f"| data consistency | {fmt('data_consistency')} |",
        f"| NFE | {row.get('nfe', 0)} |",
        f"| solver time | {fmt('seconds', ' s', 3)} |",
        f"| wall time (loading included) | {result.wall_seconds:.1f} s on {result.device} |",
    ]
    if result.std_max is not None:
        lines.append(f"| std heat map scale (dark to bright) | 0 to {result.std_max:.3f} |")
    return "\n".join(lines)


def video_metrics_markdown(result: VideoResult) -> str:
    """The metrics table of a video run (docs/video.md, docs/cli.md "Videos"): PSNR per frame averaged, global
    PSNR (one MSE over the clip), SSIM, flicker, NFE in both conventions (sweeps; network calls), times."""
    row = result.row
    lines = ["| metric | value |", "|---|---|"]
    if row.get("psnr") is not None:
        lines += [
            f"| PSNR (per frame, averaged) | {_fmt(row, 'psnr', ' dB')} |",
            f"| global PSNR (one MSE over the clip) | {_fmt(row, 'psnr_global', ' dB')} |",
            f"| SSIM (per frame) | {_fmt(row, 'ssim', '', 3)} |",
            f"| flicker (mean abs Δt(x̂ − x) × 100) | {_fmt(row, 'flicker')} |",
        ]
    nfe = f"{row.get('nfe', 0)} ({row.get('nfe_video', 0)} video + {row.get('nfe_image', 0)} image sweeps)"
    lines += [
        f"| data consistency | {_fmt(row, 'data_consistency')} |",
        f"| NFE | {nfe} |",
        f"| network calls (one per frame) | {row.get('calls', 0)} |",
        f"| solver time | {_fmt(row, 'seconds', ' s', 3)} |",
        f"| wall time (loading included) | {result.wall_seconds:.1f} s on {result.device} |",
        f"| frames | {row.get('frames')} of {row.get('height')}x{row.get('width')} |",
    ]
    return "\n".join(lines)


def error_message(err: BaseException) -> str:
    """A readable message for a failed run: the job's own message for user errors (it names the file and the
    expected value), the exception type for anything else."""
    if isinstance(err, USER_ERRORS):
        return f"**Cannot run:** {err}"
    return f"**The run failed** ({type(err).__name__}): {err}"


__all__ = [
    "FAMILY",
    "KINDS",
    "METHODS",
    "TUNED",
    "VIDEO_METHODS",
    "VIDEO_TUNED",
    "Form",
    "PriorChoice",
    "Result",
    "VideoResult",
    "error_message",
    "find_exports",
    "heat_map",
    "method_defaults",
    "method_of",
    "metrics_markdown",
    "operator_of",
    "priors",
    "read_run",
    "read_video_run",
    "run_form",
    "sample_kwargs",
]
