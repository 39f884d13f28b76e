"""The restoration job of ``sample.py`` (issues [zero-shot] and [ud2m]): input discovery, model and operator
loading, batching of images x posterior samples (:func:`~ud2m.solvers.posterior.posterior_sample` around the method
of :mod:`ud2m.methods`) and resume (docs/method.md §4.2, §5.3, §8, §10); the files written are
:mod:`ud2m.cli.outputs`'s.

Every check that can fail (inputs, operator preset, model folder, image sizes against the operator and the prior)
runs in :func:`prepare`, BEFORE anything is written; :func:`run` then only restores and writes. Outputs per image:
``<stem>_restored.png`` (posterior mean), ``<stem>_std.png`` (pixelwise std, 16-bit gray, S > 1), ``<stem>_y.png``
(the measurement on [0, 1], readable back with ``simulate=False``), ``<stem>_mask.png`` when a preset's random
mask or box was drawn for the image's size (:func:`operator_at`), plus ``metrics.json`` / ``metrics.csv`` for the
whole folder. Images whose outputs exist are skipped (resume, only into a folder written with the same settings:
:mod:`ud2m.cli.resume`); nothing is ever deleted.

Seeds follow §1.5: sample s of image i draws from its own generator seeded by ``hash(seed, 0, i, s)`` (the simulated
noise of image i from ``hash(seed, 1, i, 0)``), so results do not depend on batch composition or on resuming.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ud2m.cli.outputs import (
    is_done,
    metric_rows,
    peak_memory_mb,
    reset_peak_memory,
    synchronize,
    write_metrics,
    write_outputs,
)
from ud2m.cli.resume import check_resume_compatible, run_record
from ud2m.io import (
    check_image_values,
    discover_images,
    image_size,
    load_image,
    read_results,
    source_stem,
)
from ud2m.methods import LDRPS, UD2M, Latino, Method, Problem, Wiener
from ud2m.metrics import LPIPSMetric, psnr
from ud2m.operators.base import LinearOperator
from ud2m.operators.noise import measure, measurement_to_internal
from ud2m.operators.presets import instantiate_operator, load_preset
from ud2m.priors.loading import load_prior, model_family
from ud2m.solvers.posterior import posterior_sample, sample_generators
from ud2m.utils import seed_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """The options of ``sample.py`` (documented there; its signature holds every default)."""

    input: str
    output_dir: Path
    method: Method | str | None
    model: str | None
    model_options: dict[str, Any] | None
    checkpoint: Path | None
    allow_hash_mismatch: bool
    operator: Any  # a preset name or YAML path, or an operator object
    sigma_y: float | None
    simulate: bool
    reference: str | None
    crop: int | None
    prompt: str
    seed: int
    num_samples: int
    batch_size: int
    dtype: str
    device: str
    lpips: str | None
    lpips_weights: Path | None
    resume: bool
    progress: bool

    def record(self) -> dict[str, Any]:
        """The options as ``metrics.json`` stores them (paths as strings, objects as ``class_path`` and settings)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Method):
                value = {"class_path": _class_path(value), "init_args": value.settings()}
            elif value is not None and not isinstance(value, (str, int, float, bool, dict, list)):
                value = _class_path(value)  # an operator object
            out[key] = value
        return out


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


@dataclass(frozen=True)
class Item:
    """One input image: its index in the sorted input list (seeds), source, output stem, shape and reference."""

    index: int
    source: str
    stem: str
    x_shape: tuple[int, int, int]  # (C, H, W) of the restored image
    reference: str | None = None
    caption: str | None = None  # LD-RPS: the image's caption (``--captions``)


