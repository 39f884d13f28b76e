"""VideoFlowPrior (docs/method.md §3.2(c)) on tiny random Wan components: parity with diffusers' WanPipeline, the flow
x0 identity, shape rules, and the CausVid (original Wan layout) weight loader."""

import shutil

import pytest
import torch
from diffusers import WanPipeline

from ud2m.priors.base import TextCondition
from ud2m.priors.tiny_video import (
    tiny_video_flow_prior,
    tiny_wan_components,
    tiny_wan_transformer,
    write_tiny_wan_pipeline,
)
from ud2m.priors.video import VideoFlowPrior, convert_wan_original_to_diffusers, flow_shift
from ud2m.utils import append_dims, randn

PROMPT = "a cat & a dog  baking"
SEQ_LEN = 16


@pytest.fixture(scope="module")
def prior():
    return tiny_video_flow_prior(max_sequence_length=SEQ_LEN)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "tiny-wan")


# ---------------------------------------------------------------------------------------------------- original layout
# Independent inverse of the converter, written from the original Wan module names (Wan2.1 wan/modules/model.py).
_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_IN_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def to_original_layout(sd, prefix="model."):
    """Diffusers Wan state dict -> original Wan / CausVid layout (keys prefixed as in CausVid's wrapper)."""
    out = {}
    for key, v in sd.items():
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            if rest == "scale_shift_table":
                new = f"blocks.{n}.modulation"
            else:
                module, param = rest.rsplit(".", 1)
                new = f"blocks.{n}.{_IN_BLOCK[module]}.{param}"
        else:
            module, param = key.rsplit(".", 1)
            new = f"{_TOP[module]}.{param}"
        out[prefix + new] = v.clone()
    return out


