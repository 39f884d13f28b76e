"""Checkpoint export and reload (docs/method.md §9): exact round trips for a tiny pixel prior saved as a local
diffusers folder (peft injection path) and a tiny latent prior (``UNet2DConditionModel.load_lora_adapter`` path),
the base-model hash (weights only, configs excluded) refusing different weights, clear manifest errors, and no
unpickling anywhere in the load path.
"""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ud2m.export import (
    MANIFEST_NAME,
    base_model_hash,
    export_checkpoint,
    load_checkpoint,
    read_manifest,
)
from ud2m.operators import KernelBlur, measure
from ud2m.priors.lora import lora_state_dict
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.priors.tiny import save_tiny_pixel_pipeline
from ud2m.unfolded import UnfoldedSampler, sample_ud2m

KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
OPERATOR = {"class_path": "ud2m.operators.blur.KernelBlur", "init_args": {"kernel": "3x3 binomial"}}
TRAINING = {
    "steps": 10,
    "seed": 0,
    "l2_weighting": "none",
    "loss_weights": {"l2": 1.0, "lpips": 0.1, "adv": 0.1, "gp": 10.0},
    "lpips_backbone": "vgg",
    "data": "synthetic",
}


def perturb(model, rng):
    """Non-trivial LoRA (A and B) and scalars, so that a round trip that loses anything changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=rng))


def export(model, out, base, **kwargs):
    return export_checkpoint(
        model,
        out,
        base_model={"family": "pixel_eps_unet", "id_or_path": str(base)},
        operator={**OPERATOR, "sigma_y": 0.05, "generator": None},
        sampler={"num_steps": 2, "eta": 1.0},
        training=TRAINING,
        **kwargs,
    )


def pixel_problem(rng):
    op = KernelBlur(KERNEL)
    y = measure(op, torch.rand(2, 3, 16, 16, generator=rng) * 2 - 1, 0.05, rng)
    return op, y


def run(model, op, y, cond=None):
    return sample_ud2m(
        model, op, y, 0.05, x_shape=y.shape, num_steps=2, cond=cond, generator=torch.Generator().manual_seed(9)
    )


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    """A tiny pixel pipeline folder, a trained-looking model on it and its export (shared, read-only)."""
    root = tmp_path_factory.mktemp("pixel")
    base = save_tiny_pixel_pipeline(root / "base")
    model = UnfoldedSampler(PixelDiffusionPrior.from_pretrained(base), num_blocks=2, tied_scalars=False)
    perturb(model, torch.Generator().manual_seed(0))
    return base, model, export(model, root / "export", base)


def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the load path must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("variant", ["default", "out_layer_nearest"])
def test_pixel_round_trip_is_exact(variant, pixel_export, tmp_path, rng, monkeypatch):
    base, model, out = pixel_export
    if variant != "default":
        model = UnfoldedSampler(
            PixelDiffusionPrior.from_pretrained(base), num_blocks=2, renoise="nearest", train_out_layer=True
        )
        perturb(model, rng)
        out = export(model, tmp_path / "export", base, ema=True)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {MANIFEST_NAME, "scalars.safetensors", "adapter/pytorch_lora_weights.safetensors"}
    assert expected | {"adapter/adapter_config.json"} <= files
    assert ("out_layer.safetensors" in files) == (variant != "default")
    manifest = read_manifest(out)
    assert manifest["base_model"]["sha256"] == base_model_hash(base)
    assert manifest["adapter"]["ema"] == (variant != "default")
    assert set(load_file(str(out / "scalars.safetensors"))) == set(manifest["scalars"]["names"])
    lora_keys = set(lora_state_dict(model.prior))
    assert set(load_file(str(out / "adapter/pytorch_lora_weights.safetensors"))) == {f"unet.{k}" for k in lora_keys}
    assert set(load_file(str(out / "adapter/adapter_model.safetensors"))) == {
        f"base_model.model.{k}" for k in lora_keys
    }
    op, y = pixel_problem(rng)
    fresh = PixelDiffusionPrior.from_pretrained(base)
    with monkeypatch.context() as m:
        no_unpickling(m)
        loaded = load_checkpoint(out, fresh)
    assert loaded.renoise == model.renoise and loaded.log_lambda.shape == model.log_lambda.shape
    assert torch.equal(run(loaded, op, y), run(model, op, y))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_old_manifest_without_noise_rule_loads_with_the_reference_rule(tmp_path, rng):
    """Exports written before the §7.1 revision carry no ``block.noise_rule``: they were trained with the
    reference rule (σ_e = rho_sigma_scale·σ_n), and load with it, sampling exactly as before."""
    base = save_tiny_pixel_pipeline(tmp_path / "base")
    model = UnfoldedSampler(PixelDiffusionPrior.from_pretrained(base), num_blocks=2, noise_rule="reference")
    perturb(model, rng)
    out = export(model, tmp_path / "export", base)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["block"]["noise_rule"] == "reference"
    for key in ("noise_rule", "sigma_cap", "renoise_cap"):  # what an export of the previous release holds
        del manifest["block"][key]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    loaded = load_checkpoint(out, PixelDiffusionPrior.from_pretrained(base))
    assert loaded.noise_rule == "reference" and loaded.rho_sigma_scale == model.rho_sigma_scale
    op, y = pixel_problem(rng)
    assert torch.equal(run(loaded, op, y), run(model, op, y))


def test_time_knot_scalars_round_trip(tmp_path, rng):
    base = save_tiny_pixel_pipeline(tmp_path / "base")
    model = UnfoldedSampler(PixelDiffusionPrior.from_pretrained(base), num_blocks=2, tied_scalars=False, time_knots=3)
    perturb(model, rng)
    out = export(model, tmp_path / "export", base)
    assert read_manifest(out)["block"]["time_knots"] == 3
    loaded = load_checkpoint(out, PixelDiffusionPrior.from_pretrained(base))
    assert loaded.log_sigma_z_scale.shape == (2, 3) and torch.equal(loaded.log_rho_scale, model.log_rho_scale)
    op, y = pixel_problem(rng)
    assert torch.equal(run(loaded, op, y), run(model, op, y))


def test_out_layer_and_time_knots_export_samples_on_a_half_precision_prior(tmp_path, rng):
    """sample.py loads the prior in bf16 on CUDA (§1.4) and then the export: the fp32 out layer inside the bf16
    network takes its input cast (it raised a dtype error), and the result stays close to the fp32 one."""
    base = save_tiny_pixel_pipeline(tmp_path / "base")
    model = UnfoldedSampler(
        PixelDiffusionPrior.from_pretrained(base), num_blocks=2, time_knots=3, tied_scalars=False, train_out_layer=True
    )
    perturb(model, rng)
    out = export(model, tmp_path / "export", base)
    half = load_checkpoint(out, PixelDiffusionPrior.from_pretrained(base, dtype=torch.bfloat16))
    assert half.prior.dtype == torch.bfloat16 and half.prior.net.conv_out.weight.dtype == torch.float32
    assert half.log_lambda.device == half.prior.device
    op, y = pixel_problem(rng)
    full, x_half = run(model, op, y), run(half, op, y)
    assert x_half.dtype == torch.float32 and torch.isfinite(x_half).all()
    assert (x_half - full).abs().mean() < 0.05  # bf16 rounding of two blocks' network calls, on [-1, 1]


def test_hash_mismatch_is_refused_unless_allowed(pixel_export, tmp_path, rng):
    base, model, out = pixel_export
    copy = shutil.copytree(base, tmp_path / "base")
    (copy / "scheduler" / "scheduler_config.json").write_text(
        (copy / "scheduler" / "scheduler_config.json").read_text() + "\n"
    )
    assert base_model_hash(copy) == base_model_hash(base)  # configs are not part of the hash
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    save_file(state, str(weights))
    assert base_model_hash(copy) != base_model_hash(base)
    with pytest.raises(ValueError, match="hash mismatch") as err:
        load_checkpoint(out, PixelDiffusionPrior.from_pretrained(copy), base_path=copy)
    assert "allow_hash_mismatch" in str(err.value) and MANIFEST_NAME in str(err.value)
    loaded = load_checkpoint(out, PixelDiffusionPrior.from_pretrained(copy), base_path=copy, allow_hash_mismatch=True)
    op, y = pixel_problem(rng)
    assert not torch.equal(run(loaded, op, y), run(model, op, y))  # different base weights, same adapter


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["block"].pop("num_blocks"), "'block.num_blocks'"),
        (lambda m: m.pop("sampler"), "'sampler'"),
        (lambda m: m["base_model"].pop("sha256"), "'base_model.sha256'"),
        (lambda m: m["block"]["warm_start"].pop("s0"), "'block.warm_start.s0'"),
        (lambda m: m.update(format="something-else"), "'format'"),
        (lambda m: m.update(format_version=99), "'format_version'"),
    ],
)
def test_manifest_errors_name_the_file_and_the_key(edit, message, pixel_export, tmp_path):
    _, _, out = pixel_export
    broken = shutil.copytree(out, tmp_path / "broken")
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    edit(manifest)
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(broken)
    assert str(broken / MANIFEST_NAME) in str(err.value)
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        read_manifest(tmp_path)


def test_export_refuses_an_incomplete_manifest(pixel_export, tmp_path):
    _, model, _ = pixel_export
    with pytest.raises(ValueError, match=r"'training\.lpips_backbone'"):
        export_checkpoint(
            model,
            tmp_path / "x",
            base_model={"family": "pixel_eps_unet", "id_or_path": "owner/name", "sha256": None},
            operator={**OPERATOR, "sigma_y": 0.05, "generator": None},
            sampler={"num_steps": 2, "eta": 1.0},
            training={k: v for k, v in TRAINING.items() if k != "lpips_backbone"},
        )
    assert not (tmp_path / "x").exists()


def test_latent_lora_round_trip_uses_load_lora_adapter(tmp_path, rng, monkeypatch):
    from diffusers import UNet2DConditionModel

    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    base = write_tiny_pipeline(tmp_path / "base", "lcm")
    prior = LatentConsistencyPrior.from_pretrained(base)
    model = UnfoldedSampler(prior, num_blocks=2)
    perturb(model, rng)
    out = export_checkpoint(
        model,
        tmp_path / "export",
        base_model={"family": "latent_consistency", "id_or_path": str(base)},
        operator={**OPERATOR, "sigma_y": 0.05, "generator": None},
        sampler={"num_steps": 2, "eta": 1.0},
        training=TRAINING,
    )
    assert read_manifest(out)["block"]["latent_split_prox"] is True
    calls = []
    original = UNet2DConditionModel.load_lora_adapter

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "load_lora_adapter", spy)
    fresh = LatentConsistencyPrior.from_pretrained(base)
    loaded = load_checkpoint(out, fresh)
    assert len(calls) == 1 and calls[0]["use_safetensors"] is True
    for key, value in lora_state_dict(prior).items():
        assert torch.equal(lora_state_dict(fresh)[key], value), key
    op = KernelBlur(KERNEL)
    x_t = torch.randn(2, 4, 16, 16, generator=rng)
    y = measure(op, torch.rand(2, 3, 32, 32, generator=rng) * 2 - 1, 0.05, rng)
    cond = prior.encode_prompt("")
    outputs = [
        m(x_t, torch.tensor([200.0, 700.0]), y, op, 0.05, cond=cond, generator=torch.Generator().manual_seed(2))
        for m in (model, loaded)
    ]
    assert torch.equal(outputs[0], outputs[1])


def _x0_with_net(prior, net, z_t, t, cond=None):
    """The prior's x̂0 (as sample.py computes it) with its network replaced by ``net``."""
    prior.net = net
    with torch.inference_mode():
        return prior.predict_x0(z_t, t, cond)


