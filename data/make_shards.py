"""Write WebDataset shards for UD2M training (issue [ud2m], "Data"; docs/method.md §1.1, §2.8, §7).

A script, not package code (nanoGPT's ``data/*/prepare.py``). Sources: an image folder (recursive; PNG, JPEG, TIFF,
BMP, WebP), scikit-image's bundled photographs (``--from_skimage``) or scikit-learn's 8x8 digits upsampled to
32x32 (``--from_digits``); the last two need no download. Each image is converted to ``--channels``, brought to
``--size`` by ``--policy`` and stored losslessly as 8-bit PNG, in ``<out>/train-%06d.tar`` and ``<out>/val-%06d.tar``
(deterministic split by ``--val_fraction`` and ``--seed``, see ``ud2m.training.data.split_train_val``).

With ``--operator <preset name or YAML>`` each sample also stores ``y.npy``: ``y = A x + 2 sigma_y n`` (float32 on the
internal [-1, 1] scale, measured on the stored, quantised x) and the json gets ``params`` = ``{operator: {class_path,
init_args}, sigma_y, seed, preset}``, enough to rebuild the operator and replay the noise exactly
(``torch.Generator().manual_seed(seed)`` passed to ``ud2m.operators.measure``).

With ``--simulate low-light|haze|noise|colour`` instead, each sample gets the blind-restoration protocol's degradation
(docs/method.md §13.8, ``ud2m.operators.simulate.simulate_task``) with its *own* random parameters: ``y.npy`` as
above (colour: the grey value in every channel) and ``params`` = ``{simulate, sigma_y, seed, param_seed, values}``,
``values`` the drawn scalars (low light: gamma, exposure; haze: beta, airlight; its depth map is replayed from
``param_seed``): ``simulate_task(task, x, Generator().manual_seed(param_seed), Generator().manual_seed(seed),
sigma_y=sigma_y)`` rebuilds y exactly.

Examples::

    python data/make_shards.py --input ~/images --out shards/mydata --size 256 --val_fraction 0.05
    python data/make_shards.py --from_skimage --out shards/skimage --size 128 --operator ud2m/deblur_gaussian
    python data/make_shards.py --from_digits --out shards/digits --maxcount 500
    python data/make_shards.py --from_skimage --out shards/haze --size 64 --simulate haze
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from ud2m.io import digits32, load_image
from ud2m.operators.simulate import TASK_SIGMA_Y, simulate_task
from ud2m.training.data import list_image_files, split_train_val, upscale_to

logger = logging.getLogger("make_shards")

#: Photographs that ship inside scikit-image (no download), used by ``--from_skimage``.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "clock", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


class Source(NamedTuple):
    """One input image: a name (stored in the json) and a loader returning ``(1, C, H, W)`` on [-1, 1]."""

    name: str
    load: Callable[[], torch.Tensor]


def folder_sources(root: str | Path, channels: int) -> tuple[list[Source], list[Path]]:
    """Image files under ``root`` (recursive) as sources, plus the files ignored for their suffix."""
    root = Path(root)
    images = list_image_files(root)
    kept = set(images)
    ignored = sorted(p for p in root.rglob("*") if p.is_file() and p not in kept)
    return [Source(str(p.relative_to(root)), lambda p=p: load_image(p, channels=channels)) for p in images], ignored


def skimage_sources(channels: int) -> list[Source]:
    """scikit-image's bundled photographs (names ``skimage:<name>``)."""
    return [Source(f"skimage:{n}", lambda n=n: load_image(f"skimage:{n}", channels=channels)) for n in SKIMAGE_PHOTOS]


def digits_sources(channels: int) -> list[Source]:
    """scikit-learn's 1,797 8x8 digits bilinearly upsampled to 32x32 (``ud2m.io.digits32``, names ``digits:<i>``)."""
    x = 2 * torch.from_numpy(digits32())[:, None] - 1  # (N, 1, 32, 32) on [-1, 1]
    x = x.expand(-1, channels, -1, -1)
    return [Source(f"digits:{i:04d}", lambda i=i: x[i : i + 1]) for i in range(x.shape[0])]


