"""Export and reload of trained UD2M models (docs/method.md §9): the folder that ``sample.py --checkpoint`` reads.

Layout::

    <name>/
      ud2m.json                                  manifest (format, base model reference + content hash, block, ...)
      adapter/pytorch_lora_weights.safetensors   LoRA for diffusers (pipe.load_lora_weights; keys unet.<module>...)
      adapter/adapter_model.safetensors          the same LoRA for peft (PeftModel.from_pretrained(net, adapter))
      adapter/adapter_config.json                LoraConfig
      scalars.safetensors                        log_lambda, log_rho_scale[, log_sigma_z_scale]: (1,) or (K,)
      out_layer.safetensors                      only with train_out_layer=True
      initializer.safetensors                    only with a learned initialiser
      discriminator.safetensors                  optional, not needed for sampling

Only JSON and safetensors are read or written: nothing is ever unpickled (house-style J, M.10). The base model is
identified by a SHA-256 over its weight files; loading against different weights is refused unless explicitly
allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ud2m
from ud2m.priors.base import Prior
from ud2m.priors.lora import LORA_WEIGHT_NAME, load_lora, lora_config, save_lora
from ud2m.unfolded import NOISE_RULES, RENOISE_MODES, UnfoldedSampler, out_layer_modules
from ud2m.utils import copy_safetensors_into

logger = logging.getLogger(__name__)

FORMAT = "ud2m-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "ud2m.json"
ADAPTER_DIR = "adapter"
SCALARS_NAME = "scalars.safetensors"
OUT_LAYER_NAME = "out_layer.safetensors"
INITIALIZER_NAME = "initializer.safetensors"
DISCRIMINATOR_NAME = "discriminator.safetensors"
#: weight files that enter the base-model hash (configs, tokenizers and index JSONs are excluded)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
#: required manifest keys per (dotted) section; "adapter" may be null for priors without a network
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "format",
        "format_version",
        "ud2m_version",
        "base_model",
        "adapter",
        "block",
        "scalars",
        "operator",
        "sampler",
        "training",
    ),
    "base_model": ("family", "id_or_path", "revision", "subfolder", "prediction_type", "dtype", "scheduler", "sha256"),
    "adapter": ("path", "format", "rank", "alpha", "target_modules", "train_out_layer", "ema"),
    "block": ("num_blocks", "tied_scalars", "rho_sigma_scale", "renoise", "warm_start", "latent_split_prox"),
    "block.warm_start": ("kind", "s0"),
    "scalars": ("path", "names"),
    "operator": ("class_path", "init_args", "sigma_y", "generator"),
    "sampler": ("num_steps", "grid", "eta"),
    "training": ("steps", "seed", "l2_weighting", "loss_weights", "lpips_backbone", "data"),
}
SCHEDULER_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")


# ---------------------------------------------------------------------------------------------- base-model hash
def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of one file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def base_model_hash(path: str | os.PathLike) -> str:
    r"""Content hash of a base model (§9): SHA-256 over the sorted list of (relative path, file SHA-256) of its
    weight files (``WEIGHT_SUFFIXES``; configs excluded, hidden folders such as ``.cache`` skipped).

    Args:
        path: a model folder (any layout) or a single weight file.

    Returns:
        64 hex digits.

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds no weight file.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"base_model_hash: {root} does not exist")
    if root.is_file():
        entries = [(root.name, root)]
    else:
        entries = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if _is_weight_file(p, root)]
    if not entries:
        raise FileNotFoundError(f"base_model_hash: {root} holds no weight file (suffixes {WEIGHT_SUFFIXES})")
    h = hashlib.sha256()
    for rel, p in sorted(entries):
        h.update(f"{rel}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _is_weight_file(p: Path, root: Path) -> bool:
    rel = p.relative_to(root).parts
    return p.is_file() and p.suffix in WEIGHT_SUFFIXES and not any(part.startswith(".") for part in rel)


# ---------------------------------------------------------------------------------------------- export
def export_checkpoint(
    model: UnfoldedSampler,
    out_dir: str | os.PathLike,
    *,
    base_model: dict,
    operator: dict,
    sampler: dict,
    training: dict,
    metrics: dict | None = None,
    ema: bool = False,
    discriminator: nn.Module | None = None,
) -> Path:
    """Write the export folder of §9 (manifest last, so a folder with ``ud2m.json`` is complete).

    Args:
        model: the trained model (put EMA weights in place before exporting them).
        out_dir: destination folder (created; known optional files of an older export are removed).
        base_model: at least ``family`` and ``id_or_path``; ``revision``, ``subfolder``, ``prediction_type``,
            ``dtype``, ``scheduler`` and ``sha256`` are filled from the prior / :func:`base_model_hash` of a local
            ``id_or_path`` when absent.
        operator: ``class_path``, ``init_args``, ``sigma_y``, ``generator`` of the training operator.
        sampler: ``num_steps``, ``eta`` (``grid`` defaults to ``"quadratic"``).
        training: ``steps``, ``seed``, ``l2_weighting``, ``loss_weights``, ``lpips_backbone``, ``data`` (+ any extra).
        metrics: optional validation metrics.
        ema: whether the exported adapter weights are EMA weights (recorded in ``adapter.ema``).
        discriminator: optional, saved as ``discriminator.safetensors``.

    Returns:
        The folder path.

    Raises:
        ValueError: for a missing required key (named) or a value that is not JSON-serialisable.
    """
    out = Path(out_dir)
    manifest = build_manifest(model, base_model=base_model, operator=operator, sampler=sampler, training=training)
    manifest["adapter"] = _adapter_entry(model, ema)
    if metrics is not None:
        manifest["metrics"] = dict(metrics)
    validate_manifest(manifest, where="export_checkpoint")
    text = _to_json(manifest)
    out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_NAME, OUT_LAYER_NAME, INITIALIZER_NAME, DISCRIMINATOR_NAME):
        (out / name).unlink(missing_ok=True)
    if manifest["adapter"] is not None:
        save_lora(model.prior, out / ADAPTER_DIR)
    _save(_scalar_state(model), out / SCALARS_NAME)
    if model.train_out_layer:
        _save(out_layer_state(model), out / OUT_LAYER_NAME)
    if _has_state(model.initializer):
        _save(model.initializer.state_dict(), out / INITIALIZER_NAME)
    if discriminator is not None:
        _save(discriminator.state_dict(), out / DISCRIMINATOR_NAME)
    (out / MANIFEST_NAME).write_text(text)
    return out