@dataclass
class Job:
    """Everything :func:`prepare` resolved and validated."""

    options: Options
    method: Method
    op: Any
    operator_name: str
    sigma_y: float
    items: list[Item]
    device: torch.device
    prior: Any = None
    model: Any = None
    cond: Any = None
    manifest: dict | None = None
    lpips: Any = None
    lpips_note: str = "disabled"
    preset_size: int | None = None
    sigma_data: float | None = None  # noise level of the data term (JPEG presets: sigma_eff, §2.6); None: sigma_y
    preset: dict[str, Any] = field(default_factory=dict)  # the preset's metadata (its solver: block of weight rules)
    run: dict[str, Any] = field(default_factory=dict)
    sized_ops: dict[tuple[int, int], Any] = field(default_factory=dict)  # operator_at's cache


def problem_of(job: Job, op: Any, x_shape: tuple[int, int, int], captions: list[str] | None = None) -> Problem:
    """The :class:`~ud2m.methods.Problem` of the job's images of shape ``x_shape`` (C, H, W) under ``op``."""
    sigma = job.sigma_y if job.sigma_data is None else job.sigma_data
    return Problem(op, sigma, x_shape, job.prior, job.cond, job.model, job.manifest, job.preset, captions)


def operator_at(job: Job, hw: tuple[int, int]) -> Any:
    """The job's operator for ``H x W`` images: a preset's random mask or box is drawn for the image's size (same
    seed; :meth:`~ud2m.operators.base.LinearOperator.at_size`), a fixed-size asset refuses other sizes."""
    hw = (int(hw[0]), int(hw[1]))
    if hw not in job.sized_ops:
        # callers may be under inference_mode (input checks); the cached operator also serves DPS, whose autograd
        # cannot save inference tensors, so its mask is drawn outside that mode
        with torch.inference_mode(False):
            job.sized_ops[hw] = job.op.at_size(hw).float().eval().to(job.device)
    return job.sized_ops[hw]


# ============================================================================================== entry point
def restore(options: Options) -> dict[str, Any]:
    """Run a restoration job: validate everything, then restore every pending image and write the outputs. A video
    method (:attr:`ud2m.methods.Method.video`) hands over to :func:`ud2m.cli.restore_video.restore_video`.

    Args:
        options: the parsed command line (see ``sample.py``).

    Returns:
        The content of ``metrics.json``: ``{"run": ..., "summary": ..., "images": [...]}``.

    Raises:
        FileNotFoundError, ValueError: for bad inputs, raised before anything is written.
    """
    checkpoint = None if options.checkpoint is None else Path(options.checkpoint)
    options = dataclasses.replace(options, output_dir=Path(options.output_dir), checkpoint=checkpoint)
    method = resolve_method(options)
    if method.video:  # LVTINO: the video job (same options, files and resume rules)
        from ud2m.cli.restore_video import restore_video

        return restore_video(dataclasses.replace(options, method=method))
    return run(prepare(options))


# ============================================================================================== preparation
def prepare(options: Options) -> Job:
    """Resolve and validate every option; reads inputs and loads models but writes nothing."""
    method = resolve_method(options)
    _check_numbers(options, method)
    sources = discover_images(options.input)
    manifest = _read_manifest(options.checkpoint) if isinstance(method, UD2M) else None
    op, sigma_y, operator_name, preset, sigma_data = resolve_operator(options, method, manifest)
    device = resolve_device(options.device)
    job = Job(options, method, op.to(device), operator_name, sigma_y, [], device, manifest=manifest, preset=preset)
    job.preset_size, job.sigma_data = _square_size(preset), sigma_data
    if method.needs_model:
        _load_models(job)
    job.items = plan_items(job, sources)
    job.run = run_record(job, problem_of(job, job.op, (0, 0, 0)))
    check_resume_compatible(job)
    job.lpips, job.lpips_note = _make_lpips(options, device)
    return job