def sample_seed(seed: int, index: int, purpose: int) -> int:
    """A 31-bit seed for sample ``index`` (purpose 0: crop, 1: noise, 2: simulated parameters), independent of
    processing order."""
    return int(np.random.SeedSequence([seed, index, purpose]).generate_state(1)[0] >> 1)


def fit_to_size(x: torch.Tensor, size: int, policy: str, small: str, generator: torch.Generator) -> torch.Tensor | None:
    """Bring a ``(1, C, H, W)`` image to ``(1, C, size, size)``; ``None`` when it is too small and ``small="skip"``.

    ``center_crop``/``random_crop`` crop at native resolution (images smaller than ``size`` are upscaled first when
    ``small="upscale"``); ``resize`` scales the shorter side to ``size`` (bicubic, antialiased when shrinking) and
    then takes the central crop.
    """
    H, W = x.shape[-2:]
    if min(H, W) < size and small == "skip":
        return None
    if policy == "resize" and min(H, W) > size:
        scale = size / min(H, W)
        shape = (max(size, round(H * scale)), max(size, round(W * scale)))
        x = F.interpolate(x, size=shape, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    elif min(H, W) < size:
        x = upscale_to(x[0], size)[None]
    H, W = x.shape[-2:]
    if policy == "random_crop":
        top = int(torch.randint(0, H - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - size + 1, (1,), generator=generator))
    else:
        top, left = (H - size) // 2, (W - size) // 2
    return x[..., top : top + size, left : left + size]


def quantise(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """8-bit (H, W[, C]) array of a ``(1, C, H, W)`` image on [-1, 1], and the quantised image back on [-1, 1]."""
    u8 = (((x[0] + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)  # (C, H, W), as ud2m.io.save_image
    arr = u8.permute(1, 2, 0).numpy()
    return (arr[..., 0] if arr.shape[-1] == 1 else arr), (u8.float() / 255 * 2 - 1)[None]


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless 8-bit PNG bytes of an (H, W) or (H, W, 3) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(a: np.ndarray) -> bytes:
    """``.npy`` bytes of an array."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class Degradation:
    """The paired-measurement operator of ``--operator``/``--sigma_y`` (a preset of ``ud2m.operators.presets``).

    A preset's ``init_args.image_size`` is set to the shard size (with a warning when it differs).
    """

    def __init__(self, preset: str, sigma_y: float | None, size: int) -> None:
        import yaml

        from ud2m.operators.presets import instantiate_operator, preset_path

        path = preset_path(preset)
        data = yaml.safe_load(path.read_text())
        spec = {"class_path": data["operator"]["class_path"], "init_args": dict(data["operator"].get("init_args", {}))}
        if spec["init_args"].get("image_size", size) != size:
            logger.warning("%s: image_size %s replaced by --size %d", preset, spec["init_args"]["image_size"], size)
            spec["init_args"]["image_size"] = size
        self.spec, self.preset = spec, str(preset)
        self.sigma_y = checked_sigma_y(data["sigma_y"] if sigma_y is None else sigma_y, preset)
        self.op = instantiate_operator(spec, source=str(path))

    def __call__(self, x: torch.Tensor, seed: int) -> tuple[np.ndarray, dict]:
        """``(y[0] as float32 array, params)`` for one ``(1, C, H, W)`` image; the noise comes from ``seed``."""
        from ud2m.operators import measure

        y = measure(self.op, x, self.sigma_y, torch.Generator().manual_seed(seed))
        params = {"operator": self.spec, "sigma_y": self.sigma_y, "seed": seed, "preset": self.preset}
        return y[0].detach().cpu().numpy().astype(np.float32), params


def checked_sigma_y(value: float, what: str) -> float:
    """``value`` as a float, refused unless finite and >= 0 (checked before any shard is touched)."""
    sigma = float(value)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"--sigma_y for {what}: expected a finite noise level >= 0 on [0, 1], got {value}")
    return sigma


class Simulation:
    """``--simulate``: the §13.8 degradation of a blind-restoration task with per-sample random parameters."""

    def __init__(self, task: str, sigma_y: float | None, channels: int) -> None:
        if task not in TASK_SIGMA_Y:
            raise ValueError(f"--simulate: unknown task {task!r}; known tasks: {', '.join(TASK_SIGMA_Y)}")
        if task == "colour" and channels != 3:  # checked before any shard is written
            raise ValueError(f"--simulate colour needs RGB samples (--channels 3), got --channels {channels}")
        self.task, self.sigma_y = task, checked_sigma_y(TASK_SIGMA_Y[task] if sigma_y is None else sigma_y, task)

    def __call__(self, x: torch.Tensor, seed: int, param_seed: int) -> tuple[np.ndarray, dict]:
        """``(y[0] as float32 array, params)`` for one ``(1, C, H, W)`` image: parameters from ``param_seed``,
        noise from ``seed``."""
        params_g, noise_g = torch.Generator().manual_seed(param_seed), torch.Generator().manual_seed(seed)
        sim = simulate_task(self.task, x, params_g, noise_g, sigma_y=self.sigma_y)
        drawn = sim.op.params() if self.task in ("low-light", "haze") else {}
        values = {k: v[0].flatten().tolist() for k, v in drawn.items() if k != "depth"}  # the depth: param_seed
        params = {"simulate": self.task, "sigma_y": self.sigma_y, "seed": seed, "param_seed": param_seed}
        return sim.y[0].detach().cpu().numpy().astype(np.float32), {**params, "values": values}


def sample_key(index: int, name: str) -> str:
    """``<index>_<name>`` with every character outside ``[A-Za-z0-9_-]`` replaced (webdataset splits keys at dots)."""
    stem = Path(name.split(":", 1)[-1]).with_suffix("").as_posix()
    return f"{index:06d}_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)


class SplitWriter:
    """A ``webdataset.ShardWriter`` per split, opened at the first sample (so no empty shard is ever written)."""

    def __init__(self, out: Path, maxcount: int) -> None:
        self.out, self.maxcount, self.writers = out, maxcount, {}
        self.per_shard: Counter = Counter()  # samples per shard file name (info.json "shards")

    def write(self, split: str, sample: dict) -> None:
        """Write one sample dict to ``split``."""
        import webdataset as wds

        if split not in self.writers:
            self.writers[split] = wds.ShardWriter(
                str(self.out / f"{split}-%06d.tar"), maxcount=self.maxcount, verbose=0
            )
        self.writers[split].write(sample)
        self.per_shard[Path(self.writers[split].fname).name] += 1

    def close(self) -> dict[str, int]:
        """Close all writers; return the number of shards per split."""
        shards = {}
        for split, w in self.writers.items():
            shards[split] = w.shard  # the number of shards opened so far (close() deletes the attribute)
            w.close()
        return shards


def make_sample(
    src: Source, index: int, split: str, args: argparse.Namespace, degrade: Degradation | Simulation | None
):
    """Load, fit and encode one source; ``None`` when it is skipped as too small (errors propagate)."""
    x = src.load().float()  # (1, C, H, W)
    orig = list(x.shape[-2:])
    g = torch.Generator().manual_seed(sample_seed(args.seed, index, 0))
    x = fit_to_size(x, args.size, args.policy, args.small, g)
    if x is None:
        return None
    arr, xq = quantise(x)
    meta = {"source": src.name, "orig_size": orig, "size": [args.size, args.size], "channels": args.channels}
    meta.update(policy=args.policy, split=split)
    sample = {"__key__": sample_key(index, src.name), "png": encode_png(arr)}
    if degrade is not None:
        seeds = (sample_seed(args.seed, index, 1),)
        seeds += (sample_seed(args.seed, index, 2),) if isinstance(degrade, Simulation) else ()
        try:
            y, meta["params"] = degrade(xq, *seeds)
        except ValueError as err:  # a setting error, not an unreadable image: stop instead of skipping every sample
            raise RuntimeError(f"{src.name}: the degradation failed: {err}") from err
        sample["y.npy"] = encode_npy(y)
    sample["json"] = json.dumps(meta).encode()
    return sample


def make_shards(sources: list[Source], args: argparse.Namespace, *, ignored: int = 0, progress: bool = True) -> dict:
    """Write all shards; return the summary (samples and shards per split, skipped files)."""
    from tqdm import tqdm

    out = Path(args.out)
    degrade = Degradation(args.operator, args.sigma_y, args.size) if args.operator else None
    if args.simulate:
        degrade = Simulation(args.simulate, args.sigma_y, args.channels)
    prepare_out(out, args.overwrite)  # after the checks above: a bad option deletes no earlier shards
    train_idx, val_idx = split_train_val([s.name for s in sources], args.val_fraction, args.seed)
    split_of = {i: "train" for i in train_idx} | {i: "val" for i in val_idx}
    writer, counts = SplitWriter(out, args.maxcount), Counter()
    for i in tqdm(range(len(sources)), desc="shards", disable=not progress):
        try:
            sample = make_sample(sources[i], i, split_of[i], args, degrade)
        except (OSError, ValueError) as err:
            logger.warning("skipped unreadable %s: %s", sources[i].name, err)
            counts["skipped_unreadable"] += 1
            continue
        if sample is None:
            counts["skipped_small"] += 1
            continue
        writer.write(split_of[i], sample)
        counts[split_of[i]] += 1
    shards = writer.close()
    summary = {"train": counts["train"], "val": counts["val"], "train_shards": shards.get("train", 0)}
    summary |= {"val_shards": shards.get("val", 0), "skipped_unreadable": counts["skipped_unreadable"]}
    summary |= {"skipped_small": counts["skipped_small"], "ignored": ignored, "out": str(out)}
    info = {"summary": summary, "shards": dict(sorted(writer.per_shard.items())), "args": vars(args)}
    (out / "info.json").write_text(json.dumps(info, indent=1, default=str))  # "shards": readers count lost samples
    return summary


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; existing shards there are an error unless ``overwrite`` (then they are deleted)."""
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("train-*.tar")) + sorted(out.glob("val-*.tar"))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shards (e.g. {old[0].name}); pass --overwrite")
    for p in old:
        p.unlink()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="image folder (searched recursively)")
    src.add_argument("--from_skimage", action="store_true", help="scikit-image's bundled photographs")
    src.add_argument("--from_digits", action="store_true", help="scikit-learn's digits, 8x8 -> 32x32, gray")
    p.add_argument("--out", required=True, help="output folder for train-%%06d.tar / val-%%06d.tar")
    p.add_argument("--size", type=int, default=None, help="square side (default 256; 32 with --from_digits)")
    p.add_argument("--policy", choices=["center_crop", "random_crop", "resize"], default="center_crop")
    p.add_argument("--small", choices=["upscale", "skip"], default="upscale", help="images smaller than --size")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="default 3 (1 with --from_digits)")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="split, random crops and measurement noise")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sources (sorted)")
    pair = p.add_mutually_exclusive_group()
    pair.add_argument("--operator", default=None, help="paired data: preset name (e.g. ud2m/deblur_gaussian) or YAML")
    pair.add_argument(
        "--simulate",
        choices=list(TASK_SIGMA_Y),
        default=None,
        help="paired data with per-sample random parameters: a blind-restoration task (docs/blind.md)",
    )
    p.add_argument("--sigma_y", type=float, default=None, help="noise std on [0, 1] (default: the preset's or task's)")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards in --out first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.from_digits else 256)
    args.channels = args.channels or (1 if args.from_digits else 3)
    return args


def collect_sources(args: argparse.Namespace) -> tuple[list[Source], int]:
    """The sources selected by ``args`` (first ``--limit``), and the number of folder files ignored for suffix."""
    ignored: list[Path] = []
    if args.input:
        sources, ignored = folder_sources(args.input, args.channels)
    elif args.from_skimage:
        sources = skimage_sources(args.channels)
    else:
        sources = digits_sources(args.channels)
    for p in ignored:
        logger.warning("ignored %s (not an image suffix)", p)
    return sources[: args.limit], len(ignored)


def main(argv: list[str] | None = None) -> dict:
    """Run the command line; print and return the summary."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    sources, ignored = collect_sources(args)
    summary = make_shards(sources, args, ignored=ignored, progress=not args.quiet)
    print(f"wrote {summary['train']} train samples in {summary['train_shards']} shards, ", end="")
    print(f"{summary['val']} val samples in {summary['val_shards']} shards to {summary['out']}")
    print(f"skipped: {summary['skipped_unreadable']} unreadable, {summary['skipped_small']} too small; ", end="")
    print(f"ignored {ignored} non-image files")
    return summary


if __name__ == "__main__":
    main()
