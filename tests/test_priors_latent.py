"""LatentConsistencyPrior (docs/method.md §3.1, §3.2(a)) on tiny random SD / LCM / SDXL parts: parity with diffusers'
LatentConsistencyModelPipeline, SD/SDXL text conditioning, the ε/v/sample -> x0 conversions and the LCM boundary
condition derived by hand, shape rules, save/load round trips, LCM-LoRA fusing and the loader's error messages."""

import json
import shutil

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from ud2m.priors.base import TextCondition
from ud2m.priors.latent import LatentConsistencyPrior, check_tokenizer, sdxl_time_ids
from ud2m.priors.tiny_latent import (
    tiny_pipeline,
    tiny_vae,
    write_tiny_lora,
    write_tiny_pipeline,
    write_tiny_unet_weights,
    write_tiny_vae,
)

PROMPT = "a cat & a dog baking"
H = W = 32  # image size; tiny VAE factor 2 -> 16x16 latents


@pytest.fixture(scope="module")
def lcm_pipe():
    return tiny_pipeline("lcm")


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("lcm") / "tiny-lcm", "lcm")


def _alphas_cumprod(pipe, t: int) -> torch.Tensor:
    """ᾱ_t from diffusers' own scheduler table, in float64 (independent of our VPSchedule)."""
    return pipe.scheduler.alphas_cumprod[t].double()


# ---------------------------------------------------------------------------------------------------- LCM parity
def test_lcm_sampler_reproduces_diffusers_pipeline(lcm_pipe):
    """4-step multistep consistency sampling written from predict_x0/add_noise/decode equals the LCM pipeline."""
    captured = {}

    def keep_denoised(pipe, i, t, kwargs):
        captured["denoised"] = kwargs["denoised"]
        return {}

    g = torch.Generator().manual_seed(7)
    image = lcm_pipe(
        PROMPT,
        num_inference_steps=4,
        height=H,
        width=W,
        generator=g,
        output_type="pt",
        callback_on_step_end=keep_denoised,
        callback_on_step_end_tensor_inputs=["denoised"],
    ).images
    timesteps = lcm_pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == 4

    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe, boundary="lcm", guidance_scale=8.5)
    cond = prior.encode_prompt(PROMPT)
    g = torch.Generator().manual_seed(7)
    z = torch.randn((1, 4, H // 2, W // 2), generator=g)  # pipeline: randn_tensor(shape, generator), init sigma 1
    for i, t in enumerate(timesteps):
        x0 = prior.predict_x0(z, float(t), cond)
        if i + 1 < len(timesteps):  # LCMScheduler.step: fresh noise from the same generator, none at the last step
            z = prior.add_noise(x0, float(timesteps[i + 1]), torch.randn(x0.shape, generator=g))
    torch.testing.assert_close(x0, captured["denoised"], rtol=1e-4, atol=1e-5)
    ours = (prior.decode(x0) / 2 + 0.5).clamp(0, 1)  # the pipeline's "pt" postprocessing
    torch.testing.assert_close(ours, image, rtol=1e-4, atol=1e-5)
    assert prior.nfe == 4


def test_guidance_embedding_and_prompt_match_pipeline(lcm_pipe):
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe, guidance_scale=8.5)
    cond = prior.encode_prompt([PROMPT, "x"])
    w = torch.tensor(8.5 - 1).repeat(2)
    expected = lcm_pipe.get_guidance_scale_embedding(w, embedding_dim=lcm_pipe.unet.config.time_cond_proj_dim)
    assert torch.equal(cond.timestep_cond, expected)
    prompt_embeds, _ = lcm_pipe.encode_prompt([PROMPT, "x"], "cpu", 1, False)
    assert torch.equal(cond.prompt_embeds, prompt_embeds)
    assert cond.pooled is None and cond.time_ids is None


# ---------------------------------------------------------------------------------------------------- x0 identities
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_conversion_by_hand(lcm_pipe, prediction_type):
    """boundary="none": x̂0 from a direct UNet call with ᾱ_t from diffusers' table (§3.1 formulas)."""
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe, boundary="none", prediction_type=prediction_type)
    cond = prior.encode_prompt(PROMPT)
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    t = 499
    out = lcm_pipe.unet(
        z, t, encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1), timestep_cond=cond.timestep_cond.expand(2, -1)
    ).sample.double()
    ab, z64 = _alphas_cumprod(lcm_pipe, t), z.double()
    expected = {
        "epsilon": (z64 - (1 - ab).sqrt() * out) / ab.sqrt(),
        "v_prediction": ab.sqrt() * z64 - (1 - ab).sqrt() * out,
        "sample": out,
    }[prediction_type]
    torch.testing.assert_close(prior.predict_x0(z, t, cond).double(), expected, rtol=1e-5, atol=1e-5)


