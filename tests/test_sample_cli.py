"""sample.py / ud2m.cli.restore end to end on skimage's photographs: classical methods without a model, LATINO and
LATINO-PRO on a tiny latent model folder, DPS and DiffPIR on a tiny pixel folder, UD2M from an exported checkpoint;
outputs, metrics and NFE, resume, observation mode, and clear errors raised before anything is written."""

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ud2m.io import discover_images, load_image, save_image
from ud2m.methods import LDRPS, UD2M, Latino, LatinoPro, Method, Tikhonov, TotalVariation, Wiener
from ud2m.priors import model_family
from ud2m.solvers.weights import ConstantGamma
from ud2m.utils import seed_for

ROOT = Path(__file__).resolve().parents[1]
CROP = 32  # tiny models: 32² images (16² latents) keep each solver call in milliseconds


def _load_sample():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample


sample = _load_sample()


def run(output_dir, **kwargs):
    kwargs = {"crop": CROP, "progress": False, "lpips": None, **kwargs}
    return sample(output_dir=Path(output_dir), **kwargs)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny_lcm", "lcm")


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    from ud2m.priors.tiny import save_tiny_pixel_pipeline

    return save_tiny_pixel_pipeline(tmp_path_factory.mktemp("models") / "tiny_ddpm")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two 32² crops of skimage photographs as PNG files, plus a file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        x = load_image(f"skimage:{name}", channels=3)[..., 100 : 100 + CROP, 100 : 100 + CROP]
        save_image(x, folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---------------------------------------------------------------------------------------------- inputs
def test_discover_images_folder_glob_and_formats(photos, tmp_path, caplog):
    assert [Path(p).name for p in discover_images(photos)] == ["astronaut.png", "coffee.png"]  # notes.txt skipped
    assert [Path(p).name for p in discover_images(str(photos / "c*.png"))] == ["coffee.png"]
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgb16 = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "c16.tif", rgb16)
    # 16-bit values survive exactly: x = 2 v / 65535 - 1
    assert torch.allclose(load_image(tmp_path / "g16.png")[0, 0].double(), torch.from_numpy(gray16 / 65535 * 2 - 1))
    assert torch.allclose(
        load_image(tmp_path / "c16.tif")[0].double(), torch.from_numpy(rgb16 / 65535 * 2 - 1).permute(2, 0, 1)
    )
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    with caplog.at_level(logging.WARNING):
        assert load_image(tmp_path / "rgba.png").shape == (1, 3, 8, 8)
    assert "alpha channel dropped" in caplog.text


def test_model_family_is_detected_from_the_folder(latent_model, pixel_model, tmp_path):
    assert model_family(str(latent_model)) == "latent"
    assert model_family(str(pixel_model)) == "pixel"
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        model_family(str(tmp_path / "missing"))


def test_seeds_differ_per_image_and_sample():
    seeds = {seed_for(0, stream, i, s) for stream in (0, 1) for i in range(3) for s in range(3)}
    assert len(seeds) == 18 and all(0 <= v < 2**63 for v in seeds)


# ---------------------------------------------------------------------------------------------- classical methods
@pytest.mark.parametrize("method", ["wiener", "lift", "tikhonov", "tv"])
def test_classical_methods_without_a_model(method, tmp_path):
    result = run(tmp_path, input="skimage:astronaut", operator="ud2m/deblur_gaussian", method=method)
    row = result["images"][0]
    assert sorted(os.listdir(tmp_path)) == ["astronaut_restored.png", "astronaut_y.png", "metrics.csv", "metrics.json"]
    assert row["nfe"] == 0 and row["height"] == row["width"] == CROP and row["peak_memory_mb"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == result["images"]
    header, line = (tmp_path / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:2] == ["image", "source"] and line.startswith("astronaut,skimage:astronaut")
    assert np.isfinite([row["psnr"], row["ssim"], row["data_consistency"]]).all()


@pytest.mark.parametrize("preset, observed", [("ud2m/inpaint_random", 0.3), ("dps/inpaint_box", 1 - 0.5**2)])
def test_mask_presets_are_drawn_for_the_image_size(preset, observed, tmp_path):
    """A 256² preset's Bernoulli mask (30 % observed) or centred half-side box restores a 32² crop: the mask is drawn
    for 32² with the preset's seed, written as <stem>_mask.png, and identical in a second run."""
    first = run(tmp_path / "a", input="skimage:astronaut", operator=preset, method="tikhonov")
    mask = read_png(tmp_path / "a" / "astronaut_mask.png") / 255
    assert mask.shape == (CROP, CROP) and set(np.unique(mask)) == {0.0, 1.0}
    assert abs(mask.mean() - observed) < 0.1 and np.isfinite(first["images"][0]["psnr"])
    y = read_png(tmp_path / "a" / "astronaut_y.png")
    assert (y[mask == 0] == 0).all()  # y.png is y + A(1) - 1 (internal scale): -1, i.e. 0 on [0, 1], where unobserved
    run(tmp_path / "b", input="skimage:astronaut", operator=preset, method="tikhonov")
    assert (read_png(tmp_path / "b" / "astronaut_mask.png") == mask * 255).all()


def test_dps_differentiates_through_a_mask_drawn_for_the_image_size(pixel_model, tmp_path):
    """The mask of a 256² preset is drawn for the 32² crop while the inputs are checked (under inference_mode); DPS
    then differentiates through it, which inference tensors forbid ("cannot be saved for backward")."""
    result = run(
        tmp_path, input="skimage:astronaut", operator="dps/inpaint_random", model=str(pixel_model),
        method=Method.by_name("dps").__class__(num_steps=2),
    )  # fmt: skip
    assert result["images"][0]["nfe"] == 2 and np.isfinite(result["images"][0]["psnr"])


def test_a_fixed_mask_file_names_the_size_it_takes(tmp_path):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(mask)
    preset = tmp_path / "mask.yaml"
    preset.write_text(
        f"operator:\n  class_path: ud2m.operators.inpainting.Inpainting\n  init_args: {{mask: {mask}}}\nsigma_y: 0.01\n"
    )
    with pytest.raises(ValueError, match=r"astronaut.*fixed 48x48 asset and takes only 48x48 images, got 32x32"):
        run(tmp_path / "out", input="skimage:astronaut", operator=str(preset), method="tikhonov")
    assert not (tmp_path / "out").exists()


def test_lpips_is_reported_only_with_backbone_weights(tmp_path, monkeypatch):
    import torchvision

    weights = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), weights)
    common = dict(input="skimage:astronaut", operator="ud2m/deblur_gaussian", lpips="squeeze")
    with_weights = run(tmp_path / "a", lpips_weights=weights, **common)
    assert with_weights["run"]["lpips"] == "squeeze" and with_weights["images"][0]["lpips"] >= 0
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # an offline machine: no cached backbone
    without = run(tmp_path / "b", **common)
    assert without["run"]["lpips"].startswith("unavailable") and without["images"][0]["lpips"] is None


