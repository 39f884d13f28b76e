"""Distortion metrics, data consistency, LPIPS reporting rules and Welford statistics (docs/method.md §8, §10.1-10.2).

Expected values are derived: PSNR from its formula on a constructed pair, SSIM(x, x) = 1 and agreement with
scikit-image's reference implementation on real photographs, r² m ~ χ²_m for the data-consistency ratio at the true
image, and Welford against torch.mean/std over the concatenated samples.
"""

import math

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import chi2
from skimage.metrics import structural_similarity

from ud2m.metrics import LPIPSMetric, Welford, data_consistency, psnr, ssim, video_psnr_global
from ud2m.operators import GaussianBlur, RandomInpainting, measure, sigma_internal
from ud2m.perceptual import backbone_path, make_lpips


def photos(size: int = 96) -> torch.Tensor:
    """Three real RGB photographs from skimage, centre crops on [-1, 1], (3, 3, size, size) float64."""
    import skimage.data

    out = []
    for name in ("astronaut", "chelsea", "coffee"):
        img = getattr(skimage.data, name)()[::2, ::2]
        h, w = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out.append(torch.from_numpy(img[h : h + size, w : w + size].copy()).permute(2, 0, 1))
    return torch.stack(out).double() / 255 * 2 - 1


def distort(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Blur + noise + a contrast change: SSIM well below 1 and values outside [-1, 1] (exercising the clamp)."""
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return 1.1 * blurred + 0.1 * torch.randn(x.shape, generator=rng, dtype=x.dtype)


# --------------------------------------------------------------------------------------------- PSNR


def test_psnr_formula_and_identical_images():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)  # 0.5 on [0, 1]
    x_hat = x.clone()
    x_hat[0, :, :2] = 0.2  # +0.1 on [0, 1] on half the pixels: mse = 0.01 / 2
    x_hat[1] = 5.0  # clamps to 1 on [0, 1]: mse = 0.25
    expected = torch.tensor([10 * math.log10(1 / 0.005), 10 * math.log10(1 / 0.25)])
    assert torch.allclose(psnr(x_hat, x), expected.float())
    same = psnr(x, x)
    assert torch.isfinite(same).all() and (same >= 100).all()
    assert torch.equal(psnr(torch.full_like(x, 3.0), torch.ones_like(x)), same)  # clamped to equal images


def test_video_psnr_per_frame_and_global():
    x = torch.zeros(1, 1, 2, 4, 4, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[:, :, 0] += 0.2  # frame 0: +0.1 on [0, 1], mse 0.01
    x_hat[:, :, 1] += 0.4  # frame 1: +0.2 on [0, 1], mse 0.04
    per_frame = (10 * math.log10(1 / 0.01) + 10 * math.log10(1 / 0.04)) / 2
    global_ = 10 * math.log10(1 / 0.025)
    assert torch.allclose(psnr(x_hat, x), torch.tensor([per_frame]))
    assert torch.allclose(video_psnr_global(x_hat, x), torch.tensor([global_]))
    assert global_ < per_frame  # Jensen: log of the mean MSE vs mean of the logs
    with pytest.raises(ValueError, match="videos"):
        video_psnr_global(x_hat[:, :, 0], x[:, :, 0])


# --------------------------------------------------------------------------------------------- SSIM


def test_ssim_of_identical_images_is_one(rng, device):
    x = (torch.rand(2, 3, 24, 20, generator=rng, dtype=torch.float64) * 2 - 1).to(device)
    assert torch.allclose(ssim(x, x).cpu(), torch.ones(2), atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8], x[..., :8])


def test_ssim_matches_skimage_on_real_photos(rng, device):
    x = photos()
    x_hat = distort(x, rng)
    ours = ssim(x_hat.to(device), x.to(device)).cpu()
    a = ((x_hat + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    b = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ref = [
        structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2
        )
        for i in range(len(a))
    ]
    assert (ours < 0.95).all()  # a real distortion, not a trivial agreement near 1
    assert np.allclose(ours.numpy(), ref, atol=1e-5)
    gray = ssim(x_hat[:, :1], x[:, :1])
    ref_gray = [
        structural_similarity(
            a[i, ..., 0], b[i, ..., 0], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
        )
        for i in range(len(a))
    ]
    assert np.allclose(gray.numpy(), ref_gray, atol=1e-5)


def test_video_ssim_is_mean_of_frame_ssims(rng):
    x = photos(32)  # (3, 3, 32, 32): three frames of one clip
    video = x.transpose(0, 1).unsqueeze(0)  # (1, C, T, H, W)
    video_hat = distort(x, rng).transpose(0, 1).unsqueeze(0)
    frames = ssim(video_hat[0].transpose(0, 1), video[0].transpose(0, 1))  # (T,)
    assert torch.allclose(ssim(video_hat, video), frames.mean().reshape(1))


# --------------------------------------------------------------------------------------------- data consistency


@pytest.mark.parametrize("op_kind", ["inpainting", "blur"])
def test_data_consistency_at_the_truth_follows_chi_square(op_kind, rng):
    B, sigma_y = 4, torch.tensor([0.01, 0.02, 0.05, 0.1])
    op = RandomInpainting(32, p_obs=0.3, seed=1) if op_kind == "inpainting" else GaussianBlur(sigma=1.0, size=7)
    x = photos(32).float().repeat(2, 1, 1, 1)[:B]
    y = measure(op, x, sigma_y, generator=rng)
    r = data_consistency(op, x, y, sigma_internal(sigma_y))
    m = op.num_observed(y).double()
    if op_kind == "inpainting":
        assert (m < 0.5 * y[0].numel()).all()  # only the observed entries count
    # r² m = ‖n‖² ~ χ²_m: a two-sided 1e-6 interval per sample
    lo = torch.from_numpy(chi2.ppf(1e-6, m.numpy()) / m.numpy())
    hi = torch.from_numpy(chi2.ppf(1 - 1e-6, m.numpy()) / m.numpy())
    assert ((r.double() ** 2 > lo) & (r.double() ** 2 < hi)).all(), (r, lo, hi)
    assert (data_consistency(op, x + 0.3, y, sigma_internal(sigma_y)) > hi.sqrt()).all()  # an inconsistent x


# --------------------------------------------------------------------------------------------- LPIPS metric


@pytest.fixture
def squeeze_home(monkeypatch, tmp_path):
    """TORCH_HOME holding a random squeezenet1_1 state dict under torchvision's file name (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("network access attempted"))
    with torch.device("meta"):
        shapes = torchvision.models.squeezenet1_1().state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in shapes.items()}
    path = backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return tmp_path


