"""UD2M training wiring (docs/method.md §7.5-7.8, §9; house-style J, L): the LightningModule, EMA, checkpoints, exact
resume, train.py end to end and 2-process DDP on CPU.

Everything runs on a tiny random pixel prior (16x16 RGB, or 32x32 gray digits for the CLI runs); the assertions are
identities of the wiring (step counts, equal states, disjoint samples), never numbers recorded from a run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ud2m.discriminator import ConditionalDiscriminator
from ud2m.operators import SuperResolution
from ud2m.priors.tiny import tiny_pixel_prior
from ud2m.training.callbacks import EMA, ImageLogger
from ud2m.training.data import SyntheticImages
from ud2m.training.module import UnfoldedDistillation
from ud2m.unfolded import UnfoldedSampler

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml"


def make_model(**kwargs) -> UnfoldedDistillation:
    """A fresh tiny model, identically initialised every time (LoRA A and D are drawn under a forked, seeded RNG;
    LoRA attaches to the prior in place, so every model gets its own prior)."""
    kwargs = {"operator": SuperResolution(2, "box"), "omega_lpips": 0.0, "lr_g": 1e-3, "lr_d": 1e-3, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sampler = UnfoldedSampler(tiny_pixel_prior(), num_blocks=2)
        return UnfoldedDistillation(sampler, ConditionalDiscriminator(3, 16), **kwargs)


def make_data(num_train: int = 6) -> SyntheticImages:
    """Three shuffled batches per epoch, so that the resume tests stop and resume in the middle of an epoch."""
    return SyntheticImages(num_train, 2, batch_size=2, image_size=16, channels=3)


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


def trainable_state(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(state["step"]) for state in optimizer.state.values()}


# ------------------------------------------------------------------------------------------------ the module
def test_fast_dev_run_trains_and_validates(tmp_path):
    model = make_model()
    images = ImageLogger(out_dir=str(tmp_path))
    t = pl.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False, callbacks=[images])
    t.fit(model, make_data())
    assert t.global_step == 1
    written = {p.name.split("_", 2)[-1] for p in tmp_path.glob("*.png")}  # no TensorBoard: PNG files
    assert written == {"x.png", "y.png", "x_hat.png", "iterates.png"}
    assert {"train/l2", "train/adv_g", "train/d_real", "train/gp", "val/psnr", "val/ssim"} <= set(t.callback_metrics)
    assert "val/lpips" not in t.callback_metrics  # no real LPIPS backbone offline
    warmup = min(1.0, 1 / max(model.hparams.warmup_steps, 1))  # the learning rates of step 0, after the warm-up
    assert float(t.callback_metrics["train/lr_g"]) == pytest.approx(model.hparams.lr_g * warmup)
    assert float(t.callback_metrics["train/lr_d"]) == pytest.approx(model.hparams.lr_d * warmup)


def test_two_steps_update_every_trainable_tensor_and_both_optimizers():
    model = make_model(d_steps_per_g=2)
    before = trainable_state(model)
    assert any(k.startswith("sampler.") for k in before) and any(k.startswith("discriminator.") for k in before)
    t = trainer(2)
    t.fit(model, make_data())
    after = trainable_state(model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"not updated: {unchanged}"
    opt_g, opt_d = (o.optimizer for o in model.optimizers())
    assert t.global_step == 2  # one trainer step = one generator update
    assert adam_steps(opt_g) == {2} and adam_steps(opt_d) == {4}  # d_steps_per_g = 2 discriminator updates per step
    assert model.skipped_steps == 0


@pytest.mark.parametrize("operator", [SuperResolution(4, "bicubic", padding="reflect"), "jpeg"])
def test_measurements_are_simulated_in_float32_under_mixed_precision(operator):
    """bf16-mixed training runs the step under autocast, which would run the operator's convolutions and the JPEG
    DCT in bf16 (JPEG 10: 17 % of entries off by more than a grey level); y and lift(y) stay fp32 (§1.4)."""
    from ud2m.operators import measure
    from ud2m.operators.jpeg import JPEG

    op = JPEG(10) if operator == "jpeg" else operator
    model = make_model(operator=op, sigma_y=0.05)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, sigma_y, y = model._measurement({"x": x}, torch.Generator().manual_seed(1))
    _, sigma_ref, _ = model._measurement({"x": x}, torch.Generator().manual_seed(1))
    expected = measure(op, x, sigma_ref, torch.Generator().manual_seed(1))
    assert y.dtype == torch.float32 and torch.equal(sigma_y, sigma_ref)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_learning_rate_factor_warm_up_and_cosine_decay():
    from ud2m.training.module import lr_factor

    assert lr_factor(5, 0, "constant", 100) is None  # nothing to set
    assert [lr_factor(s, 4, "constant", 100) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]
    # cosine over the 100 - 20 steps after the warm-up: 1 at its start, 1/2 half-way, 0 at max_steps
    assert lr_factor(20, 20, "cosine", 100) == 1.0 and lr_factor(60, 20, "cosine", 100) == pytest.approx(0.5)
    assert lr_factor(100, 20, "cosine", 100) == pytest.approx(0.0, abs=1e-12) and lr_factor(9, 20, "cosine", 100) == 0.5
    with pytest.raises(ValueError, match="max_steps"):
        lr_factor(30, 0, "cosine", -1)
    with pytest.raises(ValueError, match="lr_decay"):
        make_model(lr_decay="linear")
    with pytest.raises(ValueError, match="max_steps"):  # before training, not after the warm-up
        trainer(-1, max_epochs=1).fit(make_model(lr_decay="cosine", warmup_steps=50), make_data())


def test_cosine_decay_sets_both_optimisers_rates_from_the_step():
    model = make_model(lr_decay="cosine", lr_g=1e-3, lr_d=2e-3)
    trainer(3).fit(model, make_data())
    opt_g, opt_d = (o.optimizer for o in model.optimizers())
    expected = 0.5 * (1 + math.cos(math.pi * 2 / 3))  # the third step (global step 2) of 3
    assert [g["lr"] for g in opt_g.param_groups] == pytest.approx([1e-3 * expected] * len(opt_g.param_groups))
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2e-3 * expected)


def test_adversarial_window_stops_the_discriminator_and_its_loss():
    """``adv_end_step`` (§7.5): steps 0-1 train D and use the adversarial loss, step 2 and later neither (after 3
    steps D's Adam has made 2 updates, G's 3); an end at or before the start is refused."""
    model = make_model(adv_end_step=2)
    t = trainer(3)
    t.fit(model, make_data())
    opt_g, opt_d = (o.optimizer for o in model.optimizers())
    assert adam_steps(opt_g) == {3} and adam_steps(opt_d) == {2}
    assert [model._adversarial_at(s) for s in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="adv_end_step: expected a step after adv_start_step = 5, got 5"):
        make_model(adv_start_step=5, adv_end_step=5)


def test_nan_guard_skips_and_counts(monkeypatch):
    import ud2m.losses as losses

    calls = {"n": 0}
    real = losses.energy_score  # the default consistency loss

    def nan_once(x0_hat, x0_hat_2, x0, weight=None):
        calls["n"] += 1
        loss = real(x0_hat, x0_hat_2, x0, weight)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(losses, "energy_score", nan_once)
    model = make_model()
    before = trainable_state(model)
    t = trainer(1)
    t.fit(model, make_data())
    assert calls["n"] == 2  # the bad batch is skipped, the next one makes the step
    assert model.skipped_steps == 1 and float(t.callback_metrics["train/skipped_steps"]) == 1.0
    opt_g, opt_d = (o.optimizer for o in model.optimizers())
    assert t.global_step == 1 and adam_steps(opt_g) == {1} and adam_steps(opt_d) == {2}
    after = trainable_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("sampler."))


# ------------------------------------------------------------------------------------------------ resume
class RestoredState(pl.Callback):
    """Records the state right after a resume (model, optimisers, EMA, step) before any training."""

    def on_train_start(self, trainer, pl_module):
        self.model = trainable_state(pl_module)
        self.optimizers = copy.deepcopy([o.optimizer.state_dict() for o in pl_module.optimizers()])
        self.ema = {k: v.clone() for k, v in next(c for c in trainer.callbacks if isinstance(c, EMA)).shadow.items()}
        self.global_step = trainer.global_step


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """4 steps straight, and 2 steps + checkpoint + resume to 4 (fixed seeds, num_workers=0): the resumed run
    finishes the first epoch (batch 3) and starts the second, as the straight run does."""
    ckpt = tmp_path_factory.mktemp("resume") / "step2.ckpt"
    straight = make_model()
    trainer(4, callbacks=[EMA(halflife_steps=2)]).fit(straight, make_data())
    first = make_model()
    t1 = trainer(2, callbacks=[EMA(halflife_steps=2)])
    t1.fit(first, make_data())
    t1.save_checkpoint(ckpt)
    saved = {
        "model": trainable_state(first),
        "optimizers": [o.optimizer.state_dict() for o in first.optimizers()],
        "ema": dict(next(c for c in t1.callbacks if isinstance(c, EMA)).shadow),
    }
    probe, resumed = RestoredState(), make_model()
    t2 = trainer(4, callbacks=[EMA(halflife_steps=2), probe])
    t2.fit(resumed, make_data(), ckpt_path=ckpt)
    return dict(straight=straight, saved=saved, probe=probe, resumed=resumed, t2=t2, ckpt=ckpt)


def _assert_equal_tree(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_equal_tree(u, v, f"{where}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_checkpoint_round_trip_restores_every_state(resume_runs):
    saved, probe = resume_runs["saved"], resume_runs["probe"]
    assert probe.global_step == 2
    _assert_equal_tree(saved["model"], probe.model, "model")
    _assert_equal_tree(saved["optimizers"], probe.optimizers, "optimizers")
    _assert_equal_tree(saved["ema"], probe.ema, "ema")
    state = torch.load(resume_runs["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("sampler.prior.") and "lora" not in k and k.endswith("weight") for k in state)


def test_exact_resume_equals_straight_run(resume_runs):
    straight, resumed = trainable_state(resume_runs["straight"]), trainable_state(resume_runs["resumed"])
    assert resume_runs["t2"].global_step == 4
    _assert_equal_tree(straight, resumed, "weights")


def test_ema_is_the_half_life_average():
    """With half-life h, β = 0.5^(1/h); after one update the shadow is β θ_0 + (1 − β) θ_1 (§7.7)."""
    model = make_model()
    before = {k: v.double() for k, v in trainable_state(model).items() if k.startswith("sampler.")}
    ema = EMA(halflife_steps=3)
    trainer(1, callbacks=[ema]).fit(model, make_data())
    beta = 0.5 ** (1 / 3)
    for k, theta0 in before.items():
        theta1 = dict(model.named_parameters())[k].detach().double()
        torch.testing.assert_close(ema.shadow[k].double(), beta * theta0 + (1 - beta) * theta1, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ train.py


def run_train(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (extra_path, ROOT) if p is not None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def common_args(root: Path, run: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIG),
        "--model.sampler.init_args.prior.init_args.path_or_hub_id", str(root / "prior"),
        "--data.init_args.train_shards", str(root / "shards" / "train-{000000..000003}.tar"),
        "--data.init_args.val_shards", str(root / "shards" / "val-000000.tar"),
        "--trainer.default_root_dir", str(root / run),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_train_py_end_to_end_export_and_sample(cli_inputs, tmp_path):
    from ud2m.export import load_checkpoint
    from ud2m.training.cli import export
    from ud2m.unfolded import sample_ud2m

    root = cli_inputs
    run_train([*common_args(root, "e2e"), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"], tmp_path)
    out = tmp_path / "outputs" / "tiny" / "exports" / "pixel_sr4"  # ExportOnTrainEnd of the config (relative path)
    assert json.loads((out / "ud2m.json").read_text())["format"] == "ud2m-checkpoint"
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    ckpt = next((root / "e2e").rglob("last.ckpt"))
    assert (ckpt.parent.parent / "config.yaml").is_file()  # LightningCLI saved the resolved config
    exported = export(ckpt, tmp_path / "export_command")  # load_from_checkpoint through the CLI instantiator
    prior = tiny_pixel_prior(in_channels=1)
    model = load_checkpoint(exported, prior, allow_hash_mismatch=True)
    shadow = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    shadow = next(v["shadow"] for k, v in shadow.items() if k.startswith("EMA"))
    loaded = dict(model.named_parameters())
    for name, value in shadow.items():  # the export holds the EMA weights
        torch.testing.assert_close(loaded[name.removeprefix("sampler.")].detach(), value, rtol=0, atol=0)
    x = torch.zeros(2, 1, 32, 32)
    op = SuperResolution(4, "gaussian", gaussian_sigma=3**0.5, gaussian_size=3)
    with torch.inference_mode():
        x_hat = sample_ud2m(model, op, op.A(x), 0.05, x_shape=x.shape, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all() and x_hat.abs().max() <= 1


PROBE = """
import hashlib, json, torch
import lightning.pytorch as pl