def test_observation_mode_reads_back_the_written_measurement(tmp_path):
    """y.png stores 2y₀₁ − 1 = y + A(1) − 1, so restoring from it with simulate=False is the simulated run up to the
    8-bit quantisation of y (≤ 1/255 on the internal scale), amplified at most by the Wiener gain
    max_s s/(s² + ε) = 1/(2√ε), plus the PNG rounding of both outputs."""
    simulated = run(tmp_path / "sim", input="skimage:astronaut", operator="ud2m/deblur_gaussian", method="wiener")
    observed = run(
        tmp_path / "obs",
        input=str(tmp_path / "sim" / "astronaut_y.png"),
        operator="ud2m/deblur_gaussian",
        method="wiener",
        simulate=False,
        reference="skimage:astronaut",
    )
    assert observed["images"][0]["image"] == "astronaut"  # "<stem>_y" observations keep the stem
    eps = (2 * 0.01) ** 2 / 0.5**2  # Wiener ε = σ_n²/s0² with the preset's σ_y = 0.01
    bound = (1 / (2 * np.sqrt(eps))) * (1 / 255) / 2 + 1 / 255  # [0, 1] file units, RMS
    a = read_png(tmp_path / "sim" / "astronaut_restored.png") / 255
    b = read_png(tmp_path / "obs" / "astronaut_restored.png") / 255
    assert np.sqrt(np.mean((a - b) ** 2)) <= bound
    assert abs(observed["images"][0]["psnr"] - simulated["images"][0]["psnr"]) < 1.0  # same reference crop


# ---------------------------------------------------------------------------------------------- diffusion methods
def test_latino_posterior_samples_on_a_tiny_latent_model(latent_model, photos, tmp_path):
    result = run(
        tmp_path / "b2",
        input=str(photos),
        operator="ud2m/deblur_gaussian",
        model=str(latent_model),
        num_samples=2,
        batch_size=2,
    )
    assert result["run"]["method"] == "latino"
    names = sorted(os.listdir(tmp_path / "b2"))
    assert names == sorted(
        [f"{s}_{k}.png" for s in ("astronaut", "coffee") for k in ("restored", "std", "y")]
        + ["metrics.csv", "metrics.json"]
    )
    for row in result["images"]:
        assert row["nfe"] == 8  # LCM's 8-step grid, the S = 2 chains run batched
        # each sample's prox output meets the discrepancy target ‖Ax − y‖ = √m σ_n, so by the triangle inequality
        # the mean of the samples has a ratio ≤ 1
        assert row["data_consistency"] <= 1 + 1e-3
    std = read_png(tmp_path / "b2" / "astronaut_std.png")
    assert Image.open(tmp_path / "b2" / "astronaut_std.png").mode.startswith("I;16") and 0 < std.max() <= 65535 / 2
    # per-chain generators: batch composition does not change the result
    run(tmp_path / "b1", input=str(photos), operator="ud2m/deblur_gaussian", model=str(latent_model), num_samples=2)
    for name in ("astronaut_restored.png", "coffee_std.png"):
        assert np.abs(read_png(tmp_path / "b1" / name) - read_png(tmp_path / "b2" / name)).max() <= 1


