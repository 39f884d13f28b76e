"""Cost of zero-shot restoration on a latent consistency prior (issue [zero-shot], "Figures to report").

Compares LATINO (8 NFE; Spagnoletti et al. 2025, Algorithm 1; docs/method.md §4.2) with DPS (Chung et al. 2023,
Algorithm 1), DiffPIR (Zhu et al. 2023, Algorithm 1) and Tikhonov on Gaussian deblurring (``GaussianBlur(3.0, 13)``,
sigma_y = 0.01) of ``skimage.data.astronaut()`` resized to ``--size``. Priors are built from config with random
weights (random weights cost the same as trained ones; nothing is downloaded):

* ``--prior tiny``: the tiny LCM pipeline of ``ud2m.priors.tiny_latent`` (VAE factor 2);
* ``--prior sd15``: the full-size SD1.5 UNet and VAE of ``priors_fullsize.py`` with a random (1, 77, 768) text
  condition (text encoding is outside the NFE loop), ``boundary="lcm"`` as for LCM-LoRA SD1.5.

Every (method, batch) runs in a FRESH child process (independent peak memory), which builds the prior, warms up
(``--warmup full``: one whole run; ``call``: one network call, encode and decode), then times ``--repeats`` runs and
reports: NFE (``prior.nfe``), wall time per image (synchronised on CUDA), the summed time of the UNet forward calls
(``prior.net.forward``) and of VAE encode/decode (forward only: the backward passes of DPS count as overhead), the
overhead ratio wall / (network + VAE), and peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak
RSS increase over the post-warm-up RSS (glibc ``malloc_trim(0)`` first, so the baseline holds live memory only, then
VmHWM reset through ``/proc/self/clear_refs``). LATINO, DiffPIR and Tikhonov run under ``torch.inference_mode()``,
DPS under ``torch.no_grad()`` (it enables grad locally)::

    python benchmarks/zero_shot.py --prior tiny --size 64 --batch 1 4 --out benchmarks/results/zero_shot_tiny.json
    python benchmarks/zero_shot.py --prior sd15 --size 256 --batch 1 --methods latino --repeats 1 --warmup call \
        --out benchmarks/results/zero_shot_sd15_latino.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from ud2m.operators.blur import GaussianBlur
from ud2m.operators.noise import measure
from ud2m.operators.presets import load_preset
from ud2m.priors.base import TextCondition
from ud2m.priors.latent import LatentConsistencyPrior
from ud2m.schedules import LCM_8
from ud2m.solvers.baselines import solve_diffpir, solve_dps, solve_tikhonov
from ud2m.solvers.latino_algorithms import latino
from ud2m.solvers.weights import preset_rules

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import CallTimer

SIGMA_Y = 0.01
WEIGHTS = preset_rules(load_preset("latino/deblur_gaussian").meta, "latino")["weights"]  # the σ_k < 10 table row
CHILD_TAG = "ZERO_SHOT_ROW "
METHODS = ("latino", "dps", "diffpir", "tikhonov")


# ---------------------------------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _proc_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB from ``/proc/self/status``."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory counter; return the baseline (CUDA: allocated bytes; CPU: RSS bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the baseline holds live memory only
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return 1024 * _proc_kib("VmRSS")


def peak_memory(device: torch.device) -> int:
    """Peak since :func:`reset_peak_memory` (CUDA: max allocated bytes; CPU: VmHWM bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return 1024 * _proc_kib("VmHWM")


# ---------------------------------------------------------------------------------------------------- problem
def build_prior(name: str, device: torch.device) -> tuple[LatentConsistencyPrior, TextCondition]:
    """The prior with random weights and its (batch 1) empty-prompt condition, built outside inference mode."""
    torch.manual_seed(0)
    if name == "tiny":
        from ud2m.priors.tiny_latent import tiny_pipeline

        prior = LatentConsistencyPrior.from_pipeline(tiny_pipeline("lcm")).to(device)
        with torch.no_grad():
            return prior, prior.encode_prompt("")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from priors_fullsize import SD15_UNET, VAE

    from ud2m.priors.tiny_latent import SCHEDULER_CONFIG

    unet, vae = UNet2DConditionModel(**SD15_UNET).eval(), AutoencoderKL(**VAE).eval()
    prior = LatentConsistencyPrior(unet, vae, scheduler_config=SCHEDULER_CONFIG, boundary="lcm").to(device)
    cond = TextCondition(torch.randn(1, 77, SD15_UNET["cross_attention_dim"], device=device))
    return prior, cond


def astronaut(size: int, batch: int, device: torch.device) -> torch.Tensor:
    """``skimage.data.astronaut()`` resized (antialiased) to ``size x size`` on [-1, 1], repeated ``batch`` times."""
    from skimage import data

    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1).repeat(batch, 1, 1, 1).to(device)


def run_method(method: str, steps: int, prior, op, y: torch.Tensor, cond: TextCondition, seed: int) -> torch.Tensor:
    """One reconstruction of the batch ``y`` by ``method`` (``steps``: NFE of DPS / DiffPIR)."""
    g = torch.Generator(device=y.device).manual_seed(seed)
    if method == "dps":
        with torch.no_grad():
            return solve_dps(prior, op, y, cond=cond, num_steps=steps, generator=g)
    with torch.inference_mode():
        if method == "latino":
            return latino(prior, op, y, timesteps=LCM_8, cond=cond, weights=WEIGHTS, sigma_y=SIGMA_Y, generator=g)
        if method == "diffpir":
            return solve_diffpir(prior, op, y, cond=cond, sigma_y=SIGMA_Y, num_steps=steps, generator=g)
        return solve_tikhonov(op, y, sigma_y=SIGMA_Y)


