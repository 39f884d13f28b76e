"""Training a pixel diffusion prior (``ud2m.training.prior_module``): the DDPM loss equals its hand formula (Ho et al.
2020, Eq. 14), a short run lowers the loss below the trivial predictor's, the validation DDIM sampler equals
diffusers' ``DDIMPipeline``, the exported folder is read back identically by ``PixelDiffusionPrior`` and by
diffusers, and the shipped prior configs parse and instantiate.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.priors.tiny import tiny_pixel_unet
from ud2m.training.callbacks import EMA, tracked_parameters
from ud2m.training.data import SyntheticImages
from ud2m.training.prior_module import DiffusionPriorTraining, PriorCLI, ddim_timesteps, sample_ddim

ROOT = Path(__file__).resolve().parents[1]
PRIOR_CONFIGS = [ROOT / "configs" / "priors" / f"{name}.yaml" for name in ("digits", "photos")]


def make_module(prediction_type: str = "epsilon", channels: int = 3, **kwargs) -> DiffusionPriorTraining:
    unet = tiny_pixel_unet(in_channels=channels, block_out_channels=(16, 32)).train()
    return DiffusionPriorTraining(unet, prediction_type=prediction_type, **kwargs)


def hand_alphas_cumprod() -> torch.Tensor:
    """Ho et al.'s linear schedule: beta_i evenly spaced in [1e-4, 0.02], abar_t = prod_{i<=t}(1 - beta_i) (fp32)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0).double()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_equals_the_hand_formula(prediction_type, rng):
    module = make_module(prediction_type).double()
    x0 = torch.rand((4, 3, 16, 16), generator=rng, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=rng, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 999], dtype=torch.float64)
    a = hand_alphas_cumprod()[t.long()].sqrt().view(-1, 1, 1, 1)
    b = (1 - hand_alphas_cumprod()[t.long()]).sqrt().view(-1, 1, 1, 1)
    target = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction_type]
    with torch.no_grad():
        expected = (module.unet(a * x0 + b * eps, t).sample - target).pow(2).mean(dim=(1, 2, 3))
        got = module.loss(x0, t, eps)
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_target(prediction_type, rng):
    """If the network output were the exact target, predict_x0 would return x0 (x0_from_prediction is its inverse)."""
    module = make_module(prediction_type).double()
    x0 = torch.rand((2, 3, 16, 16), generator=rng, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=rng, dtype=torch.float64)
    t = torch.tensor([3.0, 800.0], dtype=torch.float64)
    a, b = hand_alphas_cumprod()[t.long()].sqrt(), (1 - hand_alphas_cumprod()[t.long()]).sqrt()
    target = a.view(-1, 1, 1, 1) * eps - b.view(-1, 1, 1, 1) * x0 if prediction_type == "v_prediction" else eps
    x_t = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * eps
    with mock.patch.object(module, "network", return_value=target):
        torch.testing.assert_close(module.predict_x0(x_t, t), x0, rtol=0, atol=1e-10)


def test_training_lowers_the_loss_below_the_trivial_predictor(rng):
    """Overfit one batch for 30 steps at a high lr: the loss on fixed (x0, t, eps) must fall below its value at
    step 0 and below half the loss of the trivial predictor eps_hat = 0 (which is mean(eps^2), about 1)."""
    data = SyntheticImages(num_train=8, num_val=1, batch_size=8, image_size=16, channels=3, seed=1)
    module = make_module(lr=3e-3, warmup_steps=0, ema_halflife_steps=5)
    data.setup()
    x0 = torch.stack([data.datasets["train"][i]["x"] for i in range(8)])
    t = torch.arange(8, dtype=torch.float32) * 125 + 50  # spread over [50, 925]
    eps = torch.randn(x0.shape, generator=rng)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(module.loss(x0, t, eps).mean())

    before = fixed_loss()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    after, trivial = fixed_loss(), float(eps.pow(2).mean())
    assert trainer.global_step == 30
    assert after < before and after < 0.5 * trivial, (before, after, trivial)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(3e-3)  # logged; no warm-up


