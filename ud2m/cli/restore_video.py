"""The video job of ``sample.py`` (issue [video]): a video method (``--method LVTINO``, docs/method.md §6) restores
videos with the image job's options, seeds, run record and resume rules (docs/cli.md "Videos", docs/video.md §2).

Inputs are videos (:func:`ud2m.video_io.discover_videos`: a file, a folder of videos or of frame folders, a glob, or
``clips:val``). ``--model`` is the VIDEO prior (:func:`load_video_prior`; without it LVTINO is frame-wise LATINO),
the method's ``image_model`` the image prior. Every check that can fail (inputs readable, frame count and frame size
against the operator and the priors, references, options that do not apply to videos, a changed setting in the
output folder) runs in :func:`prepare`, BEFORE anything is written; :func:`run` then only restores and writes.

Outputs per video: ``<stem>_restored.mp4`` and its lossless frames ``<stem>_restored/`` (PNG), ``<stem>_y.mp4`` and
``<stem>_y/`` (the measurement as :func:`~ud2m.cli.outputs.measurement_image` writes images, readable back with
``simulate=False``); per folder ``metrics.json`` / ``metrics.csv`` (PSNR per frame averaged, global PSNR, SSIM,
flicker, data consistency, NFE in both conventions of §6.5, seconds, peak memory). Seeds follow §1.5 as for images:
video i's solver noise from ``hash(seed, 0, i, 0)``, its simulated noise from ``hash(seed, 1, i, 0)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ud2m.cli.outputs import measurement_image, peak_memory_mb, reset_peak_memory, synchronize
from ud2m.cli.restore import (
    Options,
    grad_mode,
    image_channels,
    noise_generators,
    observation_to_internal,
    output_stem,
    reference_of,
    references_by_stem,
    resolve_device,
    resolve_dtype,
    resolve_operator,
    run_pending,
)
from ud2m.cli.resume import check_resume_compatible, run_record
from ud2m.io import write_results
from ud2m.methods import Method, Problem
from ud2m.metrics import data_consistency, flicker, psnr, ssim, video_psnr_global
from ud2m.operators.base import LinearOperator
from ud2m.operators.noise import measure, sigma_internal
from ud2m.priors.latent import default_dtype
from ud2m.priors.loading import load_prior, model_family, model_json
from ud2m.priors.stacked import FrameStackedPrior, FrameWisePrior
from ud2m.solvers.posterior import sample_generators
from ud2m.video_io import discover_videos, read_video, stack_videos, video_stem, write_video

logger = logging.getLogger(__name__)

FPS = 8  # frames per second of the MP4s written (the frame folders are the lossless copy)
SUMMARY_KEYS = (
    "psnr",
    "psnr_global",
    "ssim",
    "flicker",
    "data_consistency",
    "nfe",
    "calls",
    "seconds",
    "peak_memory_mb",
)


@dataclass(frozen=True)
class Video:
    """One input video: its index in the sorted input list (seeds), source, output stem, shape and reference."""

    index: int
    source: str
    stem: str
    x_shape: tuple[int, int, int, int]  # (C, T, H, W) of the restored video
    reference: str | None = None


@dataclass
class VideoJob:
    """Everything :func:`prepare` resolved and validated (``prior`` is the image prior)."""

    options: Options
    method: Method
    op: Any
    operator_name: str
    sigma_y: float
    device: torch.device
    preset: dict[str, Any] = field(default_factory=dict)
    sigma_data: float | None = None  # noise level of the data term (JPEG presets: sigma_eff, §2.6); None: sigma_y
    prior: Any = None
    video_prior: Any = None
    items: list[Video] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)

    def problem(self, x_shape: tuple[int, ...] = (0, 0, 0, 0)) -> Problem:
        """The :class:`~ud2m.methods.Problem` the method restores from."""
        sigma = self.sigma_y if self.sigma_data is None else self.sigma_data
        return Problem(self.op, sigma, x_shape, self.prior, preset=self.preset, video_prior=self.video_prior)


def restore_video(options: Options) -> dict[str, Any]:
    """Run a video job (``options.method`` is a video method object): validate everything, then restore every
    pending video and write the outputs; returns the content of ``metrics.json``.

    Raises:
        FileNotFoundError, ValueError: for bad inputs, raised before anything is written.
    """
    return run(prepare(options))


# ============================================================================================== preparation
def prepare(options: Options) -> VideoJob:
    """Resolve and validate every option; reads inputs and loads the priors but writes nothing."""
    _check_options(options)
    sources = discover_videos(options.input)
    op, sigma_y, name, preset, sigma_data = resolve_operator(options, options.method, None)
    device = resolve_device(options.device)
    job = VideoJob(options, options.method, op.to(device), name, sigma_y, device, preset, sigma_data)
    _load_priors(job)
    job.method.check(job.problem())
    job.items = plan_videos(job, sources)
    job.run = run_record(job, job.problem())
    check_resume_compatible(job)
    return job


def _check_options(options: Options) -> None:
    """Options that do not apply to videos are refused rather than ignored."""
    if options.num_samples != 1:
        raise ValueError(f"num_samples={options.num_samples}: the video path writes one restoration per video (use 1)")
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {options.batch_size}")
    if options.crop is not None:
        raise ValueError(f"crop={options.crop}: videos are restored at their own size (crop is for images)")
    if options.reference is not None and options.simulate:
        raise ValueError("--reference is for observation mode (simulate=False); simulated runs use the input")


def load_video_prior(source: str, *, dtype: torch.dtype | None, device: torch.device, **kwargs: Any) -> Any:
    """The video prior of ``--model``: a Wan ``WanPipeline`` folder or hub id
    (:class:`~ud2m.priors.video.VideoFlowPrior`; ``--model_options`` such as ``transformer_weights``) or a pixel
    DDPM over stacked frames (:class:`~ud2m.priors.stacked.FrameStackedPrior`, e.g. ``ud2m/assets/priors/clips``)."""
    dtype = dtype or default_dtype(device, sdxl=False)
    index = model_json(source, "model_index.json") or {}
    if "transformer" in index:
        from ud2m.priors.video import VideoFlowPrior

        return VideoFlowPrior.from_pretrained(source, dtype=dtype, device=device, **kwargs)
    if model_family(source) != "pixel":
        raise ValueError(
            f"{source}: not a video prior (expected a pixel DDPM over stacked frames such as "
            "ud2m/assets/priors/clips, or a Wan folder); image priors go in --method.image_model"
        )
    return FrameStackedPrior.from_pretrained(source, dtype=dtype, device=device, **kwargs)


def _load_priors(job: VideoJob) -> None:
    """The image prior (the method's ``image_model``) and, with ``--model``, the video prior."""
    options, dtype = job.options, resolve_dtype(job.options.dtype)
    job.prior = load_prior(job.method.image_model, dtype=dtype, device=job.device)
    if options.model is not None:
        kwargs = dict(options.model_options or {})
        job.video_prior = load_video_prior(options.model, dtype=dtype, device=job.device, **kwargs)
    job.run["model"] = options.model


def plan_videos(job: VideoJob, sources: list[str]) -> list[Video]:
    """One :class:`Video` per source, each read and checked against the operator and the priors (errors name it)."""
    references = references_by_stem(job.options.reference, discover_videos, video_stem)
    stems: dict[str, str] = {}
    items = []
    for index, source in enumerate(sources):
        stem = output_stem(source, job.options.simulate, video_stem)
        if stem in stems:
            raise ValueError(f"two inputs give the same output name {stem!r}: {stems[stem]} and {source}")
        stems[stem] = source
        reference = reference_of(job, references, source, stem, "video")
        item = Video(index, source, stem, _x_shape(job, source, read_frames(job, source)), reference)
        _check_video(job, item)
        items.append(item)
    return items


def read_frames(job: VideoJob, source: str) -> torch.Tensor:
    """``(T, C, H, W)`` on [-1, 1] with the image prior's C channels (gray frames replicated, colour averaged)."""
    frames, C = read_video(source), image_channels(job)
    if frames.shape[1] == C:
        return frames
    return frames.expand(-1, C, -1, -1) if frames.shape[1] == 1 else frames.mean(1, keepdim=True)


def _x_shape(job: VideoJob, source: str, frames: torch.Tensor) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the restored video: the input's, or the operator's preimage of an observation."""
    T, C, H, W = frames.shape
    if job.options.simulate:
        return (C, T, H, W)
    y_like = torch.zeros(1, C, T, H, W, device=job.device)
    try:
        with torch.inference_mode():
            x_like = job.op.A_adjoint(y_like) if isinstance(job.op, LinearOperator) else y_like
    except ValueError as err:
        raise ValueError(
            f"{source}: an observation of {T} frames of {H}x{W} does not fit the operator {job.operator_name}: {err}"
        ) from err
    return (C, *x_like.shape[2:])


def _check_video(job: VideoJob, item: Video) -> None:
    """Run the operator on a zero video of the item's shape and the priors' shape checks; check the reference."""
    C, T, H, W = item.x_shape
    x_shape = (1, C, T, H, W)
    try:
        with torch.inference_mode():
            job.op.A(torch.zeros(x_shape, device=job.device))
        if job.video_prior is not None:
            job.video_prior.check_shape(x_shape)
        FrameWisePrior(job.prior).check_shape(x_shape)
    except ValueError as err:
        sized = job.preset.get("num_frames"), job.preset.get("image_size")
        hint = f" (the preset is sized for {sized[0]} frames of {sized[1]})" if sized[0] else ""
        raise ValueError(
            f"{item.source}: cannot restore a video of {T} frames of {H}x{W} with operator {job.operator_name}"
            f"{hint}: {err}"
        ) from err
    if item.reference is not None:
        shape = tuple(read_frames(job, item.reference).shape)
        if shape != (T, C, H, W):
            raise ValueError(f"{item.reference}: reference of shape (T, C, H, W) = {shape}, expected {(T, C, H, W)}")


# ============================================================================================== running
def output_paths(job: VideoJob, item: Video) -> dict[str, Path]:
    """The video files and frame folders written for ``item``."""
    out, stem = job.options.output_dir, item.stem
    return {
        "y": out / f"{stem}_y.mp4",
        "y_frames": out / f"{stem}_y",
        "restored": out / f"{stem}_restored.mp4",
        "restored_frames": out / f"{stem}_restored",
    }


def is_done(job: VideoJob, item: Video) -> bool:
    """The restored video's last frame exists (it is written last; resume skips the video)."""
    return (output_paths(job, item)["restored_frames"] / f"frame_{item.x_shape[1] - 1:04d}.png").is_file()


def run(job: VideoJob) -> dict[str, Any]:
    """Restore every pending video in batches and write outputs and metrics after each batch."""
    return run_pending(job, "video", "video", is_done, restore_batch, write_metrics)


def load_batch(job: VideoJob, batch: list[Video]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(x, y)``: references (None when there are none) ``(B, C, T, H, W)`` and measurements, internal scale."""
    videos = stack_videos([read_frames(job, v.source) for v in batch]).to(job.device)
    if job.options.simulate:
        return videos, measure(job.op, videos, job.sigma_y, noise_generators(job, batch))
    y = observation_to_internal(job.op, (videos + 1) / 2, (len(batch), *batch[0].x_shape))
    if batch[0].reference is None:
        return None, y
    return stack_videos([read_frames(job, v.reference) for v in batch]).to(job.device), y


def restore_batch(job: VideoJob, batch: list[Video]) -> list[dict[str, Any]]:
    """Restore one batch of videos (one solver call), write its videos, return its metric rows."""
    x, y = load_batch(job, batch)
    indices = [v.index for v in batch]
    generators = sample_generators(job.options.seed, indices, 1)  # stream 0, sample 0, on the CPU (§1.5)
    reset_peak_memory(job.device)
    t0 = time.perf_counter()
    with grad_mode(job.method):
        out = job.method.restore(job.problem(batch[0].x_shape), y, generators, torch.tensor(indices))
    synchronize(job.device)
    seconds = (time.perf_counter() - t0) / len(batch)
    x_hat, extras = out if isinstance(out, tuple) else (out, {})
    with torch.inference_mode():
        x_hat = x_hat.float()
        rows = metric_rows(job, batch, x, y, x_hat)
        write_outputs(job, batch, y, x_hat)
    peak = peak_memory_mb(job.device)
    for row in rows:
        row.update(**extras.get("nfe", {}), seconds=seconds, **peak)
    return rows


def metric_rows(job: VideoJob, batch: list[Video], x, y, x_hat) -> list[dict[str, Any]]:
    """Per video: PSNR (per frame, averaged), global PSNR, SSIM and flicker (×100) when a reference exists, and the
    data-consistency ratio :math:`\\|A\\hat x - y\\|/(\\sqrt m\\,\\sigma_n)` (docs/method.md §10.1)."""
    sigma_n = sigma_internal(job.sigma_y if job.sigma_data is None else job.sigma_data)
    none = [None] * len(batch)
    values: dict[str, list] = {"data_consistency": none}
    if sigma_n > 0:
        values["data_consistency"] = data_consistency(job.op, x_hat, y, sigma_n).tolist()
    if x is not None:
        values.update(psnr=psnr(x_hat, x).tolist(), psnr_global=video_psnr_global(x_hat, x).tolist())
        values["ssim"] = ssim(x_hat, x).tolist() if min(x.shape[-2:]) >= 11 else none  # 11x11 window
        values["flicker"] = (100 * flicker(x_hat, x)).tolist()
    rows = []
    for i, item in enumerate(batch):
        _, T, H, W = item.x_shape
        row = dict(video=item.stem, source=item.source, reference=item.reference, frames=T, height=H, width=W)
        rows.append({**row, **{k: v[i] for k, v in values.items()}})
    return rows


def write_outputs(job: VideoJob, batch: list[Video], y: torch.Tensor, x_hat: torch.Tensor) -> None:
    """y first (never over the input), then the restored video (its last frame marks the video done)."""
    y_img = measurement_image(job.op, y, (len(batch), *batch[0].x_shape))
    for i, item in enumerate(batch):
        paths = output_paths(job, item)
        source = Path(item.source).resolve() if Path(item.source).exists() else None
        if source not in (paths["y"].resolve(), paths["y_frames"].resolve()):
            write_video(y_img[i : i + 1], paths["y"], FPS, frames_dir=paths["y_frames"])
        write_video(x_hat[i : i + 1], paths["restored"], FPS, frames_dir=paths["restored_frames"])


def write_metrics(job: VideoJob, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write ``metrics.json`` / ``metrics.csv`` with the rows in input order (earlier rows of a resumed run kept)."""
    order = {v.stem: v.index for v in job.items}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["video"], math.inf), r["video"]))
    record = {**job.run, "lpips": "not computed for videos", "options": job.options.record()}
    return write_results(job.options.output_dir, record, ordered, keys=SUMMARY_KEYS)


__all__ = ["FPS", "Video", "VideoJob", "load_video_prior", "prepare", "restore_video", "run"]
