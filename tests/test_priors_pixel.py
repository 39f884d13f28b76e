"""Pixel VP prior (docs/method.md §3.2b): DDIM parity with diffusers' DDIMPipeline using only predict_x0 and scales,
learned-variance and class-conditional UNets, from_pretrained round trips and clear errors for broken folders.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from ud2m.priors import ClassCondition, PixelDiffusionPrior
from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior, tiny_pixel_unet, tiny_scheduler_config


def ddim_sample(prior, x, timesteps):
    """DDIM with eta = 0 (Song et al. 2021, eq. 12) from the prior contract only; the step after t = 0 uses ᾱ = 1."""
    for k, t in enumerate(timesteps):
        x0_hat = prior.predict_x0(x, float(t))
        a_t, b_t = prior.scales(float(t))
        eps_hat = (x - a_t * x0_hat) / b_t
        if k + 1 == len(timesteps):
            return x0_hat
        a_prev, b_prev = prior.scales(float(timesteps[k + 1]))
        x = a_prev * x0_hat + b_prev * eps_hat
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_loop_reproduces_diffusers_ddim_pipeline(prediction_type):
    prior = tiny_pixel_prior(prediction_type=prediction_type, sample_size=16)
    scheduler = DDIMScheduler.from_config(prior.scheduler_config)
    pipe = DDIMPipeline(unet=prior.net, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(7)
    ref = pipe(batch_size=2, generator=gen, num_inference_steps=4, eta=0.0, output_type="np").images
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # diffusers' randn_tensor draw
    scheduler.set_timesteps(4)
    out = ddim_sample(prior, x_T, scheduler.timesteps.tolist())
    ours = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert prior.nfe == 4


def test_learned_variance_keeps_first_channels(rng):
    prior = tiny_pixel_prior(learned_variance=True)
    assert prior.net.config.out_channels == 6
    z = torch.randn(2, 3, 16, 16, generator=rng)
    t = torch.tensor([100.0, 600.0])
    eps_hat = prior.net(z, t).sample[:, :3]
    a_t, b_t = (v[:, None, None, None] for v in prior.scales(t))
    torch.testing.assert_close(prior.predict_x0(z, t), (z - b_t * eps_hat) / a_t)


def test_class_conditional_labels(rng):
    prior = tiny_pixel_prior(num_class_embeds=5)
    z = torch.randn(2, 3, 16, 16, generator=rng)
    one = prior.predict_x0(z, 300.0, ClassCondition(torch.tensor([2])))
    two = prior.predict_x0(z, 300.0, ClassCondition(torch.tensor([2, 2])))
    other = prior.predict_x0(z, 300.0, ClassCondition(torch.tensor([4, 4])))
    assert torch.equal(one, two) and not torch.allclose(one, other)
    assert torch.equal(prior.predict_x0(z, 300.0, torch.tensor([2, 2])), one)  # raw int64 labels are not cast
    with pytest.raises(ValueError, match="class-conditional"):
        prior.predict_x0(z, 300.0)


def test_shape_rules():
    prior = tiny_pixel_prior(block_out_channels=(16, 32, 32))
    assert prior.latent_shape((1, 3, 32, 24)) == (1, 3, 32, 24)
    with pytest.raises(ValueError, match="multiples of 4"):
        prior.check_shape((1, 3, 30, 32))
    with pytest.raises(ValueError, match="3 channels"):
        prior.check_shape((1, 1, 32, 32))


def test_bf16_network_returns_fp32(rng):
    prior = tiny_pixel_prior()
    ref = prior.predict_x0(torch.randn(1, 3, 16, 16, generator=rng), 500.0)
    prior.to(torch.bfloat16)
    out = prior.predict_x0(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), 500.0)
    assert prior.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert prior.schedule.alphas_cumprod.dtype == torch.float64  # tables never follow the network dtype
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.1  # same function at bf16 precision


def test_from_pretrained_pipeline_and_bare_folders_round_trip(tmp_path, rng):
    prior = tiny_pixel_prior(prediction_type="v_prediction")
    z = torch.randn(2, 3, 16, 16, generator=rng)
    t = torch.tensor([3.0, 777.5])
    ref = prior.predict_x0(z, t)
    folder = save_tiny_pixel_pipeline(tmp_path / "pipe", prior)
    loaded = PixelDiffusionPrior.from_pretrained(str(folder))
    assert loaded.prediction_type == "v_prediction"
    assert torch.equal(loaded.predict_x0(z, t), ref)
    # bare UNet folder + scheduler config given explicitly, then found next to the UNet
    prior.net.save_pretrained(tmp_path / "bare")
    config = tmp_path / "sched.json"
    config.write_text(json.dumps(prior.scheduler_config))
    assert torch.equal(
        PixelDiffusionPrior.from_pretrained(tmp_path / "bare", scheduler_config=config).predict_x0(z, t), ref
    )
    shutil.copy(config, tmp_path / "bare" / "scheduler_config.json")
    assert torch.equal(PixelDiffusionPrior.from_pretrained(tmp_path / "bare").predict_x0(z, t), ref)


def test_from_pretrained_errors_name_path_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PixelDiffusionPrior.from_pretrained(missing)
    folder = save_tiny_pixel_pipeline(tmp_path / "pipe")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"pipe.*scheduler_config\.json"):
        PixelDiffusionPrior.from_pretrained(folder)
    folder = save_tiny_pixel_pipeline(tmp_path / "pipe2")
    for f in (folder / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"unet.*diffusion_pytorch_model\.safetensors"):
        PixelDiffusionPrior.from_pretrained(folder)
    folder = save_tiny_pixel_pipeline(tmp_path / "pipe3")
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json.*malformed"):
        PixelDiffusionPrior.from_pretrained(folder)


def test_constructor_rejects_inconsistent_unet():
    unet = tiny_pixel_unet()
    unet.register_to_config(out_channels=5)
    with pytest.raises(ValueError, match="out_channels"):
        PixelDiffusionPrior(unet, tiny_scheduler_config())
