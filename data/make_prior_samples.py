"""Unconditional samples of a pixel diffusion prior as PNG files: extra training data for a UD2M distillation.

UD2M learns to sample the posterior of its prior. Where the training photographs are few (the shipped ``photos``
prior has eight), the prior's own samples are data of exactly the distribution whose posterior the sampler learns;
``ImageFolderImages(extra_root=..., extra_fraction=...)`` mixes them into the training crops. On the photos problems
they did not help (docs/training.md, "Few training images": the photos prior's samples are textures, not scenes), so
measure before adopting them. Sampling is diffusers' ``DDIMPipeline`` (η = 0, the noise recomputed from the clipped x̂0,
as the prior's card grid), batch ``b`` from the seed ``seed_for(seed, b)``, so the folder is the same whatever
``--num_shards`` split the work, and a rerun skips the batches already written::

    python data/make_prior_samples.py --prior ud2m/assets/priors/photos --out outputs/prior_samples/photos --num 2016
    # two processes on two cores (same folder, disjoint batches)
    python data/make_prior_samples.py ... --num_shards 2 --shard 0 & python data/make_prior_samples.py ... --shard 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from ud2m.export import base_model_hash  # noqa: E402
from ud2m.io import save_image  # noqa: E402
from ud2m.training.prior_card import ddim_pipeline, ddim_samples  # noqa: E402
from ud2m.utils import seed_for  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="a diffusers pixel prior folder (unet/, scheduler/)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the PNG files (created)")
    parser.add_argument("--num", type=int, default=2016, help="number of samples (rounded up to whole batches)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=16, help="samples per network call (part of the seeding)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", type=int, default=0, help="this process's share: batches b with b %% n == shard")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.num < 1 or args.batch < 1 or args.steps < 1 or not 0 <= args.shard < args.num_shards:
        parser.error(f"expected num, batch, steps >= 1 and 0 <= shard < num_shards, got {vars(args)}")
    return args


def settings(args: argparse.Namespace) -> dict:
    """What fixes the samples (stored in ``info.json``; a rerun into the folder must match it)."""
    return {
        "prior": str(args.prior),
        "prior_hash": base_model_hash(args.prior),
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "sampler": "diffusers DDIMPipeline, eta 0, use_clipped_model_output=True; batch b from seed_for(seed, b)",
    }


def check_folder(out: Path, info: dict) -> None:
    """Create ``out`` with ``info.json``, or check that an existing one was made with the same settings.

    Raises:
        SystemExit: naming the file, when the folder holds samples made otherwise (they would be mixed).
    """
    path = out / "info.json"
    if path.is_file():
        stored = {k: v for k, v in json.loads(path.read_text()).items() if k in info}
        if stored != info:
            changed = sorted(k for k in info if stored.get(k) != info[k])
            raise SystemExit(f"{path}: the folder holds samples made with other settings ({changed}); use another out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if not (Path(args.prior) / "unet").is_dir():
        raise SystemExit(f"--prior {args.prior}: not a diffusers pixel prior folder (no unet/ inside)")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_folder(args.out, settings(args))
    pipe = ddim_pipeline(args.prior)
    num_batches = -(-args.num // args.batch)
    mine = [b for b in range(num_batches) if b % args.num_shards == args.shard]
    written, start = [], time.perf_counter()
    for done, b in enumerate(mine, 1):
        paths = [args.out / f"s{b * args.batch + i:06d}.png" for i in range(args.batch)]
        if all(p.is_file() for p in paths):
            continue
        with torch.inference_mode():
            x = ddim_samples(pipe, args.batch, steps=args.steps, seed=seed_for(args.seed, b))
        for image, path in zip(x, paths, strict=True):
            save_png(image, path)
        written += paths
        print(f"batch {done}/{len(mine)}: {len(written)} written, {time.perf_counter() - start:.0f} s", flush=True)
    return written


def save_png(image: torch.Tensor, path: Path) -> None:
    """An image on [0, 1] ``(C, H, W)`` as an 8-bit PNG, written under a temporary name first (an interrupted run
    leaves no truncated file that a rerun would take as done)."""
    tmp = path.with_suffix(".tmp.png")
    save_image(image * 2 - 1, tmp)  # the project's PNG writer (images on [-1, 1])
    tmp.replace(path)


if __name__ == "__main__":
    main()