# ---------------------------------------------------------------------------------------------------- pipeline parity
def test_matches_wan_pipeline(folder, rng):
    """Euler flow steps written from predict_x0 reproduce WanPipeline (guidance 1, same generator and timesteps)."""
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prior = VideoFlowPrior.from_pretrained(folder, max_sequence_length=SEQ_LEN)
    seed, num_steps, shape = 123, 3, (1, 3, 5, 32, 32)
    final = {}

    def keep_latents(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    ref = pipe(
        PROMPT,
        height=shape[3],
        width=shape[4],
        num_frames=shape[2],
        num_inference_steps=num_steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=SEQ_LEN,
        callback_on_step_end=keep_latents,
    ).frames  # (B, T, C, H, W) on [0, 1]
    timesteps = pipe.scheduler.timesteps  # the same grid for our loop
    assert len(timesteps) == num_steps

    cond = prior.encode_prompt(PROMPT)
    z = randn(prior.latent_shape(shape), torch.Generator().manual_seed(seed))
    sigmas = [float(t) / 1000 for t in timesteps] + [0.0]
    for k, t in enumerate(timesteps):
        x0_hat = prior.predict_x0(z, t, cond)
        v = (z - x0_hat) / sigmas[k]  # flow velocity recovered from x0_hat = z - sigma v
        z = z + (sigmas[k + 1] - sigmas[k]) * v
    assert prior.nfe == num_steps
    torch.testing.assert_close(z, final["latents"], rtol=1e-5, atol=1e-5)
    video = ((prior.decode(z) + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(video, ref, rtol=1e-5, atol=1e-5)


def test_encode_prompt_matches_pipeline(folder, prior):
    pipe = WanPipeline.from_pretrained(folder)
    ref, _ = pipe.encode_prompt([PROMPT, "x"], do_classifier_free_guidance=False, max_sequence_length=SEQ_LEN)
    prior = VideoFlowPrior.from_pretrained(folder, max_sequence_length=SEQ_LEN)
    cond = prior.encode_prompt([PROMPT, "x"])
    assert cond.prompt_embeds.shape == (2, SEQ_LEN, prior.net.config.text_dim)
    torch.testing.assert_close(cond.prompt_embeds, ref)
    assert (cond.prompt_embeds[1, 2:] == 0).all()  # "x" + </s>: padding rows are zeroed


# ---------------------------------------------------------------------------------------------------- flow identities
def test_predict_x0_is_flow_identity(prior, rng):
    z_t = randn((2, 16, 2, 4, 4), rng)
    t = torch.tensor([757.0, 125.5])
    cond = prior.encode_prompt(PROMPT)  # batch 1, expanded inside
    v_hat = prior.net(
        hidden_states=z_t, timestep=t, encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1), return_dict=False
    )[0]
    expected = z_t - append_dims(t / 1000, 5) * v_hat
    torch.testing.assert_close(prior.predict_x0(z_t, t, cond), expected, rtol=0, atol=1e-6)


def test_float_and_batch_time_agree_and_nfe(prior, rng):
    z_t = randn((2, 16, 2, 2, 2), rng, dtype=torch.float64)
    cond = prior.encode_prompt([PROMPT, "x"])
    prior.reset_nfe()
    a = prior.predict_x0(z_t, 500.0, cond)
    b = prior.predict_x0(z_t, torch.full((2,), 500.0, dtype=torch.float64), cond)
    assert a.dtype == torch.float64
    assert torch.equal(a, b)
    assert prior.reset_nfe() == 2


def test_schedule_and_add_noise(prior, rng):
    t = torch.tensor([0.0, 125.0, 757.0, 999.0], dtype=torch.float64)
    a_t, b_t = prior.scales(t)
    torch.testing.assert_close(a_t, 1 - t / 1000)
    torch.testing.assert_close(b_t, t / 1000)
    torch.testing.assert_close(prior.t_of_sigma(prior.sigma(t)), t)
    z0, eps = randn((4, 16, 2, 2, 2), rng, dtype=torch.float64), randn((4, 16, 2, 2, 2), rng, dtype=torch.float64)
    sigma_fm = append_dims(t / 1000, 5)
    torch.testing.assert_close(prior.add_noise(z0, t, eps), (1 - sigma_fm) * z0 + sigma_fm * eps)


def test_add_noise_follows_the_latent_device(device, rng):
    """The flow-matching schedule has no tables: the scales live where the latent and its time live (on CUDA a
    CPU copy of a_t made ``add_noise`` fail; found by benchmarks/video_fullsize.py on an H100)."""
    prior = tiny_video_flow_prior(max_sequence_length=SEQ_LEN).to(device)
    z0, eps = randn((2, 16, 2, 2, 2), rng, device=device), randn((2, 16, 2, 2, 2), rng, device=device)
    a_t, b_t = prior.scales(torch.tensor([250.0, 750.0], device=device))
    assert a_t.device.type == device.type and b_t.device.type == device.type
    sigma_fm = append_dims(torch.tensor([0.25, 0.75], device=device), 5)
    torch.testing.assert_close(prior.add_noise(z0, 250.0, eps)[:1], ((1 - sigma_fm) * z0 + sigma_fm * eps)[:1])
    expected = (1 - sigma_fm) * z0 + sigma_fm * eps
    torch.testing.assert_close(prior.add_noise(z0, torch.tensor([250.0, 750.0]), eps), expected)  # CPU times


def test_half_precision_transformer_keeps_diffusers_float32_modules(folder, rng):
    """``from_pretrained(dtype=bfloat16)`` keeps Wan's norms and modulation tables in float32 (diffusers'
    ``_keep_in_fp32_modules``); the first parameter is such a table, yet the prior must feed the network bf16."""
    prior = VideoFlowPrior.from_pretrained(folder, dtype=torch.bfloat16, load_text_encoder=False)
    assert prior.net.scale_shift_table.dtype == torch.float32  # diffusers kept it
    assert prior.dtype == torch.bfloat16
    cond = prior.encode_prompt(prompt_embeds=randn((1, SEQ_LEN, prior.net.config.text_dim), rng))
    z_t = randn((1, 16, 2, 4, 4), rng)
    x0 = prior.predict_x0(z_t, 500.0, cond)
    reference = VideoFlowPrior.from_pretrained(folder, load_text_encoder=False).predict_x0(z_t, 500.0, cond)
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, reference, rtol=0, atol=0.1)  # bf16 rounding of a unit-scale output


def test_shifted_timesteps(prior):
    """t_k/1000 = shift u/(1 + (shift-1) u) inverts to the uniform grid u_k = 1 - k/N."""
    num_steps, shift = 4, prior.shift
    s = prior.timesteps(num_steps).double() / 1000
    u = s / (shift - (shift - 1) * s)
    torch.testing.assert_close(u, 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps, rtol=0, atol=1e-6)
    assert torch.equal(flow_shift(torch.tensor([0.0, 1.0]), shift), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------------- VAE and shapes
def test_encode_decode_shapes_and_normalisation(prior, rng):
    x = torch.rand((2, 3, 5, 16, 16), generator=rng) * 2 - 1
    z0 = prior.encode(x)
    assert z0.shape == prior.latent_shape(x.shape) == (2, 16, 2, 2, 2)
    assert z0.dtype == torch.float32
    mean = torch.tensor(prior.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(prior.vae.config.latents_std).view(1, -1, 1, 1, 1)
    mu = prior.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z0 * std + mean, mu)
    x_rec = prior.decode(z0)
    assert x_rec.shape == x.shape and x_rec.dtype == torch.float32
    torch.testing.assert_close(x_rec, prior.vae.decode(mu).sample)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 6, 32, 32), r"T = 4k \+ 1.*T = 6"),
        ((1, 3, 5, 20, 32), r"multiples of 16.*H = 20"),
        ((1, 3, 5, 32, 24), r"multiples of 16.*W = 24"),
        ((1, 1, 5, 32, 32), r"expected 3 channels, got 1"),
        ((1, 3, 32, 32), r"\(B, C, T, H, W\)"),
    ],
)
def test_shape_errors(prior, shape, message):
    with pytest.raises(ValueError, match=message):
        prior.check_shape(shape)
    with pytest.raises(ValueError, match=message):
        prior.encode(torch.zeros(shape))


