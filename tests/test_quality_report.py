"""benchmarks/quality.py report: tables and figures from results JSON files alone (nothing is recomputed), written
into a temporary results folder and README, so the repository's own files are never touched."""

import json
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture
def quality(benchmark_script):
    """The benchmark module with RESULTS and README redirected into ``tmp_path`` (conftest.benchmark_script)."""
    return benchmark_script("quality")


def _cell(k: int, n: int) -> dict:
    """A grid cell with every field grid_table reads; coverage for alpha = 0.01..1.00."""
    stat = {"mean": 20.0 + k + n, "std": 1.0}
    coverage = [min(1.0, (i + 1) / 100 * n / 8) for i in range(100)]
    return {
        "nfe": k * n,
        "psnr_mean": stat,
        "psnr_sample": stat,
        "cfid": 1.0 / (k * n),
        "fid": 0.5,
        "coverage_calibration_error": 0.1,
        "coverage_at": {"0.5": coverage[49], "0.9": coverage[89]},
        "coverage": coverage,
        "seconds_per_sample": 0.01,
    }


def _fake_method_folder(folder: Path, truth: Path, num_samples: int) -> None:
    """What sample() leaves in a method's folder for two 8x8 gray images: metrics.json, y, restored (and std)."""
    from ud2m.io import save_image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = []
    for stem in ("a", "b"):
        save_image(torch.rand(1, 4, 4, generator=g) * 2 - 1, folder / f"{stem}_y.png")
        save_image(torch.rand(1, 8, 8, generator=g) * 2 - 1, folder / f"{stem}_restored.png")
        if num_samples > 1:
            save_image(torch.rand(1, 8, 8, generator=g) * 2 - 1, folder / f"{stem}_std.png", bits=16)
        images.append({"image": stem, "source": str(truth)})
    (folder / "metrics.json").write_text(json.dumps({"run": {}, "summary": {}, "images": images}))


def test_report_writes_figures_and_links(quality, tmp_path, capsys):
    """A 2 x 2 grid and a suite whose rows point at fake sample() folders: grid_cfid, grid_coverage and the sample
    figure are non-empty PNGs, a suite without images is skipped with a note, and the README section (only it)
    holds the tables and README-relative image links."""
    from ud2m.io import save_image

    results = tmp_path / "results"
    grid = {"samples_per_observation": 4, "cells": {}}
    for k in (2, 4):
        grid["cells"][str(k)] = {"train_seconds": 1.0, **{str(n): _cell(k, n) for n in (1, 2)}}
    (results / "quality_grid.json").write_text(json.dumps(grid))
    truth = tmp_path / "truth.png"
    save_image(torch.zeros(1, 10, 10), truth)  # larger than the restored 8x8: centre-cropped
    _fake_method_folder(tmp_path / "work" / "dps", truth, num_samples=4)
    _fake_method_folder(tmp_path / "work" / "tv", truth, num_samples=1)  # no std maps: blank cells
    summary = {"nfe": {"mean": 1}, "psnr": {"mean": 20.0, "std": 1.0}, "seconds": {"mean": 0.1}}
    rows = {
        "DPS, 100 steps (ζ = 2)": {**summary, "output_dir": str(tmp_path / "work" / "dps")},
        "TV (λ = 3.0)": {**summary, "output_dir": str(tmp_path / "work" / "tv")},
        "A^T y (op.lift)": summary,  # a results file from before output_dir was recorded
    }
    photos = {"meta": {}, "problems": {"sr_x4": rows, "deblur": {"TV": {**summary, "output_dir": "missing"}}}}
    (results / "quality_photos.json").write_text(json.dumps(photos))

    text = quality.report()

    figures = results / "figures"
    for name in ("grid_cfid.png", "grid_coverage.png", "samples_photos_sr_x4.png"):
        assert (figures / name).stat().st_size > 1000
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (figures / "samples_photos_deblur.png").exists()
    assert "no sample figure for photos/deblur" in capsys.readouterr().out
    assert "![" in text and "(figures/grid_cfid.png)" in text  # quality.md links relative to the results folder
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# title\n\n") and readme.endswith("<!-- quality:end -->\ntail\n") and "old" not in readme
    assert "| DPS, 100 steps (ζ = 2) |" in readme and "| 4 | 2 | 8 |" in readme
    for name in ("grid_cfid.png", "grid_coverage.png", "samples_photos_sr_x4.png"):
        assert f"](results/figures/{name})" in readme  # relative to the README's folder


