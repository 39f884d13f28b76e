"""Cost of one NFE on real-size latent priors: the SD1.5 (512²) and SDXL (1024²) UNet architectures and their VAEs,
built from config with random weights (random weights cost the same as trained ones; nothing is downloaded).

On CPU (this machine's kind) only SD1.5 at batch 1 is practical; on a CUDA GPU both models run in fp16 at batch 1
and 8 (issue [priors], "Figures to report")::

    python benchmarks/priors_fullsize.py --models sd15 --batch 1 --device cpu --repeats 2
    python benchmarks/priors_fullsize.py --models sd15 sdxl --batch 1 8 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json

import torch
from common import median_ms
from diffusers import AutoencoderKL, UNet2DConditionModel

SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    layers_per_block=2,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
MODELS = {"sd15": (SD15_UNET, 512, 768), "sdxl": (SDXL_UNET, 1024, 2048)}


def unet_inputs(name: str, batch: int, size: int, text_dim: int, device, dtype) -> dict:
    """Random latents, timestep and text conditioning of the right shapes for one UNet call."""
    kw = dict(
        sample=torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype),
        timestep=torch.full((batch,), 499.0, device=device),
        encoder_hidden_states=torch.randn(batch, 77, text_dim, device=device, dtype=dtype),
    )
    if name == "sdxl":
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
            "time_ids": time_ids,
        }
    return kw


def bench(name: str, batch: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    config, size, text_dim = MODELS[name]
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    vae = AutoencoderKL(**VAE).to(device, dtype).eval()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kw = unet_inputs(name, batch, size, text_dim, device, dtype)
    x = torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1
    with torch.inference_mode():
        row = {
            "model": name,
            "batch": batch,
            "size": size,
            "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
            "nfe_ms": median_ms(lambda: unet(**kw), repeats, device),
            "encode_ms": median_ms(lambda: vae.encode(x).latent_dist.mean, repeats, device),
            "decode_ms": median_ms(lambda: vae.decode(kw["sample"]).sample, repeats, device),
        }
    if device == "cuda":
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15"], choices=sorted(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, float16 on CUDA by default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    for name in args.models:
        for batch in args.batch:
            row = bench(name, batch, args.device, dtype, args.repeats)
            row.update(device=args.device, dtype=str(dtype), threads=torch.get_num_threads())
            print(json.dumps(row))


if __name__ == "__main__":
    main()