def resolve_method(options: Options) -> Method:
    """The method to run (:mod:`ud2m.methods`): the option (an object, or a short name with its defaults); unset:
    UD2M with a checkpoint, LATINO with a model and the Wiener filter without (clear errors for contradictions)."""
    method = Method.by_name(options.method) if isinstance(options.method, str) else options.method
    if options.checkpoint is not None:
        if method is not None and not isinstance(method, UD2M):
            raise ValueError(f"--checkpoint restores with the UD2M sampler; it contradicts method={method.name!r}")
        return method or UD2M()
    if isinstance(method, UD2M):
        raise ValueError("method 'ud2m' needs --checkpoint EXPORTED_DIR (an exported UD2M model folder)")
    if isinstance(method, LDRPS) and options.operator is not None and not options.simulate:
        raise ValueError("method 'ld_rps' restores without a known operator: drop --operator")
    if method is None:
        return Latino() if options.model is not None else Wiener()
    return method


def _check_numbers(options: Options, method: Method) -> None:
    if options.num_samples < 1 or options.batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {options.num_samples} and {options.batch_size}")
    if options.num_samples > 1 and method.deterministic:
        raise ValueError(f"num_samples={options.num_samples}: method {method.name!r} is deterministic (use 1)")
    if options.crop is not None and options.crop < 0:
        raise ValueError(f"crop must be >= 0 (0 keeps the whole image), got {options.crop}")
    if options.reference is not None and options.simulate:
        raise ValueError("--reference is for observation mode (simulate=False); simulated runs use the input")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """``"auto"`` -> None (the prior's policy, docs/method.md §1.4), else the named torch dtype."""
    names = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype: expected one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def resolve_operator(
    options: Options, method: Method, manifest: dict | None
) -> tuple[Any, float, str, dict[str, Any], float | None]:
    """``(operator, sigma_y, name, preset, sigma_data)`` from ``--operator`` (preset name, YAML file or operator
    object) or the checkpoint's manifest; ``preset`` is the preset file's metadata (its ``image_size`` and tuned
    ``solver:`` rules; empty otherwise), ``name`` the shipped preset's name when the file is one, ``sigma_data`` the
    data-term noise level when it differs from the simulation's (``sigma_eff`` of JPEG presets, §2.6)."""
    preset, sigma_data = {}, None
    if isinstance(method, LDRPS) and options.operator is None:  # the degradation is learned, y has x's shape
        if options.simulate:
            raise ValueError(
                "method 'ld_rps' restores degraded images as they are: pass --simulate false (the inputs are the "
                "observations), or --operator PRESET to simulate a degradation first"
            )
        from ud2m.operators.inpainting import Denoising

        return Denoising().eval(), float(options.sigma_y or 0.0), f"ld_rps:{method.task}", {}, None
    if isinstance(options.operator, (str, Path)):
        loaded = load_preset(options.operator)
        op, sigma_y, name, preset = loaded.operator, loaded.sigma_y, preset_name(options.operator), loaded.meta
        sigma_data = preset.get("sigma_eff")
    elif options.operator is not None:  # an operator object (--operator.class_path ... / a YAML operator: block)
        if options.sigma_y is None:
            raise ValueError(f"--sigma_y is required with an operator object ({type(options.operator).__name__})")
        op, sigma_y, name = options.operator, options.sigma_y, _class_path(options.operator)
    elif manifest is not None:
        op, sigma_y, name = _manifest_operator(manifest, options)
    else:
        raise ValueError("--operator is required (a preset name such as ud2m/sr_x4, or a preset YAML file)")
    sigma_y = float(sigma_y if options.sigma_y is None else options.sigma_y)
    if sigma_y < 0:
        raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
    if manifest is not None and (sigma_y if sigma_data is None else float(sigma_data)) <= 0:
        raise ValueError(
            f"sigma_y = {sigma_y}: the UD2M sampler of {options.checkpoint} needs a positive noise level (its data "
            "step divides by it); for noiseless data give the effective noise of the operator (sigma_eff, §2.6)"
        )
    return op.float().eval(), sigma_y, name, preset, None if sigma_data is None else float(sigma_data)


