"""Tests of the UD2M training data: ``data/make_shards.py`` and ``ud2m.training.data`` (issue [ud2m], "Data").

Real pixels (crops of scikit-image photographs, scikit-learn digits) go through the shard writer and come back out
of the DataModules; the checks are exact identities (8-bit round trip, crops, noise replay) or derived statistics.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import logging
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ud2m.io import center_crop, load_image
from ud2m.operators import measure
from ud2m.operators.presets import instantiate_operator
from ud2m.training import ImageFolderImages, SyntheticImages, WebDatasetImages
from ud2m.training.data import split_train_val

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
STEP = 2 / 255  # one 8-bit quantisation step on the [-1, 1] scale
# (name, crop height, crop width, subfolder): sizes vary so that central crops really crop
PHOTOS = [
    ("astronaut", 40, 48, ""), ("camera", 36, 36, ""), ("coffee", 48, 40, ""), ("rocket", 32, 44, "sub"),
    ("cat", 40, 40, "sub"), ("coins", 44, 36, "sub"), ("brick", 32, 32, ""), ("moon", 38, 50, "sub/deeper"),
    ("grass", 33, 47, ""), ("clock", 46, 34, ""),
]  # fmt: skip


@pytest.fixture(scope="module")
def ms():
    """``data/make_shards.py`` imported from its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "data" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """10 PNG crops of skimage photographs (gray and RGB, nested folders), one too small, one broken, one text."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name, h, w, sub in PHOTOS:
        arr = np.asarray(getattr(data, name)())[100 : 100 + h, 120 : 120 + w]
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / sub / f"{name}.png")
    Image.fromarray(np.asarray(data.astronaut())[:20, :24]).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"this is not a PNG file" * 10)
    (root / "notes.txt").write_text("not an image")
    return root


def shard_args(ms, out: Path, *extra: str):
    return ms.parse_args(["--out", str(out), "--size", str(SIZE), "--quiet", *extra])


@pytest.fixture(scope="module")
def shards(ms, photo_folder, tmp_path_factory):
    """Unpaired shards of the photo folder: 32x32 RGB central crops, 3 samples per shard, 30 % validation."""
    out = tmp_path_factory.mktemp("shards")
    args = shard_args(ms, out, "--input", str(photo_folder), "--val_fraction", "0.3", "--maxcount", "3")
    args.small = "skip"
    sources, ignored = ms.collect_sources(args)
    return out, ms.make_shards(sources, args, ignored=ignored, progress=False), sources


def names_in(out: Path, split: str) -> list[str]:
    """Sample keys stored in the shards of ``split``, straight from the tar files."""
    keys = []
    for p in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(p) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png")]
    return keys


def read_all(dm: WebDatasetImages, split: str = "val") -> dict[str, dict]:
    """Every sample of one pass, by key (x, and y/params when paired); training drops partial batches."""
    dm.setup()
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    out = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            out[key] = {k: v[i] for k, v in batch.items() if k != "key"}
    return out


def pattern(out: Path, split: str) -> str:
    n = len(list(out.glob(f"{split}-*.tar")))
    return str(out / f"{split}-{{000000..{n - 1:06d}}}.tar")


# ------------------------------------------------------------------------------------------------ split


def test_split_train_val_is_deterministic_disjoint_and_order_free():
    names = [f"img{i:03d}" for i in range(100)]
    train, val = split_train_val(names, 0.2, seed=3)
    assert len(val) == 20 and sorted(train + val) == list(range(100))
    shuffled = names[::-1]
    _, val2 = split_train_val(shuffled, 0.2, seed=3)
    assert {shuffled[i] for i in val2} == {names[i] for i in val}  # same names whatever the listing order
    assert set(split_train_val(names, 0.2, seed=4)[1]) != set(val)
    assert len(split_train_val(names[:3], 0.01, seed=0)[1]) == 1  # at least one when asked for
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_train_val(names, 1.0, seed=0)


# ------------------------------------------------------------------------------------------------ make_shards


def test_make_shards_counts_skips_and_shard_sizes(shards, photo_folder):
    out, summary, sources = shards
    assert summary["skipped_unreadable"] == 1  # broken.png
    assert summary["skipped_small"] == 1  # tiny.png (20x24 < 32 with --small skip)
    assert summary["ignored"] == 1  # notes.txt
    assert len(sources) == len(PHOTOS) + 2
    train_idx, val_idx = split_train_val([s.name for s in sources], 0.3, seed=0)
    bad = {"broken.png", "tiny.png"}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        expected = sum(sources[i].name not in bad for i in idx)
        stored = names_in(out, split)
        assert summary[split] == len(stored) == expected
        assert summary[f"{split}_shards"] == len(list(out.glob(f"{split}-*.tar"))) == math.ceil(expected / 3)
    assert summary["train"] + summary["val"] == len(PHOTOS)


def test_val_images_round_trip_exactly(shards, photo_folder):
    out, summary, _ = shards
    dm = WebDatasetImages(pattern(out, "train"), pattern(out, "val"), image_size=SIZE, batch_size=2, resampled=False)
    samples = read_all(dm, "val")
    assert len(samples) == summary["val"]
    files = {
        p.relative_to(photo_folder).with_suffix("").as_posix().replace("/", "_"): p for p in photo_folder.rglob("*.png")
    }
    for key, s in samples.items():
        source = files[key.split("_", 1)[1]]
        x_ref = center_crop(load_image(source, channels=3), SIZE)[0]  # (3, 32, 32)
        assert s["x"].dtype == torch.float32 and s["x"].shape == (3, SIZE, SIZE)
        assert (s["x"] - x_ref).abs().max() <= STEP / 2 + 1e-6


def test_train_crops_are_windows_of_stored_images_and_seeded(shards):
    out, _, _ = shards
    kw = dict(image_size=24, batch_size=1, resampled=False, shuffle_buffer=8)
    stored = {}
    for p in sorted(out.glob("train-*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    stored[m.name.split(".")[0]] = load_png(tar.extractfile(m).read())
    dm = WebDatasetImages(pattern(out, "train"), seed=1, **kw)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sorted(b["key"][0] for b in batches) == sorted(stored)  # one pass reads every sample once
    for b in batches:
        assert is_window(b["x"][0], stored[b["key"][0]])
    again = list(WebDatasetImages(pattern(out, "train"), seed=1, **kw).train_dataloader())
    assert all(torch.equal(a["x"], b["x"]) and a["key"] == b["key"] for a, b in zip(batches, again, strict=True))
    other = list(WebDatasetImages(pattern(out, "train"), seed=2, **kw).train_dataloader())
    assert any(not torch.equal(a["x"], b["x"]) for a, b in zip(batches, other, strict=True))


def load_png(data: bytes) -> torch.Tensor:
    from PIL import Image

    arr = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255 * 2 - 1


def is_window(x: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether ``x`` equals some crop of ``image`` or of its horizontal mirror."""
    s = x.shape[-1]
    for im in (image, image.flip(-1)):
        windows = im.unfold(1, s, 1).unfold(2, s, 1)  # (C, nH, nW, s, s)
        if ((windows - x[:, None, None]).abs().amax(dim=(0, 3, 4)) < 1e-6).any():
            return True
    return False


