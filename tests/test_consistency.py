"""Consistency distillation of a pixel prior (docs/method.md §3.3, ``ud2m.training.consistency_module``).

Identities: the boundary condition f(z, 0) = z of the exported prior; the distillation loss is exactly 0 with a
zero skip (t_{n-1} = t_n) at any weights, and the target is the teacher's DDIM step of the hand formula; the
pseudo-Huber distance equals its formula; the grid is diffusers' LCM grid; the exported folder loads through the
prior contract (``boundary="lcm"``, same f as the module) and through diffusers (``DDPMPipeline`` with an
``LCMScheduler``), whose 1- and 4-step samples equal ``consistency_sampling``; the teacher trajectories of
``method="trajectory"`` follow the teacher's DDIM and regressing on them lowers the loss on held-out trajectories; a
5-step ``train.py prior distil`` (both methods) runs, exports and resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, LCMScheduler

from ud2m.priors.base import cm_boundary_scalings
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.priors.tiny import tiny_pixel_unet
from ud2m.schedules import consistency_grid
from ud2m.solvers.steps import consistency_sampling
from ud2m.training.consistency_module import ConsistencyDistillation, lcm_timesteps, pseudo_huber
from ud2m.training.prior_module import DiffusionPriorTraining

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny random 16×16 single-channel DDPM prior folder (the teacher)."""
    unet = tiny_pixel_unet(in_channels=1, block_out_channels=(16, 32))
    folder = tmp_path_factory.mktemp("teacher") / "prior"
    torch.manual_seed(0)
    DiffusionPriorTraining(unet).save_pretrained(folder)
    return folder


