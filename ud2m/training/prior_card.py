"""The machine-readable data card of a trained base prior (issue [quickstart]): ``card.json`` and ``samples.png``.

Everything in the card is read from the run itself, never typed in: the weight hash
(:func:`ud2m.export.base_model_hash`), the parameter count, the loss curves and wall time from the run's
TensorBoard events, and the library versions of the machine that writes the card (run it where it trained)::

    python train.py prior card --prior outputs/priors/photos_prior \\
        --run outputs/priors/runs/photos/lightning_logs/version_0 --name photos \\
        --command "OMP_NUM_THREADS=1 python train.py prior fit --config configs/priors/photos.yaml"
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from ud2m.export import base_model_hash


def read_scalars(run: str | Path) -> dict[str, list]:
    """Every scalar series of a TensorBoard run folder, ``{tag: [ScalarEvent(wall_time, step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def scalar_curve(scalars: dict[str, list], tag: str, every: int = 1) -> dict[int, float]:
    """``{step: value}`` of one series of :func:`read_scalars`, keeping every ``every``-th value and the last."""
    values = scalars.get(tag, [])
    return {e.step: round(e.value, 5) for i, e in enumerate(values) if i % every == every - 1 or i == len(values) - 1}


def wall_seconds(scalars: dict[str, list]) -> float:
    """Seconds between the first and the last event of :func:`read_scalars`."""
    times = [e.wall_time for values in scalars.values() for e in values]
    return round(max(times) - min(times), 1) if times else 0.0


def ddim_pipeline(prior: str | Path):
    """diffusers' ``DDIMPipeline`` over a pixel prior folder (``unet/`` and ``scheduler/``), with a DDIM scheduler
    made from the folder's schedule and no progress bar."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline.from_pretrained(str(prior))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_samples(pipe, num: int, *, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """``num`` DDIM samples (η = 0, ``steps`` steps, noise from ``seed``) of :func:`ddim_pipeline`'s prior,
    ``(num, C, H, W)`` float32 on [0, 1], with the noise recomputed from the clipped x̂0 (:func:`sample_grid`)."""
    images = pipe(batch_size=num, num_inference_steps=steps, eta=0.0, generator=torch.Generator().manual_seed(seed),
                  use_clipped_model_output=True, output_type="np").images  # fmt: skip
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)


def sample_grid(prior: str | Path, out: Path, *, num: int = 16, steps: int = 50, seed: int = 0) -> Path:
    """``num`` DDIM samples (η = 0, ``steps`` steps, ``seed``) of a diffusers pixel prior, tiled in a PNG (a prior of
    clips, with 3T channels, gets one row of T frames per sample).

    The DDIM direction uses the noise recomputed from the clipped x̂0 (diffusers' ``use_clipped_model_output=True``,
    what ``ud2m``'s own DDIM does): with the raw ε̂ next to a clipped x̂0, the first steps on a linear β schedule
    (where the raw x̂0 is far outside [−1, 1]) pull every sample of the photos prior to the same grey patch."""
    from torchvision.utils import make_grid, save_image

    x = ddim_samples(ddim_pipeline(prior), num, steps=steps, seed=seed)
    if x.shape[1] > 3 and x.shape[1] % 3 == 0:  # a clip prior (frames stacked along channels): a strip per sample
        strips = x.unflatten(1, (x.shape[1] // 3, 3)).permute(0, 2, 3, 1, 4).flatten(3)  # (N, 3, H, T*W)
        save_image(make_grid(strips, nrow=1, padding=1), out)
        return out
    save_image(make_grid(x, nrow=int(num**0.5), padding=1), out)
    return out


def cm_sample_grid(prior: str | Path, teacher: str | Path, out: Path, *, num: int = 16, seed: int = 0) -> Path:
    """Rows of ``num`` samples from the same initial noise: the teacher's 50-step DDIM, the teacher's one call (the
    Tweedie mean), the consistency model's 1 and 4 calls (diffusers' pipelines with the folders' own schedulers)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline
    from torchvision.utils import make_grid, save_image

    rows = []
    for folder, steps in ((teacher, 50), (teacher, 1), (prior, 1), (prior, 4)):
        pipe = DiffusionPipeline.from_pretrained(str(folder))
        if folder == teacher:  # DDIM (eta 0, clipped x0); one step on the "trailing" grid is one call at t = T - 1
            spacing = "trailing" if steps == 1 else pipe.scheduler.config.get("timestep_spacing", "leading")
            scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
            pipe = DDIMPipeline(unet=pipe.unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"eta": 0.0, "use_clipped_model_output": True} if folder == teacher else {}
        images = pipe(batch_size=num, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np", **kwargs).images  # fmt: skip
        rows.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2))
    save_image(make_grid(torch.cat(rows), nrow=num, padding=1), out)
    return out


def write_card(
    prior: str,
    run: str,
    name: str,
    command: str,
    data: str = "",
    max_steps: int | None = None,
    teacher: str | None = None,
    previous: str | None = None,
) -> Path:
    """Write ``card.json`` (hash, parameters, versions, wall time, loss curves) and ``samples.png`` into ``prior``.

    Args:
        prior: the exported diffusers folder (``SavePriorOnTrainEnd``'s ``out_dir``).
        run: the run's TensorBoard folder (``.../lightning_logs/version_N``).
        name: the prior's name.
        command: the command that trained it.
        data: one line on the training data and the held-out split.
        max_steps: recorded as given (``None``: the last logged step + 1).
        teacher: for a distilled consistency model (``prior distil``), the teacher's folder: its hash goes into
            the card and ``samples.png`` compares the two (:func:`cm_sample_grid`).
        previous: for a run that started from another prior's weights (``init_from``), that prior's ``card.json``:
            it is kept whole under ``previous_stage`` (its hash, command and curves), and ``total_steps`` adds
            its steps (its own ``total_steps``, else ``max_steps``) to this run's.
    """
    import diffusers
    import lightning
    from diffusers import UNet2DModel

    folder = Path(prior)
    unet = UNet2DModel.from_pretrained(folder / "unet")
    scalars = read_scalars(run)
    train = scalar_curve(scalars, "train/loss", every=4)
    card = {
        "name": name,
        "sha256": base_model_hash(folder),
        "model": f"diffusers UNet2DModel {list(unet.config.block_out_channels)}, "
        f"{unet.config.sample_size}x{unet.config.sample_size}x{unet.config.in_channels}, EMA weights",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "data": data,
        "command": command,
        "max_steps": max_steps if max_steps is not None else (max(train) + 1 if train else None),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "lightning": lightning.__version__,
        },
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads when the card was written",
        "train_wall_seconds": wall_seconds(scalars),
        "train_loss": train,
        "val_loss": scalar_curve(scalars, "val/loss"),
        "samples": "samples.png: 16 DDIM samples, 50 steps, eta 0, seed 0 (diffusers DDIMPipeline, "
        "use_clipped_model_output=True)",
    }
    if previous is not None:
        earlier = json.loads(Path(previous).read_text())
        card["previous_stage"] = earlier
        card["total_steps"] = earlier.get("total_steps", earlier["max_steps"]) + card["max_steps"]
    if teacher is not None:
        teacher_path = Path(teacher)
        card["model"] = card["model"].replace("EMA weights", "consistency model (LCMScheduler), EMA weights")
        card["teacher"] = teacher_path.name
        card["teacher_sha256"] = base_model_hash(teacher_path)
        card["samples"] = (
            "samples.png, rows from the same 16 noises (seed 0): teacher DDIM 50 steps; teacher one call (Tweedie "
            "mean); this consistency model 1 call; 4 calls (diffusers pipelines)"
        )
        card["val_trajectory_loss"] = scalar_curve(scalars, "val/trajectory_loss")
        cm_sample_grid(folder, teacher_path, folder / "samples.png")
    else:
        sample_grid(folder, folder / "samples.png")
    path = folder / "card.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