def _square_size(preset: dict[str, Any]) -> int | None:
    """The preset's square ``image_size`` (None when it has none or it is not square)."""
    hw = preset.get("image_size")
    return int(hw[0]) if isinstance(hw, (list, tuple)) and len(hw) == 2 and hw[0] == hw[1] else None


def preset_name(operator: str | Path) -> str:
    """``"latino/sr_x16"`` for a shipped preset given by name or by its file path; the string itself otherwise."""
    from ud2m.operators.presets import PRESET_DIR, preset_path

    path = preset_path(operator).resolve()
    return str(path.relative_to(PRESET_DIR).with_suffix("")) if path.is_relative_to(PRESET_DIR) else str(operator)


def _manifest_operator(manifest: dict, options: Options) -> tuple[Any, float | None, str]:
    """The training operator of an export; a model trained on random operators or a noise range needs both."""
    spec = manifest["operator"]
    sigma = spec.get("sigma_y")
    if spec.get("generator") is not None:
        raise ValueError(
            f"{options.checkpoint}: this model was trained on random operators ({spec['generator']}); "
            "pass the operator to restore with --operator (a preset name or YAML file)"
        )
    if not spec.get("class_path") or spec.get("init_args") is None:
        raise ValueError(
            f"{options.checkpoint}: the manifest does not record the training operator's arguments "
            f"(operator.class_path = {spec.get('class_path')!r}, operator.init_args = null); pass the operator with "
            "--operator (a preset name or YAML file), or re-export the checkpoint with `train.py export`"
        )
    if not isinstance(sigma, (int, float)) and options.sigma_y is None:
        raise ValueError(f"{options.checkpoint}: trained with a noise range sigma_y={sigma}; pass --sigma_y")
    op = instantiate_operator({"class_path": spec["class_path"], "init_args": spec["init_args"]})
    return op, sigma if isinstance(sigma, (int, float)) else None, f"checkpoint:{spec['class_path']}"


# ---------------------------------------------------------------------------------------------- models
def _load_models(job: Job) -> None:
    """Load the prior (and, for UD2M, the exported model) and encode the prompt once."""
    options, method = job.options, job.method
    source = options.model or (job.manifest or {}).get("base_model", {}).get("id_or_path")
    if source is None and isinstance(method, UD2M):
        raise ValueError(
            f"{options.checkpoint}: the manifest names no base model (base_model.id_or_path = null); pass it with "
            "--model (the base model's folder or hub id), or re-export the checkpoint with `train.py export`"
        )
    if source is None:
        raise ValueError(f"method {method.name!r} needs --model (a local diffusers folder or a hub id)")
    family = model_family(str(source))
    kwargs = dict(options.model_options or {})
    job.prior = load_prior(str(source), family=family, dtype=resolve_dtype(options.dtype), device=job.device, **kwargs)
    job.run["model"] = str(source)
    if isinstance(method, UD2M):
        from ud2m.export import load_checkpoint

        base_path = source if Path(str(source)).expanduser().exists() else None  # hashed against the manifest
        job.model = load_checkpoint(
            options.checkpoint, job.prior, allow_hash_mismatch=options.allow_hash_mismatch, base_path=base_path
        )
    if family == "latent":
        prompt = options.prompt
        if isinstance(method, UD2M):  # the prompt the adapter was trained with (training uses "" for None)
            prompt = job.manifest["training"].get("prompt") or ""
        job.cond = _condition(job.prior, prompt, job.device)


def _condition(prior, prompt: str, device: torch.device):
    """The prompt's condition, or a condition saved by a LATINO-PRO run when ``prompt`` is a ``.safetensors`` file."""
    if prompt.endswith(".safetensors"):
        from ud2m.solvers.latino_algorithms import load_condition

        return load_condition(prompt, device)
    return prior.encode_prompt(prompt)


def _read_manifest(checkpoint: Path) -> dict:
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
    from ud2m.export import read_manifest

    return read_manifest(checkpoint)


