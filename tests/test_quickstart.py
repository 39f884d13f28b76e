"""The built-in default (issue [quickstart]): the shipped digits prior matches its data card and denoises real
digits, and configs/quickstart.yaml trains, exports and restores a held-out digit (a few steps here; the full run is
the README's main job)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from ud2m.export import base_model_hash
from ud2m.io import digits_names, load_image
from ud2m.metrics import psnr
from ud2m.priors.pixel import PixelDiffusionPrior

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "ud2m" / "assets" / "priors" / "digits"


def _load(name: str, attr: str):
    spec = importlib.util.spec_from_file_location(f"{name}_entry", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


def assert_denoises(prior, x: torch.Tensor, margin_db: float = 3.0) -> None:
    """At t = 100 and 300, one call of a trained denoiser beats the best estimate that ignores the prior, x_t / a
    (same noise, same images), by ``margin_db``."""
    g = torch.Generator().manual_seed(0)
    for t in (100, 300):
        x_t = prior.add_noise(x, float(t), torch.randn(x.shape, generator=g))
        with torch.inference_mode():
            x0_hat = prior.predict_x0(x_t, float(t))
        a, _ = prior.scales(float(t))
        assert psnr(x0_hat.clamp(-1, 1), x).mean() > psnr((x_t / a).clamp(-1, 1), x).mean() + margin_db


def _held_out_photo_crops() -> torch.Tensor:
    """Eight 64x64 crops of the two photographs held out of the photos prior's training (its data card)."""
    crops = []
    for name in ("coffee", "immunohistochemistry"):
        x = load_image(f"skimage:{name}", channels=3)
        H, W = x.shape[-2:]
        crops += [x[..., top : top + 64, left : left + 64] for top in (H // 4, H // 2) for left in (W // 4, W // 2)]
    return torch.cat(crops)


@pytest.mark.parametrize("name", ["digits", "photos"])
def test_shipped_prior_matches_its_data_card_and_denoises_held_out_images(name):
    asset = ROOT / "ud2m" / "assets" / "priors" / name
    card = json.loads((asset / "card.json").read_text())
    assert base_model_hash(asset) == card["sha256"]
    prior = PixelDiffusionPrior.from_pretrained(asset)
    if name == "digits":
        x = torch.cat([load_image(s, channels=1) for s in digits_names("val")[:16]])  # never seen in training
    else:
        x = _held_out_photo_crops()
    assert_denoises(prior, x)


def test_quickstart_trains_exports_and_restores_a_held_out_digit(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["sampler"]["init_args"]["prior"]["init_args"]["path_or_hub_id"] = str(ASSET)
    cfg["trainer"].update(max_steps=2, val_check_interval=2, default_root_dir=str(tmp_path / "runs"))
    cfg["trainer"]["callbacks"][-1]["init_args"]["out_dir"] = str(tmp_path / "export")
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(cfg))
    _load("train", "main")(["fit", "--config", str(tmp_path / "quickstart.yaml")])
    manifest = json.loads((tmp_path / "export" / "ud2m.json").read_text())
    assert manifest["operator"]["sigma_y"] == 0.05 and manifest["block"]["num_blocks"] == 3
    held_out = digits_names("val")[0]
    result = _load("sample", "sample")(
        input=held_out, checkpoint=str(tmp_path / "export"), output_dir=tmp_path / "restored", progress=False
    )
    row = result["images"][0]
    assert row["nfe"] == 9  # N x K = 3 x 3
    assert (tmp_path / "restored" / "digit_0023_restored.png").is_file() and row["psnr"] > 0


def test_shipped_clips_prior_matches_its_card_and_denoises_held_out_clips():
    """The offline video prior (issue [video]): its weights hash to its data card, and as a FrameStackedPrior it
    denoises held-out clips (clips:val, never seen in training) better than x_t / a, the estimate without a prior."""
    from ud2m.priors.stacked import FrameStackedPrior
    from ud2m.video_io import clip_names, read_video, stack_videos

    asset = ROOT / "ud2m" / "assets" / "priors" / "clips"
    card = json.loads((asset / "card.json").read_text())
    assert base_model_hash(asset) == card["sha256"]
    prior = FrameStackedPrior.from_pretrained(asset)
    x = stack_videos([read_video(name) for name in clip_names("val")[:4]])  # (4, 3, 9, 64, 64)
    assert_denoises(prior, x)
