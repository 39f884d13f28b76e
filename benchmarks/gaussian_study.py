"""Gaussian study (issue [sampler]): is the trained UD2M sampler a better *sampler* than the untrained one?

On the analytic Gaussian prior (docs/method.md §3.2d) everything is exact: the posterior p(x0 | y) is Gaussian, and
the N-step UD2M sampler is affine-Gaussian in its noise draws as long as the learnable correction of the prior is
affine in z_t, so its output law is propagated exactly (one basis noise vector per batch row, as in
``tests/test_unfolded.py``). We train UD2M blocks with the project's own ``UnfoldedDistillation`` (Lightning, the
real losses and discriminator) around a Gaussian prior with a small learnable, time-dependent, per-pixel affine
correction (the stand-in for LoRA), and report the exact W2 between the sampler's output law and the posterior for
N = 1, 2, 3, 4, 8, and the spread ratio tr(C_sampler)/tr(C_post). LATINO (8 NFE) and DPS (1000 NFE) are run
beside them with S samples per observation (empirical W2; the same estimator on exact posterior samples gives the
Monte-Carlo floor).

Problem: 1x16x16 (d = 256), SR x2 (circular box filter), sigma_y = 0.05, K = 3, batch 64, 1,000 steps, AdamW
lr 1e-3 (the same for every variant), W2 averaged (RMS) over 8 held-out observations, then averaged over the training
seeds (``--seeds``, default 0 1 2: the training data, the sampler's noise and D's initial weights; one run's W2 at
N = 8 moves by up to 0.1 between seeds).

    python benchmarks/gaussian_study.py [--steps 1000] [--seeds 0 1 2] [--variants ...]   # results/gaussian_study.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import ud2m.unfolded as unfolded
from ud2m.operators import measure, sigma_internal
from ud2m.operators.superres import SuperResolution
from ud2m.priors.gaussian import GaussianPrior, gaussian_w2, sample_gaussian
from ud2m.unfolded import UnfoldedSampler, sample_ud2m

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by the tests
from common import replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE, SIGMA_Y, K = (1, 16, 16), 0.05, 3
NS = (1, 2, 3, 4, 8)
F64 = torch.float64

#: The shipped default cap (sigma_cap = 1, images on [-1, 1]) is about 4x this prior's pixel std (0.23); CAP_DATA =
#: 1.5x the pixel std is the same ratio as sigma_cap = 1 to the digits' (0.65) and photographs' (0.6) pixel std.
CAP_DATA = 0.35
XTT = ("y", "x_t", "t")
L2, ES = dict(consistency_loss="l2"), dict(consistency_loss="energy")
ES_W = dict(consistency_loss="energy", l2_weighting="max_snr1")
ES_MM_NU = dict(consistency_loss="energy", adv_loss="minimax", adv_weighting="nu")
ES_W_MM_NU = dict(ES_MM_NU, l2_weighting="max_snr1")
ES_W_NU = dict(ES_W, adv_weighting="nu")
REF, C1, C035 = dict(noise_rule="reference"), dict(sigma_cap=1.0), dict(sigma_cap=CAP_DATA)
C1R = dict(C1, renoise="residual")
SHIPPED = "cap 1, energy weighted max(SNR, 1), D(y, x_t, t) (shipped defaults)"
OLD_DEFAULTS = "cap 1, energy, D(y, x_t, t) (the defaults before the max(SNR, 1) weighting)"
#: name -> (UnfoldedSampler kwargs, UnfoldedDistillation kwargs, discriminator condition or None, train?)
VARIANTS: dict[str, tuple[dict, dict, tuple[str, ...] | None, bool]] = {
    "untrained, reference rule": (REF, {}, None, False),
    "untrained, prior rule (cap 1)": (C1, {}, None, False),
    "untrained, prior rule (cap 0.35)": (C035, {}, None, False),
    "old defaults: reference rule, L2, D(y)": (REF, L2, ("y",), True),
    "cap 1, L2, no D": (C1, L2, None, True),
    "cap 1, energy, no D": (C1, ES, None, True),
    OLD_DEFAULTS: (C1, ES, XTT, True),
    "cap 1, energy, D(y, x_t, t), ω_adv 0.03": (C1, dict(ES, omega_adv=0.03), XTT, True),
    "cap 1, energy, D(y, x_t, t), ω_adv 0.01": (C1, dict(ES, omega_adv=0.01), XTT, True),
    "cap 1, energy, D(y, x_t, t) for the first half": (C1, dict(ES, adv_end_step=500), XTT, True),
    "cap 1, energy, D(y, x_t, t) for the first quarter": (C1, dict(ES, adv_end_step=250), XTT, True),
    "cap 1, energy, D(y, x_t, t), ω_gp 1": (C1, dict(ES, omega_gp=1.0), XTT, True),
    "cap 1, energy, D(y, x_t, t), ω_gp 10": (C1, dict(ES, omega_gp=10.0), XTT, True),
    "cap 1, energy, D(y, x_t, t), adversarial term weighted 1 - ᾱ_t": (C1, dict(ES, adv_weighting="nu"), XTT, True),
    "cap 1, energy, D(y, x_t, t), minimax generator loss": (C1, dict(ES, adv_loss="minimax"), XTT, True),
    "cap 1, energy, D(y, x_t, t), minimax generator loss weighted 1 - ᾱ_t": (C1, ES_MM_NU, XTT, True),
    "cap 1, energy weighted max(SNR, 1), no D": (C1, ES_W, None, True),
    SHIPPED: (C1, ES_W, XTT, True),
    "cap 1, energy weighted max(SNR, 1), D(y, x_t, t), adversarial term weighted 1 - ᾱ_t": (C1, ES_W_NU, XTT, True),
    "cap 1, energy weighted max(SNR, 1), D(y, x_t, t), minimax loss weighted 1 - ᾱ_t": (C1, ES_W_MM_NU, XTT, True),
    "untrained, prior rule (cap 1), residual re-noise": (C1R, {}, None, False),
    "cap 1, residual re-noise, energy, no D": (C1R, ES, None, True),
    "cap 1, residual re-noise, energy, D(y, x_t, t)": (C1R, ES, XTT, True),
    "cap 1, residual re-noise, energy weighted max(SNR, 1), D(y, x_t, t)": (C1R, ES_W, XTT, True),
    "cap 0.35, L2, no D": (C035, L2, None, True),
    "cap 0.35, L2, D(y)": (C035, L2, ("y",), True),
    "cap 0.35, L2, D(y, x_t, t)": (C035, L2, XTT, True),
    "cap 0.35, energy, no D": (C035, ES, None, True),
    "cap 0.35, energy, D(y, x_t, t)": (C035, ES, XTT, True),
    "cap 0.35, re-noise cap 0.7, energy, no D": (dict(C035, renoise_cap=0.7), ES, None, True),
    "cap 0.35, re-noise cap 0.15, energy, no D": (dict(C035, renoise_cap=0.15), ES, None, True),
    "cap 0.35, energy, no D, scalars vary with t (5 knots)": (dict(C035, time_knots=5), ES, None, True),
    "cap 0.35, energy, D(y, x_t, t), scalars vary with t (5 knots)": (dict(C035, time_knots=5), ES, XTT, True),
    "cap 0.35, energy weighted max(SNR, 1), no D": (C035, ES_W, None, True),
    "cap 0.35, energy weighted max(SNR, 1), D(y, x_t, t)": (C035, ES_W, XTT, True),
}
#: names of the first runs of this study (kept so their JSON rows map onto the names above)
RENAMED = {
    "untrained, prior rule": "untrained, prior rule (cap 0.35)",
    "prior rule, L2, no D": "cap 0.35, L2, no D",
    "prior rule, L2, D(y)": "cap 0.35, L2, D(y)",
    "prior rule, L2, D(y, x_t, t)": "cap 0.35, L2, D(y, x_t, t)",
    "prior rule, energy, no D": "cap 0.35, energy, no D",
    "prior rule, energy, D(y, x_t, t)": "cap 0.35, energy, D(y, x_t, t)",
    "prior rule cap 1 (4x data scale), energy, no D": "cap 1, energy, no D",
    "prior rule, re-noise cap 0.7, energy, no D": "cap 0.35, re-noise cap 0.7, energy, no D",
    "prior rule, re-noise cap 0.15, energy, no D": "cap 0.35, re-noise cap 0.15, energy, no D",
    "prior rule, energy, no D, scalars vary with t": "cap 0.35, energy, no D, scalars vary with t (5 knots)",
    "prior rule, energy, D(y, x_t, t), scalars vary with t": (
        "cap 0.35, energy, D(y, x_t, t), scalars vary with t (5 knots)"
    ),
    "prior rule, energy weighted max(SNR, 1), no D": "cap 0.35, energy weighted max(SNR, 1), no D",
    "prior rule, energy weighted max(SNR, 1), D(y, x_t, t)": "cap 0.35, energy weighted max(SNR, 1), D(y, x_t, t)",
    "prior rule cap 1 (4x data scale), energy, D(y, x_t, t)": OLD_DEFAULTS,
    "cap 1, energy, D(y, x_t, t) (shipped defaults)": OLD_DEFAULTS,
    "cap 1, energy weighted max(SNR, 1), D(y, x_t, t)": SHIPPED,
    "prior rule cap 1 (4x data scale), L2, no D": "cap 1, L2, no D",
}


class TimeCorrectedGaussian(GaussianPrior):
    r"""Gaussian prior whose exact denoiser gets a learnable per-pixel affine correction that depends on t
    (identity at init; the stand-in for LoRA, whose network sees t through its time embedding). Affine in
    :math:`z_t`, so the sampler's law stays Gaussian:

    :math:`\hat x_0 = \mu + \delta(t) + e^{g(t)} \odot (E[x_0 \mid z_t] - \mu)`, with :math:`\delta, g` piecewise
    linear in t on ``knots`` equally spaced knots over [0, 1000] (per pixel).
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, knots: int = 9) -> None:
        super().__init__(mu, s)
        self.knots = knots
        self.delta = nn.Parameter(torch.zeros(knots, *mu.shape, dtype=mu.dtype))
        self.log_gain = nn.Parameter(torch.zeros(knots, *mu.shape, dtype=mu.dtype))

    def _interp(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = (t.to(table.dtype) / 1000.0).clamp(0, 1) * (self.knots - 1)  # (B,)
        i = u.floor().long().clamp(max=self.knots - 2)
        w = (u - i).reshape(-1, *([1] * (table.ndim - 1)))
        return (1 - w) * table[i] + w * table[i + 1]  # (B, C, H, W)

    def _predict_x0(self, z_t, t, cond):
        base = super()._predict_x0(z_t, t, cond)
        t = t.reshape(-1).expand(base.shape[0])
        return self.mu + self._interp(self.delta, t) + self._interp(self.log_gain, t).exp() * (base - self.mu)


def make_prior(seed: int = 0) -> TimeCorrectedGaussian:
    """μ ~ 0.1 N(0, 1), s ∈ [0.1, 0.3] per pixel (float32 for training)."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.1 * torch.randn(SHAPE, generator=g)
    return TimeCorrectedGaussian(mu, 0.1 + 0.2 * torch.rand(SHAPE, generator=g))


def make_operator() -> SuperResolution:
    return SuperResolution(2, "box")


# ---------------------------------------------------------------------------------------------- training
class PriorSamples(torch.utils.data.Dataset):
    def __init__(self, prior: GaussianPrior, n: int, seed: int) -> None:
        with torch.no_grad():
            self.x = prior.sample(n, torch.Generator().manual_seed(seed)).float()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i]}


def train(model: UnfoldedSampler, prior, module_kw: dict, condition, steps: int, seed: int) -> float:
    """Train ``model`` with ``UnfoldedDistillation`` for ``steps`` steps of batch 64; returns seconds."""
    import lightning.pytorch as pl

    from ud2m.discriminator import ConditionalDiscriminator
    from ud2m.training.module import UnfoldedDistillation

    torch.manual_seed(seed)  # D's initial weights: a run is a function of its seed, not of what ran before it
    D = None if condition is None else ConditionalDiscriminator(1, 16, condition=condition)
    kw = dict(operator=make_operator(), sigma_y=SIGMA_Y, omega_lpips=0.0, lr_g=1e-3, lr_d=1e-3, omega_gp=0.01)
    kw.update({"omega_adv": 0.1 if D is not None else 0.0, "seed": seed, **module_kw})  # a variant may set omega_adv
    module = UnfoldedDistillation(model, D, **kw)
    loader = torch.utils.data.DataLoader(PriorSamples(prior, 64 * steps, seed), batch_size=64, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- exact law
def propagated_law(model, op, y, num_steps: int, *, sigma_y: float = SIGMA_Y) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact output law ``(mean (d,), cov (d, d))`` of the affine N-step sampler (``clip=False``) for one ``y``
    (1, ...) on a Gaussian prior: row 0 of the batch gets all-zero noise and row j the j-th basis vector of the
    concatenated noise draws, so out = m + J w and the law is N(m, J Jᵀ). (``tests/test_unfolded.py`` checks it
    against samples of the model.)"""
    x_shape = tuple(model.prior.mu.shape)
    d = math.prod(x_shape)
    draws = 1 + num_steps * model.num_blocks + (num_steps - 1)  # x_{t_1}, one ξ per block, one per DDIM step
    W = torch.cat([torch.zeros(1, draws * d, dtype=F64), torch.eye(draws * d, dtype=F64)])
    count = [0]

    def basis_noise(shape, generator=None, *, device=None, dtype=torch.float32):
        i, count[0] = count[0], count[0] + 1
        return W[:, i * d : (i + 1) * d].reshape(shape).to(dtype)

    real = unfolded.randn
    unfolded.randn = basis_noise
    try:
        with torch.no_grad():
            B = W.shape[0]
            ys = y.expand(B, *y.shape[1:])
            out = sample_ud2m(model, op, ys, sigma_y, x_shape=(B, *x_shape), num_steps=num_steps, clip=False)
    finally:
        unfolded.randn = real
    if count[0] != draws:
        raise RuntimeError(f"propagation saw {count[0]} noise draws, expected {draws}")
    out = out.flatten(1)
    J = out[1:] - out[0]  # (D, d)
    return out[0], J.T @ J


def evaluate(model, prior, op, ys) -> dict:
    """RMS over observations of the exact W2 to the posterior, and the spread ratio, for every N."""
    model = model.double()
    out = {}
    for n in NS:
        w2s, ratios = [], []
        for i in range(ys.shape[0]):
            m, C = propagated_law(model, op, ys[i : i + 1], n)
            pm, pC = prior.posterior(op, ys[i : i + 1], sigma_internal(SIGMA_Y))
            w2s.append(gaussian_w2(m, C, pm.flatten(), pC).item() ** 2)
            ratios.append((torch.trace(C) / torch.trace(pC)).item())
        out[n] = {"w2": math.sqrt(sum(w2s) / len(w2s)), "spread_ratio": sum(ratios) / len(ratios)}
    model.float()
    return out


def empirical_w2(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """W2 between the Gaussian fitted to ``samples`` (S, d) and N(mean, cov)."""
    s = samples.to(F64)
    return gaussian_w2(s.mean(0), torch.cov(s.T), mean.flatten(), cov).item()


def zero_shot_rows(prior, op, ys, samples: int, seed: int) -> dict:
    """LATINO (8 NFE, LCM_8 grid, the default weight rule) and DPS-1000 (ζ = 1), S samples per y; the floor is the
    same estimator on exact posterior samples."""
    from ud2m.schedules import LCM_8
    from ud2m.solvers.baselines import solve_dps
    from ud2m.solvers.latino_algorithms import latino
    from ud2m.solvers.weights import DiscrepancyWeights

    base = GaussianPrior(prior.mu.to(F64), prior.s.to(F64))
    rows = {"floor (exact posterior samples)": [], "LATINO, 8 NFE": [], "DPS, 1000 NFE": []}
    g = torch.Generator().manual_seed(seed)
    for i in range(ys.shape[0]):
        y = ys[i : i + 1].expand(samples, *ys.shape[1:])
        pm, pC = base.posterior(op, ys[i : i + 1], sigma_internal(SIGMA_Y))
        rows["floor (exact posterior samples)"].append(
            empirical_w2(sample_gaussian(pm.flatten(), pC, samples, g), pm, pC)
        )
        x = latino(base, op, y, timesteps=LCM_8, weights=DiscrepancyWeights(), sigma_y=SIGMA_Y, generator=g)
        rows["LATINO, 8 NFE"].append(empirical_w2(x.flatten(1), pm, pC))
        x = solve_dps(base, op, y, sigma_y=SIGMA_Y, num_steps=1000, generator=g)
        rows["DPS, 1000 NFE"].append(empirical_w2(x.detach().flatten(1), pm, pC))
    return {k: math.sqrt(sum(v * v for v in vals) / len(vals)) for k, vals in rows.items()}


def run_variant(name: str, op, ys, steps: int, seeds: list[int]) -> dict:
    """Train (when the variant trains) and evaluate ``name`` once per seed (the training data, the sampler's noise
    and D's initial weights); ``by_n`` holds the mean W2 and spread ratio over the seeds and ``by_seed`` each run."""
    sampler_kw, module_kw, condition, trained = VARIANTS[name]
    runs, seconds = {}, 0.0
    for seed in seeds if trained else seeds[:1]:  # an untrained sampler has no seed
        prior = make_prior()
        model = UnfoldedSampler(prior, num_blocks=K, **sampler_kw)
        seconds += train(model, prior, module_kw, condition, steps, seed=seed) if trained else 0.0
        runs[str(seed)] = {"by_n": evaluate(model, prior, op, ys), "scalars": {
            k: v.tolist() for k, v in model.scalars().items()}}  # fmt: skip
    by_n = {n: {key: sum(r["by_n"][n][key] for r in runs.values()) / len(runs) for key in ("w2", "spread_ratio")}
            for n in NS}  # fmt: skip
    return {"train_seconds": seconds, "steps": steps if trained else 0, "seeds": list(runs), "by_n": by_n,
            "by_seed": {seed: r["by_n"] for seed, r in runs.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per variant")
    parser.add_argument("--observations", type=int, default=8)
    parser.add_argument("--zero_shot_samples", type=int, default=2048, help="0 skips LATINO and DPS")
    parser.add_argument("--out", type=Path, default=RESULTS / "gaussian_study.json")
    parser.add_argument("--report", action="store_true", help="only write the table into the README from --out")
    args = parser.parse_args()
    if args.report:
        print(write_readme(report(args.out)))
        return
    op = make_operator()
    prior0 = make_prior()
    ys = measure(op, prior0.sample(args.observations, torch.Generator().manual_seed(123)), SIGMA_Y,
                 torch.Generator().manual_seed(124)).double()  # fmt: skip
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    renamed = {RENAMED.get(k, k): v for k, v in previous.get("variants", {}).items()}
    results = {k: v for k, v in renamed.items() if k in VARIANTS}  # resumable by variant
    for name in args.variants:
        results[name] = run_variant(name, op, ys, args.steps, args.seeds)
        by_n = results[name]["by_n"]
        print(name, {n: round(c["w2"], 3) for n, c in by_n.items()}, f"({results[name]['train_seconds']:.0f} s)")
    zero_shot = previous.get("zero_shot", {})
    if args.zero_shot_samples:
        zero_shot = zero_shot_rows(make_prior(), op, ys[:2], args.zero_shot_samples, seed=1)
        print(zero_shot, flush=True)
    zs_samples = args.zero_shot_samples or previous.get("meta", {}).get("zero_shot_samples", 2048)  # the default
    meta = {"load_average": os.getloadavg(), "threads": torch.get_num_threads(), "steps": args.steps}
    meta["zero_shot_samples"] = zs_samples
    args.out.write_text(json.dumps({"meta": meta, "variants": results, "zero_shot": zero_shot}, indent=2))
    print(report(args.out))


README_BEGIN = "<!-- gaussian:begin (generated by benchmarks/gaussian_study.py --report) -->"
README_END = "<!-- gaussian:end -->"


def write_readme(table: str, readme: Path = ROOT / "README.md") -> str:
    """Put ``table`` between the gaussian markers of the README (when both are present)."""
    replace_section(readme, README_BEGIN, README_END, table)
    return table


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    head = "| variant | seeds | " + " | ".join(f"W2, N = {n}" for n in NS) + " | spread ratio, N = 1 / 8 |"
    lines = [head, "|---|---|" + "---|" * (len(NS) + 1)]
    order = {name: i for i, name in enumerate(VARIANTS)}
    for name, row in sorted(data["variants"].items(), key=lambda kv: order.get(kv[0], len(order))):
        by_n = row["by_n"]
        w2 = " | ".join(_w2_cell(row, str(n)) if str(n) in by_n else "–" for n in NS)
        spread = f"{by_n['1']['spread_ratio']:.2f} / {by_n['8']['spread_ratio']:.2f}"
        seeds = len(row.get("seeds", [0])) if row.get("steps") else "–"  # rows of the first runs: seed 0 only
        lines.append(f"| {name} | {seeds} | {w2} | {spread} |")
    for name, w2 in data.get("zero_shot", {}).items():  # one figure per method: its NFE is fixed
        lines.append(f"| {name} (empirical, {data['meta'].get('zero_shot_samples', '')} samples) | – | {w2:.3f} |"
                     + " – |" * len(NS))  # fmt: skip
    return "\n".join(lines)


def _w2_cell(row: dict, n: str) -> str:
    """The mean W2 over seeds, with the range of the seeds' W2 when there are several."""
    cell = f"{row['by_n'][n]['w2']:.3f}"
    runs = [r[n]["w2"] for r in row.get("by_seed", {}).values()]
    return cell if len(runs) < 2 else f"{cell} ({min(runs):.2f}–{max(runs):.2f})"


if __name__ == "__main__":
    main()