# ---------------------------------------------------------------------------------------------- inputs
def plan_items(job: Job, sources: list[str]) -> list[Item]:
    """One :class:`Item` per source, each checked against the operator and the prior (shape errors name the file)."""
    stems: dict[str, str] = {}
    references = references_by_stem(job.options.reference)
    items = []
    for index, source in enumerate(sources):
        stem = output_stem(source, job.options.simulate)
        if stem in stems:
            raise ValueError(f"two inputs give the same output name {stem!r}: {stems[stem]} and {source}")
        stems[stem] = source
        item = Item(
            index, source, stem, _x_shape(job, source), reference_of(job, references, source, stem), _caption(job, stem)
        )
        _check_item(job, item)
        items.append(item)
    return items


def _caption(job: Job, stem: str) -> str | None:
    """LD-RPS: the caption of image ``stem``: ``<captions>/<stem>.txt`` (a missing file is an error naming it), or
    ``--prompt`` without ``--captions``; None for other methods and for tasks that use no caption (§13.4)."""
    method = job.method
    if not isinstance(method, LDRPS):
        return None
    from ud2m.solvers.ld_rps import task_defaults

    if not task_defaults(method.task).use_caption:
        return ""
    if method.captions is None:
        return job.options.prompt
    path = Path(method.captions) / f"{stem}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no caption for image {stem!r} (--method.captions {method.captions})")
    return path.read_text().strip()


def output_stem(source: str, simulate: bool, stem_of: Callable[[str], str] = source_stem) -> str:
    """Output stem; an observation ``<stem>_y.png`` (as a simulated run writes it; ``<stem>_y.mp4`` or
    ``<stem>_y/`` for videos with ``stem_of=video_stem``) keeps ``<stem>``."""
    stem = stem_of(source)
    return stem[:-2] if not simulate and stem.endswith("_y") and len(stem) > 2 else stem


def references_by_stem(
    spec: str | None,
    discover: Callable[[str], list[str]] = discover_images,
    stem_of: Callable[[str], str] = source_stem,
) -> dict[str, str] | None:
    return None if spec is None else {stem_of(s): s for s in discover(spec)}


def reference_of(
    job: Job, references: dict[str, str] | None, source: str, stem: str, kind: str = "image"
) -> str | None:
    if references is None:
        return None
    if stem not in references:
        raise FileNotFoundError(f"{source}: no reference {kind} with stem {stem!r} in {job.options.reference}")
    return references[stem]


def image_channels(job: Job) -> int:
    """Channels of the restored image: the model's (VAE input or pixel UNet), 3 without a model."""
    prior = job.prior
    if prior is None:
        return 3
    vae = getattr(prior, "vae", None)
    return int(vae.config.in_channels) if vae is not None else int(prior.latent_channels)


def _crop_size(job: Job, H: int, W: int) -> int | None:
    """The crop of ``crop`` (0: none; None: the preset's square ``image_size`` when the image is larger)."""
    crop = job.options.crop
    if crop is None:
        size = job.preset_size
        return size if size is not None and min(H, W) > size else None
    return crop or None


def _x_shape(job: Job, source: str) -> tuple[int, int, int]:
    """(C, H, W) of the restored image: the (cropped) input, or the operator's preimage of an observation."""
    H, W = image_size(source)
    C = image_channels(job)
    if job.options.simulate:
        size = _crop_size(job, H, W)
        if size is not None and size > min(H, W):
            raise ValueError(f"{source}: crop size {size} is larger than the image {H}x{W}")
        return (C, size, size) if size else (C, H, W)
    with torch.inference_mode():
        y_like = torch.zeros(1, C, H, W, device=job.device)
        try:
            x_like = job.op.A_adjoint(y_like) if isinstance(job.op, LinearOperator) else y_like
        except ValueError:  # a mask drawn for another size: masks keep the size, so draw it for the observation's
            try:
                x_like = operator_at(job, (H, W)).A_adjoint(y_like) if isinstance(job.op, LinearOperator) else y_like
            except ValueError as err:
                raise ValueError(f"{source}: observation of size {H}x{W} does not fit the operator: {err}") from err
    return (C, *x_like.shape[-2:])