# ------------------------------------------------------------------------------------------------ corrupt data


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_sample(ms, key: str, value: int) -> list[tuple[str, bytes]]:
    arr = np.full((16, 16, 3), value, dtype=np.uint8)
    return [(f"{key}.png", ms.encode_png(arr)), (f"{key}.json", json.dumps({"source": key}).encode())]


def test_corrupt_members_are_skipped_counted_and_logged(ms, tmp_path, caplog):
    bad = [
        ("bad_png.png", b"\x89PNG\r\n\x1a\n garbage"), ("bad_png.json", b"{}"),
        ("bad_json.png", ms.encode_png(np.zeros((16, 16), np.uint8))), ("bad_json.json", b"{not json"),
        ("no_json.png", ms.encode_png(np.zeros((16, 16), np.uint8))),
        ("no_png.json", b"{}"),
    ]  # fmt: skip
    members = good_sample(ms, "good0", 10) + bad[:4] + good_sample(ms, "good1", 20) + bad[4:]
    members += good_sample(ms, "good2", 30)
    write_tar(tmp_path / "val-000000.tar", members)
    dm = WebDatasetImages(str(tmp_path / "val-000000.tar"), str(tmp_path / "val-000000.tar"), image_size=16)
    with caplog.at_level(logging.WARNING, logger="ud2m.training.data"):
        samples = read_all(dm, "val")
    assert sorted(samples) == ["good0", "good1", "good2"]
    for key, value in (("good0", 10), ("good1", 20), ("good2", 30)):
        assert torch.allclose(samples[key]["x"], torch.full((3, 16, 16), value / 255 * 2 - 1))
    assert dm.skipped_samples == 4
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 4
    assert all("val-000000.tar" in m for m in skipped)
    assert {k for k in ("bad_png", "bad_json", "no_json", "no_png") if any(k in m for m in skipped)} == {
        "bad_png", "bad_json", "no_json", "no_png",
    }  # fmt: skip


