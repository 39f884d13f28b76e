"""Tiny, offline, randomly initialised latent-consistency components for tests, benchmarks and CLI smoke runs.

Builds the parts that :class:`ud2m.priors.latent.LatentConsistencyPrior` loads (docs/method.md §3.2a) at toy size:
an SD/LCM-style ``UNet2DConditionModel`` (with ``time_cond_proj_dim`` for LCM), an SDXL-style UNet
(``addition_embed_type="text_time"``), a 2-block ``AutoencoderKL`` (downsampling factor 2), tiny CLIP text encoders
and an offline byte-level CLIP tokenizer (256 byte symbols + 256 ``</w>`` variants + 2 specials, no merges), plus
writers for complete diffusers pipeline folders, an LCM-LoRA folder and a DMD2-style replacement UNet state dict.
Sizes follow environment.md ("Tiny models for tests"). Weights are drawn under ``torch.random.fork_rng`` from a
``seed`` so the global RNG is left untouched. Everything builds in well under a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_LENGTH = 16  # tiny CLIP context length (real CLIP: 77)
KINDS = ("lcm", "sd", "sdxl")
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)


# ---------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP reversible byte -> printable-unicode table (the symbols of a byte-level BPE vocabulary)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Offline byte-level CLIP tokenizer: 514 tokens (bytes, bytes + ``</w>``, BOS 512, EOS/pad 513), no merges.

    The vocabulary files are written to a temporary folder that is removed once the tokenizer is built.
    """
    symbols = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(symbols)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


# ---------------------------------------------------------------------------------------------------- models
def tiny_text_encoder(
    *, hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Two-layer CLIP text encoder over the :func:`tiny_clip_tokenizer` vocabulary (``with_projection``: SDXL's 2nd)."""
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def tiny_unet(kind: str = "lcm", *, seed: int = 0) -> UNet2DConditionModel:
    """Tiny ``UNet2DConditionModel``: ``"lcm"`` (``time_cond_proj_dim=32``), ``"sd"`` (plain) or ``"sdxl"``.

    The SDXL variant takes ``encoder_hidden_states`` of width 32 + 48 (two encoders), ``text_embeds`` (B, 32) and
    ``time_ids`` (B, 6): ``projection_class_embeddings_input_dim = 6·8 + 32``.
    """
    _check_kind(kind)
    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if kind == "lcm":
        extra = dict(cross_attention_dim=32, time_cond_proj_dim=32)
    elif kind == "sd":
        extra = dict(cross_attention_dim=32)
    else:
        extra = dict(
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**common, **extra).eval()


def tiny_vae(*, scaling_factor: float = 0.18215, seed: int = 0) -> AutoencoderKL:
    """Two-block ``AutoencoderKL`` (downsampling factor 2, 4 latent channels)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=scaling_factor,
        )
    return vae.eval()


# ---------------------------------------------------------------------------------------------------- pipelines
def tiny_pipeline(kind: str = "lcm", *, seed: int = 0):
    """A complete diffusers pipeline on tiny parts.

    ``"lcm"``: ``LatentConsistencyModelPipeline`` (LCM-distilled SD layout, ``LCMScheduler``); ``"sd"``:
    ``StableDiffusionPipeline`` (SD1.5 base layout for an LCM-LoRA); ``"sdxl"``: ``StableDiffusionXLPipeline``.
    """
    _check_kind(kind)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=tiny_vae(scaling_factor=0.13025, seed=seed),
            text_encoder=tiny_text_encoder(hidden_size=32, seed=seed + 1),
            text_encoder_2=tiny_text_encoder(hidden_size=48, with_projection=True, seed=seed + 2),
            tokenizer=tiny_clip_tokenizer(),
            tokenizer_2=tiny_clip_tokenizer(),
            unet=tiny_unet("sdxl", seed=seed + 3),
            scheduler=EulerDiscreteScheduler(**_without(SCHEDULER_CONFIG, "set_alpha_to_one")),
            add_watermarker=False,
        )
    parts = dict(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_text_encoder(seed=seed + 1),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_unet(kind, seed=seed + 3),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if kind == "lcm":
        return LatentConsistencyModelPipeline(scheduler=LCMScheduler(**SCHEDULER_CONFIG), **parts)
    return StableDiffusionPipeline(scheduler=LCMScheduler(**SCHEDULER_CONFIG), **parts)


def write_tiny_pipeline(directory: str | Path, kind: str = "lcm", *, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` with ``save_pretrained`` (safetensors) and return the folder."""
    directory = Path(directory)
    tiny_pipeline(kind, seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_lora(
    directory: str | Path, unet: UNet2DConditionModel | None = None, *, rank: int = 4, seed: int = 0
) -> Path:
    """Write an LCM-LoRA-style folder (``pytorch_lora_weights.safetensors``, diffusers key layout) for ``unet``.

    LoRA targets the attention projections with random (non-zero) A and B so that fusing visibly changes the UNet;
    ``unet`` (default: a fresh ``tiny_unet("sd")``) is not modified.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_unet("sd") if unet is None else unet
    host = UNet2DConditionModel.from_config(unet.config)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    host.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(host)
    state = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(state), safe_serialization=True
    )
    return Path(directory)


def write_tiny_unet_weights(path: str | Path, *, seed: int = 1, dtype: torch.dtype = torch.float16) -> Path:
    """Write a DMD2-style replacement UNet: a plain ``torch.save`` state dict of a tiny SDXL UNet in ``dtype``."""
    state = {k: v.to(dtype) for k, v in tiny_unet("sdxl", seed=seed).state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_tiny_vae(directory: str | Path, *, seed: int = 2) -> Path:
    """Write a standalone VAE folder (``config.json`` + weights at the root, like ``sdxl-vae-fp16-fix``)."""
    tiny_vae(scaling_factor=0.13025, seed=seed).save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}