def perturbed(module: ConsistencyDistillation, scale: float = 0.02) -> ConsistencyDistillation:
    """Move the student away from the teacher so that identities are not checked at a trivial point."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def test_grid_is_diffusers_lcm_grid():
    grid = torch.tensor(consistency_grid(50, 1000))
    assert grid[0] == 0 and grid[1] == 19 and grid[-1] == 999 and len(grid) == 51
    assert (grid[2:] - grid[1:-1] == 20).all()
    scheduler = LCMScheduler(original_inference_steps=50)
    scheduler.set_timesteps(50)
    assert sorted(scheduler.timesteps.tolist()) == grid[1:].tolist()
    with pytest.raises(ValueError, match="divisor"):
        consistency_grid(30, 1000)


def test_pseudo_huber_formula_and_zero():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    c = 0.3
    expected = torch.stack([((a[i] - b[i]).pow(2).sum() + c * c).sqrt() - c for i in range(3)])
    torch.testing.assert_close(pseudo_huber(a, b, c), expected)
    assert pseudo_huber(a, a, c).abs().max() == 0


def test_loss_is_zero_with_zero_skip_and_target_is_the_teacher_ddim_step(teacher):
    module = perturbed(ConsistencyDistillation(str(teacher), target="self"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand((4, 1, 16, 16), generator=g) * 2 - 1, torch.randn((4, 1, 16, 16), generator=g)
    t = torch.tensor([19.0, 99.0, 499.0, 999.0])
    with torch.no_grad():
        zero = module.loss(x0, t, t, eps)  # ẑ = z and f_θ⁻ = f_θ: 0 up to fp32 rounding, amplified by 1/a_999 ≈ 156
        skip = module.loss(x0, t, t - 19, eps)
    assert zero.abs().max() < 1e-4 and (skip > 1e3 * zero.abs().max()).all()
    # the teacher's DDIM step (η = 0) by hand: ẑ = a' x̂0 + b' (z - a x̂0)/b with the clipped Tweedie x̂0
    prior = PixelDiffusionPrior.from_pretrained(teacher)
    z = prior.add_noise(x0, t, eps)
    with torch.no_grad():
        x0_hat = prior.predict_x0(z, t).clamp(-1, 1)
        a, b = (v[:, None, None, None] for v in prior.scales(t))
        a2, b2 = (v[:, None, None, None] for v in prior.scales(t - 19))
        expected = a2 * x0_hat + b2 * (z - a * x0_hat) / b
        torch.testing.assert_close(module.teacher_step(z, t, t - 19), expected, rtol=1e-5, atol=1e-5)


def test_loss_at_initialisation_vanishes_with_the_skip(teacher):
    """θ = teacher: the loss shrinks towards 0 as the skip k → 0 (the teacher is its own ODE's consistency fn)."""
    module = ConsistencyDistillation(str(teacher), distance="l2")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand((8, 1, 16, 16), generator=g) * 2 - 1, torch.randn((8, 1, 16, 16), generator=g)
    t = torch.full((8,), 300.0)
    with torch.no_grad():
        losses = [module.loss(x0, t, t - k, eps).mean().item() for k in (40, 10, 1)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < 0.05 * losses[0]


def test_export_loads_through_the_prior_contract_with_the_boundary_condition(teacher, tmp_path):
    module = perturbed(ConsistencyDistillation(str(teacher)))
    module.save_pretrained(tmp_path / "cm")
    prior = PixelDiffusionPrior.from_pretrained(tmp_path / "cm")
    assert prior.boundary == "lcm" and prior.timestep_scaling == module.hparams.timestep_scaling
    g = torch.Generator().manual_seed(2)
    z = torch.randn((3, 1, 16, 16), generator=g)
    t = torch.tensor([0.0, 19.0, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(prior.predict_x0(z, t), module.consistency(module.unet, z, t), rtol=0, atol=1e-5)
        boundary = prior.predict_x0(z, torch.zeros(3))
    torch.testing.assert_close(boundary, z, rtol=0, atol=1e-6)  # f(z, t_min) = z
    assert cm_boundary_scalings(19.0).c_skip < 1e-5  # so f is the network's x̂0 everywhere but at t = 0
    assert PixelDiffusionPrior.from_pretrained(teacher).boundary == "none"  # a DDIM folder stays a Tweedie prior


@pytest.mark.parametrize("steps", [1, 4])
def test_export_samples_equal_diffusers_lcm_pipeline(teacher, tmp_path, steps):
    module = perturbed(ConsistencyDistillation(str(teacher), num_points=50))  # LCM's own grid: 4 steps 999..259
    module.save_pretrained(tmp_path / "cm")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "cm")
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    prior = PixelDiffusionPrior.from_pretrained(tmp_path / "cm")
    with torch.no_grad():
        ref = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=steps, output_type="np"
        ).images  # fmt: skip  (B, H, W, C) on [0, 1]
        ours = consistency_sampling(prior, (2, 1, 16, 16), lcm_timesteps(prior.scheduler_config, steps),
                                    generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert lcm_timesteps(prior.scheduler_config, 4) == [999, 759, 499, 259]
    ours01 = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours01 - ref).max() < 1e-4


def test_teacher_must_not_be_a_consistency_model(teacher, tmp_path):
    ConsistencyDistillation(str(teacher)).save_pretrained(tmp_path / "cm")
    with pytest.raises(ValueError, match="already a consistency model"):
        ConsistencyDistillation(str(tmp_path / "cm"))


def test_teacher_trajectories_follow_the_teacher_ddim_from_seeded_noise(teacher):
    """Trajectory m starts at the noise of seed (seed, "trajectory", m), each state is the teacher's DDIM step of the
    previous one, and the end point is the clipped x̂0 of the last state (at t_1)."""
    from ud2m.training.module import mix_seed

    module = ConsistencyDistillation(str(teacher), num_points=10, trajectory_batch=2)
    states, ends = module.teacher_trajectories(3, (1, 16, 16))
    assert states.shape == (3, 10, 1, 16, 16) and ends.shape == (3, 1, 16, 16)
    noise = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(mix_seed(0, "trajectory", 2)))
    torch.testing.assert_close(states[2, -1].float(), noise, rtol=0, atol=2e-3)  # fp16 storage
    grid = module.grid.float()
    with torch.no_grad():
        z = states[:, 5].float()
        step = module.teacher_step(z, grid[6].expand(3), grid[5].expand(3))
        torch.testing.assert_close(step, states[:, 4].float(), rtol=0, atol=5e-3)
        end = module.teacher.predict_x0(states[:, 0].float(), grid[1].expand(3)).clamp(-1, 1)
    torch.testing.assert_close(end, ends, rtol=0, atol=5e-3)


def test_trajectory_regression_lowers_the_held_out_trajectory_loss(teacher):
    module = ConsistencyDistillation(str(teacher), num_points=10, num_trajectories=32, lr=1e-3, distance="l2",
                                     prediction_type="v_prediction")  # fmt: skip
    module.on_fit_start()
    opt = torch.optim.Adam(module.unet.parameters(), lr=1e-3)
    held_states, held_ends = module.val_trajectories

    def held_out() -> float:
        n = torch.arange(1, 11).repeat(len(held_ends))
        k = torch.arange(len(held_ends)).repeat_interleave(10)
        with torch.no_grad():
            return module.trajectory_loss(held_states[k, n - 1], held_ends[k], n).mean().item()

    before = held_out()
    g = torch.Generator().manual_seed(0)
    states, ends = module.trajectories
    for _ in range(40):
        m, n = torch.randint(0, 32, (16,), generator=g), torch.randint(1, 11, (16,), generator=g)
        loss = module.trajectory_loss(states[m, n - 1], ends[m], n).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.7 * before


def distil_config(teacher: Path, root: Path, max_steps: int, method: str = "cd") -> dict:
    return {
        "model": {"teacher": str(teacher), "method": method, "num_trajectories": 8, "num_points": 10, "lr": 1e-3,
                  "warmup_steps": 0, "ema_halflife_steps": 2, "val_num_samples": 2, "val_steps": [1, 2]},
        "data": {"class_path": "ud2m.training.data.SyntheticImages",
                 "init_args": {"num_train": 8, "num_val": 2, "batch_size": 2, "image_size": 16, "channels": 1}},
        "trainer": {
            "accelerator": "cpu", "max_steps": max_steps, "default_root_dir": str(root), "enable_progress_bar": False,
            "log_every_n_steps": 1, "enable_model_summary": False, "limit_val_batches": 1, "val_check_interval": 3,
            "callbacks": [{"class_path": "ud2m.training.prior_module.SavePriorOnTrainEnd",
                           "init_args": {"out_dir": str(root / "cm")}},
                          {"class_path": "ud2m.training.callbacks.ImageLogger", "init_args": {"max_images": 2}}],
        },
        "checkpoint": {"every_n_train_steps": 1},
    }  # fmt: skip


@pytest.mark.parametrize("method", ["cd", "trajectory"])
def test_train_py_prior_distil_runs_exports_and_resumes(teacher, tmp_path, method):
    """5 steps of ``train.py prior distil`` write an LCM folder (the EMA student) and ``prior export`` of the
    checkpoint writes the same weights; fitting on from last.ckpt continues the step count."""
    import yaml

    from train import main

    config = tmp_path / "distil.yaml"
    config.write_text(yaml.safe_dump(distil_config(teacher, tmp_path, 5, method)))
    main(["prior", "distil", "--config", str(config)])
    saved = PixelDiffusionPrior.from_pretrained(tmp_path / "cm")
    assert saved.boundary == "lcm"
    assert json.loads((tmp_path / "cm" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "LCMScheduler"
    )
    ckpt = next(tmp_path.rglob("last.ckpt"))
    main(["prior", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    exported = PixelDiffusionPrior.from_pretrained(tmp_path / "exported")
    for (name, p), q in zip(saved.net.state_dict().items(), exported.net.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    teacher_sd = PixelDiffusionPrior.from_pretrained(teacher).net.state_dict()
    assert any((teacher_sd[n] - p).abs().max() > 0 for n, p in saved.net.state_dict().items())  # it trained
    assert any(p.name.startswith("events") for p in tmp_path.rglob("*"))  # TensorBoard run

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5
    assert any(k.startswith("target_unet.") for k in state["state_dict"]) == (method == "cd")  # the EMA target
    config.write_text(yaml.safe_dump(distil_config(teacher, tmp_path, 7, method)))
    main(["prior", "distil", "fit", "--config", str(config), "--ckpt_path", str(ckpt)])
    newest = max(tmp_path.rglob("last.ckpt"), key=lambda f: f.stat().st_mtime_ns)
    resumed = torch.load(newest, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 7


SHIPPED_CM = [p for p in (ROOT / "ud2m" / "assets" / "priors").glob("*-cm") if (p / "card.json").is_file()]


@pytest.mark.parametrize("folder", SHIPPED_CM, ids=lambda p: p.name)
def test_shipped_consistency_models_match_their_cards(folder):
    from ud2m.export import base_model_hash

    card = json.loads((folder / "card.json").read_text())
    assert base_model_hash(folder) == card["sha256"]
    prior = PixelDiffusionPrior.from_pretrained(folder)
    assert prior.boundary == "lcm"
    teacher = ROOT / "ud2m" / "assets" / "priors" / card["teacher"]
    assert base_model_hash(teacher) == card["teacher_sha256"]
    cfg = prior.net.config
    z = torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prior.predict_x0(z, torch.zeros(2)), z, rtol=0, atol=1e-6)
