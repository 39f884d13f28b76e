"""UD2M training costs (issue [ud2m], "Figures to report"; docs/method.md §7.1-7.7) on a pixel prior.

Three figures, each for K unfolded blocks (:class:`ud2m.unfolded.UnfoldedSampler`) trained by
:class:`ud2m.training.module.UnfoldedDistillation` (generator + discriminator updates, losses, measurement, prox):

1. Framework overhead: the median time of one full training step divided by the time of K forward + backward
   passes of the LoRA-adapted network alone on the same batch (``prior.predict_x0`` + backward of a scalar loss,
   K times, timed with ``common.median_ms``). Steps run under a real ``lightning.Trainer`` (manual optimisation
   needs its strategy: ``manual_backward``, ``toggle_optimizer``, ``clip_gradients``) on one fixed in-memory batch;
   a callback times ``on_train_batch_start`` -> ``on_train_batch_end``, so data loading is excluded and the EMA
   callback (run before the timer's end hook) is included. The first ``--warmup`` steps are not timed.
2. Data-loader throughput (samples/s) of :class:`ud2m.training.data.WebDatasetImages` on shards written by
   ``data/make_shards.py --from_skimage`` (random crops of ``--image_size`` from ``--shard_size`` images),
   for each ``--workers`` count, next to the training consumption rate ``batch / step time``.
3. Peak memory of one training step (``--memory_step``: 1 by default, so one-time allocations such as the AdamW
   state are outside it; 0 for the first) for every K, with and without gradient checkpointing, each in a fresh
   subprocess: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation at the start of the step; on
   CPU the peak RSS increase over the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` at the
   step start, minus ``VmRSS`` then; ``ru_maxrss`` if the reset is refused). CPU memory subprocesses run with
   ``MALLOC_MMAP_THRESHOLD_`` fixed, so that freed buffers go back to the system and are not silently reused.

``--prior tiny`` is :func:`ud2m.priors.tiny.tiny_pixel_prior`; ``--prior ddpm256`` is a ``UNet2DModel`` with the
architecture of google/ddpm-ema-bedroom-256 (113.7 M parameters) built from config with random weights (random
weights cost the same as trained ones; nothing is downloaded), with a linear beta schedule::

    python benchmarks/training.py --prior tiny --image_size 32 --batch 4 --blocks 1 3 5 \\
        --out benchmarks/results/training_tiny.json
    python benchmarks/training.py --prior ddpm256 --batch 1 --blocks 1 3 --warmup 0 --repeats 1 --memory_step 0 \\
        --workers 0 --out benchmarks/results/training_ddpm256_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import median_ms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

DDPM256_UNET = dict(  # google/ddpm-ema-bedroom-256 unet/config.json
    sample_size=256,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
)
MALLOC_MMAP_THRESHOLD = str(128 * 1024)  # glibc's initial threshold, fixed (no dynamic raise after frees)


# ------------------------------------------------------------------------------------------------ model
def build_prior(name: str, channels: int):
    """The pixel prior: tiny random UNet, or the DDPM bedroom-256 architecture with random weights."""
    from diffusers import UNet2DModel

    from ud2m.priors.pixel import PixelDiffusionPrior
    from ud2m.priors.tiny import tiny_pixel_prior, tiny_scheduler_config

    if name == "tiny":
        return tiny_pixel_prior(in_channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**DDPM256_UNET).eval()
    return PixelDiffusionPrior(unet, tiny_scheduler_config(beta_schedule="linear"))


def build_module(cfg: dict):
    """``UnfoldedDistillation`` with K blocks, a conditional discriminator, SR x4 and (optionally) LPIPS."""
    from ud2m.discriminator import ConditionalDiscriminator
    from ud2m.operators import SuperResolution
    from ud2m.training.module import UnfoldedDistillation
    from ud2m.unfolded import UnfoldedSampler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior = build_prior(cfg["prior"], cfg["channels"])
        sampler = UnfoldedSampler(prior, num_blocks=cfg["K"], gradient_checkpointing=cfg["checkpointing"])
        D = ConditionalDiscriminator(cfg["channels"], cfg["image_size"])
        lpips = cfg["lpips"] != "none"
        return UnfoldedDistillation(
            sampler, D, operator=SuperResolution(4, "bicubic"), sigma_y=0.05,
            omega_lpips=0.1 if lpips else 0.0, perceptual_net=cfg["lpips"] if lpips else "vgg",
            allow_random_lpips=True, clip_norm=1.0,
        )  # fmt: skip


def fixed_batch(cfg: dict) -> dict:
    """One batch of clean images on [-1, 1] (seeded)."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg["batch"], cfg["channels"], cfg["image_size"], cfg["image_size"])
    return {"x": torch.rand(shape, generator=g) * 2 - 1, "key": [str(i) for i in range(cfg["batch"])]}