def check_export_target(out_dir: str | os.PathLike, *, overwrite: bool, how_to_overwrite: str) -> None:
    """Refuse to write into a folder that already holds a complete export (its ``ud2m.json``) unless ``overwrite``.

    Callers run this before any expensive work (``ExportOnTrainEnd`` before training, ``train.py export`` before
    loading the checkpoint), so a finished model is never replaced without an explicit request.

    Args:
        out_dir: the destination folder.
        overwrite: allow replacing the export.
        how_to_overwrite: the option that allows it, named in the error (e.g. ``"--overwrite true"``).

    Raises:
        FileExistsError: naming the folder, when it holds an export and ``overwrite`` is False.
    """
    manifest = Path(out_dir) / MANIFEST_NAME
    if manifest.is_file() and not overwrite:
        raise FileExistsError(
            f"{Path(out_dir)} already holds a UD2M export ({MANIFEST_NAME}); writing there would replace it. "
            f"Choose another folder or set {how_to_overwrite}."
        )


def build_manifest(model: UnfoldedSampler, *, base_model: dict, operator: dict, sampler: dict, training: dict) -> dict:
    """The manifest dictionary of §9 (without ``adapter``/``metrics``), base-model fields completed from the prior."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ud2m_version": ud2m.__version__,
        "base_model": _base_model_entry(model.prior, base_model),
        "adapter": None,
        "block": {
            "num_blocks": model.num_blocks,
            "tied_scalars": model.tied_scalars,
            "time_knots": model.time_knots,
            "noise_rule": model.noise_rule,
            "sigma_cap": model.sigma_cap,
            "renoise_cap": model.renoise_cap,
            "rho_sigma_scale": model.rho_sigma_scale,
            "renoise": model.renoise,
            "warm_start": {"kind": "wiener" if model.initializer is None else "learned", "s0": model.s0},
            "latent_split_prox": model.latent,
            "detach_encoder": model.detach_encoder,
        },
        "scalars": {"path": SCALARS_NAME, "names": list(_scalar_state(model))},
        "operator": dict(operator),
        "sampler": {"grid": "quadratic", **dict(sampler)},
        "training": dict(training),
    }


def _base_model_entry(prior: Prior, given: dict) -> dict:
    """Complete the caller's base-model reference; hash a local folder when no ``sha256`` is given."""
    entry = {"revision": None, "subfolder": None, "prediction_type": prior.prediction_type}
    entry["dtype"] = str(prior.dtype).removeprefix("torch.")
    config = getattr(prior, "scheduler_config", None)
    entry["scheduler"] = {k: config[k] for k in SCHEDULER_KEYS if k in config} if config else None
    entry.update(given)
    source = entry.get("id_or_path")
    if entry.get("sha256") is None and source is not None and Path(str(source)).exists():
        entry["sha256"] = base_model_hash(source)
    if entry.get("sha256") is None:
        logger.warning("export: base model %r is not a local folder and no sha256 was given: unverifiable", source)
        entry["sha256"] = None
    return entry


