"""The restoration page (issue [app], docs/app.md): the pure functions of :mod:`ud2m.app.jobs` without a browser, and
the real page driven in headless Chromium (the system ``/usr/bin/chromium`` through Playwright), whose PSNR must be
``sample.py``'s for the same options and seed. The browser test is skipped, with the reason, when gradio, playwright
or the browser is missing (``.ci/run`` installs them)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ud2m.app import jobs
from ud2m.app.jobs import Form
from ud2m.cli.sample import sample
from ud2m.methods import DPS, LVTINO, DiffPIR, Latino, TotalVariation
from ud2m.operators.base import LinearOperator
from ud2m.operators.presets import load_preset
from ud2m.schedules import uniform_grid
from ud2m.solvers.weights import ConstantGamma
from ud2m.video_io import write_video

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # the Debian package's browser
DIGITS = str(jobs.PRIOR_DIR / "digits")
CLIPS, PHOTOS = str(jobs.PRIOR_DIR / "clips"), str(jobs.PRIOR_DIR / "photos")


# ---------------------------------------------------------------------------------------------- form -> job
def test_default_form_is_the_tuned_latino_job_of_the_quality_benchmark():
    kw = jobs.sample_kwargs(Form(), Path("out"))
    method = kw.pop("method")
    assert isinstance(method, Latino) and method.timesteps == list(uniform_grid(8, t_max=500))
    assert isinstance(method.weights, ConstantGamma) and method.weights.gamma == 1000.0
    assert kw == dict(
        input="digits:0023", output_dir=Path("out"), operator="ud2m/mnist_sr_x4", sigma_y=0.05, simulate=True,
        seed=0, num_samples=1, lpips=None, resume=False, model=DIGITS, crop=32,
    )  # fmt: skip


def _tuned_rows(prior: str) -> dict[str, dict]:
    results = json.loads((REPO / f"benchmarks/results/quality_{prior}.json").read_text())["problems"]
    return {problem: rows for problem, rows in results.items()}


@pytest.mark.parametrize("prior", ["digits", "photos"])
def test_tuned_settings_are_the_quality_benchmarks_choices(prior):
    """TUNED holds what benchmarks/quality.py chose on training images (its results file names them)."""
    for problem, rows in _tuned_rows(prior).items():
        table = jobs.TUNED[(prior, "sr" if prior == "digits" else jobs.FAMILY[f"photos/{problem}"])]
        chosen = {name: row.get("solver_options", {}) for name, row in rows.items() if "on " not in name}
        (latino,) = [v for k, v in chosen.items() if k.startswith("LATINO") and "tuned" in k]
        assert (latino["timesteps"][0], latino.get("gamma")) == table["latino"]
        (diffpir,) = [v for k, v in chosen.items() if k.startswith("DiffPIR")]
        assert diffpir["lambda_"] == table["diffpir"] and diffpir["zeta"] == 1.0
        (tv,) = [k for k in chosen if k.startswith("TV")]
        assert f"λ = {table['tv']}" in tv
        dps = [v for k, v in chosen.items() if k.startswith("DPS")]
        assert all(v["zeta"] == table["dps"] for v in dps)


def test_video_defaults_are_the_video_benchmarks_tuned_time_scales():
    """VIDEO_TUNED holds the time scales benchmarks/video.py chose on training clips, per problem."""
    problems = json.loads((REPO / "benchmarks/results/video.json").read_text())["problems"]
    assert set(problems) == set(jobs.CLIP_PROBLEMS.values()) and jobs.priors()["clips"].presets == tuple(
        jobs.CLIP_PROBLEMS
    )
    for preset, problem in jobs.CLIP_PROBLEMS.items():
        tuned = problems[problem]["tuned"]
        assert jobs.method_defaults("clips", preset, "LVTINO") == (0, tuned["lvtino_time_scale"])
        assert jobs.method_defaults("clips", preset, "LATINO (frame-wise)") == (0, tuned["latino_time_scale"])


def test_a_clip_form_is_sample_pys_video_job():
    form = Form(prior="clips", builtin="clips:val:3", degradation="lvtino/B_clips", sigma_y=0.001, method="LVTINO")
    kw = jobs.sample_kwargs(replace(form, weight=0.35), Path("out"))
    assert repr(kw.pop("method")) == repr(LVTINO(image_model=PHOTOS, time_scale=0.35))
    # no crop: videos are restored at their own size
    assert kw == dict(
        input="clips:val:3", output_dir=Path("out"), operator="lvtino/B_clips", sigma_y=0.001, simulate=True,
        seed=0, num_samples=1, lpips=None, resume=False, model=CLIPS,
    )  # fmt: skip
    framewise = jobs.sample_kwargs(replace(form, method="LATINO (frame-wise)", weight=None), Path("out"))
    assert "model" not in framewise and framewise["method"].time_scale == 1.0  # no video prior; released times
    with pytest.raises(ValueError, match="restores with LVTINO or LATINO \\(frame-wise\\), not LATINO"):
        jobs.sample_kwargs(replace(form, method="LATINO"), Path("out"))
    with pytest.raises(ValueError, match="the digits prior restores with LATINO or DiffPIR"):
        jobs.sample_kwargs(Form(method="LVTINO"), Path("out"))


@pytest.mark.parametrize("method", jobs.METHODS[:4])
def test_each_method_gets_its_typed_object_with_the_form_weight(method):
    steps, weight = jobs.method_defaults("photos", "photos/inpaint_box", method)
    got = jobs.method_of(
        Form(prior="photos", degradation="photos/inpaint_box", method=method, steps=steps, weight=weight)
    )
    expected = {
        "LATINO": Latino(timesteps=list(uniform_grid(8, t_max=700))),  # box: the preset's weight rule (γ unset)
        "DiffPIR": DiffPIR(num_steps=100, lambda_=1.75, zeta=1.0, grid="quad"),
        "DPS": DPS(num_steps=100, zeta=0.3, zeta_scaling="steps"),
        "TV": TotalVariation(lam=100.0),
    }[method]
    assert repr(got) == repr(expected)


def test_a_model_free_method_loads_no_prior_and_ud2m_needs_an_export():
    assert "model" not in jobs.sample_kwargs(Form(method="TV", weight=3.0), Path("o"))
    with pytest.raises(ValueError, match="pick an export"):
        jobs.sample_kwargs(Form(method="UD2M"), Path("o"))
    kw = jobs.sample_kwargs(Form(method="UD2M", export="exports/q", steps=0), Path("o"))
    assert kw["checkpoint"] == Path("exports/q") and "model" not in kw


@pytest.mark.parametrize("kind", jobs.KINDS)
def test_every_degradation_kind_is_an_operator_at_the_priors_size(kind):
    mask = np.zeros((256, 256), bool)
    mask[100:160, 100:160] = True  # drawn at display size: resized to the 32x32 digit
    op = jobs.operator_of(Form(degradation=kind, mask=mask), 32)
    assert isinstance(op, LinearOperator)
    assert op.A(torch.zeros(1, 1, 32, 32)).shape[0] == 1
    if kind == "drawn mask":
        assert op.mask.shape[-2:] == (32, 32) and op.mask[..., 12:20, 12:20].sum() == 0 and op.mask.sum() > 900


def test_drawn_mask_comes_from_the_painted_layers():
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 2:4, 3] = 255
    assert jobs.painted({"layers": [layer]}).sum() == 4
    assert jobs.painted({"layers": [np.zeros((8, 8, 4), np.uint8)]}) is None and jobs.painted(None) is None
    with pytest.raises(ValueError, match="paint the region"):
        jobs.operator_of(Form(degradation="drawn mask"), 32)


def test_preset_noise_level_and_missing_upload():
    assert jobs.preset_sigma_y("photos/sr_x4") == load_preset("photos/sr_x4").sigma_y
    assert jobs.preset_sigma_y("denoising") is None
    with pytest.raises(ValueError, match="no file uploaded"):
        jobs.source_of(Form(input_kind="upload"))


def test_find_exports(tmp_path):
    for name in ("b/export", "a/export"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "ud2m.json").write_text("{}")
    assert jobs.find_exports(str(tmp_path)) == [str(tmp_path / "a/export"), str(tmp_path / "b/export")]
    with pytest.raises(FileNotFoundError, match="export folder not found"):
        jobs.find_exports(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- run -> display
def test_a_run_shows_sample_pys_files_and_numbers(tmp_path):
    form = Form(method="TV", weight=3.0, num_samples=1)
    result = jobs.run_form(form, tmp_path)
    written = json.loads((result.folder / "metrics.json").read_text())["images"][0]
    assert result.row == written
    assert f"| PSNR | {written['psnr']:.2f} dB |" in jobs.metrics_markdown(result, form)
    assert result.y.shape == (256, 256, 3) and result.restored.shape == (256, 256, 3)  # 8x8 and 32x32, upscaled
    assert result.truth.shape == (256, 256, 3) and result.std is None
    with zipfile.ZipFile(result.archive) as archive:
        assert {"metrics.json", "digit_0023_restored.png", "digit_0023_y.png"} <= set(archive.namelist())


def test_a_bad_upload_is_a_readable_message_and_writes_nothing(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(odd)
    cases = [(text, 32, "not a readable image file"), (odd, 0, "not divisible by the SR factor 4")]
    for path, crop, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            jobs.run_form(Form(input_kind="upload", upload=str(path), crop=crop), tmp_path / "runs")
        assert jobs.error_message(err.value).startswith("**Cannot run:**")
    assert not (tmp_path / "runs").exists()


def test_a_clip_run_shows_the_video_jobs_files_and_numbers(tmp_path):
    form = Form(prior="clips", builtin="clips:val:1", degradation="lvtino/C_clips", sigma_y=0.001)
    result = jobs.run_form(replace(form, method="LATINO (frame-wise)", weight=0.2), tmp_path)
    written = json.loads((result.folder / "metrics.json").read_text())["images"][0]
    assert isinstance(result, jobs.VideoResult) and result.row == written
    assert {p.name for p in (result.y, result.restored, result.truth)} == {
        f"clip_val_1_{k}.mp4" for k in ("y", "restored", "truth")
    }
    table = jobs.metrics_markdown(result, form)
    for label, key in (("PSNR (per frame, averaged)", "psnr"), ("global PSNR", "psnr_global"), ("flicker", "flicker")):
        assert re.search(rf"\| {re.escape(label)}[^|]*\| {written[key]:.2f}", table), (label, table)
    assert f"| NFE | {written['nfe']} (0 video + {written['nfe_image']} image sweeps) |" in table
    with zipfile.ZipFile(result.archive) as archive:
        assert {"metrics.json", "clip_val_1_restored.mp4", "clip_val_1_y.mp4", "clip_val_1_truth.mp4"} <= set(
            archive.namelist()
        )


def test_a_clip_that_does_not_fit_the_operator_is_a_readable_message(tmp_path):
    frames = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    short = write_video(frames, tmp_path / "short.gif")  # 8 frames; problem A pools 9
    form = Form(prior="clips", input_kind="upload", upload=str(short), degradation="lvtino/A_clips", sigma_y=0.001)
    with pytest.raises(ValueError, match="cannot restore a video of 8 frames of 64x64") as err:
        jobs.run_form(replace(form, method="LATINO (frame-wise)", weight=0.2), tmp_path / "runs")
    assert jobs.error_message(err.value).startswith("**Cannot run:** ") and "short.gif" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_heat_map_and_display():
    std = np.linspace(0, 0.2, 16).reshape(4, 4)
    heat = jobs.heat_map(std)
    assert heat.shape == (4, 4, 3) and heat.dtype == np.uint8
    assert heat[0, 0].sum() < heat[-1, -1].sum()  # magma: dark for 0, bright for the maximum
    assert jobs.display(np.zeros((32, 32), np.uint8)).shape == (256, 256, 3)
    assert jobs.display(np.zeros((300, 200, 3), np.uint8)).shape == (300, 200, 3)


def test_missing_gradio_names_the_extra(monkeypatch):
    from ud2m.app import page

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[app]"')):
        page.import_gradio()


def test_python_m_ud2m_app_help(capsys):
    from ud2m.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["app", "--help"])
    assert exit_.value.code == 0 and "--output_root" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the real page
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page served on a free local port in this process (gradio's server thread)."""
    gr = pytest.importorskip("gradio", reason='the app extra is not installed (pip install -e ".[app]")')
    pytest.importorskip("playwright.sync_api", reason='playwright is not installed (pip install -e ".[app]")')
    if not CHROMIUM.is_file():
        pytest.skip(f"no system browser at {CHROMIUM} (apt-get install chromium)")
    from ud2m.app.page import build_page, theme

    root = tmp_path_factory.mktemp("app_runs")
    port = _free_port()
    page = build_page(root)
    page.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
        theme=theme(gr), allowed_paths=[str(root)],
    )  # fmt: skip
    yield f"http://127.0.0.1:{port}", root
    page.close()