def test_standard_loaders_load_the_exported_lora(pixel_export, tmp_path, rng):
    """Issue [api] 6: diffusers' ``pipe.load_lora_weights`` (latent, SD family) and peft's
    ``PeftModel.from_pretrained`` (pixel and latent) load the export's adapter/ and give load_checkpoint's x̂0."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    from ud2m.priors.latent import LatentConsistencyPrior
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    base, _, out = pixel_export
    loaded = load_checkpoint(out, PixelDiffusionPrior.from_pretrained(base))
    x_t, t = torch.randn(2, 3, 16, 16, generator=rng), torch.tensor([100.0, 600.0])
    expected = _x0_with_net(loaded.prior, loaded.prior.net, x_t, t)
    plain = PixelDiffusionPrior.from_pretrained(base)
    assert not torch.equal(_x0_with_net(plain, plain.net, x_t, t), expected)  # the LoRA changes x̂0
    peft_net = PeftModel.from_pretrained(PixelDiffusionPrior.from_pretrained(base).net, str(out / "adapter"))
    torch.testing.assert_close(_x0_with_net(plain, peft_net, x_t, t), expected, rtol=0, atol=1e-5)  # float32 order

    latent_base = write_tiny_pipeline(tmp_path / "latent", "lcm")
    model = UnfoldedSampler(LatentConsistencyPrior.from_pretrained(latent_base), num_blocks=2)
    perturb(model, rng)
    latent_out = export_checkpoint(
        model,
        tmp_path / "latent_export",
        base_model={"family": "latent_consistency", "id_or_path": str(latent_base)},
        operator={**OPERATOR, "sigma_y": 0.05, "generator": None},
        sampler={"num_steps": 2, "eta": 1.0},
        training=TRAINING,
    )
    loaded = load_checkpoint(latent_out, LatentConsistencyPrior.from_pretrained(latent_base))
    z_t = torch.randn(2, 4, 16, 16, generator=rng)
    cond = loaded.prior.encode_prompt("")
    expected = _x0_with_net(loaded.prior, loaded.prior.net, z_t, t, cond)
    pipe = DiffusionPipeline.from_pretrained(latent_base)
    pipe.load_lora_weights(str(latent_out / "adapter"))
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    prior = LatentConsistencyPrior.from_pretrained(latent_base)
    torch.testing.assert_close(_x0_with_net(prior, pipe.unet, z_t, t, cond), expected, rtol=0, atol=1e-6)
    peft_net = PeftModel.from_pretrained(
        LatentConsistencyPrior.from_pretrained(latent_base).net, str(latent_out / "adapter")
    )
    torch.testing.assert_close(_x0_with_net(prior, peft_net, z_t, t, cond), expected, rtol=0, atol=1e-6)


def test_adapters_written_before_the_prefixed_layout_still_load(pixel_export, tmp_path, rng):
    """Exports written before issue [api] 6 hold raw peft keys (no ``unet.`` prefix, no adapter_model file)."""
    base, model, out = pixel_export
    old = tmp_path / "old"
    shutil.copytree(out, old)
    weights = old / "adapter" / "pytorch_lora_weights.safetensors"
    config = (old / "adapter" / "adapter_config.json").read_text()  # the old header: the unprefixed LoraConfig
    state = {k.removeprefix("unet."): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt", "lora_adapter_metadata": config})
    (old / "adapter" / "adapter_model.safetensors").unlink()
    op, y = pixel_problem(rng)
    loaded = load_checkpoint(old, PixelDiffusionPrior.from_pretrained(base))
    assert torch.equal(run(loaded, op, y), run(model, op, y))