def test_truncated_tar_keeps_complete_samples(ms, tmp_path):
    path = tmp_path / "val-000000.tar"
    write_tar(path, good_sample(ms, "s0", 1) + good_sample(ms, "s1", 2) + good_sample(ms, "s2", 3))
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "s2.png").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    dm = WebDatasetImages(str(path), str(path), image_size=16)
    assert sorted(read_all(dm, "val")) == ["s0", "s1"]
    assert dm.skipped_samples >= 1


def test_a_truncated_shard_counts_every_sample_it_lost(ms, tmp_path, caplog):
    """Issue [api] 5: make_shards.py records each shard's size in info.json; a shard cut in half yields the samples
    before the cut, and skipped_samples counts all the others (not one error per truncated tar)."""
    out = tmp_path / "digits"
    ms.main(["--from_digits", "--out", str(out), "--limit", "30", "--maxcount", "20", "--quiet"])
    sizes = json.loads((out / "info.json").read_text())["shards"]
    assert sum(sizes.values()) == 30 and sizes["train-000000.tar"] == 20
    shard = out / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    dm = WebDatasetImages(str(out / "train-{000000..000001}.tar"), str(shard), image_size=32, channels=1)
    with caplog.at_level(logging.WARNING):
        read = read_all(dm, "val")
    assert 0 < len(read) < 20
    assert dm.skipped_samples == 20 - len(read)
    assert any(f"read {len(read)} of its 20 samples, {20 - len(read)} lost" in r.getMessage() for r in caplog.records)


def test_skips_in_workers_reach_the_datamodule_through_lightning(ms, tmp_path):
    import lightning as L

    members = [("bad.png", b"junk"), ("bad.json", b"{}"), ("nojson.png", b"junk"), *good_sample(ms, "ok", 5)]
    write_tar(tmp_path / "val-000000.tar", members)
    seen = []

    class Probe(L.LightningModule):
        def validation_step(self, batch, batch_idx):
            seen.append(sorted(batch))

    shard = str(tmp_path / "val-000000.tar")
    dm = WebDatasetImages(shard, shard, image_size=16, num_workers=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(Probe(), datamodule=dm)
    assert seen == [["key", "x"]]  # "skipped" was removed before the module saw the batch
    assert dm.skipped_samples == 2


# ------------------------------------------------------------------------------------------------ ranks and workers


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(shards, monkeypatch):
    out, summary, _ = shards
    n = summary["train_shards"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(n + 1))
    with pytest.raises(ValueError, match=rf"{n} training shards .*world_size={n + 1}.*resampled=True"):
        WebDatasetImages(pattern(out, "train"), resampled=False).setup()
    WebDatasetImages(pattern(out, "train"), resampled=True).setup()  # resampling serves any number of ranks
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=rf"x max\(1, num_workers={n + 1}\) = {n + 1}"):
        WebDatasetImages(pattern(out, "train"), resampled=False, num_workers=n + 1).setup()


