"""UD2M losses, the LPIPS factory and the conditional discriminator (docs/method.md §7.4, §7.5).

Every expected value is derived by hand: softplus(0) = log 2, SNR = ᾱ/(1-ᾱ), the gradient penalty of a linear
discriminator <w, x> is ‖w‖², LPIPS equals the package called with its documented ranges, and the discriminator's
parameter count follows from its layer shapes. No test downloads anything: torchvision's download function is
patched to fail, and "pretrained" backbones are random state dicts saved under torchvision's expected file name.
"""

import itertools
import logging
import math
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ud2m.discriminator import ConditionalDiscriminator, block_channels, default_num_blocks
from ud2m.losses import (
    UD2MLoss,
    adv_weight,
    discriminator_loss,
    energy_score,
    generator_adversarial,
    gradient_penalty,
    l2_consistency,
    l2_weight,
    lpips_loss,
)
from ud2m.perceptual import BACKBONE_FILES, backbone_path, make_lpips
from ud2m.utils import rand

LOG2 = math.log(2.0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and a download function that fails: any network attempt is a test failure."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path


def fake_backbone_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision state dict for ``vgg16``/``alexnet``/``squeezenet1_1``, small on disk.

    Feature (conv) weights are random; classifier weights (unused by LPIPS, 100 M entries for vgg16) are zero-stride
    views of one zero, so torch.save writes a single element for each.
    """
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("features"):
            state[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / max(1, v[0].numel()))
        else:
            state[k] = torch.zeros(()).expand(v.shape)
    return state


def seeded_random_lpips(net: str):
    with torch.random.fork_rng():  # lpips initialises from the global RNG; keep the test session's RNG untouched
        torch.manual_seed(0)
        return make_lpips(net, allow_random_backbone=True)


def photo_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A real photograph crop on [-1, 1] (B = 2) and a distorted copy (blur + offset)."""
    import skimage.data

    img = torch.from_numpy(skimage.data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 255
    x = torch.stack([img[:, :size, :size], img[:, 64 : 64 + size, 32 : 32 + size]]) * 2 - 1
    x_hat = (torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.1).clamp(-1, 1)
    return x_hat, x


# --------------------------------------------------------------------------------------------- L2


def test_l2_consistency_equals_pixel_mean():
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    x0_hat = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 2.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert torch.allclose(l2_consistency(x0_hat, x0), torch.tensor([1.0, 1.25]))  # (1+4)/4 = 1.25
    weight = torch.tensor([3.0, 0.5])
    assert torch.allclose(l2_consistency(x0_hat, x0, weight), torch.tensor([3.0, 0.625]))
    with pytest.raises(ValueError, match="shape"):
        l2_consistency(x0_hat, x0[:, :, :1])


def test_l2_weight_kinds():
    alpha_bar = torch.tensor([0.01, 0.5, 0.8, 0.9, 0.999], dtype=torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.equal(l2_weight(alpha_bar, "none"), torch.ones_like(alpha_bar))
    assert torch.allclose(l2_weight(alpha_bar, "snr"), snr)
    assert torch.allclose(l2_weight(alpha_bar, "snr")[1:3], torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert torch.allclose(l2_weight(alpha_bar, "min_snr"), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)))
    assert torch.allclose(l2_weight(alpha_bar, "min_snr", gamma=2.0)[2], torch.tensor(2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="kind must be one of"):
        l2_weight(alpha_bar, "snr+1")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        l2_weight(torch.tensor([0.5, 1.0]), "snr")


# --------------------------------------------------------------------------------------------- adversarial


def test_adversarial_losses_at_zero_logits_are_log2():
    zeros = torch.zeros(3)
    assert torch.allclose(generator_adversarial(zeros), torch.full((3,), LOG2))
    assert torch.allclose(discriminator_loss(zeros, zeros), torch.full((3,), LOG2))  # ½ log 2 + ½ log 2


def test_adversarial_losses_equal_their_formulas():
    d_real = torch.tensor([-3.0, 0.5, 4.0, 30.0], dtype=torch.float64)
    d_fake = torch.tensor([2.0, -1.0, 0.0, -30.0], dtype=torch.float64)
    expected_g = torch.log1p(torch.exp(-d_fake))
    expected_d = 0.5 * torch.log1p(torch.exp(-d_real)) + 0.5 * torch.log1p(torch.exp(d_fake))
    assert torch.allclose(generator_adversarial(d_fake).double(), expected_g, rtol=1e-6)
    assert torch.allclose(discriminator_loss(d_real, d_fake).double(), expected_d, rtol=1e-6)
    assert generator_adversarial(d_fake).shape == (4,)


class LinearD(nn.Module):
    """D(x, c) = <w, x>: ∇ₓD = w everywhere, so GP = ‖w‖² for every sample and every interpolate."""

    def __init__(self, shape, generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=generator))

    def forward(self, x, c):
        return (self.w * x).flatten(1).sum(1)


def test_gradient_penalty_of_linear_discriminator_is_norm_w_squared(rng):
    B, shape = 3, (2, 5, 4)
    D = LinearD(shape, rng)
    x0, x0_hat = torch.randn(B, *shape, generator=rng), torch.randn(B, *shape, generator=rng).requires_grad_(True)
    gp = gradient_penalty(D, x0, x0_hat, torch.zeros(B, *shape), generator=rng)
    w_sq = D.w.detach().pow(2).sum()
    assert gp.shape == (B,)
    assert torch.allclose(gp, w_sq.expand(B), rtol=1e-5)
    gp.sum().backward()  # create_graph=True: d/dw Σ_b ‖w‖² = 2 B w
    assert torch.allclose(D.w.grad, 2 * B * D.w.detach(), rtol=1e-5)
    assert x0_hat.grad is None  # sg(x̂0): no generator gradient through the penalty


class QuadraticD(nn.Module):
    """D(x, c) = ½‖x‖²: ∇ₓD(x̃) = x̃, so GP = ‖u x0 + (1-u) x̂0‖², which pins down the interpolation."""

    def forward(self, x, c):
        return 0.5 * x.pow(2).flatten(1).sum(1)


def test_gradient_penalty_uses_per_sample_interpolates(rng):
    B = 4
    x0, x0_hat = torch.randn(B, 1, 3, 3, generator=rng), torch.randn(B, 1, 3, 3, generator=rng)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    gp = gradient_penalty(QuadraticD(), x0, x0_hat, x0, generator=gens)
    u = rand((B,), [torch.Generator().manual_seed(10 + i) for i in range(B)]).view(B, 1, 1, 1)
    x_tilde = u * x0 + (1 - u) * x0_hat
    assert torch.allclose(gp, x_tilde.pow(2).flatten(1).sum(1), rtol=1e-5)
    assert not torch.allclose(gp, x0.pow(2).flatten(1).sum(1))  # u is not 1


# --------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_vgg():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", "/nonexistent-ud2m-torch-home")
        return seeded_random_lpips("vgg")


def test_backbone_file_names_match_torchvision():
    weights = torchvision.models
    urls = {
        "vgg": weights.VGG16_Weights.IMAGENET1K_V1.url,
        "alex": weights.AlexNet_Weights.IMAGENET1K_V1.url,
        "squeeze": weights.SqueezeNet1_1_Weights.IMAGENET1K_V1.url,
    }
    assert {k: Path(v).name for k, v in urls.items()} == BACKBONE_FILES


def test_make_lpips_without_weights_raises_naming_the_file(offline):
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth") as info:
        make_lpips("vgg")
    assert str(backbone_path("vgg")) in str(info.value)
    assert str(offline / "torch_home") in str(info.value)  # honours TORCH_HOME
    with pytest.raises(ValueError, match="backbone must be one of"):
        make_lpips("resnet")


def test_random_backbone_is_flagged_and_warned(offline, caplog):
    with caplog.at_level(logging.WARNING, logger="ud2m.perceptual"):
        p = seeded_random_lpips("squeeze")
    assert p.random_backbone is True and p.backbone == "squeeze"
    assert "RANDOM backbone" in caplog.text


def test_lpips_loss_identity_and_package_ranges(random_vgg):
    x_hat, x = photo_pair()
    loss = lpips_loss(random_vgg, x_hat, x)
    assert loss.shape == (2,) and (loss > 0).all()
    assert torch.allclose(lpips_loss(random_vgg, x, x), torch.zeros(2), atol=1e-7)
    pkg = random_vgg.net  # the lpips.LPIPS object itself
    assert torch.allclose(loss, pkg(x_hat, x, normalize=False).flatten(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(loss, pkg((x_hat + 1) / 2, (x + 1) / 2, normalize=True).flatten(), rtol=1e-4, atol=1e-6)
    # the range bug of the reference (feeding [0, 1] as if it were [-1, 1]) would be caught:
    assert not torch.allclose(loss, pkg((x_hat + 1) / 2, (x + 1) / 2, normalize=False).flatten(), rtol=1e-2)


def test_lpips_loss_grayscale_repeats_channels_and_is_differentiable(random_vgg):
    x_hat, x = photo_pair(32)
    g_hat, g = x_hat.mean(1, keepdim=True).requires_grad_(True), x.mean(1, keepdim=True)
    loss = lpips_loss(random_vgg, g_hat, g)
    assert torch.allclose(loss, random_vgg.net(g_hat.repeat(1, 3, 1, 1), g.repeat(1, 3, 1, 1)).flatten())
    loss.sum().backward()
    assert g_hat.grad is not None and g_hat.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in random_vgg.parameters())
    with pytest.raises(ValueError, match="1 or 3"):
        lpips_loss(random_vgg, x_hat[:, :2], x[:, :2])


def test_perceptual_stays_in_eval_mode(random_vgg):
    parent = nn.Sequential(random_vgg).train()
    assert not random_vgg.net.training  # the linear heads' dropout stays off
    x_hat, x = photo_pair(32)
    assert torch.equal(lpips_loss(random_vgg, x_hat, x), lpips_loss(random_vgg, x_hat, x))
    parent.eval()


def test_pretrained_path_loads_local_file_without_network(offline):
    state = fake_backbone_state("vgg16")
    path = backbone_path("vgg")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    p = make_lpips("vgg")
    assert p.random_backbone is False and p.backbone == "vgg"
    assert torch.equal(getattr(p.net.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(p.net.net.slice5, "28").weight, state["features.28.weight"])
    # the same file given as a local ``weights`` path (TORCH_HOME emptied) builds the same metric
    local = offline / "weights" / "my_vgg.pth"
    local.parent.mkdir()
    path.rename(local)
    q = make_lpips("vgg", weights=local)
    assert q.random_backbone is False
    x_hat, x = photo_pair(32)
    assert torch.equal(lpips_loss(p, x_hat, x), lpips_loss(q, x_hat, x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_lpips("vgg", weights=offline / "missing.pth")


# --------------------------------------------------------------------------------------------- discriminator


def conv_params(c_in: int, c_out: int) -> int:
    return c_in * c_out * 9 + c_out  # 3x3 weights + bias


@pytest.mark.parametrize(
    ("size", "C", "channels"),
    [(256, 3, [32, 64, 128, 256, 128, 64]), (32, 1, [32, 64, 128, 64]), (32, 3, [32, 64, 128, 64])],
)
def test_discriminator_layers_and_parameter_count(size, C, channels):
    L = len(channels) - 1  # spec §7.4: L = min(5, log2(min(H, W)) - 2)
    assert L == min(5, round(math.log2(size)) - 2)
    D = ConditionalDiscriminator(C, size, condition=("y",))  # the reference input [x, lift(y)]: 2C channels
    assert D.num_blocks == default_num_blocks((size, size)) == L
    assert block_channels(L) == channels
    expected = conv_params(2 * C, channels[0])
    expected += sum(conv_params(a, b) for a, b in itertools.pairwise(channels))
    expected += channels[-1] * (size // 2**L) ** 2 + 1  # flatten -> Linear -> one logit
    assert sum(p.numel() for p in D.parameters()) == expected
    if size == 256:
        assert 0.70e6 < expected < 0.80e6  # "≈ 0.76 M parameters at 256² RGB"


def test_discriminator_forward_shape_dtype_and_gradients(rng, device):
    D = ConditionalDiscriminator(3, (32, 48), condition=("y",)).to(device)
    x, c = torch.randn(4, 3, 32, 48, generator=rng).to(device), torch.randn(4, 3, 32, 48, generator=rng).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # D runs in fp32 under mixed precision (§1.4)
        logits = D(x.bfloat16(), c)
    assert logits.shape == (4,) and logits.dtype == torch.float32
    D(x, c).sum().backward()
    for name, p in D.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    c_low = c[:, :, ::2, ::2]  # a low-resolution lift(y) is resized bilinearly to x
    c_up = torch.nn.functional.interpolate(c_low, (32, 48), mode="bilinear", align_corners=False)
    assert torch.equal(D(x, c_low), D(x, c_up))


def test_discriminator_rejects_bad_shapes():
    D = ConditionalDiscriminator(3, 32)
    with pytest.raises(ValueError, match="x must be"):
        D(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="c must be"):
        D(torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="need min"):
        ConditionalDiscriminator(3, 32, num_blocks=5)


def test_spectral_norm_discriminator_runs_and_gp_trains_it(rng, device):
    D = ConditionalDiscriminator(1, 32, condition=("y",), spectral_norm=True).to(device)
    plain = ConditionalDiscriminator(1, 32, condition=("y",))
    assert sum(p.numel() for p in D.parameters()) == sum(p.numel() for p in plain.parameters())
    assert sum(1 for m in D.modules() if hasattr(m, "parametrizations")) == 1 + D.num_blocks + 1
    x0, x0_hat = torch.randn(2, 3, 1, 32, 32, generator=rng).to(device).unbind(0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        gp = gradient_penalty(D, x0, x0_hat, x0_hat, generator=rng)
    assert gp.dtype == torch.float32
    assert gp.shape == (3,) and torch.isfinite(gp).all()
    gp.sum().backward()  # second-order graph reaches every parameter of D ...
    for name, p in D.named_parameters():
        if name == "head.bias":  # ... except the last bias: ∇ₓD does not depend on it
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ud2m_loss_is_the_weighted_sum_of_its_terms():
    """UD2MLoss (§7.5) = ω_l2·L_cons + ω_ps·LPIPS + ω_adv·softplus(−D), batch means, each term as its function gives
    it; the weighting multiplies the L2 per sample and its square root the energy score."""
    import functools

    g = torch.Generator().manual_seed(0)
    x0, a, b = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for _ in range(3))
    alpha_bar, logits = torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, generator=g)

    def lpips_stub(u, v):
        return (u - v).abs().flatten(1).mean(1)

    weighting = functools.partial(l2_weight, kind="min_snr")
    w = weighting(alpha_bar)
    loss, terms = UD2MLoss(omega_l2=2.0, omega_lpips=0.5, omega_adv=0.1, weighting=weighting, perceptual=lpips_stub)(
        a, b, x0, alpha_bar, logits
    )
    energy = energy_score(a, b, x0, w.sqrt()).mean()
    expected = 2.0 * energy + 0.5 * lpips_loss(lpips_stub, a, x0).mean() + 0.1 * generator_adversarial(logits).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["l2"], l2_consistency(a, x0, w).mean())
    l2_loss, l2_terms = UD2MLoss("l2", omega_l2=3.0)(a, None, x0, alpha_bar)
    torch.testing.assert_close(l2_loss, 3.0 * l2_consistency(a, x0).mean())
    assert set(l2_terms) == {"l2", "loss_g"}
    with pytest.raises(ValueError, match="second sample"):
        UD2MLoss()(a, None, x0, alpha_bar)
    with pytest.raises(ValueError, match="expected 'energy' or 'l2', got 'l1'"):
        UD2MLoss("l1")


def test_adversarial_weighting_nu_scales_each_sample_by_its_noise_variance():
    """adv_weighting="nu": the generator's adversarial term is mean((1 − ᾱ_t)·softplus(−D)); the other terms and the
    unweighted default are unchanged."""
    g = torch.Generator().manual_seed(1)
    x0, a, b = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1 for _ in range(3))
    alpha_bar, logits = torch.tensor([0.999, 0.5, 0.01]), torch.randn(3, generator=g)
    plain, plain_terms = UD2MLoss(omega_adv=0.1)(a, b, x0, alpha_bar, logits)
    weighted, terms = UD2MLoss(omega_adv=0.1, adv_weighting="nu")(a, b, x0, alpha_bar, logits)
    expected_adv = ((1 - alpha_bar) * generator_adversarial(logits)).mean()
    torch.testing.assert_close(terms["adv_g"], expected_adv)
    torch.testing.assert_close(weighted - 0.1 * expected_adv, plain - 0.1 * plain_terms["adv_g"])
    assert torch.equal(adv_weight(alpha_bar, "nu"), 1 - alpha_bar) and adv_weight(alpha_bar, "none") is None
    with pytest.raises(ValueError, match="adv_weighting"):
        UD2MLoss(adv_weighting="snr")


def test_minimax_generator_loss_is_log_one_minus_sigmoid_and_weighs_fakes_by_p_over_p_plus_q():
    """adv_loss="minimax": log(1 − σ(l)); its gradient in l is −σ(l) = −p/(p + q) at the optimal D (l = log p/q),
    the non-saturating one's −(1 − σ(l)) = −q/(p + q); UD2MLoss uses the chosen one; an unknown name is refused."""
    logits = torch.tensor([-4.0, -0.5, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    mm = generator_adversarial(logits, "minimax").double()
    torch.testing.assert_close(mm, torch.log(1 - torch.sigmoid(logits.detach())))
    (grad_mm,) = torch.autograd.grad(mm.sum(), logits)
    (grad_ns,) = torch.autograd.grad(generator_adversarial(logits).double().sum(), logits)
    p_over_pq = torch.sigmoid(logits.detach())
    torch.testing.assert_close(grad_mm, -p_over_pq.float().double())
    torch.testing.assert_close(grad_ns, -(1 - p_over_pq).float().double())
    g = torch.Generator().manual_seed(2)
    x0, a, b = (torch.rand(4, 1, 8, 8, generator=g) * 2 - 1 for _ in range(3))
    alpha_bar = torch.tensor([0.9, 0.5, 0.2, 0.01])
    _, terms = UD2MLoss(omega_adv=0.1, adv_loss="minimax")(a, b, x0, alpha_bar, logits.detach().float())
    torch.testing.assert_close(terms["adv_g"], -F.softplus(logits.detach().float()).mean())
    with pytest.raises(ValueError, match="adv_loss"):
        UD2MLoss(adv_loss="hinge")
    with pytest.raises(ValueError, match="adv_loss"):
        generator_adversarial(logits, "wasserstein")