class RepeatedBatch(torch.utils.data.Dataset):
    """``n`` copies of one pre-collated batch (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": self.batch["x"].clone(), "key": list(self.batch["key"])}


# ------------------------------------------------------------------------------------------------ memory probes
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StepProbe(pl.Callback):
    """Lightning callback: wall time of every training step and the memory peak of step ``memory_step``."""

    def __init__(self, device: str, memory_step: int | None) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.memory_step, self.times_ms, self.memory = memory_step, [], None
        self._t0, self._probing, self._base, self._hwm_reset = 0.0, False, 0, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the step clock."""
        self.start(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Stop the step clock (callbacks listed before this one, e.g. EMA, are inside the interval)."""
        self.stop()

    def start(self, step: int) -> None:
        """Start the clock (and the memory probe on the chosen step)."""
        self._probing = step == self.memory_step
        if self._probing:
            self._base = self._mem_start()
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        """Stop the clock (and read the memory peak)."""
        if self.cuda:
            torch.cuda.synchronize()
        self.times_ms.append(1e3 * (time.perf_counter() - self._t0))
        if self._probing:
            self.memory = self._mem_stop()

    def _mem_start(self) -> int:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self._hwm_reset = _reset_peak_rss()
        return 1024 * (_proc_status_kib("VmRSS") or 0)

    def _mem_stop(self) -> dict:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return {"method": "cuda.max_memory_allocated", "start_mib": self._base / 2**20, "peak_mib": peak / 2**20}
        if self._hwm_reset:
            peak, method = 1024 * _proc_status_kib("VmHWM"), "VmHWM after clear_refs"
        else:
            peak, method = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (no reset)"
        return {"method": method, "start_mib": self._base / 2**20, "peak_mib": peak / 2**20}


def trainer_run(cfg: dict, module, steps: int, memory_step: int | None) -> StepProbe:
    """Fit ``module`` for ``steps`` steps on one repeated batch and return the probe (step times, memory)."""
    from ud2m.training.callbacks import EMA

    probe = StepProbe(cfg["device"], memory_step)
    callbacks = ([EMA(halflife_steps=cfg["ema_halflife"])] if cfg["ema_halflife"] > 0 else []) + [probe]
    trainer = pl.Trainer(
        accelerator="gpu" if cfg["device"] == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, precision=cfg["precision"], callbacks=callbacks,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(RepeatedBatch(fixed_batch(cfg), steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return probe


def network_passes_ms(cfg: dict, module) -> float:
    """Median time of K forward + backward passes of the LoRA-adapted network alone on the same batch."""
    device, prior = torch.device(cfg["device"]), module.sampler.prior
    g = torch.Generator().manual_seed(1)
    x0 = fixed_batch(cfg)["x"].to(device)
    t = torch.randint(1, 1000, (x0.shape[0],), generator=g).float().to(device)
    z_in = prior.add_noise(x0, t, torch.randn(x0.shape, generator=g).to(device)).requires_grad_(True)
    params = [p for p in module.sampler.parameters() if p.requires_grad]
    bf16 = cfg["precision"].startswith("bf16")

    def passes() -> None:
        for _ in range(cfg["K"]):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = prior.predict_x0(z_in, t)
            out.float().square().mean().backward()
            for p in [*params, z_in]:
                p.grad = None

    module.train()
    return median_ms(passes, cfg["repeats"], device)


# ------------------------------------------------------------------------------------------------ measurements
def quiet() -> None:
    """Silence Lightning's banners and the expected warnings of a benchmark run."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ud2m"):
        logging.getLogger(name).setLevel(logging.ERROR)


def overhead_row(cfg: dict) -> dict:
    """Step time, K network passes and their ratio for one K (checkpointing as in ``cfg``), in this process."""
    module = build_module(cfg)
    probe = trainer_run(cfg, module, cfg["warmup"] + cfg["repeats"], memory_step=None)
    steps = sorted(probe.times_ms[cfg["warmup"] :])
    step_ms = steps[len(steps) // 2] if len(steps) % 2 else 0.5 * sum(steps[len(steps) // 2 - 1 : len(steps) // 2 + 1])
    net_ms = network_passes_ms(cfg, module)
    n_trainable = sum(p.numel() for p in module.sampler.parameters() if p.requires_grad)
    return {
        "K": cfg["K"], "checkpointing": cfg["checkpointing"], "step_ms": step_ms, "step_ms_all": probe.times_ms,
        "network_KxFB_ms": net_ms, "overhead_ratio": step_ms / net_ms,
        "consumption_samples_per_s": 1e3 * cfg["batch"] / step_ms, "sampler_trainable_params": n_trainable,
    }  # fmt: skip


def memory_worker(cfg: dict) -> dict:
    """Subprocess body: one training step with the memory probe; also its wall time."""
    module = build_module(cfg)
    probe = trainer_run(cfg, module, cfg["memory_step"] + 1, memory_step=cfg["memory_step"])
    mem = probe.memory
    return {
        "K": cfg["K"], "checkpointing": cfg["checkpointing"], "step_ms": probe.times_ms[-1], **mem,
        "increase_mib": mem["peak_mib"] - mem["start_mib"],
    }  # fmt: skip


def memory_row(cfg: dict) -> dict:
    """Run :func:`memory_worker` in a fresh subprocess (one torch thread) and parse its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"])}
    if cfg["device"] == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = MALLOC_MMAP_THRESHOLD
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(lines[-1])


def make_shards(out: Path, size: int, channels: int) -> Path:
    """Write train/val shards of scikit-image's photographs with ``data/make_shards.py --from_skimage``."""
    cmd = [
        sys.executable, str(ROOT / "data" / "make_shards.py"), "--from_skimage", "--out", str(out), "--size",
        str(size), "--channels", str(channels), "--quiet", "--overwrite",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "train-000000.tar"


def loader_row(shard: Path, cfg: dict, workers: int, batches: int) -> dict:
    """Samples/s of ``WebDatasetImages`` (resampled, random crops) after 3 warm-up batches (worker start-up)."""
    from ud2m.training.data import WebDatasetImages

    dm = WebDatasetImages(
        str(shard), batch_size=cfg["batch"], num_workers=workers, image_size=cfg["image_size"],
        channels=cfg["channels"], shuffle_buffer=16,
    )  # fmt: skip
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    n = sum(next(it)["x"].shape[0] for _ in range(batches))
    elapsed = time.perf_counter() - start
    del it
    return {
        "num_workers": workers,
        "batches": batches,
        "samples_per_s": n / elapsed,
        "ms_per_batch": 1e3 * elapsed / batches,
    }


# ------------------------------------------------------------------------------------------------ report
def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table of ``rows`` with ``(header, key, format)`` columns."""
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format(r[k], f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


OVERHEAD_COLS = [
    ("K", "K", "d"), ("ckpt", "checkpointing", ""), ("step ms", "step_ms", ".1f"),
    ("K x net F+B ms", "network_KxFB_ms", ".1f"), ("ratio", "overhead_ratio", ".2f"),
    ("consumption samples/s", "consumption_samples_per_s", ".2f"),
]  # fmt: skip
LOADER_COLS = [
    ("workers", "num_workers", "d"), ("samples/s", "samples_per_s", ".1f"), ("ms/batch", "ms_per_batch", ".2f"),
]  # fmt: skip
MEMORY_COLS = [
    ("K", "K", "d"), ("ckpt", "checkpointing", ""), ("increase MiB", "increase_mib", ".1f"),
    ("start MiB", "start_mib", ".1f"), ("peak MiB", "peak_mib", ".1f"), ("step ms", "step_ms", ".1f"),
]  # fmt: skip


def report(res: dict) -> str:
    """The three markdown tables with a header line (configuration and load averages)."""
    cfg = res["config"]
    parts = [
        f"prior={cfg['prior']} image={cfg['image_size']} batch={cfg['batch']} lpips={cfg['lpips']} "
        f"device={res['device']} threads={cfg['threads']} loadavg start={res['loadavg_start']} end={res['loadavg_end']}"
    ]
    if res["overhead"]:
        title = "Framework overhead (one training step / K x (forward+backward) of the LoRA network):\n"
        parts.append(title + table(res["overhead"], OVERHEAD_COLS))
    if res["dataloader"]:
        parts.append("WebDatasetImages throughput:\n" + table(res["dataloader"], LOADER_COLS))
    if res["memory"]:
        method = res["memory"][0]["method"]
        parts.append(f"Peak memory of one training step ({method}):\n" + table(res["memory"], MEMORY_COLS))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", choices=["tiny", "ddpm256"], default="tiny")
    p.add_argument("--image_size", type=int, default=None, help="default 32 (tiny), 256 (ddpm256)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 3, 5], help="K values")
    p.add_argument("--lpips", choices=["none", "vgg", "alex", "squeeze"], default="vgg", help="random backbone")
    p.add_argument("--ema_halflife", type=int, default=10, help="EMA callback half-life (0: no EMA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (and network-pass repeats)")
    p.add_argument("--overhead_blocks", type=int, nargs="*", default=None, help="K values timed (default --blocks)")
    p.add_argument("--memory_blocks", type=int, nargs="*", default=None, help="K values probed (default --blocks)")
    p.add_argument("--memory_step", type=int, default=1, help="probed step (0: first; 1 skips one-time allocations)")
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="DataLoader workers (none: skip)")
    p.add_argument("--loader_batches", type=int, default=50)
    p.add_argument("--shard_size", type=int, default=None, help="stored image side (default 2 x image_size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on GPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.image_size = args.image_size or (32 if args.prior == "tiny" else 256)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.worker is not None:
        print(json.dumps(memory_worker(json.loads(args.worker))), flush=True)
        return
    keys = ("prior", "image_size", "channels", "batch", "lpips", "ema_halflife", "warmup", "repeats", "memory_step")
    base = {k: getattr(args, k) for k in keys} | {"device": args.device, "precision": args.precision}
    base["threads"] = args.threads
    res = {"config": base, "argv": sys.argv, "device": args.device, "loadavg_start": os.getloadavg()}
    res |= {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    over = args.blocks if args.overhead_blocks is None else args.overhead_blocks
    res["overhead"] = [overhead_row(base | {"K": K, "checkpointing": False}) for K in over]
    res["dataloader"] = []
    if args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            shard = make_shards(Path(tmp), args.shard_size or 2 * args.image_size, args.channels)
            res["dataloader"] = [loader_row(shard, base, w, args.loader_batches) for w in args.workers]
    mem = args.blocks if args.memory_blocks is None else args.memory_blocks
    res["memory"] = [memory_row(base | {"K": K, "checkpointing": c}) for K in mem for c in (False, True)]
    res["loadavg_end"] = os.getloadavg()
    print(report(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
