"""Load a prior from a diffusers folder or hub id without knowing its family: ``model_family`` reads the folder's
``model_index.json`` (or UNet config) and :func:`load_prior` builds :class:`~ud2m.priors.pixel.PixelDiffusionPrior`
or :class:`~ud2m.priors.latent.LatentConsistencyPrior` with the precision policy (docs/method.md §1.4). Used by
``sample.py`` and by anyone who restores with a model given by path.

    prior = load_prior("ud2m/assets/priors/photos")            # pixel, fp32 on CPU
    prior = load_prior("path/to/lcm", device="cuda")            # latent, bf16/fp16 on CUDA
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ud2m.priors.base import Prior


def model_family(source: str) -> str:
    """``"pixel"`` or ``"latent"`` from a diffusers folder or hub id: the ``model_index.json`` pipeline (a ``vae``
    component means latent) or the UNet config class (``UNet2DModel`` pixel, ``UNet2DConditionModel`` latent).

    Raises:
        FileNotFoundError: for a missing folder (or an unreachable hub id) and a folder that is not a diffusers model.
    """
    index = model_json(source, "model_index.json")
    if index is not None:
        unet = index.get("unet", [None, None])
        if "vae" in index or unet[1] == "UNet2DConditionModel":
            return "latent"
        if unet[1] == "UNet2DModel":
            return "pixel"
    for name in ("unet/config.json", "config.json"):
        config = model_json(source, name)
        if config is not None and config.get("_class_name") in ("UNet2DModel", "UNet2DConditionModel"):
            return "pixel" if config["_class_name"] == "UNet2DModel" else "latent"
    raise FileNotFoundError(
        f"{source}: not a diffusers model (no model_index.json with a unet, and no UNet config.json)"
    )


def model_json(source: str, name: str) -> dict | None:
    """A JSON file of a local model folder or hub repository, None when it does not exist there."""
    root = Path(source).expanduser()
    if root.exists():
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: expected a model folder, got a file")
        path = root / name
        return json.loads(path.read_text()) if path.is_file() else None
    if str(source).startswith(("/", ".", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"model folder not found: {source} (neither a local folder nor a hub id owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(source), name)).read_text())
    except EntryNotFoundError:
        return None
    except Exception as err:  # offline, unknown repository, ...
        raise FileNotFoundError(f"{source}: not a local folder and the hub lookup failed ({err})") from err


def load_prior(
    source: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Prior:
    """Load the prior of a diffusers folder or hub id.

    Args:
        source: local folder or hub id.
        family: ``"pixel"`` or ``"latent"`` (None: :func:`model_family` of ``source``).
        dtype: network dtype (None: the precision policy, fp32 on CPU, bf16/fp16 on CUDA).
        device: where the networks go.
        **kwargs: further keywords of the prior's ``from_pretrained`` (``lora``, ``unet_weights``, ``vae``, ...).
    """
    source = str(source)
    family = family or model_family(source)
    device = torch.device(device)
    if family == "pixel":
        from ud2m.priors.latent import default_dtype
        from ud2m.priors.pixel import PixelDiffusionPrior

        dtype = dtype or default_dtype(device, sdxl=False)
        return PixelDiffusionPrior.from_pretrained(source, dtype=dtype, device=device, **kwargs)
    if family != "latent":
        raise ValueError(f"family: expected 'pixel' or 'latent', got {family!r}")
    from ud2m.priors.latent import LatentConsistencyPrior

    return LatentConsistencyPrior.from_pretrained(source, dtype=dtype, device=device, **kwargs)


__all__ = ["load_prior", "model_family"]