def test_jpeg_preset_uses_its_effective_noise_level(latent_model, tmp_path):
    """ud2m/jpeg_qf10 simulates without Gaussian noise (sigma_y 0) and solves with sigma_eff 0.01 (§2.6): LATINO's
    data weights stay finite (sigma_y 0 alone would make gamma infinite, undefined for the nonlinear prox)."""
    result = run(
        tmp_path / "jpeg", input="skimage:astronaut", operator="ud2m/jpeg_qf10", model=str(latent_model), crop=32
    )
    row = result["images"][0]
    assert row["nfe"] == 8 and np.isfinite(row["psnr"]) and row["data_consistency"] is not None


def test_latino_pro_calibrates_and_saves_a_reusable_prompt(latent_model, tmp_path):
    num_outer = 2
    result = run(
        tmp_path / "pro",
        input="skimage:astronaut",
        operator="ud2m/deblur_gaussian",
        model=str(latent_model),
        method=LatinoPro(num_outer=num_outer),
    )
    assert result["run"]["method"] == "latino_pro"
    assert result["images"][0]["nfe"] == num_outer * 4 + 8  # inner DMD2 grid x M + final 8-step run
    cond = tmp_path / "pro" / "astronaut_cond.safetensors"
    reused = run(
        tmp_path / "reuse",
        input="skimage:astronaut",
        operator="ud2m/deblur_gaussian",
        model=str(latent_model),
        prompt=str(cond),
    )
    assert reused["images"][0]["nfe"] == 8


@pytest.mark.parametrize("method", ["dps", "diffpir"])
def test_pixel_baselines_on_a_tiny_pixel_model(method, pixel_model, tmp_path):
    num_steps = 3
    result = run(
        tmp_path,
        input="skimage:camera",
        operator="ud2m/deblur_uniform",
        method=Method.by_name(method).__class__(num_steps=num_steps),
        model=str(pixel_model),
    )
    assert result["images"][0]["nfe"] == num_steps
    assert (tmp_path / "camera_restored.png").is_file() and result["run"]["model"] == str(pixel_model)


def test_latino_settings_set_its_grid_and_a_constant_data_step(pixel_model, tmp_path):
    """``Latino(timesteps=[...], weights=ConstantGamma(g))``: len(timesteps) NFE, and γ → ∞ makes the output
    data-consistent; the same settings as command-line options give the same run record."""
    common = dict(input="skimage:camera", operator="ud2m/deblur_uniform", model=str(pixel_model))
    grid = [500, 250, 60]
    hard = run(tmp_path / "hard", **common, method=Latino(timesteps=grid, weights=ConstantGamma(1e6)))
    soft = run(tmp_path / "soft", **common, method=Latino(timesteps=grid, weights=ConstantGamma(1e-3)))
    assert hard["images"][0]["nfe"] == soft["images"][0]["nfe"] == 3
    assert hard["images"][0]["data_consistency"] < 0.1 * soft["images"][0]["data_consistency"]
    assert hard["run"]["settings"] == {"timesteps": grid, "weights": "ConstantGamma(1000000.0)", "fill_holes_iters": 0}
    from ud2m.cli.sample import main

    args = ["--input", "skimage:camera", "--operator", "ud2m/deblur_uniform", "--model", str(pixel_model)]
    args += ["--method", "Latino", "--method.timesteps", "[500, 250, 60]", "--method.weights", "ConstantGamma"]
    args += ["--method.weights.gamma", "1e6", "--output_dir", str(tmp_path / "hard"), "--crop", str(CROP)]
    main([*args, "--lpips", "null", "--progress", "false"])  # resumes the run above: the same settings


def test_latino_reads_the_weight_rule_of_its_preset(pixel_model, tmp_path):
    """A preset's ``solver:`` block sets LATINO's data weights (the table rule of latino/sr_x8); an operator without
    one uses the discrepancy rule, and a rule given to the method wins over the preset's."""
    common = dict(input="skimage:camera", model=str(pixel_model), crop=64, method=Latino(num_steps=2))
    tuned = run(tmp_path / "tuned", operator="latino/sr_x8", **common)
    assert tuned["run"]["settings"]["weights"].startswith("TableWeights(c_hi=1.0, c_lo=1.0, t_switch=None")
    plain = run(tmp_path / "plain", operator="ud2m/sr_x4", **common)
    assert plain["run"]["settings"]["weights"].startswith("DiscrepancyWeights(")
    common["method"] = Latino(num_steps=2, weights=ConstantGamma(3.0))
    given = run(tmp_path / "given", operator="latino/sr_x8", **common)
    assert given["run"]["settings"]["weights"] == "ConstantGamma(3.0)"