def test_figures_without_any_results_are_skipped(quality, tmp_path):
    """No JSON at all: empty tables, no figures, no crash, the README section emptied."""
    assert quality.report() == ""
    assert not list((tmp_path / "results" / "figures").glob("*.png"))


def test_tuning_options_name_rows_and_folders(quality):
    """Row names carry the tuned values in the papers' symbols; every solver setting gets its own folder; the grids
    contain the former defaults (DPS: zeta = 1 per step at 100 steps, 0.1 per 1000; DiffPIR: lambda_ 1.75, zeta 0.3)."""
    dps = quality.diffusion_candidates("dps", "full")
    assert [o["zeta"] for o in dps] == [0.1, 0.3, 1.0, 2.0, 4.0] and {o["zeta_scaling"] for o in dps} == {"steps"}
    diffpir = quality.diffusion_candidates("diffpir", "full")
    assert len(diffpir) == 8 and {o["grid"] for o in diffpir} == {"quad"}
    assert {"lambda_": 1.75, "zeta": 0.3, "grid": "quad"} in diffpir
    assert quality.options_label({"lambda_": 0.125, "zeta": 1.0, "grid": "quad"}) == "λ = 0.125, ζ = 1"
    slugs = {quality.options_slug(o) for o in dps + diffpir}
    assert len(slugs) == 13 and "lambda0.125_zeta0.3_quad" in slugs and "zeta2.0_steps" in slugs


def test_diffusion_baselines_are_tuned_on_training_images_only(quality, tmp_path):
    """With a stand-in for sample() (PSNR grows with zeta and lambda_): every candidate runs on the tuning input in
    its own folder; a candidate with a NaN output is never chosen, on every image or on one only (where the
    summary's mean would skip it); the test input runs only with the chosen options; DPS-1000 reuses DPS-100's
    zeta (per 1000 steps)."""
    from ud2m.io import write_results

    calls = []

    def fake_sample(input, output_dir, method, **kw):  # method: a ud2m.methods object
        o = {k: v for k, v in vars(method).items() if v is not None and k != "num_steps"}
        num_steps, method = method.num_steps, method.name
        calls.append(dict(input=input, output_dir=Path(output_dir), method=method, num_steps=num_steps, **o))
        psnr = 20 + o["zeta"] + o.get("lambda_", 0.0)
        nan_a = method == "diffpir" and o == {"lambda_": 1.75, "zeta": 1.0, "grid": "quad"}  # the best, diverged
        nan_b = nan_a or (method == "dps" and o["zeta"] == 1.0)  # the best DPS, diverged on one image
        rows = [
            {"image": "a", "psnr": math.nan if nan_a else psnr},
            {"image": "b", "psnr": math.nan if nan_b else psnr},
        ]
        Path(output_dir).mkdir()
        return write_results(output_dir, {}, rows)

    kw = dict(test_input="test", tune_input="train", operator="photos/sr_x4", prior=Path("prior"), budget="small")
    rows = quality.diffusion_rows(fake_sample, tmp_path, dps1000=True, **kw)
    names = ["DiffPIR, 100 steps (λ = 1.75, ζ = 0.3)", "DPS, 100 steps (ζ = 0.3)", "DPS, 1000 steps (ζ = 0.3)"]
    assert list(rows) == names
    diffpir, dps100, dps1000 = rows.values()
    assert diffpir["tuning"]["lambda1.75_zeta1.0_quad"] is None
    assert diffpir["tuning"]["lambda1.75_zeta0.3_quad"] == pytest.approx(22.05)
    assert dps100["tuning"] == {"zeta0.3_steps": pytest.approx(20.3), "zeta1.0_steps": None}
    assert dps1000["solver_options"] == dps100["solver_options"] == {"zeta": 0.3, "zeta_scaling": "steps"}
    assert dps1000["tuned_at"] == "100 steps" and "tuning" not in dps1000
    tuning = [c for c in calls if c["input"] == "train"]
    assert len(tuning) == 4 + 2 and {c["num_steps"] for c in tuning} == {100}
    assert len({c["output_dir"] for c in calls}) == len(calls)  # one folder per setting: resume never mixes them
    tests = [(c["method"], c["num_steps"], c["zeta"]) for c in calls if c["input"] == "test"]
    assert tests == [("diffpir", 100, 0.3), ("dps", 100, 0.3), ("dps", 1000, 0.3)]
    assert dps100["output_dir"] == str(tmp_path / "dps100_zeta0.3_steps")