def test_lcm_boundary_condition(lcm_pipe):
    """c_skip(0) = 1, c_out(0) = 0 ⇒ predict_x0(z, 0) = z; elsewhere c_skip z + c_out x̂0 with c's derived here."""
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe, boundary="lcm").to(torch.float64)
    plain = LatentConsistencyPrior.from_pipeline(lcm_pipe, boundary="none").to(torch.float64)
    cond = prior.encode_prompt(PROMPT)
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(prior.predict_x0(z, 0.0, cond), z)
    for t in (0.03, 3.7, 20.0):
        kt, sd = 10.0 * t, 0.5  # κ = timestep_scaling, σ_d = sigma_data
        c_skip, c_out = sd**2 / (kt**2 + sd**2), kt / (kt**2 + sd**2) ** 0.5
        t64 = torch.full((2,), t, dtype=torch.float64)  # a Python float would be rounded to float32
        expected = c_skip * z + c_out * plain.predict_x0(z, t64, cond)
        torch.testing.assert_close(prior.predict_x0(z, t64, cond), expected, rtol=1e-12, atol=1e-12)
    lcm_pipe.to(torch.float32)  # the parts are shared with the module fixture


def test_time_forms_batch_independence_and_nfe(lcm_pipe):
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe)
    cond = prior.encode_prompt(PROMPT)
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    prior.reset_nfe()
    a = prior.predict_x0(z, 499.0, cond)
    assert prior.nfe == 1
    b = prior.predict_x0(z, torch.full((2,), 499.0), cond)
    assert prior.nfe == 2
    assert torch.equal(a, b)
    mixed = prior.predict_x0(z, torch.tensor([999.0, 259.0]), cond)
    assert prior.nfe == 3
    torch.testing.assert_close(mixed[:1], prior.predict_x0(z[:1], 999.0, cond), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:], prior.predict_x0(z[1:], 259.0, cond), rtol=1e-4, atol=1e-4)
    assert prior.nfe == 5
    prior.encode(torch.zeros(1, 3, H, W))
    assert prior.nfe == 5  # the VAE is not an NFE
    with pytest.raises(ValueError, match="TextCondition"):
        prior.predict_x0(z, 499.0, None)


def test_embeddings_only_condition_matches_encode_prompt(lcm_pipe):
    """A TextCondition holding only prompt_embeds gets the guidance embedding added inside (LATINO-PRO path)."""
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe)
    cond = prior.encode_prompt(PROMPT)
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    bare = TextCondition(cond.prompt_embeds)
    assert torch.equal(prior.predict_x0(z, 759.0, bare), prior.predict_x0(z, 759.0, cond))