def test_lpips_metric_reports_only_real_backbones(squeeze_home, rng):
    metric = LPIPSMetric("squeeze")
    assert metric.backbone == "squeeze"
    x = photos(64).float()
    x_hat = distort(x, rng).float()
    value = metric(x_hat, x)
    assert value.shape == (3,) and (value > 0).all()
    assert torch.allclose(metric(x, x), torch.zeros(3), atol=1e-7)
    direct = metric.perceptual.net(x_hat.clamp(-1, 1), x, normalize=False).flatten()  # inputs on [-1, 1], clamped
    assert torch.allclose(value, direct, rtol=1e-5)
    video = torch.stack([x, x_hat], dim=2)  # (B, C, T=2, H, W): mean of the per-frame values
    assert torch.allclose(metric(video, torch.stack([x, x], dim=2)), value / 2, rtol=1e-5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fallback = make_lpips("squeeze", allow_random_backbone=True)
    assert fallback.random_backbone is False  # the squeeze weights exist here, so nothing random is built


def test_lpips_metric_refuses_random_backbone(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"squeezenet1_1-b8a52dc0\.pth"):
        LPIPSMetric("squeeze")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        metric = LPIPSMetric(perceptual=make_lpips("squeeze", allow_random_backbone=True))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="random"):
        metric(x, x)


# --------------------------------------------------------------------------------------------- Welford


def test_welford_equals_mean_and_unbiased_std(rng):
    samples = torch.randn(7, 2, 3, 5, 5, generator=rng, dtype=torch.float64) * 3 + 1  # (S, B, C, H, W)
    one_by_one, chunked = Welford(), Welford()
    for s in samples:
        one_by_one.update(s)
    chunked.update(samples[:3].movedim(0, 1), sample_dim=1)
    chunked.update(samples[3])
    chunked.update(samples[4:], sample_dim=0)
    for acc in (one_by_one, chunked):
        assert acc.count == 7
        assert torch.allclose(acc.mean, samples.mean(0))
        assert torch.allclose(acc.std, samples.std(0, unbiased=True))
    single = Welford()
    single.update(samples[0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        single.std
    with pytest.raises(ValueError, match="differs"):
        single.update(samples[0, :1])
