"""Tiny, randomly initialised Wan2.1 components for tests and examples (no downloads, well under a second).

Owns the offline builders of the four parts of a diffusers ``WanPipeline`` (``WanTransformer3DModel``,
``AutoencoderKLWan`` with the real 4x temporal / 8x spatial factors, a ``UMT5EncoderModel`` and a byte-level
tokenizer), a tiny :class:`~ud2m.priors.video.VideoFlowPrior`, and a writer of a complete ``WanPipeline`` folder in
the layout of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``. The architecture is the one of docs/method.md §3.2(c); only the
widths are tiny.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from ud2m.priors.video import VideoFlowPrior

TEXT_DIM = 32


def tiny_wan_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer built offline: 256 byte symbols, no merges, T5 specials ``<pad>=0, </s>=1, <unk>=2``.

    Every text maps to one token per UTF-8 byte followed by ``</s>``, as T5/UMT5 tokenizers append EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_wan_text_encoder(vocab_size: int, *, d_model: int = TEXT_DIM) -> UMT5EncoderModel:
    """Two-layer UMT5 encoder of width ``d_model`` (the real one is UMT5-XXL, width 4096)."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def tiny_wan_transformer(*, text_dim: int = TEXT_DIM, num_layers: int = 2) -> WanTransformer3DModel:
    """Wan DiT with 2 heads of 12 channels, patch (1, 2, 2), 16 latent channels (Wan2.1-1.3B: 12 x 128, 30 layers)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae() -> AutoencoderKLWan:
    """Wan VAE with base width 3 but the real factors: 4x in time, 8x in space, 16 latent channels."""
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_wan_components(seed: int = 0) -> dict[str, torch.nn.Module | PreTrainedTokenizerFast]:
    """All four parts, initialised from ``seed`` (the global RNG state is restored afterwards)."""
    tokenizer = tiny_wan_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {
            "transformer": tiny_wan_transformer(),
            "vae": tiny_wan_vae(),
            "text_encoder": tiny_wan_text_encoder(len(tokenizer)),
            "tokenizer": tokenizer,
        }


def tiny_video_flow_prior(*, seed: int = 0, shift: float = 8.0, max_sequence_length: int = 16) -> VideoFlowPrior:
    """A :class:`VideoFlowPrior` on tiny random components (video ``(B, 3, 4k+1, 16m, 16n)``)."""
    parts = tiny_wan_components(seed)
    return VideoFlowPrior(**parts, shift=shift, max_sequence_length=max_sequence_length)


def write_tiny_wan_pipeline(path: str | os.PathLike, *, seed: int = 0, shift: float = 8.0) -> Path:
    """Save a complete tiny ``WanPipeline`` folder (Euler flow-matching scheduler with ``shift``) and return it."""
    parts = tiny_wan_components(seed)
    pipe = WanPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **parts)
    pipe.save_pretrained(path)
    return Path(path)