# ---------------------------------------------------------------------------------------------------- VAE and shapes
def test_encode_decode_definition_and_shapes(lcm_pipe):
    prior = LatentConsistencyPrior.from_pipeline(lcm_pipe)
    x = torch.rand((2, 3, H, W), generator=torch.Generator().manual_seed(5)) * 2 - 1
    z0 = prior.encode(x)
    assert z0.shape == prior.latent_shape(tuple(x.shape)) == (2, 4, H // 2, W // 2)
    sf = lcm_pipe.vae.config.scaling_factor
    assert torch.equal(z0, lcm_pipe.vae.encode(x).latent_dist.mean * sf)  # posterior mean: deterministic
    assert torch.equal(prior.encode(x), z0)
    x_hat = prior.decode(z0)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert torch.equal(x_hat, lcm_pipe.vae.decode(z0 / sf).sample)  # raw decoder output: not clamped
    sliced = LatentConsistencyPrior.from_pipeline(lcm_pipe, vae_slicing=True)  # one sample at a time: exact
    torch.testing.assert_close(sliced.decode(z0), x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sliced.encode(x), z0, rtol=1e-4, atol=1e-5)
    LatentConsistencyPrior.from_pipeline(lcm_pipe)  # switch slicing off again on the shared VAE
    assert all(type(p) is AttnProcessor2_0 for p in prior.net.attn_processors.values())  # SDPA
    with pytest.raises(ValueError, match="H=33, W=32"):
        prior.check_shape((1, 3, 33, 32))
    with pytest.raises(ValueError, match="3 image channels"):
        prior.latent_shape((1, 1, 32, 32))


# ---------------------------------------------------------------------------------------------------- SDXL
def test_sdxl_conditioning_and_direct_unet_call(sdxl_pipe):
    prior = LatentConsistencyPrior.from_pipeline(sdxl_pipe, boundary="none")
    assert prior.is_sdxl
    cond = prior.encode_prompt([PROMPT, "x"], image_size=(H, W))
    pe, _, pooled, _ = sdxl_pipe.encode_prompt([PROMPT, "x"], device="cpu", do_classifier_free_guidance=False)
    assert cond.prompt_embeds.shape == (2, 16, 32 + 48) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.prompt_embeds, pe) and torch.equal(cond.pooled, pooled)
    assert cond.timestep_cond is None

    z = torch.randn((2, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(6))
    t = 749
    time_ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)
    eps = sdxl_pipe.unet(
        z, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample.double()
    ab = _alphas_cumprod(sdxl_pipe, t)
    expected = (z.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
    torch.testing.assert_close(prior.predict_x0(z, t, cond).double(), expected, rtol=1e-5, atol=1e-5)
    # time_ids derived from the latent size when the condition has none
    no_ids = TextCondition(cond.prompt_embeds, pooled=cond.pooled)
    assert torch.equal(prior.predict_x0(z, t, no_ids), prior.predict_x0(z, t, cond))
    assert torch.equal(sdxl_time_ids(H, W, 2), time_ids)


def test_sdxl_dmd2_layout_loads_and_round_trips(tmp_path):
    root = write_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    weights = write_tiny_unet_weights(tmp_path / "dmd2" / "dmd2_sdxl_4step_unet_fp16.bin", seed=11)
    vae_dir = write_tiny_vae(tmp_path / "vae-fp16-fix", seed=12)
    prior = LatentConsistencyPrior.from_sdxl_dmd2(str(root), unet_weights=str(weights), vae=str(vae_dir))
    assert prior.boundary == "none" and prior.is_sdxl
    state = torch.load(weights, weights_only=True)
    for k, v in prior.net.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    vae_ref = tiny_vae(scaling_factor=0.13025, seed=12)  # what write_tiny_vae wrote: the override was used
    assert torch.equal(prior.vae.encoder.conv_in.weight, vae_ref.encoder.conv_in.weight)
    cond = prior.encode_prompt(PROMPT)
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(8))
    x = torch.rand((1, 3, H, W), generator=torch.Generator().manual_seed(9))
    saved = prior.save_pretrained(tmp_path / "saved")
    again = LatentConsistencyPrior.from_pretrained(saved)
    assert again.boundary == "none"
    assert torch.equal(again.predict_x0(z, 499.0, again.encode_prompt(PROMPT)), prior.predict_x0(z, 499.0, cond))
    assert torch.equal(again.encode(x), prior.encode(x))


# ---------------------------------------------------------------------------------------------------- loading
def test_from_pretrained_round_trip(lcm_folder, tmp_path):
    prior = LatentConsistencyPrior.from_pretrained(lcm_folder)
    ref = LatentConsistencyPrior.from_pipeline(tiny_pipeline("lcm"))  # same seeds -> same weights
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(10))
    x = torch.rand((1, 3, H, W), generator=torch.Generator().manual_seed(11)) * 2 - 1
    out = prior.predict_x0(z, 259.0, prior.encode_prompt(PROMPT))
    assert torch.equal(out, ref.predict_x0(z, 259.0, ref.encode_prompt(PROMPT)))
    saved = prior.save_pretrained(tmp_path / "saved")
    again = LatentConsistencyPrior.from_pretrained(saved)
    assert torch.equal(again.predict_x0(z, 259.0, again.encode_prompt(PROMPT)), out)
    assert torch.equal(again.decode(again.encode(x)), prior.decode(prior.encode(x)))
    pipe = LatentConsistencyModelPipeline.from_pretrained(saved)  # the saved folder is a valid diffusers pipeline
    assert torch.equal(pipe.unet.conv_in.weight, prior.net.conv_in.weight)