def test_checkpoint_selection_never_trains_on_the_test_photographs(quality):
    """select_best validates on a training photograph taken out of training; the held-out test photographs (the
    config's val_sources) leave the training list as well instead of returning to it; the ImageFolderImages split
    of the resulting config trains on neither."""
    base = quality.photos_config("sr_x4")
    held_out = set(base["data"]["init_args"]["val_sources"])
    cfg = quality.select_best(base)
    data = cfg["data"]["init_args"]
    assert held_out and data["val_sources"] == [quality.PHOTOS_SELECTION_SOURCE]
    training = set(data["root"]) - set(data["val_sources"])
    assert not training & held_out and quality.PHOTOS_SELECTION_SOURCE in data["root"]
    assert training == set(base["data"]["init_args"]["root"]) - held_out - {quality.PHOTOS_SELECTION_SOURCE}
    assert set(base["data"]["init_args"]["val_sources"]) == held_out  # the base config is not modified


def test_a_cached_export_is_reused_only_for_the_config_it_was_distilled_with(quality, tmp_path, monkeypatch):
    """ensure_export must not hand back an export distilled with another config (a changed learning rate would be
    scored as the old one); the same config reuses it without training."""
    calls = []
    monkeypatch.setattr(quality, "load_entry", lambda *a: lambda argv: calls.append(argv))
    config = quality.quickstart_config(3, max_steps=10)
    work = tmp_path / "ud2m_K3"
    quality.ensure_export(config, work)  # "trains" (recorded) and writes work/config.yaml
    assert len(calls) == 1 and (work / "config.yaml").is_file()
    (work / "export").mkdir()
    (work / "export" / "ud2m.json").write_text("{}")
    assert quality.ensure_export(config, work) == work / "export" and len(calls) == 1  # reused, no training
    changed = quality.quickstart_config(3, max_steps=10)
    changed["model"]["lr_g"] = 2 * config["model"]["lr_g"]
    with pytest.raises(SystemExit, match="another config"):
        quality.ensure_export(changed, work)
    # a run moved from another folder (its stored paths name that folder) is the same run
    stored = (work / "config.yaml").read_text().replace(str(work), str(tmp_path / "elsewhere"))
    (work / "config.yaml").write_text(stored)
    assert quality.ensure_export(config, work) == work / "export" and len(calls) == 1


def test_grid_cells_are_cached_per_export_and_rescored_after_a_new_export(quality, tmp_path, monkeypatch):
    """A grid column already scored for an export (same sample count) is read back, not recomputed; another sample
    count or a newer export scores again."""
    import argparse
    import os

    scored = []

    def fake_score(export, x, vae, args):
        scored.append((export, args.samples))
        return {n: _cell(3, n) for n in (1, 2)}

    monkeypatch.setattr(quality, "_grid_for_export", fake_score)
    export = tmp_path / "K3" / "export"
    export.mkdir(parents=True)
    (export / "ud2m.json").write_text("{}")
    args = argparse.Namespace(samples=4)
    first = quality._cached_grid_cells(export, None, None, args)
    again = quality._cached_grid_cells(export, None, None, args)
    assert len(scored) == 1 and again == first and set(again) == {1, 2}  # JSON keys back to ints
    quality._cached_grid_cells(export, None, None, argparse.Namespace(samples=8))
    assert scored[-1] == (export, 8)
    cache = tmp_path / "K3" / "grid_cells_S4.json"
    stamp = cache.stat().st_mtime
    os.utime(export / "ud2m.json", (stamp + 10, stamp + 10))  # distilled again after the cells were written
    quality._cached_grid_cells(export, None, None, args)
    assert len(scored) == 3 and scored[-1] == (export, 4)


