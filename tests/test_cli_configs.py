"""Shipped training configs cannot go stale (house-style L, Lightning ``test_cli.py`` pattern): every
``configs/experiments/**/*.yaml`` parses under ``mock.patch("sys.argv", ...)`` with ``run=False``, the tiny ones also
instantiate (model, data, trainer, callbacks), and a wrong key fails with a message that names it.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from ud2m.training.cli import UD2MCLI

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = [*sorted((ROOT / "configs" / "experiments").rglob("*.yaml")), ROOT / "configs" / "quickstart.yaml"]


class ParseOnlyCLI(UD2MCLI):
    """Parse and validate (types, keys, ``class_path`` resolution, links) without building anything: the realistic
    configs name hub models that are not available offline."""

    def instantiate_classes(self) -> None:
        """Skip instantiation."""


def test_the_required_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    assert {"tiny_pixel_sr4.yaml", "tiny_latent_deblur.yaml", "ddpm_bedroom_sr4.yaml"} <= names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_parses(config):
    with mock.patch("sys.argv", ["train.py", "--config", str(config)]):
        cli = ParseOnlyCLI(run=False)
    model = cli.config.model
    assert model.sampler.class_path == "ud2m.unfolded.UnfoldedSampler"
    if model.discriminator is not None:  # linked from the data section
        assert model.discriminator.init_args.image_size == cli.config.data.init_args.image_size
        assert model.discriminator.init_args.in_channels == cli.config.data.init_args.channels
    assert cli.config.checkpoint.save_last is True


@pytest.fixture(scope="module")
def prior_folders(tmp_path_factory):
    from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior
    from ud2m.priors.tiny_latent import write_tiny_pipeline

    root = tmp_path_factory.mktemp("priors")
    save_tiny_pixel_pipeline(root / "pixel_gray", tiny_pixel_prior(in_channels=1))
    write_tiny_pipeline(root / "lcm", "lcm")
    return {"tiny_pixel_sr4": root / "pixel_gray", "tiny_latent_deblur": root / "lcm"}


@pytest.mark.parametrize("name", ["tiny_pixel_sr4", "tiny_latent_deblur"])
def test_tiny_config_instantiates(name, prior_folders, tmp_path):
    from ud2m.training.module import UnfoldedDistillation

    argv = [
        "train.py", "--config", str(ROOT / "configs" / "experiments" / f"{name}.yaml"),
        "--model.sampler.init_args.prior.init_args.path_or_hub_id", str(prior_folders[name]),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    with mock.patch("sys.argv", argv):
        cli = UD2MCLI(run=False)
    assert isinstance(cli.model, UnfoldedDistillation)
    assert cli.model.hparams.sampler["class_path"] == "ud2m.unfolded.UnfoldedSampler"  # config, not a pickled module
    assert cli.datamodule.image_size == cli.model.discriminator.image_size[0]
    assert cli.trainer.checkpoint_callback is not None and cli.trainer.checkpoint_callback.save_last is True


@pytest.mark.parametrize(
    ("override", "bad_key"),
    [("--model.omega_l3=1.0", "omega_l3"), ("--data.init_args.batch_sise=2", "batch_sise")],
)
def test_wrong_key_fails_naming_the_key(override, bad_key, tmp_path, capsys):
    config = ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml"
    with mock.patch("sys.argv", ["train.py", "--config", str(config), override]), pytest.raises(SystemExit) as err:
        ParseOnlyCLI(run=False)
    assert err.value.code != 0
    assert bad_key in capsys.readouterr().err


def test_wrong_key_in_a_yaml_file_fails_naming_the_key(tmp_path, capsys):
    text = (ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  sigma_y: 0.05\n", "  sigma_y: 0.05\n  lr_generator: 1.0e-4\n"))
    with mock.patch("sys.argv", ["train.py", "--config", str(bad)]), pytest.raises(SystemExit):
        ParseOnlyCLI(run=False)
    assert "lr_generator" in capsys.readouterr().err


def _quality_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("problem", ["sr_x4", "deblur_gaussian", "inpaint_random", "inpaint_box"])
def test_quality_benchmark_photos_configs_parse_with_each_presets_operator(problem, tmp_path):
    """benchmarks/quality.py derives one UD2M config per photos problem from photos_sr4.yaml: each must parse and
    carry its preset's operator and noise level (and §7.1's rho scale 13 where pixels are unobserved)."""
    import yaml

    from ud2m.operators.presets import load_preset

    cfg = _quality_benchmark().photos_config(problem)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with mock.patch("sys.argv", ["train.py", "--config", str(tmp_path / "c.yaml")]):
        cli = ParseOnlyCLI(run=False)
    preset = load_preset(f"photos/{problem}")
    assert (
        cli.config.model.operator.class_path == f"{type(preset.operator).__module__}.{type(preset.operator).__name__}"
    )
    assert cli.config.model.sigma_y == preset.sigma_y
    init = cli.config.model.sampler.init_args  # the default noise rule serves every problem (§7.1 revision)
    assert init.get("noise_rule", "prior") == "prior" and init.get("rho_sigma_scale", 1.0) == 1.0


def test_train_help_lists_every_command():
    """``train.py --help`` names export and the prior commands before LightningCLI's own usage (issue [api])."""
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "train.py"), "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("export --ckpt", "prior fit", "prior distil", "prior export", "prior card", "fit | validate"):
        assert command in proc.stdout, command
    assert proc.stdout.index("prior distil") < proc.stdout.index("usage:")
    assert "not recommended to provide both args and command line arguments" not in proc.stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["fit", "--config", "{bad}"], "bad.yaml, line 2, column 6: invalid YAML"),
        (["fit", "--config", "{config}", "--model.omega_l3=1.0"], "omega_l3"),
        (["export", "--ckpt", "{tmp}/missing.ckpt", "--out", "{tmp}/out"], "missing.ckpt"),
    ],
)
def test_train_errors_are_two_lines_before_any_usage(args, match, tmp_path, capsys, monkeypatch):
    """Issue [api]: a user error of train.py is ``train.py: error: ...`` plus a hint, exit status 2, no traceback and
    no usage text (it used to follow 87 lines of usage); --debug raises with the traceback instead."""
    from ud2m.cli.train import cli
    from ud2m.training.base_cli import ParserSettings

    monkeypatch.setattr(ParserSettings, "exit_on_error", True)  # cli() sets it False; restored after the test
    (tmp_path / "bad.yaml").write_text("model:\n  x: : 1\n")
    config = ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml"
    argv = [a.format(bad=tmp_path / "bad.yaml", config=config, tmp=tmp_path) for a in args]
    monkeypatch.setattr("sys.argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 2, err
    assert err[0].startswith("train.py: error: ") and match in err[0] and not any("usage" in line for line in err)
    monkeypatch.setattr("sys.argv", ["train.py", *argv, "--debug"])
    with pytest.raises(Exception) as raised:
        cli()
    assert not isinstance(raised.value, SystemExit)


def test_lightning_compat_reads_the_cli_hyperparameters_only_inside_the_cli(prior_folders, tmp_path):
    """ud2m.training.lightning_compat is the one place that reads a Lightning internal: outside LightningCLI it gives
    None (modules keep injected objects out of hparams), inside it the parsed config reaches the module's hparams."""
    from ud2m.training.lightning_compat import cli_hyperparameters

    assert cli_hyperparameters() is None
    argv = [
        "train.py", "--config", str(ROOT / "configs" / "experiments" / "tiny_pixel_sr4.yaml"),
        "--model.sampler.init_args.prior.init_args.path_or_hub_id", str(prior_folders["tiny_pixel_sr4"]),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    seen = []
    real = cli_hyperparameters
    with (
        mock.patch("sys.argv", argv),
        mock.patch("ud2m.training.module.cli_hyperparameters", lambda: seen.append(real()) or seen[-1]),
    ):
        cli = UD2MCLI(run=False)
    assert seen and isinstance(seen[0], dict) and seen[0]["sampler"]["class_path"] == "ud2m.unfolded.UnfoldedSampler"
    assert cli.model.hparams.sampler["class_path"] == "ud2m.unfolded.UnfoldedSampler"  # the config, not a module