def test_config_file_gives_the_method_and_operator_as_objects(tmp_path):
    """``--config`` YAML with ``method:`` and ``operator:`` blocks (``class_path``/``init_args``, the training
    dialect) equals the same run from Python objects."""
    from ud2m.cli.sample import main
    from ud2m.operators import GaussianBlur

    config = tmp_path / "restore.yaml"
    config.write_text(
        "input: skimage:camera\n"
        "operator:\n  class_path: ud2m.operators.blur.GaussianBlur\n  init_args: {sigma: 2.0, size: 9}\n"
        "sigma_y: 0.02\n"
        "method:\n  class_path: ud2m.methods.Tikhonov\n  init_args: {s0: 0.3}\n"
        f"output_dir: {tmp_path / 'yaml'}\ncrop: {CROP}\nlpips: null\nprogress: false\n"
    )
    main(["--config", str(config)])
    direct = run(tmp_path / "py", input="skimage:camera", operator=GaussianBlur(2.0, 9), sigma_y=0.02,
                 method=Tikhonov(s0=0.3))  # fmt: skip
    assert np.array_equal(
        read_png(tmp_path / "yaml" / "camera_restored.png"), read_png(tmp_path / "py" / "camera_restored.png")
    )
    assert direct["run"]["settings"] == {"s0": 0.3} and direct["run"]["operator"].endswith("GaussianBlur")
    with pytest.raises(ValueError, match="--sigma_y is required with an operator object"):
        run(tmp_path / "none", input="skimage:camera", operator=GaussianBlur(2.0, 9), method=Tikhonov())


# ---------------------------------------------------------------------------------------------- resume and errors
def test_resume_skips_finished_images_and_keeps_their_rows(photos, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "astronaut.png").write_bytes((photos / "astronaut.png").read_bytes())
    out = tmp_path / "out"
    run(out, input=str(inputs), operator="ud2m/sr_x4")
    before = snapshot(out)
    (inputs / "coffee.png").write_bytes((photos / "coffee.png").read_bytes())
    result = run(out, input=str(inputs), operator="ud2m/sr_x4")
    after = snapshot(out)
    for name in ("astronaut_restored.png", "astronaut_y.png"):
        assert after[name] == before[name]  # skipped: neither rewritten nor touched
    assert "coffee_restored.png" in after
    assert [r["image"] for r in result["images"]] == ["astronaut", "coffee"]
    with pytest.raises(ValueError, match="different run"):
        run(out, input=str(inputs), operator="ud2m/sr_x4", sigma_y=0.05)
    assert snapshot(out) == after


@pytest.mark.parametrize(
    "changed, match",
    [
        (dict(seed=1), "seed: 0 there, 1 now"),
        (dict(sigma_y=0.05), "sigma_y: 0.01 there, 0.05 now"),
        (dict(operator="ud2m/deblur_uniform"), "operator: 'ud2m/deblur_gaussian' there, 'ud2m/deblur_uniform' now"),
        (dict(method=Wiener(s0=0.25)), "settings: {'s0': 0.5} there, {'s0': 0.25} now"),
        (dict(method="tv"), "method: 'wiener' there, 'tv' now"),
    ],
)
def test_resume_refuses_a_changed_setting_naming_it(changed, match, tmp_path):
    """Issue [api]: resuming into a folder written with other settings would keep the old images and rows under the
    new run record; the run is refused before anything is written, naming the setting with both values."""
    kwargs = dict(input="skimage:camera", operator="ud2m/deblur_gaussian", method="wiener", sigma_y=0.01)
    run(tmp_path, **kwargs)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(match)):
        run(tmp_path, **{**kwargs, **changed})
    assert snapshot(tmp_path) == before