def test_ud2m_only_keeps_the_other_rows_and_reruns_the_ud2m_rows(quality, tmp_path, monkeypatch):
    """--ud2m_only: the earlier run's baselines are kept as they were (nothing else is run), its UD2M rows are
    replaced by the new exports' rows; a problem without earlier rows is refused by name."""
    monkeypatch.setattr(quality, "run_method", lambda *a, **k: pytest.fail("a baseline was run again"))
    ran = []

    def fake_rows(sample, work, name, export, extra, **inputs):
        ran.append((name, export, extra))
        return {name: {"psnr": {"mean": 30.0}}}

    monkeypatch.setattr(quality, "ud2m_rows_of", fake_rows)
    earlier = {"TV (λ = 3)": {"psnr": {"mean": 20.0}}, "UD2M (old), N x K = 3 x 3": {"psnr": {"mean": 10.0}}}
    rows = quality.run_problem(
        None, tmp_path, test_input="t", tune_input="u", operator="photos/sr_x4", prior=tmp_path,
        ud2m_rows=[("UD2M (new), N x K = 3 x 3", tmp_path / "export", {})], dps1000=False, baselines=earlier,
    )  # fmt: skip
    assert rows == {"TV (λ = 3)": earlier["TV (λ = 3)"], "UD2M (new), N x K = 3 x 3": {"psnr": {"mean": 30.0}}}
    assert ran == [("UD2M (new), N x K = 3 x 3", tmp_path / "export", {})]
    (quality.RESULTS / "quality_photos.json").write_text(json.dumps({"problems": {"sr_x4": earlier}}))
    assert quality._previous_rows("photos", "sr_x4") == earlier
    with pytest.raises(SystemExit, match=r"quality_photos\.json holds no rows for 'inpaint_box'"):
        quality._previous_rows("photos", "inpaint_box")


def test_diffusion_only_recomputes_dps_and_diffpir_without_resume_and_keeps_the_rest(quality, tmp_path, monkeypatch):
    """--diffusion_only: only diffusion_rows runs, with resume=False (a changed solver must not reuse stale images);
    every other row is kept in place, the fresh DiffPIR/DPS rows replace the earlier ones before the UD2M rows."""
    monkeypatch.setattr(quality, "ud2m_rows_of", lambda *a, **k: pytest.fail("a UD2M row was run again"))
    calls = []

    def fake_diffusion(sample, work, **kw):
        calls.append(kw)
        return {"DiffPIR, 100 steps (new)": {"psnr": {"mean": 31.0}}, "DPS, 100 steps (new)": {"psnr": {"mean": 29.0}}}

    monkeypatch.setattr(quality, "diffusion_rows", fake_diffusion)
    earlier = {
        "TV (λ = 3)": {"psnr": {"mean": 20.0}},
        "DiffPIR, 100 steps (old)": {"psnr": {"mean": 25.0}},
        "DPS, 100 steps (old)": {"psnr": {"mean": 24.0}},
        "UD2M (x), N x K = 3 x 3": {"psnr": {"mean": 26.0}},
    }
    rows = quality.run_problem(
        None, tmp_path, test_input="t", tune_input="u", operator="photos/sr_x4", prior=tmp_path,
        ud2m_rows=[], dps1000=False, baselines=earlier, rerun="diffusion",
    )  # fmt: skip
    assert list(rows) == ["TV (λ = 3)", "DiffPIR, 100 steps (new)", "DPS, 100 steps (new)", "UD2M (x), N x K = 3 x 3"]
    assert rows["TV (λ = 3)"] is earlier["TV (λ = 3)"] and rows["UD2M (x), N x K = 3 x 3"]["psnr"]["mean"] == 26.0
    assert len(calls) == 1 and calls[0]["resume"] is False


def test_variant_overrides_name_the_bad_key_and_leave_the_base_config(quality):
    base = quality.quickstart_config(3, max_steps=10)
    cfg = quality.apply_overrides(base, ["model.lr_g=2e-3", "model.sampler.init_args.lora_targets=[to_q, conv_out]"])
    assert cfg["model"]["lr_g"] == 2e-3 and isinstance(cfg["model"]["lr_g"], float)
    assert cfg["model"]["sampler"]["init_args"]["lora_targets"] == ["to_q", "conv_out"]
    assert base["model"]["lr_g"] != 2e-3  # a copy
    with pytest.raises(SystemExit, match=r"'model\.nope'"):
        quality.apply_overrides(base, ["model.nope.lr=1"])
    with pytest.raises(SystemExit, match=r"dotted\.key=value"):
        quality.apply_overrides(base, ["model.lr_g"])
    with pytest.raises(SystemExit, match="not a mapping"):
        quality.apply_overrides(base, ["model.lr_g.x=1"])