def _check_item(job: Job, item: Item) -> None:
    """Check the item's pixel values (finite, e.g. no NaN in a float TIFF) and run the operator on a zero image of
    its shape (and the prior's shape check), naming the file."""
    for source in (item.source, item.reference):
        if source is not None:
            check_image_values(source)
    x_shape = (1, *item.x_shape)
    ref_hw = image_size(item.reference) if item.reference is not None else item.x_shape[1:]
    if ref_hw[0] < item.x_shape[1] or ref_hw[1] < item.x_shape[2]:
        raise ValueError(f"{item.reference}: reference {ref_hw} is smaller than the image {item.x_shape[1:]}")
    try:
        with torch.inference_mode():
            operator_at(job, item.x_shape[1:]).A(torch.zeros(x_shape, device=job.device))
        if job.prior is not None:
            job.prior.check_shape(x_shape)
    except ValueError as err:
        raise ValueError(f"{item.source}: cannot restore an image of shape {item.x_shape}: {err}") from err


def _make_lpips(options: Options, device: torch.device) -> tuple[Any, str]:
    """LPIPS with a real backbone, or None and the reason (offline the backbone weights are usually missing)."""
    if options.lpips is None:
        return None, "disabled"
    try:
        return LPIPSMetric(options.lpips, options.lpips_weights).to(device), options.lpips
    except (FileNotFoundError, ImportError) as err:
        logger.warning("LPIPS not reported: %s", err)
        return None, f"unavailable: {err}"


# ============================================================================================== running
def run(job: Job) -> dict[str, Any]:
    """Restore every pending image in batches and write outputs and metrics after each batch."""
    return run_pending(job, "image", "img", is_done, restore_batch, write_metrics)


