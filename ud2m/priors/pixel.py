"""Pixel-space VP diffusion priors: a diffusers ``UNet2DModel`` used as a one-step x0 predictor (docs/method.md §3.2b).

The UNet of Ho et al. (2020) (or any ε / v / x0-predicting ``UNet2DModel``, optionally class-conditional, optionally
with learned variance) plus its scheduler config give z_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; ``predict_x0`` is the Tweedie
estimate x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t. encode/decode are the identity. Loading works from a local diffusers folder
(pipeline layout ``unet/`` + ``scheduler/``, or a bare UNet folder with a scheduler config) offline, and from a hub id
online.

A pixel **consistency model** (docs/method.md §3.3, ``train.py prior distil``) is the same folder with an
``LCMScheduler`` config: the scheduler class says so, and the prior then applies the LCM boundary scalings
(``boundary="lcm"``, κ = the config's ``timestep_scaling``, σ_d = 0.5 as in diffusers' ``LCMScheduler``), so one
call returns f(z_t, t) = c_skip(t) z_t + c_out(t) x̂0, a sample rather than the Tweedie mean.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from ud2m.priors.base import ClassCondition, Prior
from ud2m.priors.vp import VPSchedule

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


class PixelDiffusionPrior(Prior):
    r"""A pixel ``UNet2DModel`` prior with a VP schedule (docs/method.md §3.2b).

    Args:
        unet: the diffusers UNet (frozen here); ``out_channels`` may be ``2·in_channels`` (learned variance).
        scheduler_config: a diffusers scheduler config (mapping or scheduler object): betas and ``prediction_type``.
        prediction_type: overrides the config's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``).
        boundary: ``"lcm"`` (consistency model) or ``"none"`` (Tweedie estimate); None: ``"lcm"`` exactly when the
            scheduler config is an ``LCMScheduler``'s (:func:`boundary_of_config`).
        timestep_scaling: κ of the boundary scalings; None: the config's ``timestep_scaling`` (10 when absent).
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: Mapping[str, Any] | Any,
        *,
        prediction_type: str | None = None,
        boundary: str | None = None,
        timestep_scaling: float | None = None,
    ) -> None:
        config = dict(getattr(scheduler_config, "config", scheduler_config))
        prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")
        out_ch, in_ch = unet.config.out_channels, unet.config.in_channels
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(f"unet: out_channels must be in_channels ({in_ch}) or twice it, got {out_ch}")
        super().__init__(
            unet,
            schedule=VPSchedule.from_config(config),
            prediction_type=prediction_type,
            boundary=boundary or boundary_of_config(config),
            timestep_scaling=float(timestep_scaling or config.get("timestep_scaling", 10.0)),
            latent_channels=in_ch,
        )
        self.scheduler_config = config

    @property
    def class_conditional(self) -> bool:
        """Whether the UNet takes class labels."""
        cfg = self.net.config
        return cfg.num_class_embeds is not None or cfg.class_embed_type is not None

    @property
    def downsampling_factor(self) -> int:
        """H and W must be multiples of this (one factor 2 per down block but the last)."""
        return 2 ** (len(self.net.config.block_out_channels) - 1)

    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Images ``(B, C, H, W)`` with ``C = in_channels`` and ``H, W`` multiples of :attr:`downsampling_factor`.

        Raises:
            ValueError: naming the expected and actual shape.
        """
        super().check_shape(x_shape)
        f = self.downsampling_factor
        if x_shape[2] % f or x_shape[3] % f:
            raise ValueError(f"PixelDiffusionPrior: H and W must be multiples of {f}, got shape {tuple(x_shape)}")

    def _network(self, z_in: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """``unet(z_t, t, class_labels).sample`` (float ``t`` is fine: sinusoidal embedding)."""
        class_labels = cond.class_labels if isinstance(cond, ClassCondition) else cond
        if self.class_conditional and class_labels is None:
            raise ValueError("PixelDiffusionPrior: class-conditional UNet needs cond=ClassCondition(class_labels)")
        if not self.class_conditional and class_labels is not None:
            raise ValueError("PixelDiffusionPrior: unconditional UNet got class labels")
        if class_labels is not None and class_labels.shape[0] == 1:
            class_labels = class_labels.expand(z_in.shape[0])
        return self.net(z_in, t, class_labels=class_labels).sample

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        subfolder: str | None = None,
        scheduler_config: str | Path | Mapping[str, Any] | None = None,
        prediction_type: str | None = None,
        boundary: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PixelDiffusionPrior:
        """Load a pixel prior from a local diffusers folder (offline) or a hub id (online).

        Layouts: a pipeline folder (``unet/`` + ``scheduler/scheduler_config.json``), or a bare UNet folder
        (``config.json`` + weights) whose scheduler config is ``scheduler_config.json`` next to it or given by
        ``scheduler_config`` (a path or a mapping).

        Args:
            path_or_hub_id: local folder or hub repository id (e.g. ``google/ddpm-ema-bedroom-256``).
            subfolder: UNet subfolder; default ``unet`` when it exists, else the root.
            scheduler_config: explicit scheduler config (file path or mapping); default: found in the folder.
            prediction_type: overrides the scheduler config's value.
            boundary: overrides the boundary the scheduler config implies (``"lcm"`` for an ``LCMScheduler``).
            dtype: network dtype (fp32 on CPU, bf16 on GPU by default policy, docs/method.md §1.4).
            device: where to put the network.

        Raises:
            FileNotFoundError: naming the folder and the missing file when the layout is incomplete.
            ValueError: for a malformed JSON config.
        """
        root, hub_id = _local_root(path_or_hub_id)
        unet_dir = root / subfolder if subfolder else (root / "unet" if (root / "unet").is_dir() else root)
        _require_file(unet_dir, ("config.json",))
        if hub_id is not None:
            _fetch_weights(hub_id, root, unet_dir)
        _require_file(unet_dir, WEIGHT_FILES)
        _read_json(unet_dir / "config.json")
        config = _scheduler_config(root, unet_dir, scheduler_config)
        unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype)
        return cls(unet, config, prediction_type=prediction_type, boundary=boundary).to(device)


def boundary_of_config(config: Mapping[str, Any]) -> str:
    """``"lcm"`` for a diffusers ``LCMScheduler`` config (a distilled consistency model), ``"none"`` otherwise."""
    return "lcm" if config.get("_class_name") == "LCMScheduler" else "none"


def _local_root(path_or_hub_id: str | Path) -> tuple[Path, str | None]:
    """``(folder, None)`` for a local folder; ``(snapshot of the JSON configs, hub_id)`` for a hub id."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected a diffusers model folder, found a file")
        return path, None
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: no such model folder (and not a hub id of the form 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json"])), text
    except Exception as err:  # offline, unknown repo, ...
        raise FileNotFoundError(f"{text}: not a local folder and the hub download failed ({err})") from err


def _fetch_weights(hub_id: str, root: Path, unet_dir: Path) -> None:
    """Download the UNet weights of a hub snapshot, safetensors first, then the pickled ``.bin``."""
    from huggingface_hub import hf_hub_download

    sub = unet_dir.relative_to(root).as_posix()
    for name in WEIGHT_FILES[:2]:
        try:
            hf_hub_download(hub_id, name, subfolder=None if sub == "." else sub)
            return
        except Exception as err:  # the file may simply not exist in this repository
            logger.debug("%s: no %s/%s (%s)", hub_id, sub, name, err)


def _require_file(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` present in ``folder``; a clear error naming the folder and files otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found (expected a file {names[0]!r} there)")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing file {' or '.join(repr(n) for n in names)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from err


def _scheduler_config(root: Path, unet_dir: Path, explicit: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Scheduler config: explicit mapping/path, else ``scheduler/`` of a pipeline folder, else next to the UNet."""
    if isinstance(explicit, Mapping):
        return dict(explicit)
    if explicit is not None:
        path = Path(explicit)
        path = path / "scheduler_config.json" if path.is_dir() else path
        _require_file(path.parent, (path.name,))
        return _read_json(path)
    for folder in (root / "scheduler", unet_dir, root):
        if (folder / "scheduler_config.json").is_file():
            return _read_json(folder / "scheduler_config.json")
    raise FileNotFoundError(
        f"{root}: missing file 'scheduler/scheduler_config.json' (or 'scheduler_config.json' next to the UNet); "
        "pass scheduler_config= for a bare UNet folder"
    )