def test_variant_distils_the_changed_config_scores_each_n_and_merges_results(quality, tmp_path, monkeypatch):
    """suite_variant hands ensure_export the quick-start config with the changes, scores every VARIANT_N on the
    held-out digits with that export, and write_variant keeps the other variants' entries."""
    seen = {}

    def fake_ensure(cfg, work):
        seen["cfg"], seen["work"] = cfg, work
        return work / "export"

    def fake_run(sample, name, out, **kw):
        seen.setdefault("runs", []).append((out, kw))
        return {"psnr": {"mean": 20.0 + kw["num_steps"], "std": 1.0}, "ssim": {"mean": 0.9, "std": 0.0}}

    monkeypatch.setattr(quality, "ensure_export", fake_ensure)
    monkeypatch.setattr(quality, "run_method", fake_run)
    monkeypatch.setattr(quality, "load_entry", lambda *a: None)
    args = quality.argparse.Namespace(name="lr2", set=["model.lr_d=2e-3"], ud2m_steps=30, work_dir=tmp_path)
    result = quality.suite_variant(args)
    assert seen["cfg"]["model"]["lr_d"] == 2e-3 and seen["cfg"]["trainer"]["max_steps"] == 30
    assert seen["work"] == tmp_path / "digits" / "ud2m_K3_lr2"
    assert [kw["num_steps"] for _, kw in seen["runs"]] == list(quality.VARIANT_N)
    export = str(seen["work"] / "export")
    assert all(kw["input"] == "digits:val" and kw["checkpoint"] == export for _, kw in seen["runs"])
    assert result["by_n"]["3"]["psnr"]["mean"] == 23.0 and result["steps"] == 30

    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"variants": {"other": {**result, "set": []}}}))
    quality.write_variant(args, result, start=0.0, path=path)
    stored = json.loads(path.read_text())["variants"]
    assert set(stored) == {"other", "lr2"}
    assert stored["lr2"]["meta"]["command"].startswith("python benchmarks/quality.py")
    table = quality.variants_table(stored)
    assert "| lr2 | `model.lr_d=2e-3` | 30 | 23.00 ± 1.00 | 24.00 ± 1.00 |" in table
    assert table[2].startswith("| other | none | 30 |")  # the earlier entry keeps its place
    with pytest.raises(SystemExit, match="--name"):
        quality.suite_variant(quality.argparse.Namespace(name=None, set=[], ud2m_steps=None, work_dir=tmp_path))


def test_photos_variant_distils_the_problem_config_and_tables_it_apart(quality, tmp_path, monkeypatch):
    """--problem sr_x4: the photos config of that problem with the changes, scored by ud2m_rows_of at each VARIANT_N
    on the held-out crops (tuned on training crops), stored as '<problem>/<name>' and tabled apart from digits."""
    seen = {}

    def fake_ensure(cfg, work):
        seen["cfg"], seen["work"] = cfg, work
        return work / "export"

    def fake_rows(sample, work, name, export, extra, *, test_input, tune_input):
        seen.setdefault("rows", []).append((name, extra, test_input, tune_input))
        n = extra.get("num_steps", 3)
        return {
            name: {"psnr": {"mean": 20.0 + n, "std": 1.0}},
            f"{name}, tuned start (t ≤ 500)": {"psnr": {"mean": 21.0 + n, "std": 1.0}},
        }

    monkeypatch.setattr(quality, "ensure_export", fake_ensure)
    monkeypatch.setattr(quality, "ud2m_rows_of", fake_rows)
    monkeypatch.setattr(quality, "write_crops", lambda folder, photos: folder)
    monkeypatch.setattr(quality, "load_entry", lambda *a: None)
    args = quality.argparse.Namespace(
        name="aug", set=["data.init_args.rot90=true"], ud2m_steps=20, work_dir=tmp_path, problem="deblur_gaussian"
    )
    result = quality.suite_variant(args)
    preset = quality.yaml.safe_load((quality.ROOT / "ud2m/assets/operators/photos/deblur_gaussian.yaml").read_text())
    assert seen["cfg"]["model"]["operator"] == preset["operator"]
    assert seen["cfg"]["data"]["init_args"]["rot90"] is True and seen["cfg"]["trainer"]["max_steps"] == 20
    assert seen["work"] == tmp_path / "photos" / "deblur_gaussian" / "ud2m_aug"
    assert [extra.get("num_steps", 3) for _, extra, _, _ in seen["rows"]] == list(quality.VARIANT_N)
    assert all(t == str(tmp_path / "photos" / "test_inputs") for _, _, t, _ in seen["rows"])
    assert all(t == str(tmp_path / "photos" / "tune_inputs") for _, _, _, t in seen["rows"])
    assert result["problem"] == "deblur_gaussian" and "N = 4, tuned start (t ≤ 500)" in result["rows"]

    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"variants": {"lr2": {"set": [], "steps": 30, "by_n": {"3": {"psnr": None}}}}}))
    quality.write_variant(args, result, start=0.0, path=path)
    stored = json.loads(path.read_text())["variants"]
    assert set(stored) == {"lr2", "deblur_gaussian/aug"}
    table = quality.photos_variants_table({"deblur_gaussian/aug": stored["deblur_gaussian/aug"]})
    assert table[2] == (
        "| aug | deblur_gaussian | `data.init_args.rot90=true` | 20 | 23.00 ± 1.00 / 24.00 ± 1.00 | "
        "24.00 ± 1.00 / 25.00 ± 1.00 |"
    )