def test_latent_errors(prior):
    cond = prior.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match=r"h, w multiples of 2"):
        prior.predict_x0(torch.zeros(1, 16, 2, 3, 4), 500.0, cond)
    with pytest.raises(ValueError, match="TextCondition"):
        prior.predict_x0(torch.zeros(1, 16, 2, 4, 4), 500.0, None)
    with pytest.raises(ValueError, match=r"expected \(B, L, 32\)"):
        prior.encode_prompt(prompt_embeds=torch.zeros(1, 8, 7))


def test_prompt_embeds_pass_through(prior, rng):
    embeds = randn((1, 8, 32), rng)
    cond = prior.encode_prompt(prompt_embeds=embeds)
    assert isinstance(cond, TextCondition) and cond.prompt_embeds is embeds


def test_degraded_tokenizer_is_refused():
    parts = tiny_wan_components()

    class TwoTokens:
        def __len__(self):
            return 2

    parts["tokenizer"] = TwoTokens()
    with pytest.raises(ValueError, match="2 tokens"):
        VideoFlowPrior(**parts)


# ---------------------------------------------------------------------------------------------------- CausVid weights
def test_converter_agrees_with_diffusers_single_file():
    """Our key map equals diffusers' own original->diffusers conversion (an independent implementation)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = tiny_wan_transformer().state_dict()
    original = to_original_layout(sd, prefix="")
    ours = convert_wan_original_to_diffusers(original)
    theirs = convert_wan_transformer_to_diffusers(dict(original))
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(ours[k] is original[to_original_key] for k, to_original_key in zip(sd, original))


def test_causvid_weights_round_trip(folder, tmp_path, rng):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        distilled = tiny_wan_transformer()
    path = tmp_path / "model.pt"
    torch.save({"generator": to_original_layout(distilled.state_dict())}, path)
    loaded = VideoFlowPrior.from_pretrained(folder, transformer_weights=path, max_sequence_length=SEQ_LEN)
    base = VideoFlowPrior.from_pretrained(folder, max_sequence_length=SEQ_LEN)
    direct = VideoFlowPrior(distilled, base.vae, base.text_encoder, base.tokenizer, max_sequence_length=SEQ_LEN)
    expected = distilled.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.net.state_dict().items())
    z_t, cond = randn((1, 16, 2, 4, 4), rng), base.encode_prompt(PROMPT)
    out = loaded.predict_x0(z_t, 600.0, cond)
    # identical weights; outputs only to float tolerance (weights read from files are not 64-byte aligned, so the
    # CPU kernels may take another SIMD path)
    torch.testing.assert_close(out, direct.predict_x0(z_t, 600.0, cond), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, base.predict_x0(z_t, 600.0, cond))  # the weights really changed


def test_causvid_weights_errors(folder, tmp_path):
    sd = to_original_layout(tiny_wan_transformer().state_dict())
    bad = dict(sd, **{"model.blocks.0.self_attn.extra.weight": torch.zeros(1)})
    torch.save({"generator": bad}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match=r"not in the original Wan layout.*self_attn\.extra\.weight"):
        VideoFlowPrior.from_pretrained(folder, transformer_weights=tmp_path / "unknown.pt")
    missing = {k: v for k, v in sd.items() if k != "model.blocks.1.ffn.2.bias"}
    torch.save({"generator": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['blocks\.1\.ffn\.net\.2\.bias'\]"):
        VideoFlowPrior.from_pretrained(folder, transformer_weights=tmp_path / "missing.pt")
    torch.save(
        {"generator": {"model.head.modulation": torch.zeros(1, 2, 5)}, "step": torch.tensor(3)}, tmp_path / "x.pt"
    )
    with pytest.raises(ValueError, match="missing key"):
        VideoFlowPrior.from_pretrained(folder, transformer_weights=tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        VideoFlowPrior.from_pretrained(folder, transformer_weights=tmp_path / "nope.pt")


class _Payload:
    pass


def test_checkpoint_with_objects_is_not_unpickled(folder, tmp_path):
    torch.save({"generator": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="tensors-only"):
        VideoFlowPrior.from_pretrained(folder, transformer_weights=tmp_path / "evil.pt")


def test_missing_folder_and_files(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        VideoFlowPrior.from_pretrained(tmp_path / "does-not-exist")
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"broken.*vae/config\.json"):
        VideoFlowPrior.from_pretrained(broken)
    shutil.copy(folder / "vae" / "config.json", broken / "vae" / "config.json")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        VideoFlowPrior.from_pretrained(broken)