class RankProbe(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir, self.keys = out_dir, []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["key"])
    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha256()
        for name, p in sorted(pl_module.named_parameters()):
            if p.requires_grad:
                h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"keys": self.keys, "hash": h.hexdigest(), "step": trainer.global_step}, f)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_read_different_samples_and_agree(cli_inputs, tmp_path):
    (tmp_path / "ud2m_probe.py").write_text(textwrap.dedent(PROBE))
    run_train(
        [*common_args(cli_inputs, "ddp"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu", "--data.init_args.resampled", "false",
         "--trainer.callbacks+=ud2m_probe.RankProbe", f"--trainer.callbacks.out_dir={tmp_path}"],
        cwd=tmp_path, extra_path=tmp_path,
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["step"] == 2 and len(r["keys"]) == 2 * 4 for r in ranks)  # 2 steps x batch 4 per rank
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # split_by_node: disjoint shards per rank
    assert ranks[0]["hash"] == ranks[1]["hash"]  # replicas stay identical
    assert hashlib.sha256().hexdigest() != ranks[0]["hash"]


KILLER = """
import os, signal
import lightning.pytorch as pl

class KillAtStep(pl.Callback):
    \"\"\"SIGKILL this process at the end of training step ``step`` (before that step's checkpoint is written).\"\"\"
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_and_resume_equals_an_uninterrupted_run(cli_inputs, tmp_path):
    """Issue [api] 4: killed with SIGKILL mid-epoch (3 batches per epoch, killed in the middle of the second) and
    resumed from last.ckpt, train.py reads the same batches and ends with the same weights, bit for bit, as a run
    that was never interrupted (random crops, shuffle buffer and noise all seeded from the position)."""
    (tmp_path / "ud2m_probe.py").write_text(textwrap.dedent(PROBE) + textwrap.dedent(KILLER))
    args = [
        "--trainer.max_steps", "7", "--trainer.val_check_interval", "100", "--trainer.limit_val_batches", "0",
        "--data.init_args.samples_per_epoch", "12", "--trainer.callbacks+=ud2m_probe.RankProbe",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    straight.mkdir()
    run_train(
        [*common_args(cli_inputs, "straight"), *args, f"--trainer.callbacks.out_dir={straight}"], tmp_path, tmp_path
    )
    killed = tmp_path / "killed"
    killed.mkdir()
    checkpoints = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1", f"--trainer.callbacks.dirpath={killed / 'ckpt'}",
    ]  # fmt: skip
    first = [*common_args(cli_inputs, "killed"), *args, f"--trainer.callbacks.out_dir={killed}", *checkpoints]
    kill = ["--trainer.callbacks+=ud2m_probe.KillAtStep", "--trainer.callbacks.step=5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *first, *kill], cwd=killed, env=env, capture_output=True, timeout=900
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed by the signal, not finished
    last = killed / "ckpt" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    run_train([*first, "--ckpt_path", str(last)], killed, tmp_path)
    done, resumed = (json.loads((d / "rank0.json").read_text()) for d in (straight, killed))
    assert done["step"] == resumed["step"] == 7
    assert resumed["keys"] == done["keys"][4 * 4 :]  # steps 5-7 read the straight run's batches 5-7
    assert resumed["hash"] == done["hash"]  # and end with bit-identical weights


# ------------------------------------------------------------------------------------------------ latent prior
def test_latent_prior_trains_exports_and_samples(tmp_path):
    """The same wiring on a tiny latent consistency model (prox in pixel space through the VAE, §7.2): two steps
    update the LoRA and the scalars, the export round-trips through ``load_lora_adapter`` and samples."""
    from ud2m.export import load_checkpoint
    from ud2m.operators import GaussianBlur
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import write_tiny_pipeline
    from ud2m.training.callbacks import ExportOnTrainEnd
    from ud2m.unfolded import sample_ud2m

    folder = write_tiny_pipeline(tmp_path / "lcm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sampler = UnfoldedSampler(LatentConsistencyPrior.from_pretrained(folder), num_blocks=2)
        model = UnfoldedDistillation(
            sampler,
            ConditionalDiscriminator(3, 16, state_channels=4),  # x_t is a 4-channel latent
            operator=GaussianBlur(1.0, 3),
            sigma_y=0.05,
            omega_lpips=0.0,
            lr_g=1e-3,
        )  # sigma_y 0.05: with 0.01, rho0 < s(1) of the scaled-linear schedule, sigma_z sits on its clamp (§7.1.5)
    before = trainable_state(model)
    out = tmp_path / "export"
    t = trainer(2, callbacks=[ExportOnTrainEnd(str(out), use_ema=False)])
    t.fit(model, make_data())
    after = trainable_state(model)
    assert not [k for k in before if k.startswith("sampler.") and torch.equal(before[k], after[k])]
    loaded = load_checkpoint(out, LatentConsistencyPrior.from_pretrained(folder), base_path=folder)
    op = GaussianBlur(1.0, 3)
    x = torch.zeros(1, 3, 16, 16)
    cond = loaded.prior.encode_prompt("")
    kw = dict(x_shape=tuple(x.shape), num_steps=2, cond=cond)
    with torch.inference_mode():
        a = sample_ud2m(loaded, op, op.A(x), 0.01, generator=torch.Generator().manual_seed(0), **kw)
        b = sample_ud2m(model.sampler.eval(), op, op.A(x), 0.01, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b)  # the export is the trained model
    assert a.shape == x.shape


class RecordValidatedWeights(pl.Callback):
    """Records the generator weights at every validation (after the sanity check)."""

    def __init__(self):
        self.seen = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append({k: v for k, v in trainable_state(pl_module).items() if k.startswith("sampler.")})


def test_export_of_the_best_validation_keeps_those_weights(tmp_path, monkeypatch):
    """ExportOnTrainEnd(best="val/psnr"): the export holds the weights of the best validation (the second of three
    here, by a PSNR that is made to be 20, 25, 22), not the last ones, and the manifest says which step and value."""
    import ud2m.training.module as module
    from ud2m.export import load_checkpoint, read_manifest
    from ud2m.training.callbacks import ExportOnTrainEnd

    values = iter([20.0, 25.0, 22.0])
    monkeypatch.setattr(module, "psnr", lambda x_hat, x0: torch.full((x0.shape[0],), next(values)))
    probe, out = RecordValidatedWeights(), tmp_path / "export"
    t = trainer(3, callbacks=[probe, ExportOnTrainEnd(str(out), use_ema=False, best="val/psnr")],
                limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None)  # fmt: skip
    t.fit(make_model(), make_data())
    assert len(probe.seen) == 3 and not all(torch.equal(probe.seen[1][k], probe.seen[2][k]) for k in probe.seen[1])
    manifest = read_manifest(out)
    assert manifest["training"]["selected"] == {"metric": "val/psnr", "value": 25.0, "step": 2}
    assert manifest["training"]["steps"] == 2
    loaded = dict(load_checkpoint(out, tiny_pixel_prior(), allow_hash_mismatch=True).named_parameters())
    for name, value in probe.seen[1].items():
        torch.testing.assert_close(loaded[name.removeprefix("sampler.")].detach(), value, rtol=0, atol=0)


def test_training_times_stay_below_t_max_and_the_export_starts_there(tmp_path):
    """§7.6/§8 revisions: ``t_max`` bounds the training times (t ~ U{1..t_max}); validation and the export's
    default sampler start at t_max; the export records a closing data step as the sampler's default; an out-of-range
    t_max, export start or data-step weight is refused before training."""
    from ud2m.export import read_manifest
    from ud2m.methods import UD2M, Problem
    from ud2m.training.callbacks import ExportOnTrainEnd

    model = make_model(t_max=40)
    t, _ = model._diffuse(torch.zeros(512, 3, 16, 16), torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() == 40 and len(t.unique()) == 40  # every time in 1..40 drawn, none above
    assert model.sampler_start() == 40 and make_model().sampler_start() is None
    out = tmp_path / "export"
    export = ExportOnTrainEnd(str(out), use_ema=False, final_gamma=10, residual_renoise=True)
    trainer(1, callbacks=[export]).fit(model, make_data())
    manifest = read_manifest(out)
    assert manifest["sampler"] == {
        "num_steps": 3, "grid": "quadratic", "eta": 1.0, "t_start": 40, "final_gamma": 10.0, "residual_renoise": True
    }  # fmt: skip
    # the export's closing data step and re-noise rule are the sampler's defaults; settings given at sampling win
    problem = Problem(None, 0.05, (3, 16, 16), manifest=manifest)
    assert UD2M().settings(problem)["final_gamma"] == 10.0
    assert UD2M(final_gamma=0.0).settings(problem)["final_gamma"] == 0.0
    assert UD2M().settings(problem)["residual_renoise"] is True
    assert UD2M(residual_renoise=False).settings(problem)["residual_renoise"] is False
    with pytest.raises(ValueError, match="t_max: expected an integer in \\[1, 999\\], got 1000"):
        make_model(t_max=1000)
    with pytest.raises(ValueError, match=r"t_start: expected a first sampler time in \[1, 999\].*got 0"):
        ExportOnTrainEnd(str(tmp_path / "other"), t_start=0)
    with pytest.raises(ValueError, match=r"final_gamma: expected a data-step weight >= 0.*got -1"):
        ExportOnTrainEnd(str(tmp_path / "other"), final_gamma=-1)


def test_paired_batches_from_simulated_shards_are_refused_by_name():
    """make_shards.py --simulate shards hold one random degradation per sample; a UD2M training step needs one
    known operator per batch, so it names the task and the ways out instead of a KeyError on 'operator'."""
    batch = {
        "params": [{"simulate": "haze", "sigma_y": 0.01, "seed": 1, "param_seed": 2, "values": {}}],
        "y": torch.zeros(1, 3, 8, 8),
    }
    with pytest.raises(ValueError, match=r"make_shards.py --simulate haze.*write the shards with --operator"):
        UnfoldedDistillation._paired(None, batch)  # refused before anything of the module is touched