def run_pending(job, key: str, unit: str, is_done, restore_batch, write_metrics) -> dict[str, Any]:
    """The resumable batch loop of the image and video jobs: items whose outputs exist are skipped (their rows in
    ``metrics.json``, keyed by ``row[key]``, are kept), the others restored ``batch_size`` at a time, and the metrics
    rewritten after each batch."""
    from tqdm.auto import tqdm

    options = job.options
    pending = [it for it in job.items if not (options.resume and is_done(job, it))]
    if len(pending) < len(job.items):
        logger.info("resume: %d of %d %s(s) already done", len(job.items) - len(pending), len(job.items), key)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    rows = {row[key]: row for row in read_results(options.output_dir).get("images", []) if key in row}
    with tqdm(total=len(pending), desc=job.method.name, unit=unit, disable=not options.progress) as bar:
        for batch in batches(pending, options.batch_size):
            for row in restore_batch(job, batch):
                rows[row[key]] = row
            write_metrics(job, rows)
            bar.update(len(batch))
    return write_metrics(job, rows)


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive groups of at most ``batch_size`` items with equal shapes."""
    out: list[list[Item]] = []
    for item in items:
        if out and len(out[-1]) < batch_size and out[-1][0].x_shape == item.x_shape:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def noise_generators(job: Job, batch: list[Item]) -> list[torch.Generator]:
    """The simulated noise of image i: stream 1 of §1.5, ``hash(seed, 1, i, 0)`` (the solver's are stream 0,
    :func:`~ud2m.solvers.posterior.sample_generators`), drawn on the CPU whatever the job's device, so a CUDA run
    replays on the CPU (``ud2m.utils.randn`` draws on the generator's device and moves the noise)."""
    return [torch.Generator().manual_seed(seed_for(job.options.seed, 1, it.index, 0)) for it in batch]


def load_batch(job: Job, batch: list[Item]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(x, y)``: references (None when there are none) and measurements on the internal scale, ``(B, ...)``."""
    x_shape = batch[0].x_shape
    if job.options.simulate:
        x = torch.cat([_load(it.source, x_shape) for it in batch]).to(job.device)  # (B, C, H, W)
        return x, measure(job.op, x, job.sigma_y, noise_generators(job, batch))
    y01 = (torch.cat([load_image(it.source, channels=x_shape[0]) for it in batch]).to(job.device) + 1) / 2
    y = observation_to_internal(job.op, y01, (len(batch), *x_shape))
    if batch[0].reference is None:
        return None, y
    return torch.cat([_load(it.reference, x_shape) for it in batch]).to(job.device), y


def observation_to_internal(op, y01: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    r"""A measurement file on [0, 1] on the internal scale (§1.1): :math:`2y_{01} - A(\mathbb 1)` for linear A
    (:func:`~ud2m.operators.noise.measurement_to_internal`), :math:`2y_{01} - 1` for JPEG; unobserved entries 0."""
    y = measurement_to_internal(op, y01, x_shape) if isinstance(op, LinearOperator) else 2 * y01 - 1
    mask = op.observed_mask(y)
    return y if mask is None else y * mask


def _load(source: str, x_shape: tuple[int, int, int]) -> torch.Tensor:
    """``(1, C, H, W)``: the image converted to C channels and centre-cropped to H x W (checked in prepare)."""
    C, H, W = x_shape
    x = load_image(source, channels=C)
    top, left = (x.shape[-2] - H) // 2, (x.shape[-1] - W) // 2
    return x[..., top : top + H, left : left + W]


def grad_mode(method: Method):
    """``inference_mode`` everywhere except the methods that need autograd inside the solver (LATINO-PRO, DPS,
    LD-RPS: §5.2), which run under ``no_grad``."""
    return torch.no_grad() if method.needs_autograd else torch.inference_mode()


def restore_batch(job: Job, batch: list[Item]) -> list[dict[str, Any]]:
    """Restore one batch (B images x S samples as one solver call), write its images, return its metric rows."""
    S = job.options.num_samples
    preset_op = job.op
    job = dataclasses.replace(job, op=operator_at(job, batch[0].x_shape[1:]))  # this batch's image size
    x, y = load_batch(job, batch)
    problem = problem_of(job, job.op, batch[0].x_shape, [it.caption for it in batch])
    generators = sample_generators(job.options.seed, [it.index for it in batch], S)  # CPU: replayable anywhere
    nfe0 = getattr(job.prior, "nfe", 0)
    reset_peak_memory(job.device)
    t0 = time.perf_counter()
    with grad_mode(job.method):
        restore = lambda y_rows, gens, index: job.method.restore(problem, y_rows, gens, index)  # noqa: E731
        post = posterior_sample(restore, y, num_samples=S, generators=generators)
    synchronize(job.device)
    seconds = (time.perf_counter() - t0) / len(batch)
    nfe = getattr(job.prior, "nfe", 0) - nfe0
    extras = post.extras
    with torch.inference_mode():
        mean, std = post.mean.float(), (post.std.float() if post.std is not None else None)
        rows = metric_rows(job, batch, x, y, mean, post.samples[:, 0].float())
        if job.op is not preset_op and job.op.observed_mask(y) is not None:  # drawn for this size: kept with y
            extras = {**extras, "mask": job.op.observed_mask(y)}
        write_outputs(job, batch, y, mean, std, extras)
    peak = peak_memory_mb(job.device)
    for i, row in enumerate(rows):
        row.update(nfe=nfe, seconds=seconds, **peak)
        if "costs" in extras:  # LD-RPS: the §13.5 counters (per image) and how well ψ(x̂) explains y
            row.update({f"cost_{k}": v for k, v in extras["costs"].items()})
            row["psi_fit_psnr"] = psnr(extras["psi"][i * S : i * S + 1].float(), y[i : i + 1].float()).item()
    return rows


__all__ = ["Item", "Job", "Options", "prepare", "problem_of", "restore", "run"]
