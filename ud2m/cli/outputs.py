"""The outputs of ``sample.py`` (issue [api]: split from :mod:`ud2m.cli.restore`): per image the restored posterior
mean, the measurement (readable back in observation mode), the std map, LATINO-PRO's calibrated condition,
LD-RPS's passes and ψ output and a drawn mask; per folder ``metrics.json`` / ``metrics.csv`` with PSNR / SSIM /
LPIPS, data consistency (docs/method.md §10.1), NFE, time and peak memory.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ud2m.io import save_image, write_results
from ud2m.metrics import data_consistency, psnr, ssim
from ud2m.operators.base import LinearOperator
from ud2m.operators.noise import sigma_internal

if TYPE_CHECKING:
    from ud2m.cli.restore import Item, Job


def output_paths(job: Job, item: Item) -> dict[str, Path]:
    """The files written for ``item`` (the std map only with several samples)."""
    out = job.options.output_dir
    paths = {"restored": out / f"{item.stem}_restored.png", "y": out / f"{item.stem}_y.png"}
    if job.options.num_samples > 1:
        paths["std"] = out / f"{item.stem}_std.png"
    return paths


def is_done(job: Job, item: Item) -> bool:
    """All outputs of ``item`` exist (resume skips it)."""
    return all(p.is_file() for p in output_paths(job, item).values())


# ---------------------------------------------------------------------------------------------- metrics
def measurement_image(op, y: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    r"""The measurement as an image on [-1, 1] whose [0, 1] file reads back to ``y`` with
    :func:`~ud2m.operators.noise.measurement_to_internal`: :math:`2y_{01} - 1 = y + A(\mathbb 1) - 1` (§1.1)."""
    if not isinstance(op, LinearOperator):
        return y
    return y + op.A(torch.ones(x_shape, device=y.device, dtype=y.dtype)) - 1


def write_outputs(job: Job, batch: list[Item], y, mean, std, extras) -> None:
    """y first, then the std map, then the restored image (its existence marks the item done)."""
    y_img = measurement_image(job.op, y, (len(batch), *batch[0].x_shape))
    for i, item in enumerate(batch):
        paths = output_paths(job, item)
        if job.options.simulate or not _same_file(paths["y"], item.source):  # never overwrite the input
            save_image(y_img[i], paths["y"])
        if std is not None:
            # RMS over channels of the std on the [0, 1] scale (= std/2), stored linearly in 16 bits
            std01 = (std[i] / 2).pow(2).mean(0, keepdim=True).sqrt()
            save_image(2 * std01 - 1, paths["std"], bits=16)
        if "cond" in extras:
            _save_condition(job, extras["cond"], i, item)
        if "passes" in extras:  # LD-RPS: every pass of sample 0 and ψ's output on it (docs/method.md §13.3)
            k = i * job.options.num_samples
            for r, x_r in enumerate(extras["passes"][:-1]):
                save_image(x_r[k], job.options.output_dir / f"{item.stem}_pass{r}.png")
            save_image(extras["psi"][k], job.options.output_dir / f"{item.stem}_psi.png")
        if "mask" in extras:  # white = observed, as --operator's mask files
            mask = extras["mask"]
            save_image(2 * mask[i if mask.shape[0] > 1 else 0] - 1, job.options.output_dir / f"{item.stem}_mask.png")
        save_image(mean[i], paths["restored"])


def _same_file(path: Path, source: str) -> bool:
    return path.exists() and Path(source).exists() and path.resolve() == Path(source).resolve()


def _save_condition(job: Job, cond, i: int, item: Item) -> None:
    """``<stem>_cond.safetensors``: the calibrated condition of sample 0 (reusable as ``--prompt FILE``)."""
    from ud2m.solvers.latino_algorithms import save_condition

    k = i * job.options.num_samples
    row = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    row = {name: None if v is None else v[k : k + 1] for name, v in row.items()}
    save_condition(dataclasses.replace(cond, **row), job.options.output_dir / f"{item.stem}_cond.safetensors")


def metric_rows(job: Job, batch: list[Item], x, y, mean, first) -> list[dict[str, Any]]:
    """Per-image PSNR / SSIM / LPIPS on the posterior mean (and PSNR of sample 0) when a reference exists, and the
    data-consistency ratio :math:`\\|A\\hat x - y\\|/(\\sqrt m\\,\\sigma_n)` (§10.1)."""
    sigma_n = sigma_internal(job.sigma_y if job.sigma_data is None else job.sigma_data)
    dc = data_consistency(job.op, mean, y, sigma_n).tolist() if sigma_n > 0 else [None] * len(batch)
    values: dict[str, list] = {"data_consistency": dc}
    if x is not None:
        values.update(psnr=psnr(mean, x).tolist(), psnr_sample0=psnr(first, x).tolist(), ssim=_ssim(mean, x))
        values["lpips"] = job.lpips(mean, x).tolist() if job.lpips is not None else [None] * len(batch)
    rows = []
    for i, item in enumerate(batch):
        row = {
            "image": item.stem,
            "source": item.source,
            "reference": item.reference,
            "height": item.x_shape[1],
            "width": item.x_shape[2],
        }
        row.update({k: v[i] for k, v in values.items()})
        rows.append(row)
    return rows


def _ssim(x_hat: torch.Tensor, x: torch.Tensor) -> list[float | None]:
    """SSIM, or None for images smaller than its 11x11 window."""
    return ssim(x_hat, x).tolist() if min(x.shape[-2:]) >= 11 else [None] * x.shape[0]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> dict[str, Any]:
    """CUDA max allocated during the batch, or the process's peak RSS on CPU (``ru_maxrss``, kB on Linux)."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "cuda_max_allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory_kind": "cpu_max_rss"}


def write_metrics(job: Job, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write ``metrics.json`` / ``metrics.csv`` with the rows in input order (earlier rows of a resumed run kept)."""
    order = {it.stem: it.index for it in job.items}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["image"], math.inf), r["image"]))
    record = {**job.run, "lpips": job.lpips_note, "options": job.options.record()}
    return write_results(job.options.output_dir, record, ordered)


__all__ = [
    "is_done",
    "measurement_image",
    "metric_rows",
    "output_paths",
    "peak_memory_mb",
    "reset_peak_memory",
    "synchronize",
    "write_metrics",
    "write_outputs",
]