def warm_up(kind: str, spec: dict, prior, op, y: torch.Tensor, cond: TextCondition) -> None:
    """``full``: one whole run; ``call``: one network call, one encode and one decode at the same batch."""
    if kind == "full":
        run_method(spec["method"], spec["steps"], prior, op, y, cond, seed=1)
        return
    with torch.inference_mode():
        z = prior.encode(op.A_adjoint(y).clamp(-1, 1))
        prior.decode(prior.predict_x0(z, 499.0, cond))


# ---------------------------------------------------------------------------------------------------- child
def child(spec: dict) -> dict:
    """Build, warm up and time one (method, batch) in this process; the row of figures."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sync = _sync(device)
    prior, cond = build_prior(spec["prior"], device)
    op = GaussianBlur(3.0, 13)
    x = astronaut(spec["size"], spec["batch"], device)
    y = measure(op, x, SIGMA_Y, torch.Generator(device=device).manual_seed(0))
    timers = {"net": CallTimer(prior.net, "forward", sync)}
    timers.update(encode=CallTimer(prior.vae, "encode", sync), decode=CallTimer(prior.vae, "decode", sync))
    warm_up(spec["warmup"], spec, prior, op, y, cond)
    base = reset_peak_memory(device)
    runs = [timed_run(spec, prior, op, y, cond, timers, sync, seed) for seed in range(spec["repeats"])]
    row = summarise(spec, runs)
    row.update(peak_mem_MiB=(peak_memory(device) - base) / 2**20, params_M=_params_m(prior))
    if device.type == "cpu":
        row["peak_rss_total_MiB"] = peak_memory(device) / 2**20
        row["ru_maxrss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def timed_run(spec: dict, prior, op, y, cond, timers: dict, sync, seed: int) -> dict:
    """Wall time, NFE and the summed network / VAE times of one run."""
    for t in timers.values():
        t.reset()
    prior.reset_nfe()
    sync()
    start = time.perf_counter()
    out = run_method(spec["method"], spec["steps"], prior, op, y, cond, seed)
    sync()
    wall = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"{spec['method']}: non-finite reconstruction")
    vae = timers["encode"].seconds + timers["decode"].seconds
    calls = {f"{k}_calls": t.calls for k, t in timers.items()}
    return dict(wall=wall, nfe=prior.nfe, net=timers["net"].seconds, vae=vae, **calls)


def summarise(spec: dict, runs: list[dict]) -> dict:
    """Medians over the timed runs, per image; overhead = wall / (network + VAE), None without network calls."""
    B = spec["batch"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "net", "vae")}
    work = med["net"] + med["vae"]
    row = {k: spec[k] for k in ("method", "steps", "prior", "size", "batch", "device", "threads", "warmup")}
    row.update(nfe=runs[-1]["nfe"], repeats=len(runs), **{k: v for k, v in runs[-1].items() if k.endswith("calls")})
    row.update(wall_s_per_image=med["wall"] / B, net_s_per_image=med["net"] / B, vae_s_per_image=med["vae"] / B)
    row.update(overhead=med["wall"] / work if work > 0 else None, wall_s_runs=[r["wall"] for r in runs])
    return row


def _params_m(prior) -> float:
    return sum(p.numel() for p in prior.parameters()) / 1e6


# ---------------------------------------------------------------------------------------------------- parent
def jobs(args: argparse.Namespace) -> list[dict]:
    """One spec per (method, steps, batch)."""
    steps = {"latino": [len(LCM_8)], "dps": args.dps_steps, "diffpir": args.diffpir_steps, "tikhonov": [0]}
    common = dict(prior=args.prior, size=args.size, device=args.device, threads=args.threads)
    common.update(repeats=args.repeats, warmup=args.warmup)
    return [dict(method=m, steps=s, batch=b, **common) for m in args.methods for s in steps[m] for b in args.batch]


def spawn(spec: dict, timeout: float) -> dict:
    """Run :func:`child` in a fresh interpreter; a row with ``status`` ``ok``, ``timeout`` or ``error``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "timeout_s": timeout}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        return {**spec, "status": "error", "stderr_tail": proc.stderr[-2000:]}
    row = json.loads(lines[-1][len(CHILD_TAG) :])
    return {**row, "status": "ok", "child_s": time.perf_counter() - start}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    """The figures as a markdown table (times in seconds per image)."""
    head = "| method | prior | size | batch | NFE | wall/image (s) | network/image (s) | VAE/image (s) | overhead |"
    lines = [head + " peak mem (MiB) | status |", "|" + "---|" * 11]
    for r in rows:
        name = r["method"] + (f"({r['steps']})" if r["method"] in ("dps", "diffpir") else "")
        cells = [name, r["prior"], str(r["size"]), str(r["batch"]), str(r.get("nfe", "-"))]
        cells += [_fmt(r.get(k), ".3f") for k in ("wall_s_per_image", "net_s_per_image", "vae_s_per_image")]
        cells += [_fmt(r.get("overhead"), ".2f"), _fmt(r.get("peak_mem_MiB"), ".0f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dps_steps", nargs="+", type=int, default=[8, 100])
    parser.add_argument("--diffpir_steps", nargs="+", type=int, default=[100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", choices=("full", "call"), default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows and the machine state")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print(CHILD_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return
    meta = dict(argv=sys.argv, torch=torch.__version__, cpu_count=os.cpu_count(), loadavg_start=os.getloadavg())
    rows = []
    for spec in jobs(args):
        rows.append({**spawn(spec, args.timeout), "loadavg": os.getloadavg()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    meta["loadavg_end"] = os.getloadavg()
    print(markdown(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