def test_sample_figures_of_an_earlier_run_are_kept_when_the_outputs_are_gone(quality, tmp_path):
    """A report on a fresh checkout (no output images under the work dir) keeps and links the sample figure the last
    full run drew, instead of silently dropping it from the README; with no earlier figure there is none."""
    pytest.importorskip("matplotlib")
    rows = {"TV": {"output_dir": str(tmp_path / "gone")}}
    suites = {"photos": {"problems": {"sr_x4": rows, "inpaint_box": rows}}}
    out = tmp_path / "figures"
    out.mkdir()
    earlier = out / "samples_photos_sr_x4.png"
    earlier.write_bytes(b"\x89PNG earlier")
    figures = quality.make_figures(None, suites, out)
    assert figures == [("photos sr_x4: y, mean, std and truth per method", earlier)]
    assert earlier.read_bytes() == b"\x89PNG earlier" and not (out / "samples_photos_inpaint_box.png").exists()


def test_a_mean_of_chains_row_counts_every_chain_in_its_nfe(quality, tmp_path, monkeypatch):
    """A UD2M row with ``num_samples`` S (one restoration as the mean of S batched chains) records its chains, and
    the table's NFE column gives S × the calls of one chain; a one-chain row keeps its plain count."""
    import ud2m.export

    calls = []

    def fake_run(sample, name, out, **kw):
        calls.append(kw)
        return {"psnr": {"mean": 28.0, "std": 1.0}, "nfe": {"mean": 6.0}, "seconds": {"mean": 0.1}}

    monkeypatch.setattr(quality, "run_method", fake_run)
    monkeypatch.setattr(quality, "tune", lambda *a, **k: ("tstart999", {"tstart999": 1.0}))
    monkeypatch.setattr(ud2m.export, "read_manifest", lambda e: {"sampler": {}, "block": {"renoise": "full"}})
    name = "UD2M (x), N x K = 2 x 3, mean of 2 chains"
    rows = quality.ud2m_rows_of(
        None, tmp_path, name, tmp_path / "export", {"num_steps": 2, "num_samples": 2}, test_input="t", tune_input="u"
    )
    assert rows[name]["chains"] == 2 and calls[0]["num_samples"] == 2
    one = {"psnr": {"mean": 27.0, "std": 1.0}, "nfe": {"mean": 9.0}, "seconds": {"mean": 0.1}}
    table = quality.problem_table({name: rows[name], "UD2M (x), N x K = 3 x 3": one})
    assert table[2].startswith(f"| {name} | 12 (2 × 6) | 28.00 ± 1.00 |")
    assert table[3].startswith("| UD2M (x), N x K = 3 x 3 | 9 | 27.00 ± 1.00 |")


def test_a_photos_run_over_some_problems_notes_only_those(quality, tmp_path):
    """photos_notes: the problems a run computed get its note (chained to their own earlier note), the others keep
    the note of the run they came from, and the report prints each problem's own note."""
    import argparse

    args = argparse.Namespace(ud2m_only=True, diffusion_only=False, skip_dps=True, skip_ud2m=False)
    previous = {"meta": {"note": "old run."}, "problems": {"sr_x4": {}, "inpaint_random": {}}}
    notes = quality.photos_notes(args, previous, ["inpaint_random"])
    assert notes["sr_x4"] == "old run."
    assert notes["inpaint_random"].startswith("the UD2M rows re-run (--ud2m_only, ")
    assert notes["inpaint_random"].endswith("; that run: old run.")
    again = quality.photos_notes(args, {"meta": {"notes": notes}, "problems": previous["problems"]}, ["sr_x4"])
    assert again["inpaint_random"] == notes["inpaint_random"] and again["sr_x4"].endswith("; that run: old run.")
    row = {"psnr": {"mean": 20.0, "std": 1.0}, "seconds": {"mean": 0.1}}
    payload = {"meta": {"notes": notes}, "problems": {"sr_x4": {"TV": row}, "inpaint_random": {"TV": row}}}
    (quality.RESULTS / "quality_photos.json").write_text(json.dumps(payload))
    text = quality.report()
    assert text.count("*old run.*") == 1 and text.count("; that run: old run.*") == 1