def test_sample_ddim_equals_diffusers_ddim_pipeline():
    """Same network, same initial noise, eta = 0, 5 steps: our sampler and diffusers' DDIMPipeline agree."""
    module = make_module().eval()
    scheduler = DDIMScheduler.from_config({**module.scheduler_config(), "clip_sample": False})
    pipe = DDIMPipeline(unet=module.unet, scheduler=scheduler)
    assert ddim_timesteps(5, 1000) == [800, 600, 400, 200, 0]
    with torch.no_grad():
        ref = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, eta=0.0, output_type="np"
        ).images  # fmt: skip  (B, H, W, C) on [0, 1]
        ours = sample_ddim(module.predict_x0, module.schedule, (2, 3, 16, 16), num_steps=5,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    ours01 = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert abs(ours01 - ref).max() < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_save_pretrained_round_trips_the_ema_weights(prediction_type, tmp_path, rng):
    module = make_module(prediction_type).eval()
    ema = EMA(halflife_steps=10)
    ema.shadow = {
        n: p.detach() + 0.01 * torch.randn(p.shape, generator=rng) for n, p in tracked_parameters(module).items()
    }
    x_t = torch.randn((2, 3, 16, 16), generator=rng)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        own = module.predict_x0(x_t, t)
        with ema.swapped(module):
            own_ema = module.predict_x0(x_t, t)
        module.save_pretrained(tmp_path / "ema", ema=ema)
        module.save_pretrained(tmp_path / "raw")
        from_ema = PixelDiffusionPrior.from_pretrained(tmp_path / "ema").predict_x0(x_t, t)
        from_raw = PixelDiffusionPrior.from_pretrained(tmp_path / "raw").predict_x0(x_t, t)
    torch.testing.assert_close(from_ema, own_ema, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_raw, own, rtol=0, atol=1e-6)
    assert (own - own_ema).abs().max() > 1e-4  # the EMA weights were really exported, training weights restored
    torch.testing.assert_close(module.predict_x0(x_t, t).detach(), own, rtol=0, atol=0)


def test_exported_folder_loads_in_diffusers(tmp_path):
    module = make_module("v_prediction", channels=1).eval()
    module.save_pretrained(tmp_path / "prior")
    pipe = DDIMPipeline.from_pretrained(tmp_path / "prior")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.in_channels == 1
    for (name, p), q in zip(module.unet.state_dict().items(), pipe.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 1)


#: the UNet of the CLI fits below: 1 channel and 16x16 come from the data (linked)
TINY_UNET = {
    "layers_per_block": 1, "block_out_channels": [16, 32], "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip


def tiny_fit_config(root: Path, out: Path, model: dict, trainer: dict) -> dict:
    """A PriorCLI ``fit`` config of the tiny UNet on 16x16 synthetic images, run in ``root``, exported to ``out``
    (SavePriorOnTrainEnd); ``model`` and ``trainer`` add to (or override) its sections."""
    return {
        "model": {"unet": {"class_path": "diffusers.UNet2DModel", "init_args": TINY_UNET}, "warmup_steps": 0,
                  "lr": 1e-2, **model},
        "data": {"class_path": "ud2m.training.data.SyntheticImages",
                 "init_args": {"num_train": 4, "num_val": 2, "batch_size": 2, "image_size": 16, "channels": 1}},
        "trainer": {"accelerator": "cpu", "default_root_dir": str(root), "enable_progress_bar": False,
                    "enable_model_summary": False, **trainer,
                    "callbacks": [{"class_path": "ud2m.training.prior_module.SavePriorOnTrainEnd",
                                   "init_args": {"out_dir": str(out)}}]},
    }  # fmt: skip


def test_cli_fit_saves_the_ema_prior_and_export_matches(tmp_path):
    """A 3-step ``fit`` through PriorCLI: SavePriorOnTrainEnd writes the EMA weights, ``export_prior`` of
    last.ckpt writes the same weights, and both differ from the final training weights."""
    from ud2m.training.prior_module import export_prior

    model = {"ema_halflife_steps": 1, "val_num_samples": 2, "val_num_steps": 2}
    trainer = {"max_steps": 3, "log_every_n_steps": 1, "limit_val_batches": 1}
    cli = PriorCLI(args={"fit": tiny_fit_config(tmp_path, tmp_path / "prior", model, trainer)})
    assert cli.model.unet.config.in_channels == 1 and cli.model.unet.config.sample_size == 16  # linked from data
    saved = PixelDiffusionPrior.from_pretrained(tmp_path / "prior").net.state_dict()
    ckpt = next(tmp_path.rglob("last.ckpt"))
    exported = PixelDiffusionPrior.from_pretrained(export_prior(ckpt, tmp_path / "exported")).net.state_dict()
    training = cli.model.unet.state_dict()
    for name, p in saved.items():
        torch.testing.assert_close(exported[name], p, rtol=0, atol=0, msg=name)
    assert any((training[n] - p).abs().max() > 0 for n, p in saved.items() if p.is_floating_point())

    # the data card is read from the run: hash of the saved weights, every logged loss step, a sample grid
    from ud2m.export import base_model_hash
    from ud2m.training.prior_module import main as prior_main

    run = next(tmp_path.rglob("events.out.tfevents.*")).parent
    prior_main(["card", "--prior", str(tmp_path / "prior"), "--run", str(run), "--name", "t", "--command", "c"])
    card = json.loads((tmp_path / "prior" / "card.json").read_text())
    assert card["sha256"] == base_model_hash(tmp_path / "prior")
    assert card["parameters"] == sum(p.numel() for p in saved.values())
    assert card["max_steps"] == 3 and list(card["train_loss"]) == ["2"]  # logged at steps 0, 1, 2; the last kept
    assert (tmp_path / "prior" / "samples.png").is_file()
    # a second stage (init_from) keeps the first stage's card whole and adds up the steps
    (tmp_path / "first.json").write_text(json.dumps({**card, "max_steps": 5}))
    prior_main(["card", "--prior", str(tmp_path / "prior"), "--run", str(run), "--name", "t", "--command", "c",
                "--previous", str(tmp_path / "first.json")])  # fmt: skip
    chained = json.loads((tmp_path / "prior" / "card.json").read_text())
    assert chained["previous_stage"] == {**card, "max_steps": 5} and chained["total_steps"] == 8


def test_init_from_starts_from_an_exported_prior_and_refuses_what_does_not_fit(tmp_path):
    """``init_from`` copies an exported prior's UNet into a differently initialised one (from the prior folder, its
    ``unet/`` folder or the file), and names the file and the tensor when the architecture differs, copying
    nothing then."""
    from ud2m.training.prior_module import load_unet_weights

    source = make_module()
    source.save_pretrained(tmp_path / "prior")
    weights = tmp_path / "prior" / "unet" / "diffusion_pytorch_model.safetensors"
    for where in (tmp_path / "prior", tmp_path / "prior" / "unet", weights):
        fresh = tiny_pixel_unet(in_channels=3, block_out_channels=(16, 32), seed=1)
        assert any((fresh.state_dict()[n] - v).abs().max() > 0 for n, v in source.unet.state_dict().items())
        module = DiffusionPriorTraining(fresh, init_from=str(where))
        for name, value in source.unet.state_dict().items():
            torch.testing.assert_close(module.unet.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert module.hparams.init_from == str(weights)
    with pytest.raises(FileNotFoundError, match=r"no UNet weights at .*missing"):
        DiffusionPriorTraining(tiny_pixel_unet(), init_from=str(tmp_path / "missing"))
    shapes = r"safetensors: tensor conv_in.weight has shape \(16, 3, 3, 3\), this UNet expects \(16, 1, 3, 3\)"
    grey = tiny_pixel_unet(in_channels=1, block_out_channels=(16, 32))
    before = {name: value.clone() for name, value in grey.state_dict().items()}
    with pytest.raises(ValueError, match=r"^init_from: .*" + shapes):
        load_unet_weights(tmp_path / "prior", grey)
    assert all(torch.equal(grey.state_dict()[n], v) for n, v in before.items())  # nothing copied half-way
    with pytest.raises(ValueError, match=r"does not fit this UNet: .* missing"):
        load_unet_weights(tmp_path / "prior", tiny_pixel_unet(in_channels=3, block_out_channels=(16, 32, 32)))


@pytest.mark.parametrize("config", PRIOR_CONFIGS, ids=lambda p: p.stem)
def test_prior_config_parses_and_instantiates(config, tmp_path):
    argv = ["prior", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    with mock.patch("sys.argv", argv):
        cli = PriorCLI(run=False)
    unet, data = cli.model.unet, cli.datamodule
    assert isinstance(cli.model, DiffusionPriorTraining)
    assert unet.config.in_channels == unet.config.out_channels == data.channels  # linked
    assert unet.config.sample_size == data.image_size
    assert "AttnDownBlock2D" == unet.config.down_block_types[-1]  # attention at the lowest resolution
    if config.stem == "digits":
        assert (data.image_size, data.channels, data.batch_size) == (32, 1, 64)
        assert 1e6 <= sum(p.numel() for p in unet.parameters()) <= 2e6
    else:
        assert (data.image_size, data.channels) == (64, 3)
    assert cli.model.hparams.unet["class_path"] == "diffusers.UNet2DModel"  # config, not a pickled module


def test_a_run_started_from_an_export_exports_without_its_start(tmp_path):
    """A 2-step fit with ``init_from``: its last.ckpt exports the run's own weights (those SavePriorOnTrainEnd wrote)
    even after the prior it started from is gone."""
    import shutil

    from diffusers import UNet2DModel

    from ud2m.training.prior_module import export_prior

    start = UNet2DModel(**TINY_UNET, in_channels=1, out_channels=1, sample_size=16)
    DiffusionPriorTraining(start).save_pretrained(tmp_path / "start")
    out = tmp_path / "out"
    model = {"init_from": str(tmp_path / "start"), "val_num_samples": 0}
    config = tiny_fit_config(tmp_path / "run", out, model, {"max_steps": 2, "limit_val_batches": 0})
    PriorCLI(args={"fit": config})
    shutil.rmtree(tmp_path / "start")
    exported = export_prior(next((tmp_path / "run").rglob("last.ckpt")), tmp_path / "exported")
    saved = PixelDiffusionPrior.from_pretrained(out).net.state_dict()
    for name, value in PixelDiffusionPrior.from_pretrained(exported).net.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def test_the_clips_second_stage_overrides_the_first_stages_config(tmp_path):
    """configs/priors/clips_continued.yaml given after clips.yaml: the same UNet and data, started from the first
    stage's export with fresh seeds, written to its own folders."""
    configs = ROOT / "configs" / "priors"
    first = ["prior", "--config", str(configs / "clips.yaml")]
    with mock.patch("sys.argv", first):
        stage1 = PriorCLI(run=False)
    stage1.model.save_pretrained(tmp_path / "clips_prior")  # stands in for stage 1's export
    argv = [
        *first,
        "--config",
        str(configs / "clips_continued.yaml"),
        "--model.init_from",
        str(tmp_path / "clips_prior"),
    ]
    with mock.patch("sys.argv", argv):
        stage2 = PriorCLI(run=False)
    assert stage2.model.unet.config == stage1.model.unet.config
    for name, value in stage1.model.unet.state_dict().items():
        torch.testing.assert_close(stage2.model.unet.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert (stage1.model.hparams.seed, stage2.model.hparams.seed) == (0, 1)
    assert (stage1.datamodule.seed, stage2.datamodule.seed) == (0, 1)
    assert stage2.datamodule.val_sources == stage1.datamodule.val_sources
    saved = [c.out_dir for c in stage2.trainer.callbacks if type(c).__name__ == "SavePriorOnTrainEnd"]
    assert saved == ["outputs/priors/clips_prior_continued"]
