"""Per-call cost of LatentConsistencyPrior (docs/method.md §3.2(a)) on the tiny LCM and SDXL parts.

Times one ``predict_x0`` (= 1 NFE), ``encode`` and ``decode`` under ``torch.inference_mode`` (median of ``--repeats``
calls after one warm-up call) and prints a table. Random tiny weights cost the same as trained ones.

    .venv/bin/python benchmarks/priors_latent.py --batch 1 4 --size 32 64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import median_ms

from ud2m.priors.latent import LatentConsistencyPrior
from ud2m.priors.tiny_latent import tiny_pipeline


def bench(kind: str, batch: int, size: int, repeats: int, device: str) -> dict[str, float]:
    """Times of predict_x0 / encode / decode for one tiny prior, batch and image size."""
    prior = LatentConsistencyPrior.from_pipeline(tiny_pipeline(kind)).to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand((batch, 3, size, size), generator=g) * 2 - 1).to(device)
    z = torch.randn(prior.latent_shape(tuple(x.shape)), generator=g).to(device)
    with torch.inference_mode():
        cond = prior.encode_prompt(["a photo"] * batch, image_size=(size, size) if kind == "sdxl" else None)
        return {
            "predict_x0": median_ms(lambda: prior.predict_x0(z, 499.0, cond), repeats),
            "encode": median_ms(lambda: prior.encode(x), repeats),
            "decode": median_ms(lambda: prior.decode(z), repeats),
            "encode_prompt": median_ms(lambda: prior.encode_prompt(["a photo"] * batch), repeats),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["lcm", "sdxl"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--size", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} (median ms per call)")
    print(f"{'model':6} {'B':>3} {'HxW':>7} {'predict_x0':>11} {'encode':>8} {'decode':>8} {'prompt':>8}")
    for kind in args.kinds:
        for batch in args.batch:
            for size in args.size:
                r = bench(kind, batch, size, args.repeats, args.device)
                print(
                    f"{kind:6} {batch:>3} {f'{size}x{size}':>7} {r['predict_x0']:>11.1f} {r['encode']:>8.1f} "
                    f"{r['decode']:>8.1f} {r['encode_prompt']:>8.1f}"
                )


if __name__ == "__main__":
    main()
