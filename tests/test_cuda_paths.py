"""Every entry point end to end on a CUDA device with tiny models (marked ``gpu``: ``pytest -m gpu``).

The CPU suite cannot see device bugs (a CPU copy of a schedule table, a dtype taken from the wrong parameter: both
found only when the full-size video benchmark first ran on an H100). The CLI paths run on CUDA and are checked
against the same run on the CPU: the solvers draw their noise from CPU generators (docs/method.md §1.5), so the two
devices restore the same image up to floating-point differences of the kernels. LD-RPS (which fits networks online),
LVTINO on the Wan prior and training are checked for running and for finite, well-shaped results only.
``UD2M_PATHS_DEVICE=cpu`` runs the file against itself on a machine without a GPU (a check of the tests, not of
CUDA).
"""

import math
import os

import pytest
import torch
from test_sample_cli import latent_model, pixel_model, run, ud2m_export  # noqa: F401 (fixtures)

from ud2m.io import load_image, save_image
from ud2m.methods import DPS, LDRPS, LVTINO, UD2M, DiffPIR, Latino, LatinoPro, TotalVariation

DEVICE = os.environ.get("UD2M_PATHS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PSNR_TOLERANCE = 0.1  # dB between the CUDA and the CPU run of the same seeds


def both_devices(tmp_path, **kwargs) -> tuple[dict, dict]:
    """The same run on ``DEVICE`` and on the CPU, both in float32: their first image rows. Then the default dtype
    on the device (bf16 networks on CUDA, §1.4) must run too, finite and within 1 dB of float32."""
    on_device = run(tmp_path / "device", device=DEVICE, dtype="float32", **kwargs)["images"][0]
    on_cpu = run(tmp_path / "cpu", device="cpu", dtype="float32", **kwargs)["images"][0]
    default = run(tmp_path / "default", device=DEVICE, **kwargs)["images"][0]
    assert math.isfinite(default["psnr"]) and abs(default["psnr"] - on_device["psnr"]) < 1.0
    return on_device, on_cpu


def assert_same_restoration(on_device: dict, on_cpu: dict) -> None:
    assert math.isfinite(on_device["psnr"]) and on_device["nfe"] == on_cpu["nfe"]
    assert abs(on_device["psnr"] - on_cpu["psnr"]) < PSNR_TOLERANCE, (on_device["psnr"], on_cpu["psnr"])


@pytest.mark.parametrize(
    "method, model",
    [
        (lambda: Latino(), "latent"),
        (lambda: LatinoPro(num_outer=1), "latent"),
        (lambda: DPS(num_steps=4), "pixel"),
        (lambda: DiffPIR(num_steps=4), "pixel"),
        (lambda: TotalVariation(), None),
    ],
    ids=["latino", "latino_pro", "dps", "diffpir", "tv"],
)
def test_image_methods(method, model, latent_model, pixel_model, tmp_path):  # noqa: F811
    folder = {"latent": latent_model, "pixel": pixel_model, None: None}[model]
    kwargs = dict(input="skimage:astronaut", operator="ud2m/deblur_gaussian", method=method())
    assert_same_restoration(*both_devices(tmp_path, **kwargs, **({"model": str(folder)} if folder else {})))


def test_ud2m_export(ud2m_export, tmp_path):  # noqa: F811
    on_device, on_cpu = both_devices(tmp_path, input="skimage:camera", checkpoint=str(ud2m_export), method=UD2M())
    assert on_device["nfe"] == 2 * 2  # N = 2 steps of K = 2 blocks
    assert_same_restoration(on_device, on_cpu)


def test_ud2m_export_with_time_knots_and_an_out_layer(pixel_model, tmp_path):  # noqa: F811
    """Per-time scalars (indexed by t on the device) and an fp32 out layer inside the bf16 network."""
    from ud2m.export import export_checkpoint
    from ud2m.priors.pixel import PixelDiffusionPrior
    from ud2m.unfolded import UnfoldedSampler

    model = UnfoldedSampler(
        PixelDiffusionPrior.from_pretrained(pixel_model), num_blocks=2, lora_rank=2, time_knots=3,
        tied_scalars=False, train_out_layer=True,
    )  # fmt: skip
    operator = {"class_path": "ud2m.operators.blur.UniformBlur", "init_args": {"size": 5}, "sigma_y": 0.01}
    out = export_checkpoint(
        model, tmp_path / "export", base_model={"family": "pixel_eps_unet", "id_or_path": str(pixel_model)},
        operator={**operator, "generator": None}, sampler={"num_steps": 2, "eta": 1.0},
        training=dict(steps=0, seed=0, l2_weighting="none", loss_weights={}, lpips_backbone="vgg", data="none"),
    )  # fmt: skip
    on_device, on_cpu = both_devices(tmp_path, input="skimage:camera", checkpoint=str(out))
    assert on_device["nfe"] == 2 * 2
    assert_same_restoration(on_device, on_cpu)


def test_ld_rps_blind(pixel_model, tmp_path):  # noqa: F811
    observation = tmp_path / "dark.png"
    save_image(load_image("skimage:astronaut")[..., 200:232, 200:232] * 0.5 - 0.5, observation)
    kwargs = dict(input=str(observation), simulate=False, model=str(pixel_model))
    on_device = run(tmp_path / "device", device=DEVICE, method=LDRPS("low-light", num_steps=4, free_chains=1), **kwargs)
    row = on_device["images"][0]
    assert row["nfe"] == row["cost_nfe"] > 0 and math.isfinite(row["psi_fit_psnr"])


def test_lvtino_on_pixel_priors(tmp_path):
    from test_video_cli import OPERATOR, T

    from ud2m.operators.presets import instantiate_operator
    from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior
    from ud2m.video_io import read_video

    video = save_tiny_pixel_pipeline(tmp_path / "video", tiny_pixel_prior(in_channels=3 * T, seed=3))
    image = save_tiny_pixel_pipeline(tmp_path / "image", tiny_pixel_prior(seed=4))
    clip = tmp_path / "clip"
    for t, frame in enumerate(read_video("clips:val:0")[:T, :, 8:24, 8:24]):
        save_image(frame, clip / f"frame_{t:04d}.png")
    kwargs = dict(input=str(clip), model=str(video), operator=instantiate_operator(OPERATOR), sigma_y=0.01, crop=None)
    on_device, on_cpu = both_devices(
        tmp_path, method=LVTINO(image_model=str(image), schedule="B", frame_batch=4), **kwargs
    )
    assert_same_restoration(on_device, on_cpu)


def test_lvtino_on_the_wan_video_prior():
    """The flow-matching video prior (tiny Wan, bf16 on CUDA as §1.4 prescribes) inside lvtino on the device."""
    from ud2m.operators import measure
    from ud2m.operators.presets import load_preset
    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import tiny_unet, tiny_vae
    from ud2m.priors.tiny_video import tiny_video_flow_prior
    from ud2m.solvers.lvtino import lvtino

    device = torch.device(DEVICE)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    video = tiny_video_flow_prior(max_sequence_length=8).to(device)
    video.net.to(dtype)
    scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    image = LatentConsistencyPrior(tiny_unet("lcm"), tiny_vae(), scheduler_config=scheduler).to(device)
    op = load_preset("lvtino/A").operator.to(device)
    x = torch.rand(1, 3, 25, 32, 32, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    y = measure(op, x, 0.001, torch.Generator().manual_seed(1))
    cond_image = torch.randn(1, 8, image.net.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    from ud2m.priors.base import TextCondition

    out, info = lvtino(
        video, image, op, y, schedule="A", sigma_y=0.001, cond_video="a video",
        cond_image=TextCondition(prompt_embeds=cond_image.to(device)), generator=torch.Generator().manual_seed(0),
        return_info=True,
    )  # fmt: skip
    assert out.device.type == device.type and out.shape == x.shape and torch.isfinite(out).all()
    assert (info["nfe_video"], info["nfe_image"]) == (5, 4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_two_training_steps(precision):
    import lightning.pytorch as pl
    from test_training import make_data, make_model, trainable_state

    model = make_model()
    before = trainable_state(model)
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=2, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, make_data())
    after = trainable_state(model)
    assert trainer.global_step == 2 and model.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in after.values())
    assert [k for k in before if torch.equal(before[k].cpu(), after[k].cpu())] == []