def test_resume_compares_method_specific_settings_by_their_effective_value(ud2m_export, tmp_path):
    """UD2M's unset N and eta are the manifest's (N = 2, eta = 1): stating them resumes, changing them is refused;
    so is a changed TV weight."""
    kwargs = dict(input="skimage:camera", checkpoint=str(ud2m_export))
    run(tmp_path / "ud2m", **kwargs)
    before = snapshot(tmp_path / "ud2m")
    run(tmp_path / "ud2m", **kwargs, method=UD2M(num_steps=2, eta=1.0))  # the same run: everything skipped
    assert {k: v for k, v in snapshot(tmp_path / "ud2m").items() if k.endswith(".png")} == {
        k: v for k, v in before.items() if k.endswith(".png")
    }
    for changed, match in [
        (dict(method=UD2M(num_steps=3)), "'residual_renoise': None} there, {'num_steps': 3, 'eta': 1.0,"),
        (dict(method=UD2M(eta=0.5)), "'residual_renoise': None} there, {'num_steps': 2, 'eta': 0.5,"),
        (
            dict(method=UD2M(t_start=500)),
            "'t_start': None, 'final_gamma': None, 'residual_renoise': None} there, {'num_steps': 2, "
            "'eta': 1.0, 't_start': 500, 'final_gamma': None, 'residual_renoise': None} now",
        ),
        (
            dict(method=UD2M(final_gamma=10.0)),
            "'final_gamma': None, 'residual_renoise': None} there, {'num_steps': 2, 'eta': 1.0, "
            "'t_start': None, 'final_gamma': 10.0, 'residual_renoise': None} now",
        ),
        (dict(method=UD2M(residual_renoise=True)), "'residual_renoise': True} now"),
        (dict(num_samples=2), "num_samples: 1 there, 2 now"),
    ]:
        with pytest.raises(ValueError, match=re.escape(match)):
            run(tmp_path / "ud2m", **kwargs, **changed)
    # a folder recorded before a setting existed (no t_start) resumes while the setting is at its default
    metrics = tmp_path / "ud2m" / "metrics.json"
    record = json.loads(metrics.read_text())
    del record["run"]["settings"]["t_start"]
    del record["run"]["settings"]["final_gamma"]
    del record["run"]["settings"]["residual_renoise"]
    metrics.write_text(json.dumps(record))
    run(tmp_path / "ud2m", **kwargs)
    with pytest.raises(ValueError, match=re.escape("'t_start': 500, 'final_gamma': None, 'residual_renoise': None}")):
        run(tmp_path / "ud2m", **kwargs, method=UD2M(t_start=500))
    # the closing data step (§8 revision) is recorded and moves the output toward y
    closed = run(tmp_path / "ud2m_dc", **kwargs, method=UD2M(final_gamma=1e3))
    record = json.loads((tmp_path / "ud2m_dc" / "metrics.json").read_text())
    assert record["run"]["settings"]["final_gamma"] == 1e3
    plain = json.loads(metrics.read_text())["summary"]["data_consistency"]["mean"]
    assert closed["summary"]["data_consistency"]["mean"] < 0.5 * plain
    tv = dict(input="skimage:camera", operator="ud2m/deblur_gaussian")
    run(tmp_path / "tv", **tv, method=TotalVariation(iters=5))
    with pytest.raises(ValueError, match=re.escape("'lam': 20.0, 'iters': 5")):
        run(tmp_path / "tv", **tv, method=TotalVariation(lam=5.0, iters=5))


def _float_tiff(path: Path, shape: tuple[int, int], bad: float) -> Path:
    arr = np.full(shape, 0.5, np.float32)
    arr[1, 2] = bad
    Image.fromarray(arr).save(path)  # a 32-bit float ("F") TIFF
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("simulate", [False, True])
def test_non_finite_pixels_are_refused_naming_the_file(bad, simulate, tmp_path):
    """Issue [api]: a NaN in a float TIFF gave exit 0, an all-black image and data_consistency = NaN. An observation
    (simulate=False) or a clean image (simulate=True) with non-finite values is refused before anything is written."""
    size = 32 if simulate else 8  # an observation of sr_x4 is 4x smaller than the image
    tif = _float_tiff(tmp_path / "obs.tif", (size, size), bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"{tif}: 1 of {size * size} pixel values are not finite")):
        run(out, input=str(tif), operator="ud2m/sr_x4", simulate=simulate)
    assert not out.exists()


