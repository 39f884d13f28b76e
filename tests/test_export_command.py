"""``train.py export`` / ``train.py prior export`` and the export written at the end of training (issue [api]).

One tiny UD2M run (the tiny_pixel_sr4 config, 2 steps, in-process) serves every test: the export of its ``last.ckpt``
by the documented command (``--ckpt/--out``, and the older positional form) must be the export that
``ExportOnTrainEnd`` wrote for the same weights (same manifest, same tensors, same restored image through
``sample.py``), and a second training run into the same export folder must stop before training.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ud2m.io import digits_names
from ud2m.training.callbacks import ExportOnTrainEnd

ROOT = Path(__file__).resolve().parents[1]


def _load(script: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{script}_script", ROOT / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


train_main = _load("train", "main")
sample = _load("sample", "sample")


def tiny_config(root: Path, name: str) -> Path:
    """configs/experiments/tiny_pixel_sr4.yaml on digit shards and a tiny prior under ``root``, 2 steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml").read_text())
    cfg["model"]["sampler"]["init_args"]["prior"]["init_args"]["path_or_hub_id"] = str(root / "prior")
    cfg["data"]["init_args"].update(
        train_shards=str(root / "shards" / "train-{000000..000003}.tar"),
        val_shards=str(root / "shards" / "val-000000.tar"),
    )
    cfg["trainer"].update(
        max_steps=2, val_check_interval=2, default_root_dir=str(root / name), enable_progress_bar=False
    )
    cfg["trainer"]["callbacks"][-1]["init_args"]["out_dir"] = str(root / "end_of_training")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(cli_inputs):
    """A 2-step UD2M run on the shared digit shards and tiny prior: its last.ckpt and the ExportOnTrainEnd folder."""
    root = cli_inputs
    train_main(["fit", "--config", str(tiny_config(root, "first"))])
    return {"root": root, "ckpt": next((root / "first").rglob("last.ckpt")), "export": root / "end_of_training"}


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(folder).as_posix(): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("form", ["options", "positional"])
def test_export_command_equals_the_end_of_training_export(form, trained, tmp_path):
    """``train.py export --ckpt C --out O`` exited 2, and the positional form wrote base_model.id_or_path, sha256 and
    operator.init_args as null; both forms now write the end-of-training export of the same weights."""
    out = tmp_path / "export"
    args = (
        ["--ckpt", str(trained["ckpt"]), "--out", str(out)] if form == "options" else [str(trained["ckpt"]), str(out)]
    )
    train_main(["export", *args])
    manifest = json.loads((out / "ud2m.json").read_text())
    reference = json.loads((trained["export"] / "ud2m.json").read_text())
    assert manifest["base_model"]["id_or_path"] == str(trained["root"] / "prior")
    assert manifest["base_model"]["sha256"] is not None
    assert manifest["operator"]["init_args"]["factor"] == 4
    assert manifest == reference
    ours, theirs = _tensors(out), _tensors(trained["export"])
    assert ours.keys() == theirs.keys()
    for name, state in theirs.items():
        assert state.keys() == ours[name].keys()
        for key, value in state.items():
            torch.testing.assert_close(ours[name][key], value, rtol=0, atol=0, msg=f"{name}:{key}")


def test_exported_checkpoint_restores_like_the_end_of_training_export(trained, tmp_path):
    out = tmp_path / "export"
    train_main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(out)])
    digit = digits_names("val")[0]
    results = {
        name: sample(input=digit, checkpoint=folder, output_dir=tmp_path / name, progress=False, lpips=None)
        for name, folder in (("command", out), ("callback", trained["export"]))
    }
    stem = results["command"]["images"][0]["image"]
    x_hat = {name: (tmp_path / name / f"{stem}_restored.png").read_bytes() for name in results}
    assert x_hat["command"] == x_hat["callback"]
    assert results["command"]["images"][0]["psnr"] == results["callback"]["images"][0]["psnr"]


def test_export_command_refuses_an_existing_export(trained, tmp_path):
    out = tmp_path / "export"
    train_main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(out)])
    before = (out / "ud2m.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=f"{out} already holds a UD2M export"):
        train_main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(out)])
    assert (out / "ud2m.json").stat().st_mtime_ns == before
    train_main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(out), "--overwrite", "true"])


def test_training_into_an_existing_export_stops_before_training(trained):
    """ExportOnTrainEnd overwrote an existing export at the end of fit; it now refuses at setup, before any step."""
    root, export = trained["root"], trained["export"]
    before = {p: p.stat().st_mtime_ns for p in export.rglob("*")}
    with pytest.raises(
        FileExistsError, match=f"ExportOnTrainEnd: {export} already holds a UD2M export.*overwrite: true"
    ):
        train_main(["fit", "--config", str(tiny_config(root, "second"))])
    assert not list((root / "second").rglob("*.ckpt"))  # no training step ran
    assert not list((root / "second").rglob("version_*"))  # and no empty log folder is left behind
    assert {p: p.stat().st_mtime_ns for p in export.rglob("*")} == before


def test_remove_failed_log_dir_never_touches_older_files(tmp_path):
    import time

    from ud2m.training.base_cli import remove_failed_log_dir

    reused = tmp_path / "version_0"
    reused.mkdir()
    (reused / "events.old").write_text("from an earlier run")
    started = time.time() + 1
    (reused / "config.yaml").write_text("this run")
    assert not remove_failed_log_dir(reused, started, global_step=0) and reused.is_dir()
    fresh = tmp_path / "version_1"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("this run")
    assert not remove_failed_log_dir(fresh, started - 5, global_step=3) and fresh.is_dir()  # it trained
    assert remove_failed_log_dir(fresh, started - 5, global_step=0) and not fresh.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_callback_setup_checks_the_folder(overwrite, tmp_path):
    (tmp_path / "ud2m.json").write_text("{}")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    callback = ExportOnTrainEnd(str(tmp_path), overwrite=overwrite)
    callback.setup(trainer, None, "validate")  # only fit exports
    if overwrite:
        callback.setup(trainer, None, "fit")
    else:
        with pytest.raises(FileExistsError, match="overwrite: true"):
            callback.setup(trainer, None, "fit")


def test_prior_export_accepts_ckpt_and_out(tmp_path):
    """``train.py prior export --ckpt C --out O`` (docs/prior_training.md) exited 2 as well."""
    from ud2m.priors.pixel import PixelDiffusionPrior

    config = {
        "model": {
            "unet": {"class_path": "diffusers.UNet2DModel", "init_args": {
                "layers_per_block": 1, "block_out_channels": [8, 16], "norm_num_groups": 8,
                "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
            }},
            "val_num_samples": 1, "val_num_steps": 1,
        },
        "data": {"class_path": "ud2m.training.data.SyntheticImages",
                 "init_args": {"num_train": 2, "num_val": 1, "batch_size": 2, "image_size": 8, "channels": 1}},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0},
    }  # fmt: skip
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(config))
    train_main(["prior", "fit", "--config", str(tmp_path / "prior.yaml")])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    train_main(["prior", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "prior")])
    assert PixelDiffusionPrior.from_pretrained(tmp_path / "prior").latent_channels == 1