def test_two_ranks_read_disjoint_samples(shards, monkeypatch):
    out, summary, _ = shards
    keys = {}
    val = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = WebDatasetImages(
            pattern(out, "train"), pattern(out, "val"), image_size=SIZE, batch_size=1, resampled=False
        )
        keys[rank] = set(read_all(dm, "train"))
        val[rank] = set(read_all(dm, "val"))
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(names_in(out, "train"))
    all_val = set(names_in(out, "val"))
    if summary["val_shards"] >= 2:
        assert not val[0] & val[1] and val[0] | val[1] == all_val
    else:  # fewer validation shards than ranks: every rank reads all of them
        assert val[0] == val[1] == all_val


def test_resampled_streams_depend_on_rank_and_seed_only(shards, monkeypatch):
    out, _, _ = shards

    def stream(rank: int) -> list[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = WebDatasetImages(pattern(out, "train"), image_size=SIZE, batch_size=2, samples_per_epoch=12, seed=5)
        dm.setup()
        batches = list(dm.train_dataloader())
        assert len(batches) == 6  # with_epoch: samples_per_epoch // batch_size batches
        return [k for b in batches for k in b["key"]]

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)


# ------------------------------------------------------------------------------------------------ paired data


def test_paired_shards_from_cli_round_trip_y_and_operator(photo_folder, tmp_path):
    sigma_y = 0.05
    out = tmp_path / "paired"
    cmd = [sys.executable, "data/make_shards.py", "--input", str(photo_folder), "--out", str(out), "--size", "32"]
    cmd += ["--operator", "ud2m/deblur_gaussian", "--sigma_y", str(sigma_y), "--val_fraction", "0.2", "--quiet"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "1 unreadable" in run.stdout and "ignored 1 non-image" in run.stdout
    dm = WebDatasetImages(pattern(out, "train"), pattern(out, "val"), image_size=SIZE, batch_size=1, resampled=False)
    samples = read_all(dm, "train") | read_all(dm, "val")
    assert len(samples) == len(PHOTOS) + 1  # tiny.png is upscaled (default --small upscale)
    residuals = []
    for s in samples.values():
        p = s["params"]
        assert p["sigma_y"] == sigma_y and p["preset"] == "ud2m/deblur_gaussian"
        op = instantiate_operator(p["operator"])
        x, y = s["x"][None], s["y"][None]
        replay = measure(op, x, p["sigma_y"], torch.Generator().manual_seed(p["seed"]))
        assert torch.allclose(replay, y, atol=1e-5)  # same operator, same noise
        residuals.append((y - op.A(x)).double().flatten())
    r = torch.cat(residuals)
    n, sigma_n = r.numel(), 2 * sigma_y  # internal noise std (§1.1)
    # std estimate: relative standard error 1/sqrt(2n); mean: standard error sigma_n/sqrt(n); 5 standard errors
    assert abs(r.std().item() / sigma_n - 1) < 5 / math.sqrt(2 * n)
    assert abs(r.mean().item()) < 5 * sigma_n / math.sqrt(n)


@pytest.mark.parametrize("task", ["low-light", "haze", "noise", "colour"])
def test_simulated_shards_draw_parameters_per_sample_and_replay_exactly(ms, photo_folder, tmp_path, task):
    """--simulate: every sample draws its own §13.8 parameters; the stored seeds replay y bit for bit."""
    from ud2m.operators.simulate import HAZE_BETA, LOW_LIGHT_GAMMA, TASK_SIGMA_Y, simulate_task

    args = shard_args(ms, tmp_path, "--input", str(photo_folder), "--simulate", task, "--val_fraction", "0")
    sources, _ = ms.collect_sources(args)
    summary = ms.make_shards([s for s in sources if "broken" not in s.name][:4], args, progress=False)
    assert summary["train"] == 4
    dm = WebDatasetImages(pattern(tmp_path, "train"), image_size=SIZE, batch_size=1, resampled=False)
    samples = read_all(dm, "train")
    drawn = []
    for s in samples.values():
        p = s["params"]
        assert p["simulate"] == task and p["sigma_y"] == TASK_SIGMA_Y[task] and p["seed"] != p["param_seed"]
        x, y = s["x"][None], s["y"][None]
        gens = (torch.Generator().manual_seed(p["param_seed"]), torch.Generator().manual_seed(p["seed"]))
        replay = simulate_task(task, x, *gens, sigma_y=p["sigma_y"])
        assert torch.allclose(replay.y, y, atol=1e-6)
        drawn.append(p["values"])
    if task == "low-light":
        assert all(LOW_LIGHT_GAMMA[0] <= v["gamma"][0] <= LOW_LIGHT_GAMMA[1] for v in drawn)
    if task == "haze":
        assert all(HAZE_BETA[0] <= v["beta"][0] <= HAZE_BETA[1] for v in drawn) and "depth" not in drawn[0]
    if task == "colour":
        assert all(v == {} for v in drawn) and all(torch.equal(s["y"][0], s["y"][2]) for s in samples.values())
    elif task == "noise":
        assert all(v == {} for v in drawn)  # nothing drawn but the noise
    else:
        assert len({str(v) for v in drawn}) == 4  # per sample, not one draw for the set


def test_bad_simulation_settings_fail_before_touching_the_shards(ms, photo_folder, tmp_path):
    args = shard_args(ms, tmp_path, "--input", str(photo_folder), "--val_fraction", "0")
    sources, _ = ms.collect_sources(args)
    ms.make_shards(sources[:2], args, progress=False)
    before = sorted(p.name for p in tmp_path.glob("*.tar"))
    bad = shard_args(ms, tmp_path, "--input", str(photo_folder), "--simulate", "colour", "--channels", "1")
    bad.overwrite = True
    with pytest.raises(ValueError, match="--simulate colour needs RGB samples"):
        ms.make_shards(sources[:2], bad, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == before and before
    for sigma in ("-0.01", "nan"):  # a bad noise level is refused up front too, not skipped per sample
        bad = shard_args(ms, tmp_path, "--input", str(photo_folder), "--simulate", "haze", "--sigma_y", sigma)
        bad.overwrite = True
        with pytest.raises(ValueError, match="--sigma_y for haze: expected a finite noise level >= 0"):
            ms.make_shards(sources[:2], bad, progress=False)
        assert sorted(p.name for p in tmp_path.glob("*.tar")) == before
    with pytest.raises(SystemExit):  # --operator and --simulate are exclusive
        shard_args(ms, tmp_path, "--input", "x", "--simulate", "haze", "--operator", "ud2m/deblur_gaussian")


def test_paired_samples_refuse_crops(ms, photo_folder, tmp_path):
    args = shard_args(ms, tmp_path, "--input", str(photo_folder), "--operator", "ud2m/deblur_gaussian")
    sources, _ = ms.collect_sources(args)
    ms.make_shards(sources[:3], args, progress=False)
    dm = WebDatasetImages(pattern(tmp_path, "train"), image_size=24, resampled=False, batch_size=1)
    dm.setup()
    with pytest.raises(ValueError, match="paired samples cannot be cropped"):
        next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------------------- digits, folders, synthetic


def test_digits_shards_hold_upsampled_digits(ms, tmp_path):
    from sklearn.datasets import load_digits

    args = shard_args(ms, tmp_path, "--from_digits", "--limit", "20", "--val_fraction", "0.1")
    assert args.channels == 1
    sources, _ = ms.collect_sources(args)
    summary = ms.make_shards(sources, args, progress=False)
    assert (summary["train"], summary["val"]) == (18, 2)
    dm = WebDatasetImages(
        pattern(tmp_path, "train"),
        pattern(tmp_path, "val"),
        image_size=32,
        channels=1,
        batch_size=1,
        resampled=False,
        random_flip=False,
    )
    samples = read_all(dm, "train") | read_all(dm, "val")
    assert len(samples) == 20
    digits = torch.from_numpy(load_digits().images[:20]).double()[:, None] / 16  # (20, 1, 8, 8) on [0, 1]
    ref = 2 * F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False) - 1
    for key, s in samples.items():
        i = int(key.split("_")[1])
        assert s["x"].shape == (1, 32, 32)
        assert (s["x"].double() - ref[i]).abs().max() <= STEP / 2 + 1e-6


def test_image_folder_images(photo_folder):
    dm = ImageFolderImages(str(photo_folder), image_size=SIZE, batch_size=2, val_fraction=0.3, seed=0)
    dm.setup()
    assert dm.skipped_samples == 1  # broken.png
    n_total = len(PHOTOS) + 1  # tiny.png is upscaled
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == n_total
    files = {p.stem: p for p in photo_folder.rglob("*.png")}
    for batch in dm.val_dataloader():
        for x, key in zip(batch["x"], batch["key"], strict=True):
            if key != "tiny":
                assert torch.equal(x, center_crop(load_image(files[key], channels=3), SIZE)[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (2, 3, SIZE, SIZE) and len(batch["key"]) == 2
    for x, key in zip(batch["x"], batch["key"], strict=True):
        if key != "tiny":
            assert is_window(x, load_image(files[key], channels=3)[0])


def is_dihedral_window(x: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether ``x`` equals a crop of ``image`` in one of the 8 orientations (rotations of it and of its mirror)."""
    return any(is_window(x.rot90(-k, (-2, -1)), image) for k in range(4))


def test_rot90_crops_are_dihedral_windows_in_every_orientation():
    from ud2m.training.data import CropFlip

    image = torch.rand(3, 12, 13) * 2 - 1
    crop = CropFlip(5, train=True, seed=0, rot90=True)
    outs = [crop(image) for _ in range(64)]
    assert all(is_dihedral_window(x, image) for x in outs)
    # every rotation occurs (a crop that is a plain window, mirror or not, is rotation k = 0 only for generic pixels)
    ks = {next(k for k in range(4) if is_window(x.rot90(-k, (-2, -1)), image)) for x in outs}
    assert ks == {0, 1, 2, 3}
    plain = CropFlip(5, train=True, seed=0)  # off by default: only windows and their mirrors
    assert all(is_window(plain(image), image) for _ in range(16))


def test_zoom_crops_resize_a_larger_window():
    from ud2m.training.data import CropFlip

    image = torch.rand(3, 16, 16) * 2 - 1
    # scale 1/2 of a 16-pixel image at side 8: the window is the whole image, resized with antialiasing
    crop = CropFlip(8, train=True, seed=0, random_flip=False, zoom=(0.5, 0.5))
    expected = F.interpolate(image[None], size=(8, 8), mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.allclose(crop(image), expected, atol=1e-6)
    # on a linear ramp a window of side w resized to s keeps the ramp with slope w / s (the zoom factor)
    ramp = torch.arange(64.0).div(64).expand(1, 64, 64).contiguous()
    zoom = CropFlip(8, train=True, seed=1, random_flip=False, zoom=(0.25, 0.5))
    for _ in range(8):
        x = zoom(ramp)[0]
        slope = (x[4, 5] - x[4, 2]) / 3 * 64  # interior columns: exact for a linear function
        assert 2.0 - 1e-4 <= slope <= 4.0 + 1e-4
        assert torch.allclose(x - x.mean(0, keepdim=True), torch.zeros(8, 8), atol=1e-5)  # rows stay constant
    with pytest.raises(ValueError, match="zoom"):
        CropFlip(8, train=True, zoom=(0.5, 1.5))
    with pytest.raises(ValueError, match="zoom"):
        CropFlip(8, train=True, zoom=(0.0, 1.0))


def test_image_folder_images_pass_augmentation_to_the_crops(photo_folder):
    dm = ImageFolderImages(str(photo_folder), image_size=SIZE, batch_size=4, val_fraction=0.3, seed=0, rot90=True)
    dm.setup()
    files = {p.stem: p for p in photo_folder.rglob("*.png")}
    rotated = 0
    for batch in itertools.islice(dm.train_dataloader(), 4):
        for x, key in zip(batch["x"], batch["key"], strict=True):
            if key != "tiny":
                image = load_image(files[key], channels=3)[0]
                assert is_dihedral_window(x, image)
                rotated += not is_window(x, image)
    assert rotated > 0
    for batch in dm.val_dataloader():  # validation stays the central crop
        for x, key in zip(batch["x"], batch["key"], strict=True):
            if key != "tiny":
                assert torch.equal(x, center_crop(load_image(files[key], channels=3), SIZE)[0])


def test_synthetic_images_are_seeded_smooth_and_batch_independent():
    a = SyntheticImages(6, 2, batch_size=4, image_size=16, channels=2, seed=0)
    b = SyntheticImages(6, 2, batch_size=3, image_size=16, channels=2, seed=0)
    a.setup(), b.setup()
    xa = torch.stack([a.datasets["train"][i]["x"] for i in range(6)])
    xb = torch.stack([b.datasets["train"][i]["x"] for i in range(6)])
    assert xa.shape == (6, 2, 16, 16) and torch.equal(xa, xb)
    assert xa.abs().max() < 1
    other = SyntheticImages(6, 2, image_size=16, channels=2, seed=1)
    other.setup()
    assert not torch.equal(other.datasets["train"][0]["x"], xa[0])
    val = torch.stack([a.datasets["val"][i]["x"] for i in range(2)])
    assert not torch.isclose(val[:, None], xa[None]).all(dim=(2, 3, 4)).any()  # val never repeats a train image
    # low-pass noise with a Gaussian spectrum exp(-f^2/fc^2) has neighbour correlation exp(-pi^2 fc^2) ~ 0.94 at
    # fc = 0.08, so E(dx^2) ~ 0.12 * 2 var; white noise would give 2 var
    x = xa.double()
    assert (x[..., 1:] - x[..., :-1]).pow(2).mean() < 0.3 * 2 * x.var()
    batch = next(iter(a.train_dataloader()))
    assert batch["x"].shape == (4, 2, 16, 16) and all(k.startswith("synthetic-train-") for k in batch["key"])


def test_image_list_dataset_mixes_the_extra_pool_at_its_fraction():
    from ud2m.training.data import CropFlip, ImageListDataset

    crop = CropFlip(4, train=False)
    main = [torch.full((1, 4, 4), float(i)) for i in range(3)]
    extra = [torch.full((1, 4, 4), -1.0 - i) for i in range(5)]
    ds = ImageListDataset(main, ["m0", "m1", "m2"], crop, 40, extra=(extra, [f"e{i}" for i in range(5)]),
                          extra_fraction=0.25)  # fmt: skip
    keys = [ds[i]["key"] for i in range(40)]
    assert [k for k in keys if k.startswith("e")] == [f"e{i % 5}" for i in range(10)]  # 1/4, each pool in order
    assert [k for k in keys if k.startswith("m")] == [f"m{i % 3}" for i in range(30)]
    assert all(keys[i].startswith("e") for i in range(3, 40, 4))  # spread evenly: every 4th item
    for i in range(40):
        assert ds[i]["x"][0, 0, 0].item() == (-1.0 - int(keys[i][1:]) if keys[i][0] == "e" else int(keys[i][1:]))
    only = ImageListDataset(main, ["m0", "m1", "m2"], crop, 6, extra=(extra, [f"e{i}" for i in range(5)]),
                            extra_fraction=1.0)  # fmt: skip
    assert [only[i]["key"] for i in range(6)] == ["e0", "e1", "e2", "e3", "e4", "e0"]
    plain = ImageListDataset(main, ["m0", "m1", "m2"], crop, 4)
    assert [plain[i]["key"] for i in range(4)] == ["m0", "m1", "m2", "m0"]


def test_image_folder_images_extra_root_feeds_training_only(photo_folder, tmp_path):
    from PIL import Image

    extra = tmp_path / "prior_samples"
    extra.mkdir()
    for i in range(3):  # flat images of one value each, recognisable in a crop
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(extra / f"s{i}.png")
    # a list root expands its folders; the extra pool never enters validation
    root = [str(photo_folder / "sub"), str(extra / "s0.png")]
    dm = ImageFolderImages(
        root, image_size=SIZE, batch_size=2, val_sources=root[1:], extra_root=str(extra), extra_fraction=0.5, seed=0
    )
    assert (
        dm.sources()[-1] == str(extra / "s0.png")
        and len(dm.sources()) == len(list((photo_folder / "sub").rglob("*.png"))) + 1
    )
    dm.setup()
    train = dm.datasets["train"]
    keys = [train[i]["key"] for i in range(8)]
    assert sum(k.startswith("s") for k in keys) == 4
    assert [b for batch in dm.val_dataloader() for b in batch["key"]] == ["s0"]
    with pytest.raises(ValueError, match="extra_fraction"):
        ImageFolderImages(str(photo_folder), extra_root=str(extra), extra_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderImages(str(photo_folder), image_size=SIZE, extra_root=str(tmp_path / "missing")).setup()


def test_make_prior_samples_writes_seeded_resumable_pngs_the_extra_pool_reads(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler
    from PIL import Image

    from ud2m.priors.tiny import tiny_pixel_unet
    from ud2m.training.prior_module import DiffusionPriorTraining
    from ud2m.utils import seed_for

    spec = importlib.util.spec_from_file_location("make_prior_samples", ROOT / "data" / "make_prior_samples.py")
    mps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mps)
    prior = tmp_path / "prior"
    torch.manual_seed(0)
    DiffusionPriorTraining(tiny_pixel_unet(in_channels=1, block_out_channels=(16, 32))).save_pretrained(prior)
    out = tmp_path / "samples"
    common = ["--prior", str(prior), "--out", str(out), "--num", "5", "--batch", "2", "--steps", "2"]
    # two shards fill the folder with disjoint batches (5 samples round up to 3 batches of 2)
    written = mps.main([*common, "--num_shards", "2", "--shard", "1"]) + mps.main([*common, "--num_shards", "2"])
    assert sorted(p.name for p in written) == [f"s{i:06d}.png" for i in range(6)]
    assert mps.main(common) == []  # a rerun finds every batch written
    # batch 1 equals diffusers' own DDIM pipeline from the seed seed_for(0, 1), up to 8-bit rounding
    pipe = DDIMPipeline.from_pretrained(str(prior))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(batch_size=2, num_inference_steps=2, eta=0.0, generator=torch.Generator().manual_seed(seed_for(0, 1)),
               use_clipped_model_output=True, output_type="np").images  # fmt: skip
    for i in (2, 3):
        png = np.asarray(Image.open(out / f"s{i:06d}.png"), dtype=np.float64) / 255
        assert png.shape == (16, 16) and np.abs(png - ref[i - 2, ..., 0]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(SystemExit, match="other settings"):
        mps.main([*common[:-1], "3"])  # other steps into the same folder
    with pytest.raises(SystemExit, match="unet"):
        mps.main(["--prior", str(tmp_path), "--out", str(tmp_path / "x")])
    dm = ImageFolderImages(str(out), image_size=16, channels=1, extra_root=str(out), extra_fraction=1.0)
    assert dm.sources(str(out)) == [str(out / f"s{i:06d}.png") for i in range(6)]  # info.json is not an image