def test_non_finite_reference_is_refused(tmp_path):
    observation = tmp_path / "camera_y.png"
    save_image(torch.zeros(1, 8, 8), observation)
    reference = _float_tiff(tmp_path / "camera.tif", (32, 32), np.nan)
    with pytest.raises(ValueError, match=re.escape(f"{reference}: 1 of 1024 pixel values are not finite")):
        run(tmp_path / "out", input=str(observation), operator="ud2m/sr_x4", simulate=False, reference=str(reference))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input="missing.png"), FileNotFoundError, "not found"),
        (dict(input="{photos}/notes.txt"), ValueError, "not a readable image"),
        (dict(crop=30), ValueError, "not divisible by the SR factor 4"),
        (dict(operator="ud2m/no_such_preset"), FileNotFoundError, "unknown operator preset"),
        (dict(method="latino", model="{tmp}/no_model"), FileNotFoundError, "model folder not found"),
        (dict(checkpoint="{tmp}/no_export"), FileNotFoundError, "not found"),
    ],
)
def test_bad_inputs_fail_before_writing(kwargs, error, match, photos, tmp_path):
    out = tmp_path / "out"
    run(out, input="skimage:astronaut", operator="ud2m/sr_x4")
    before = snapshot(out)
    kwargs = {k: v.format(photos=photos, tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        run(out, **{"input": "skimage:astronaut", "operator": "ud2m/sr_x4", **kwargs})
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------- LD-RPS (blind)
@pytest.mark.parametrize("task", ["low-light", "haze", "noise", "colour"])
def test_ld_rps_restores_each_task_without_an_operator(task, pixel_model, tmp_path):
    """Issue [ld-rps]: ``--task`` runs LD-RPS on observations with no operator (tiny pixel prior, 6 DDIM steps);
    every pass and psi's output are written, and the §13.5 counters in the metrics equal the solver's count: N + R·⌊γN⌋
    steps, one batched prior call per step; the noise task starts at y's estimated noise level (N − i_s steps)."""
    from ud2m.operators.estimate import noise_level
    from ud2m.priors import PixelDiffusionPrior
    from ud2m.solvers.ld_rps import num_steps_total, start_index, task_defaults, timestep_grid

    observation = tmp_path / "dark.png"
    save_image(load_image("skimage:astronaut")[..., 200:232, 200:232] * 0.5 - 0.5, observation)
    result = run(
        tmp_path / "out", input=str(observation), simulate=False, model=str(pixel_model),
        method=LDRPS(task, num_steps=6, free_chains=1),
    )  # fmt: skip
    row = result["images"][0]
    R = task_defaults(task).num_recurrences
    steps = num_steps_total(6, 0.5, R)
    if task == "noise":  # the time of Immerkær's σ of y, rounded up to the grid (y and the estimate on [-1, 1])
        sigma = 2 * noise_level((load_image(observation, channels=3) + 1) / 2)
        t_s = float(PixelDiffusionPrior.from_pretrained(pixel_model).t_of_sigma(sigma.max()))
        steps = 6 - start_index(timestep_grid(6), t_s)
    assert row["cost_steps"] == steps and row["nfe"] == row["cost_nfe"] == steps
    assert row["cost_psi_steps"] == steps and np.isfinite(row["psi_fit_psnr"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    passes = [f"dark_pass{r}.png" for r in range(R)]  # the last pass is dark_restored.png
    assert written == sorted(
        ["dark_restored.png", "dark_y.png", "dark_psi.png", *passes, "metrics.csv", "metrics.json"]
    )
    assert result["run"]["method"] == "ld_rps" and result["run"]["operator"] == f"ld_rps:{task}"
    assert result["run"]["settings"]["psi"] == "physical" and row["cost_d1_steps"] == 0  # paired fit: no D1


def test_ld_rps_noise_preset_runs_one_chain_and_records_it(pixel_model, tmp_path):
    """The noise preset's F = 0 (ψ has nothing to fit) is what runs and what the run record says."""
    observation = tmp_path / "noisy.png"
    save_image(load_image("skimage:astronaut")[..., 200:232, 200:232], observation)
    result = run(tmp_path / "out", input=str(observation), simulate=False, model=str(pixel_model),
                 method=LDRPS("noise", num_steps=6))  # fmt: skip
    row = result["images"][0]
    assert result["run"]["settings"]["free_chains"] == 0 and row["cost_chains"] == 1
    assert row["cost_nfe_paper"] == row["cost_steps"]


def test_ld_rps_threshold_setting_reaches_the_solver(pixel_model, tmp_path, monkeypatch):
    """``LDRPS(threshold=...)`` is passed to ``ld_rps`` and recorded; unset, the solver's ``"auto"`` applies."""
    import ud2m.solvers.ld_rps as solver

    seen, real = [], solver.ld_rps

    def spy(*args, **kwargs):
        seen.append(kwargs.get("threshold", "auto"))
        return real(*args, **kwargs)

    monkeypatch.setattr(solver, "ld_rps", spy)
    observation = tmp_path / "dark.png"
    save_image(load_image("skimage:astronaut")[..., 200:232, 200:232] * 0.3 - 0.5, observation)
    common = dict(input=str(observation), simulate=False, model=str(pixel_model))
    result = run(tmp_path / "ref", **common, method=LDRPS("low-light", num_steps=4, threshold="reference"))
    assert seen == ["reference"] and result["run"]["settings"]["threshold"] == "reference"
    run(tmp_path / "auto", **common, method=LDRPS("low-light", num_steps=4))
    assert seen[-1] == "auto"


def test_ld_rps_presets_take_their_own_step_counts():
    """The presets' N (docs/method.md §13.13): colour 50, haze 100, low light 200, noise the reference's 450, unless
    ``num_steps`` is given."""
    assert LDRPS("colour").settings()["num_steps"] == 50 and LDRPS("colour", num_steps=9).settings()["num_steps"] == 9
    assert LDRPS("haze").settings()["num_steps"] == 100 and LDRPS("noise").settings()["num_steps"] == 450
    assert LDRPS("low-light").settings()["num_steps"] == 200


def test_ld_rps_reference_psi_is_a_setting(pixel_model, tmp_path):
    """``LDRPS(psi="fpam")`` restores with the reference's F-PAM ψ and its adversarial D1 (counted), and the run
    record tells it from the default physical ψ, so resuming one into the other's folder is refused."""
    observation = tmp_path / "hazy.png"
    save_image(load_image("skimage:astronaut")[..., 200:232, 200:232] * 0.5 + 0.4, observation)
    common = dict(input=str(observation), simulate=False, model=str(pixel_model))
    result = run(tmp_path / "out", **common, method=LDRPS("haze", num_steps=4, psi="fpam"))
    assert result["run"]["settings"]["psi"] == "fpam" and result["images"][0]["cost_d1_steps"] > 0
    there = "'psi': 'fpam', 'guidance_factor': None, 'zhat_from': None, 'threshold': None} there"
    with pytest.raises(ValueError, match=re.escape(there)):
        run(tmp_path / "out", **common, method=LDRPS("haze", num_steps=4))
    factor = "'guidance_factor': 0.3, 'zhat_from': 'z_t', 'threshold': None} now"  # the tuned options are settings too
    with pytest.raises(ValueError, match=re.escape(factor)):
        run(
            tmp_path / "out",
            **common,
            method=LDRPS("haze", num_steps=4, psi="fpam", guidance_factor=0.3, zhat_from="z_t"),
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="ld_rps"), ValueError, "missing 1 required positional argument: 'task'"),
        (dict(method=LDRPS("haze"), simulate=True), ValueError, "pass --simulate false"),
        (dict(method=LDRPS("haze"), checkpoint="x"), ValueError, "contradicts method='ld_rps'"),
        (dict(method=LDRPS("haze", captions="{tmp}/none")), FileNotFoundError, "no caption for image 'dark'"),
    ],
)
def test_ld_rps_bad_input_fails_before_writing(kwargs, error, match, pixel_model, tmp_path):
    observation = tmp_path / "dark.png"
    save_image(torch.zeros(3, 32, 32), observation)
    if "captions" in str(kwargs):
        kwargs = dict(method=LDRPS("haze", captions=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="unknown LD-RPS task 'fog'; known tasks: low-light, haze, noise, colour"):
        LDRPS("fog")
    with pytest.raises(error, match=re.escape(match)):
        run(tmp_path / "out", **{"input": str(observation), "simulate": False, "model": str(pixel_model), **kwargs})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- command-line errors
def _float_image_outside_range(path: Path) -> Path:
    arr = np.full((32, 32), 0.5, np.float32)
    arr[3, 4] = 1.5
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize(
    "args, match",
    [
        (["--input", "{tmp}/missing.png"], "input not found: {tmp}/missing.png"),
        (["--input", "{photos}/notes.txt"], "not a readable image"),
        (["--crop", "30"], "not divisible by the SR factor 4"),
        (["--operator", "ud2m/no_such_preset"], "unknown operator preset"),
        (["--method", "latino", "--model", "{tmp}/no_model"], "model folder not found"),
        (["--checkpoint", "{tmp}/no_export"], "not found"),
        (["--input", "{nan}"], "1 of 1024 pixel values are not finite"),
        (["--input", "{range}"], "float image values must lie in [0, 1], got [0.5, 1.5]"),
        (["--num_samples", "0"], "num_samples and batch_size must be >= 1"),
        (["--inputt", "x"], "unrecognized arguments: --inputt x"),
        (["--config", "{yaml}"], "bad.yaml, line 3, column 1: invalid YAML: expected ',' or ']'"),
        (["--config", "{yaml}"], "(while parsing a flow sequence at line 2, column 11)"),
        (["--output_dir", "{done}", "--seed", "1"], "seed: 0 there, 1 now"),
    ],
)
def test_command_line_errors_are_two_lines_without_a_traceback(args, match, photos, tmp_path, capsys):
    """Issue [api]: every user error of the bad-input table (docs/cli.md) exits with status 2 and prints
    ``sample.py: error: <message naming the file or option>`` and a hint, no traceback; --debug raises instead."""
    from ud2m.cli.sample import cli

    (tmp_path / "bad.yaml").write_text("input: skimage:camera\noperator: [ud2m/sr_x4\n")
    names = dict(
        tmp=tmp_path,
        photos=photos,
        nan=_float_tiff(tmp_path / "nan.tif", (32, 32), np.nan),
        range=_float_image_outside_range(tmp_path / "range.tif"),
        yaml=tmp_path / "bad.yaml",
        done=tmp_path / "done",
    )
    common = ["--input", "skimage:camera", "--operator", "ud2m/sr_x4", "--crop", "32", "--lpips", "null"]
    run(tmp_path / "done", input="skimage:camera", operator="ud2m/sr_x4")
    argv = [*common, "--progress", "false", *(a.format(**names) for a in args)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("sample.py: error: ") and "--debug" in err[1], err
    assert match.format(**names) in err[0]
    with pytest.raises((ValueError, FileNotFoundError, argparse.ArgumentError)):
        cli([*argv, "--debug"])


# ---------------------------------------------------------------------------------------------- UD2M export
@pytest.fixture(scope="module")
def ud2m_export(pixel_model, tmp_path_factory):
    """An untrained UD2M model (K = 2 blocks, LoRA B = 0) on the tiny pixel prior, exported with N = 2."""
    export = pytest.importorskip("ud2m.export", reason="ud2m/export.py (issue [ud2m]) is not written yet")
    from ud2m.priors.pixel import PixelDiffusionPrior
    from ud2m.unfolded import UnfoldedSampler

    model = UnfoldedSampler(PixelDiffusionPrior.from_pretrained(pixel_model), num_blocks=2, lora_rank=2)
    operator = {"class_path": "ud2m.operators.blur.UniformBlur", "init_args": {"size": 5}, "sigma_y": 0.01}
    training = dict(steps=0, seed=0, l2_weighting="none", loss_weights={}, lpips_backbone="vgg", data="none")
    return export.export_checkpoint(
        model,
        tmp_path_factory.mktemp("exports") / "ud2m_tiny",
        base_model={"family": "pixel_eps_unet", "id_or_path": str(pixel_model)},
        operator={**operator, "generator": None},
        sampler={"num_steps": 2, "eta": 1.0},
        training=training,
    )


def test_ud2m_checkpoint_restores_with_n_times_k_evaluations(ud2m_export, tmp_path):
    result = run(tmp_path / "out", input="skimage:camera", checkpoint=str(ud2m_export), num_samples=2)
    assert result["run"]["method"] == "ud2m" and result["run"]["operator"].endswith("UniformBlur")
    row = result["images"][0]
    assert row["nfe"] == 2 * 2  # N·K with the manifest's N = 2 and K = 2
    assert (tmp_path / "out" / "camera_std.png").is_file()
    again = run(tmp_path / "n3", input="skimage:camera", checkpoint=str(ud2m_export), method=UD2M(3, eta=0.5))
    assert again["images"][0]["nfe"] == 3 * 2


def test_resume_refuses_an_export_retrained_in_the_same_folder(ud2m_export, tmp_path):
    """The quick start re-exports into one folder (overwrite: true): re-running sample.py into the earlier output
    folder resumed, skipping every image, and reported the earlier weights' restorations as the new export's."""
    import shutil

    from safetensors.torch import load_file, save_file

    export = Path(shutil.copytree(ud2m_export, tmp_path / "export"))
    first = run(tmp_path / "out", input="skimage:camera", checkpoint=str(export))
    assert len(first["run"]["checkpoint_sha256"]) == 64
    assert run(tmp_path / "out", input="skimage:camera", checkpoint=str(export))["images"] == first["images"]
    scalars = load_file(export / "scalars.safetensors")  # the same path, other weights
    save_file({k: v + 0.5 for k, v in scalars.items()}, export / "scalars.safetensors")
    before = (tmp_path / "out" / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"holds results of a different run.*checkpoint_sha256"):
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(export))
    assert (tmp_path / "out" / "metrics.json").read_text() == before  # nothing written
    record = json.loads(before)
    del record["run"]["checkpoint_sha256"]  # a folder written before the hash was recorded
    (tmp_path / "out" / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="checkpoint_sha256: 'not recorded' there"):
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(export))


def test_ud2m_checkpoint_refuses_zero_noise_before_writing(ud2m_export, tmp_path):
    """Issue [api]: sigma_y = 0 failed inside the sampler, after the output folder had been created."""
    with pytest.raises(ValueError, match="needs a positive noise level"):
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(ud2m_export), sigma_y=0.0)
    assert not (tmp_path / "out").exists()