def _text_when(page, selector: str, pattern: str, timeout_s: float = 60) -> str:
    """The text of ``selector`` once it matches ``pattern`` (Playwright polls)."""
    locator = page.locator(selector)
    locator.filter(has_text=re.compile(pattern)).wait_for(timeout=timeout_s * 1000)
    return locator.inner_text()


@pytest.mark.browser
def test_the_page_in_headless_chromium(served, tmp_path):
    """Open the page, pick a held-out digit, run LATINO with S = 4, compare the shown PSNR with ``sample()``'s for the
    same options and seed; a bad upload shows the job's message and the page keeps working."""
    from playwright.sync_api import sync_playwright

    url, _ = served
    digit = jobs.priors()["digits"].builtins[2]  # not the default one: the pick must reach the job
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#builtin input").click()
        page.get_by_role("option", name=digit[0], exact=True).click()
        page.locator("#num_samples input[type=number]").fill("4")
        page.locator("#num_samples input[type=number]").press("Enter")
        page.locator("#run").click()
        shown = _text_when(page, "#metrics", r"PSNR")
        page.locator("#restored img").wait_for()
        page.locator("#std img").wait_for()  # S = 4: the std heat map
        if shot := _screenshot_path():
            page.screenshot(path=str(shot), full_page=True)
        page.locator("#upload input[type=file]").set_input_files(str(bad))
        page.get_by_label("upload", exact=True).wait_for()
        time.sleep(0.5)  # the upload event switches the input to "upload"
        page.locator("#run").click()
        message = _text_when(page, "#status", r"not a readable image file")
        page.get_by_label("built-in", exact=True).check()
        page.locator("#run").click()
        again = _text_when(page, "#status", r"Done")
        browser.close()

    expected = sample(
        input=digit[1], output_dir=tmp_path / "cli", model=DIGITS, operator="ud2m/mnist_sr_x4", sigma_y=0.05,
        method=Latino(timesteps=list(uniform_grid(8, t_max=500)), weights=ConstantGamma(1000.0)), crop=32, seed=0,
        num_samples=4, lpips=None, progress=False,
    )["images"][0]  # fmt: skip
    psnr = float(re.search(r"PSNR\s+([0-9.]+) dB", shown).group(1))
    assert psnr == round(expected["psnr"], 2)  # the posterior mean's
    assert f"{expected['psnr_sample0']:.2f} dB" in shown
    assert "notes.png: not a readable image file" in message and "Done" in again