def test_network_dtype_is_configurable(lcm_folder):
    prior = LatentConsistencyPrior.from_pretrained(lcm_folder, dtype=torch.bfloat16)
    ref = LatentConsistencyPrior.from_pretrained(lcm_folder)
    assert prior.dtype == torch.bfloat16 and ref.dtype == torch.float32
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(12))
    out = prior.predict_x0(z, 499.0, prior.encode_prompt(PROMPT))
    assert out.dtype == torch.float32
    expected = ref.predict_x0(z, 499.0, ref.encode_prompt(PROMPT))
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    assert prior.decode(out).dtype == torch.float32


def test_lcm_lora_fuses_like_diffusers(tmp_path):
    root = write_tiny_pipeline(tmp_path / "sd15", "sd")
    lora = write_tiny_lora(tmp_path / "lcm-lora", seed=3)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    prior = LatentConsistencyPrior.from_lcm_lora(str(root), str(lora))
    assert prior.boundary == "lcm"
    assert not any("lora" in k for k in prior.net.state_dict())
    pipe = StableDiffusionPipeline.from_pretrained(root)
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(13))
    emb = torch.randn((1, 16, 32), generator=torch.Generator().manual_seed(14))
    base = pipe.unet(z, 499, encoder_hidden_states=emb).sample
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    fused = pipe.unet(z, 499, encoder_hidden_states=emb).sample
    assert not torch.allclose(fused, base, atol=1e-4)  # the LoRA does change the UNet
    assert torch.equal(prior.net(z, 499, encoder_hidden_states=emb).sample, fused)


def test_missing_folder_and_files_are_named(lcm_folder, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LatentConsistencyPrior.from_pretrained(missing)
    with pytest.raises(OSError, match="not-a/real-model"):  # a hub id, offline in tests
        LatentConsistencyPrior.from_pretrained("not-a/real-model")
    broken = tmp_path / "broken"
    shutil.copytree(lcm_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken/unet.*diffusion_pytorch_model"):
        LatentConsistencyPrior.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights\.safetensors"):
        LatentConsistencyPrior.from_pretrained(lcm_folder, lora=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dmd2\.bin"):
        LatentConsistencyPrior.from_pretrained(lcm_folder, unet_weights=tmp_path / "dmd2.bin")


def test_two_token_tokenizer_is_detected(lcm_folder, tmp_path):
    from transformers import CLIPTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    degraded = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert len(degraded) == 2
    with pytest.raises(ValueError, match="only 2 tokens"):
        check_tokenizer(degraded, "somewhere")
    broken = tmp_path / "broken"
    shutil.copytree(lcm_folder, broken)
    shutil.rmtree(broken / "tokenizer")
    degraded.save_pretrained(broken / "tokenizer")
    with pytest.raises(ValueError, match=r"broken/tokenizer.*only 2 tokens"):
        LatentConsistencyPrior.from_pretrained(broken)