def test_ud2m_manifest_without_operator_or_base_model_says_so(ud2m_export, tmp_path):
    """An incomplete manifest (as the old positional `train.py export` wrote) is not "trained on random operators"."""
    import shutil

    broken = Path(shutil.copytree(ud2m_export, tmp_path / "broken"))
    manifest = json.loads((broken / "ud2m.json").read_text())
    manifest["operator"]["init_args"] = None
    (broken / "ud2m.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not record the training operator's arguments") as err:
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(broken))
    assert "random operators" not in str(err.value)
    manifest["base_model"]["id_or_path"] = None
    (broken / "ud2m.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"names no base model \(base_model.id_or_path = null\)"):
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(broken), operator="ud2m/deblur_uniform")
    assert not (tmp_path / "out").exists()


def test_ud2m_checkpoint_refuses_another_base_model(ud2m_export, tmp_path):
    from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior

    other = save_tiny_pixel_pipeline(tmp_path / "other", tiny_pixel_prior(seed=1))
    with pytest.raises(ValueError, match="hash mismatch"):
        run(tmp_path / "out", input="skimage:camera", checkpoint=str(ud2m_export), model=str(other))
    assert not (tmp_path / "out").exists()
    result = run(
        tmp_path / "out",
        input="skimage:camera",
        checkpoint=str(ud2m_export),
        model=str(other),
        allow_hash_mismatch=True,
    )
    assert result["run"]["model"] == str(other)


# ---------------------------------------------------------------------------------------------- the script
@pytest.mark.parametrize("entry", ["sample.py", "-m ud2m sample"])
def test_command_line_entry_point(tmp_path, entry):
    """``python sample.py`` and ``python -m ud2m sample`` (what the ``ud2m-sample`` script runs) give one summary."""
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        *([str(ROOT / "sample.py")] if entry == "sample.py" else entry.split()),
        "--input",
        "skimage:camera",
        "--operator",
        "ud2m/deblur_uniform",
        "--crop",
        str(CROP),
        "--lpips",
        "null",
        "--progress",
        "false",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["num_images"] == 1 and summary["nfe"]["mean"] == 0
    assert (out / "camera_restored.png").is_file()


def test_python_m_ud2m_without_a_command_prints_its_usage():
    proc = subprocess.run([sys.executable, "-m", "ud2m"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "python -m ud2m {train,sample}" in proc.stdout


def test_docs_list_every_option():
    import inspect

    docs = (ROOT / "docs" / "cli.md").read_text()
    missing = [p for p in inspect.signature(sample).parameters if f"`--{p}`" not in docs]
    assert missing == []
