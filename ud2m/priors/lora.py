"""LoRA adapters (Hu et al., 2022) on a frozen prior network, via peft (docs/method.md §7.3, §9).

:math:`W' = W + \\frac{\\alpha}{r} B A` with :math:`B = 0` at initialisation, so the adapted prior equals the frozen
prior exactly at step 0. Adapters attach to ``prior.net`` of any family: diffusers models with ``add_adapter``
(``UNet2DConditionModel``, Wan transformer) use it, others (``UNet2DModel``) go through
``peft.inject_adapter_in_model``. A saved adapter folder loads with the standard tools (issue [api] 6):

- ``pytorch_lora_weights.safetensors``: diffusers' format, the peft tensors under the pipeline component's prefix
  (``unet.<module>.lora_A.weight``) with the ``LoraConfig`` in the header's ``lora_adapter_metadata`` under the same
  prefix, so ``pipeline.load_lora_weights(folder)`` (Stable Diffusion family) restores rank, alpha and every target
  exactly, conv layers included (no key conversion is involved);
- ``adapter_model.safetensors`` + ``adapter_config.json``: peft's format (``base_model.model.<module>...``), so
  ``PeftModel.from_pretrained(net, folder)`` loads it on any base network.

Adapters written before this layout (raw peft keys, no prefix) still load with :func:`load_lora`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."  # keys of a PeftModel's saved state dict
LORA_CONFIG_NAME = "adapter_config.json"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INITS = {"zeros_B": True, "gaussian": "gaussian"}  # peft init_lora_weights; both set B = 0


def _net(prior_or_net: nn.Module) -> nn.Module:
    """``prior.net`` for a prior wrapper, the module itself otherwise."""
    net = getattr(prior_or_net, "net", None)
    return net if isinstance(net, nn.Module) else prior_or_net


def attach_lora(
    prior_or_net: nn.Module,
    *,
    rank: int = 5,
    alpha: float = 1.5,
    target_modules: Sequence[str] = ATTENTION_TARGETS,
    init: str = "zeros_B",
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    r"""Attach a LoRA adapter :math:`\Delta W = (\alpha/r)BA` to a prior's network; only LoRA tensors train.

    Args:
        prior_or_net: a ``Prior`` (the adapter goes on ``prior.net``) or a network.
        rank: :math:`r`.
        alpha: ``lora_alpha`` (scale :math:`\alpha/r`; UD2M: r = 5, α = 1.5).
        target_modules: module-name suffixes (diffusers names, e.g. ``to_q``, ``conv_out``).
        init: ``"zeros_B"`` (A Kaiming-uniform) or ``"gaussian"``; B = 0 in both.
        dropout: LoRA dropout (0 by default; the frozen net stays in eval mode anyway).
        adapter_name: peft adapter name.

    Returns:
        The adapted network (modified in place). LoRA tensors are float32 (docs/method.md §1.4).
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {tuple(INITS)}, got {init!r}")
    net = _net(prior_or_net)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=INITS[init],
        lora_dropout=dropout,
    )
    _inject(net, config, adapter_name)
    return net


def _inject(net: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Add the adapter, then freeze everything but the LoRA tensors (kept in float32)."""
    if hasattr(net, "add_adapter"):
        net.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, net, adapter_name=adapter_name)
    for name, p in net.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"attach_lora: no module matched target_modules={sorted(config.target_modules)}")


def lora_state_dict(prior_or_net: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Raw ``peft.get_peft_model_state_dict`` of the adapter (keys without the adapter name; no conversion)."""
    return get_peft_model_state_dict(_net(prior_or_net), adapter_name=adapter_name)


def lora_config(prior_or_net: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """The ``LoraConfig`` of an attached adapter."""
    net = _net(prior_or_net)
    configs = getattr(net, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} on {type(net).__name__} (have {list(configs)})")
    return configs[adapter_name]


def component_prefix(prior_or_net: nn.Module) -> str:
    """The pipeline component a network is in diffusers' LoRA files: ``transformer`` (Wan, Flux, ...) or ``unet``."""
    return "transformer" if "Transformer" in type(_net(prior_or_net)).__name__ else "unet"


def save_lora(prior_or_net: nn.Module, folder: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter in diffusers' and peft's formats (module docstring; docs/method.md §9).

    Returns:
        The folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_dict(lora_config(prior_or_net, adapter_name))
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(prior_or_net, adapter_name).items()}
    prefix = component_prefix(prior_or_net)
    metadata = json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
    save_file(
        {f"{prefix}.{k}": v for k, v in state.items()},
        str(folder / LORA_WEIGHT_NAME),
        metadata={"format": "pt", LORA_METADATA_KEY: metadata},
    )
    save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(folder / PEFT_WEIGHT_NAME), metadata={"format": "pt"})
    (folder / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _config_dict(config: LoraConfig) -> dict:
    """JSON-safe ``LoraConfig`` dict (sets become sorted lists, enums their values)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = getattr(value, "value", value)
    return out


def load_lora(prior_or_net: nn.Module, folder: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load an adapter saved by :func:`save_lora` (or diffusers' ``save_lora_adapter``) onto a network.

    ``UNet2DConditionModel`` (anything with ``load_lora_adapter``) uses
    ``load_lora_adapter(folder, prefix="unet", use_safetensors=True)`` (``prefix=None`` for an adapter written
    before the prefixed layout); other networks get
    ``inject_adapter_in_model(LoraConfig(**config))`` + ``set_peft_model_state_dict``. The base stays frozen and
    the LoRA tensors trainable.

    Raises:
        FileNotFoundError: naming the folder and the missing file.
        ValueError: if some saved LoRA tensors found no place in the network.
    """
    folder = Path(folder)
    for name in (LORA_WEIGHT_NAME, LORA_CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing LoRA file {name!r}")
    net = _net(prior_or_net)
    state = load_file(str(folder / LORA_WEIGHT_NAME))
    prefix = component_prefix(net)
    prefixed = all(k.startswith(f"{prefix}.") for k in state)  # False: an adapter written before the prefixed layout
    if hasattr(net, "load_lora_adapter"):
        net.load_lora_adapter(
            folder, prefix=prefix if prefixed else None, use_safetensors=True, adapter_name=adapter_name
        )
    else:
        config = json.loads((folder / LORA_CONFIG_NAME).read_text())
        inject_adapter_in_model(LoraConfig(**_loadable(config)), net, adapter_name=adapter_name)
        if prefixed:
            state = {k.removeprefix(f"{prefix}."): v for k, v in state.items()}
        result = set_peft_model_state_dict(net, state, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            n = len(unexpected)
            raise ValueError(f"{folder}: {n} LoRA tensors did not match the network, e.g. {unexpected[0]}")
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def _loadable(config: dict) -> dict:
    """Keep only the keys this peft version's ``LoraConfig`` accepts (forward compatibility of saved configs)."""
    fields = LoraConfig.__dataclass_fields__
    dropped = sorted(k for k in config if k not in fields)
    if dropped:
        logger.warning("ignoring unknown LoraConfig keys %s", dropped)
    return {k: v for k, v in config.items() if k in fields}


def trainable_parameters(*modules: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` across ``modules``, each tensor once (shared LoRA across blocks)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        params = m.parameters() if isinstance(m, nn.Module) else m
        for p in params:
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())