@pytest.mark.browser
def test_a_clip_on_the_page_in_headless_chromium(served, tmp_path):
    """Pick the video prior (its tuned defaults fill the form), upload a clip whose frame count does not fit problem
    A (the job's message), then restore held-out clip 0 with LVTINO: the page plays the MP4s and shows
    ``sample()``'s PSNR for the same options and seed."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = served
    frames = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    short = write_video(frames, tmp_path / "short.gif")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_label("clips (video)", exact=True).check()
        expect(page.locator("#weight input")).to_have_value("0.2")  # A's tuned time scale
        expect(page.get_by_label("LVTINO", exact=True)).to_be_checked()
        page.locator("#upload input[type=file]").set_input_files(str(short))
        page.get_by_label("upload", exact=True).wait_for()
        time.sleep(0.5)  # the upload event switches the input to "upload"
        assert not page.locator(".toast-body").all_inner_texts()  # the prior change raised no error in any event
        page.locator("#run").click()
        message = _text_when(page, "#status", r"cannot restore")
        page.get_by_label("built-in", exact=True).check()
        page.locator("#run").click()
        shown = _text_when(page, "#metrics", r"global PSNR")
        playable = "v => v.readyState >= 2 && v.videoWidth > 0"
        for i in ("y_video", "restored_video", "truth_video"):
            page.locator(f"#{i} video").wait_for()
            page.wait_for_function(f"() => ({playable})(document.querySelector('#{i} video'))", timeout=20_000)
        if shot := _screenshot_path("UD2M_APP_VIDEO_SCREENSHOT"):
            page.screenshot(path=str(shot), full_page=True)
        browser.close()

    expected = sample(
        input="clips:val:0", output_dir=tmp_path / "cli", model=CLIPS, operator="lvtino/A_clips", sigma_y=0.001,
        method=LVTINO(image_model=PHOTOS, time_scale=0.2), seed=0, lpips=None, progress=False,
    )["images"][0]  # fmt: skip
    assert "short.gif: cannot restore a video of 8 frames of 64x64 with operator lvtino/A_clips" in message
    psnr = float(re.search(r"PSNR \(per frame, averaged\)\s+([0-9.]+) dB", shown).group(1))
    assert psnr == round(expected["psnr"], 2)
    assert f"{expected['psnr_global']:.2f} dB" in shown and f"{expected['flicker']:.2f}" in shown


def _screenshot_path(variable: str = "UD2M_APP_SCREENSHOT") -> Path | None:
    """``UD2M_APP_SCREENSHOT=docs/app.png`` writes the page's screenshot there (docs/app.md);
    ``UD2M_APP_VIDEO_SCREENSHOT`` the clip run's."""
    import os

    target = os.environ.get(variable)
    return None if not target else Path(target)
