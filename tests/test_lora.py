"""LoRA helpers (docs/method.md §7.3, §9): B = 0 start equals the base exactly, frozen base, only LoRA trainable,
raw-peft safetensors save -> load round trips for UNet2DModel (inject_adapter_in_model) and UNet2DConditionModel
(load_lora_adapter), attention and conv targets together.
"""

import json

import pytest
import torch

from ud2m.priors.lora import attach_lora, load_lora, lora_state_dict, save_lora, trainable_parameters
from ud2m.priors.tiny import tiny_pixel_prior
from ud2m.priors.tiny_latent import tiny_unet

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_out"]


def tiny_cond_unet(seed=0):
    """environment.md's tiny UNet2DConditionModel (the LCM kind of the tiny-model factory)."""
    return tiny_unet("lcm", seed=seed)


def cond_inputs(rng):
    z = torch.randn(2, 4, 16, 16, generator=rng)
    t = torch.tensor([10.0, 700.0])
    return z, t, torch.randn(2, 7, 32, generator=rng), torch.randn(2, 32, generator=rng)


def cond_forward(unet, z, t, emb, tcond):
    return unet(z, t, encoder_hidden_states=emb, timestep_cond=tcond).sample


def perturb_lora(net, rng):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=rng))


def check_frozen(net):
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for n, p in net.named_parameters() if "lora_" in n)


def test_pixel_lora_identity_at_init_train_and_round_trip(tmp_path, rng):
    prior = tiny_pixel_prior()
    z = torch.randn(2, 3, 16, 16, generator=rng)
    t = torch.tensor([50.0, 600.0])
    base = prior.predict_x0(z, t)
    attach_lora(prior, rank=4, alpha=1.5, target_modules=TARGETS)
    assert torch.equal(prior.predict_x0(z, t), base)  # B = 0
    check_frozen(prior.net)
    lora = [n for n, _ in prior.net.named_parameters() if "lora_" in n]
    assert len(trainable_parameters(prior, prior.net)) == len(lora)  # deduplicated across modules
    # every targeted module got an A and a B; gradients reach LoRA only
    prior.predict_x0(z, t).square().mean().backward()
    assert all(p.grad is not None for p in trainable_parameters(prior))
    perturb_lora(prior.net, rng)
    adapted = prior.predict_x0(z, t)
    assert not torch.allclose(adapted, base)
    save_lora(prior, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 1.5 and sorted(config["target_modules"]) == sorted(TARGETS)
    fresh = tiny_pixel_prior()
    assert torch.equal(fresh.predict_x0(z, t), base)
    load_lora(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.predict_x0(z, t), adapted)
    check_frozen(fresh.net)


def test_cond_unet_lora_round_trip_through_load_lora_adapter(tmp_path, rng):
    unet = tiny_cond_unet()
    inputs = cond_inputs(rng)
    base = cond_forward(unet, *inputs)
    attach_lora(unet, rank=4, alpha=1.5, target_modules=TARGETS)
    assert torch.equal(cond_forward(unet, *inputs), base)
    check_frozen(unet)
    perturb_lora(unet, rng)
    adapted = cond_forward(unet, *inputs)
    assert not torch.allclose(adapted, base)
    save_lora(unet, tmp_path / "adapter")
    fresh = tiny_cond_unet()
    load_lora(fresh, tmp_path / "adapter")
    saved, loaded = lora_state_dict(unet), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and any("to_q" in k for k in saved) and any("conv_out" in k for k in saved)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(cond_forward(fresh, *inputs), adapted)  # alpha restored exactly (alpha != rank)
    check_frozen(fresh)


def test_errors(tmp_path):
    prior = tiny_pixel_prior()
    with pytest.raises(ValueError, match="init"):
        attach_lora(prior, init="ones")
    with pytest.raises(FileNotFoundError, match=r"adapter.*pytorch_lora_weights\.safetensors"):
        load_lora(prior, tmp_path / "adapter")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(prior, tmp_path / "adapter")