def _adapter_entry(model: UnfoldedSampler, ema: bool) -> dict | None:
    if model.prior.net is None:
        return None
    config = lora_config(model.prior.net)
    return {
        "path": ADAPTER_DIR,
        "format": "peft",
        "rank": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "train_out_layer": model.train_out_layer,
        "ema": bool(ema),
    }


def _scalar_state(model: UnfoldedSampler) -> dict[str, torch.Tensor]:
    names = ("log_lambda", "log_rho_scale", "log_sigma_z_scale")
    return {n: getattr(model, n).detach() for n in names if getattr(model, n) is not None}


def out_layer_state(model: UnfoldedSampler) -> dict[str, torch.Tensor]:
    """Full (non-LoRA) tensors of the trained output layers, keyed by their name in ``prior.net``."""
    return {
        f"{name}.{pname}": p.detach()
        for name, module in out_layer_modules(model.prior.net).items()
        for pname, p in module.named_parameters()
        if "lora_" not in pname
    }


def _has_state(module: nn.Module | None) -> bool:
    return module is not None and len(module.state_dict()) > 0


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors needs contiguous, non-aliasing CPU tensors."""
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )


def _to_json(manifest: dict) -> str:
    try:
        return json.dumps(manifest, indent=2, sort_keys=False)
    except TypeError as err:
        raise ValueError(f"export_checkpoint: the manifest is not JSON-serialisable ({err})") from err


# ---------------------------------------------------------------------------------------------- manifest
def read_manifest(export_dir: str | os.PathLike) -> dict:
    """Read and validate ``<export_dir>/ud2m.json`` (JSON only).

    Raises:
        FileNotFoundError: if the folder has no manifest.
        ValueError: for invalid JSON, a wrong format / version, or a missing key (named, e.g. ``block.num_blocks``).
    """
    path = Path(export_dir)
    path = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no UD2M manifest ({MANIFEST_NAME}) in {path.parent}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    validate_manifest(manifest, where=str(path))
    return manifest


def validate_manifest(manifest: Any, *, where: str) -> None:
    """Check format, version, required keys and the block settings; errors name ``where`` and the dotted key.

    Raises:
        ValueError: on the first problem found.
    """
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: the manifest must be a JSON object, got {type(manifest).__name__}")
    _require(manifest, "", where)
    if manifest["format"] != FORMAT:
        raise ValueError(f"{where}: key 'format' must be {FORMAT!r}, got {manifest['format']!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{where}: key 'format_version' must be an integer in [1, {FORMAT_VERSION}], got {version!r}")
    for section in REQUIRED_KEYS:
        if section and not (section == "adapter" and manifest["adapter"] is None):
            _require(manifest, section, where)
    block = manifest["block"]
    if not isinstance(block["num_blocks"], int) or block["num_blocks"] < 1:
        raise ValueError(f"{where}: key 'block.num_blocks' must be an integer >= 1, got {block['num_blocks']!r}")
    if block["renoise"] not in RENOISE_MODES:
        raise ValueError(f"{where}: key 'block.renoise' must be one of {RENOISE_MODES}, got {block['renoise']!r}")
    if block.get("noise_rule", "reference") not in NOISE_RULES:
        raise ValueError(f"{where}: key 'block.noise_rule' must be one of {NOISE_RULES}, got {block['noise_rule']!r}")


def _require(manifest: dict, section: str, where: str) -> None:
    node = manifest
    for part in filter(None, section.split(".")):
        node = node[part]
    if not isinstance(node, dict):
        raise ValueError(f"{where}: key {section!r} must be a JSON object, got {type(node).__name__}")
    for key in REQUIRED_KEYS[section]:
        if key not in node:
            dotted = f"{section}.{key}" if section else key
            raise ValueError(f"{where}: missing required key {dotted!r}")


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(
    export_dir: str | os.PathLike,
    prior: Prior,
    *,
    allow_hash_mismatch: bool = False,
    base_path: str | os.PathLike | None = None,
    initializer: nn.Module | None = None,
) -> UnfoldedSampler:
    """Rebuild an :class:`UnfoldedSampler` from an export on a freshly loaded (LoRA-free) prior.

    The base-model hash is recomputed from ``base_path`` (the local folder ``prior`` was loaded from), or from the
    manifest's ``id_or_path`` when that is a local folder, and a mismatch is refused unless
    ``allow_hash_mismatch``. LoRA loads through ``load_lora`` (``UNet2DConditionModel.load_lora_adapter`` or
    peft injection), scalars / out layer / initialiser from safetensors.

    Args:
        export_dir: the export folder.
        prior: the base prior, without an adapter.
        allow_hash_mismatch: accept different base weights (logged as a warning).
        base_path: local folder (or weight file) the prior was loaded from.
        initializer: the learned initialiser module when the export has one (``block.warm_start.kind="learned"``).

    Raises:
        FileNotFoundError: for a missing file of the export (named).
        ValueError: for an invalid manifest, a hash or prediction-type mismatch, or tensors that do not fit.
    """
    root = Path(export_dir)
    manifest = read_manifest(root)
    _check_base_model(manifest, prior, root, base_path, allow_hash_mismatch)
    adapter = manifest["adapter"]
    if adapter is not None:
        if "default" in getattr(prior.net, "peft_config", {}):
            raise ValueError("load_checkpoint: the prior already carries a LoRA adapter; pass a freshly loaded prior")
        load_lora(prior, _need(root / adapter["path"] / LORA_WEIGHT_NAME).parent)
    _check_initializer(manifest, initializer, root)
    model = UnfoldedSampler(prior, initializer=initializer, **_model_kwargs(manifest))
    _load_scalars(model, root, manifest)
    if model.train_out_layer:
        copy_safetensors_into(out_layer_state(model), _need(root / OUT_LAYER_NAME), what="the output layers")
    if _has_state(initializer):
        initializer.load_state_dict(load_file(str(_need(root / INITIALIZER_NAME))))
    return model.to(prior.device)  # the initializer and scalars beside the prior (device only, dtypes kept)


def _model_kwargs(manifest: dict) -> dict:
    block, adapter = manifest["block"], manifest["adapter"]
    kwargs = dict(
        num_blocks=block["num_blocks"],
        tied_scalars=block["tied_scalars"],
        time_knots=block.get("time_knots", 1),
        # exports written before the §7.1 revision carry no noise_rule: they were trained with the reference rule
        noise_rule=block.get("noise_rule", "reference"),
        sigma_cap=block.get("sigma_cap", 1.0),
        renoise_cap=block.get("renoise_cap"),
        rho_sigma_scale=block["rho_sigma_scale"],
        renoise=block["renoise"],
        s0=block["warm_start"]["s0"],
        detach_encoder=block.get("detach_encoder", False),
    )
    if adapter is not None:
        kwargs.update(
            lora_rank=adapter["rank"],
            lora_alpha=adapter["alpha"],
            lora_targets=tuple(adapter["target_modules"]),
            train_out_layer=adapter["train_out_layer"],
        )
    return kwargs


def _check_base_model(manifest: dict, prior: Prior, root: Path, base_path, allow_hash_mismatch: bool) -> None:
    """Prediction type must agree; the weight hash must agree unless allowed."""
    where, base = root / MANIFEST_NAME, manifest["base_model"]
    if base["prediction_type"] != prior.prediction_type:
        raise ValueError(
            f"{where}: base_model.prediction_type is {base['prediction_type']!r}, the prior predicts "
            f"{prior.prediction_type!r}"
        )
    source = base_path if base_path is not None else base["id_or_path"]
    if base["sha256"] is None or source is None or not Path(str(source)).exists():
        logger.warning("load_checkpoint: base model %r cannot be hashed locally: weights not verified", source)
        return
    actual = base_model_hash(source)
    if actual != base["sha256"]:
        msg = (
            f"{where}: base model hash mismatch: base_model.sha256 = {base['sha256']} but {source} hashes to "
            f"{actual}. Load the base model the adapter was trained on, or pass allow_hash_mismatch=True."
        )
        if not allow_hash_mismatch:
            raise ValueError(msg)
        logger.warning("%s (accepted: allow_hash_mismatch=True)", msg)


def _check_initializer(manifest: dict, initializer: nn.Module | None, root: Path) -> None:
    kind = manifest["block"]["warm_start"]["kind"]
    if kind == "learned" and initializer is None:
        raise ValueError(f"{root / MANIFEST_NAME}: block.warm_start.kind is 'learned': pass the initializer module")
    if kind != "learned" and initializer is not None:
        raise ValueError(f"{root / MANIFEST_NAME}: block.warm_start.kind is {kind!r} but an initializer was given")


def _load_scalars(model: UnfoldedSampler, root: Path, manifest: dict) -> None:
    path = _need(root / manifest["scalars"]["path"])
    copy_safetensors_into({n: getattr(model, n) for n in _scalar_state(model)}, path, what="the block scalars")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: missing export file {path.name!r}")
    return path


__all__ = [
    "MANIFEST_NAME",
    "base_model_hash",
    "check_export_target",
    "export_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "validate_manifest",
]
