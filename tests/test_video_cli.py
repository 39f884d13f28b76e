"""sample.py's video path (issue [video]): ``--method LVTINO`` restores videos end to end with tiny random priors
saved as folders (a 5-frame stacked video prior, an RGB image prior), on a 5-frame 16x16 clip written as a frame
folder; files written, NFE equal to ``lvtino``'s info, frame-wise fallback, observation round trip, resume, and
errors before anything is written. Expected values are derived (the solver's own output and counts), not recorded.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from ud2m.cli.sample import main
from ud2m.io import save_image
from ud2m.methods import LVTINO, Method, Problem
from ud2m.operators import measure
from ud2m.operators.presets import load_preset
from ud2m.priors.pixel import PixelDiffusionPrior
from ud2m.priors.stacked import FrameStackedPrior
from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior
from ud2m.solvers.lvtino import lvtino, map_times
from ud2m.utils import seed_for
from ud2m.video_io import read_video, stack_videos, write_video

pytestmark = pytest.mark.usefixtures("one_thread")

T, SIZE = 5, 16
OPERATOR = {  # a 5-frame version of the scaled problem A: pooling x2 (5 -> 3) and SR x2 per frame
    "class_path": "ud2m.operators.compose.Compose",
    "init_args": {
        "outer": {
            "class_path": "ud2m.operators.video.PerFrame",
            "init_args": {"op": {"class_path": "ud2m.operators.superres.SuperResolution", "init_args": {
                "factor": 2, "filter": "bicubic", "padding": "circular"}}},
        },
        "inner": {"class_path": "ud2m.operators.video.TemporalAveragePool", "init_args": {
            "factor": 2, "num_frames": T}},
    },
}  # fmt: skip


def sample(output_dir, **kwargs):
    from ud2m.cli.sample import sample as run

    kwargs = {"progress": False, "lpips": None, "device": "cpu", **kwargs}
    return run(output_dir=Path(output_dir), **kwargs)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    video = save_tiny_pixel_pipeline(root / "video", tiny_pixel_prior(in_channels=3 * T, seed=3))
    image = save_tiny_pixel_pipeline(root / "image", tiny_pixel_prior(seed=4))
    return {"video": str(video), "image": str(image)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 5-frame 16x16 crop of ``clips:val:0`` as a PNG frame folder (lossless)."""
    folder = tmp_path_factory.mktemp("videos") / "clip"
    frames = read_video("clips:val:0")[:T, :, 8 : 8 + SIZE, 8 : 8 + SIZE]  # (T, C, H, W)
    for t, frame in enumerate(frames):
        save_image(frame, folder / f"frame_{t:04d}.png")
    return folder


@pytest.fixture
def operator():
    from ud2m.operators.presets import instantiate_operator

    return instantiate_operator(OPERATOR)


def lvtino_kwargs(priors, operator, **method):
    method = LVTINO(image_model=priors["image"], schedule="B", frame_batch=4, **method)
    return dict(method=method, operator=operator, sigma_y=0.01)


# ---------------------------------------------------------------------------------------------- simulated runs
def test_simulated_run_writes_videos_and_metrics_and_matches_lvtino(priors, clip, operator, tmp_path):
    """The written restoration is lvtino's on y = A x + σ_n n with the image job's seeds (noise stream 1, solver
    stream 0), and the NFE columns are lvtino's info; every output file exists."""
    out = tmp_path / "out"
    result = sample(out, input=str(clip), model=priors["video"], **lvtino_kwargs(priors, operator))
    row = result["images"][0]
    files = {p.name for p in out.iterdir()}
    assert {"clip_restored.mp4", "clip_restored", "clip_y.mp4", "clip_y", "metrics.json", "metrics.csv"} <= files
    assert len(list((out / "clip_restored").glob("*.png"))) == T and len(list((out / "clip_y").glob("*.png"))) == 3
    for key in ("psnr", "psnr_global", "ssim", "flicker", "data_consistency", "seconds", "peak_memory_mb"):
        assert isinstance(row[key], float), key
    assert result["run"]["method"] == "lvtino" and result["run"]["model"] == priors["video"]
    assert result["run"]["settings"]["schedule"] == "B" and result["run"]["settings"]["shared_image_noise"] is True

    x = stack_videos([read_video(clip)])
    y = measure(operator, x, 0.01, [torch.Generator().manual_seed(seed_for(0, 1, 0, 0))])
    video = FrameStackedPrior.from_pretrained(priors["video"])
    image = PixelDiffusionPrior.from_pretrained(priors["image"])
    with torch.inference_mode():
        x_hat, info = lvtino(
            video, image, operator, y, schedule=map_times("B", video, image), sigma_y=0.01, frame_batch=4,
            generator=[torch.Generator().manual_seed(seed_for(0, 0, 0, 0))], return_info=True,
        )  # fmt: skip
    assert {k: row[k] for k in ("nfe", "nfe_video", "nfe_image", "calls", "calls_image")} == {
        k: info[k] for k in ("nfe", "nfe_video", "nfe_image", "calls", "calls_image")
    }
    assert (row["nfe_video"], row["nfe_image"], row["calls"]) == (5, 4, 5 + 4 * T)  # schedule B, §6.5
    written = read_video(out / "clip_restored")  # 8-bit PNGs of the restoration
    expected = ((x_hat[0].transpose(0, 1).clamp(-1, 1) + 1) / 2 * 255).round() / 255 * 2 - 1
    torch.testing.assert_close(written, expected, rtol=0, atol=1e-6)


def test_framewise_latino_without_a_video_prior(priors, clip, operator, tmp_path):
    """Without --model LVTINO is frame-wise LATINO: only image sweeps (the schedule's 4 image rows), noise per
    frame; asking for shared noise is refused before anything is written."""
    result = sample(tmp_path / "fw", input=str(clip), **lvtino_kwargs(priors, operator))
    row = result["images"][0]
    assert (row["nfe_video"], row["nfe_image"], row["calls"]) == (0, 4, 4 * T)
    assert result["run"]["model"] is None and result["run"]["settings"]["shared_image_noise"] is False
    with pytest.raises(ValueError, match="frame-wise LATINO"):
        sample(tmp_path / "shared", input=str(clip), **lvtino_kwargs(priors, operator, shared_image_noise=True))
    assert not (tmp_path / "shared").exists()


def test_observation_mode_reads_back_the_written_measurement(priors, clip, operator, tmp_path):
    """``<stem>_y/`` stores 2y₀₁ − 1 = y + A(1) − 1 in 8 bits: read back with simulate=False it gives the same
    measurement, so the observation run writes the same ``_y`` frames byte for byte, under the same stem."""
    kwargs = lvtino_kwargs(priors, operator)
    sample(tmp_path / "sim", input=str(clip), **kwargs)
    observed = sample(
        tmp_path / "obs", input=str(tmp_path / "sim" / "clip_y"), simulate=False, reference=str(clip), **kwargs
    )
    assert observed["images"][0]["video"] == "clip" and observed["images"][0]["frames"] == T
    for t in range(3):
        name = f"frame_{t:04d}.png"
        assert (tmp_path / "obs" / "clip_y" / name).read_bytes() == (tmp_path / "sim" / "clip_y" / name).read_bytes()
    assert isinstance(observed["images"][0]["psnr"], float)


def test_resume_skips_finished_videos_and_refuses_a_changed_setting(priors, clip, operator, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    frames = read_video(clip)
    write_video(frames, inputs / "a.gif")
    kwargs = lvtino_kwargs(priors, operator)
    out = tmp_path / "out"
    sample(out, input=str(inputs), **kwargs)
    before = snapshot(out)
    write_video(frames.flip(0), inputs / "b.gif")
    result = sample(out, input=str(inputs), **kwargs)
    after = snapshot(out)
    first = {k: v for k, v in before.items() if k.startswith("a_")}
    assert {k: after[k] for k in first} == first  # skipped: neither rewritten nor touched
    assert "b_restored/frame_0004.png" in after
    assert [r["video"] for r in result["images"]] == ["a", "b"]
    changed = {**kwargs, "method": LVTINO(image_model=priors["image"], schedule="A", frame_batch=4)}
    with pytest.raises(ValueError, match=re.escape("'schedule': 'B'") + ".*there.*" + re.escape("'schedule': 'A'")):
        sample(out, input=str(inputs), **changed)
    assert snapshot(out) == after


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_frame_count_fails_before_writing_naming_the_file(priors, clip, operator, tmp_path):
    short = tmp_path / "short.gif"
    write_video(read_video(clip)[:4], short)
    with pytest.raises(ValueError, match=re.escape(f"{short}: cannot restore a video of 4 frames") + ".*expected 5"):
        sample(tmp_path / "out", input=str(short), **lvtino_kwargs(priors, operator))
    with pytest.raises(ValueError, match=r"clips:val:0: cannot restore a video of 9 frames of 64x64.*sized for 25"):
        sample(tmp_path / "out", input="clips:val:0", operator="lvtino/A", method=LVTINO(image_model=priors["image"]))
    with pytest.raises(FileNotFoundError, match=re.escape("missing.mp4")):
        sample(tmp_path / "out", input=str(tmp_path / "missing.mp4"), **lvtino_kwargs(priors, operator))
    with pytest.raises(ValueError, match="num_samples=2"):
        sample(tmp_path / "out", input=str(clip), num_samples=2, **lvtino_kwargs(priors, operator))
    assert not (tmp_path / "out").exists()


def test_scaled_presets_name_their_schedule_and_fit_the_clips():
    """The lvtino/*_clips presets (the benchmark's problems) fit 9-frame 64x64 clips and default the schedule."""
    x = torch.zeros(1, 3, 9, 64, 64)
    shapes = {"A": (1, 3, 5, 32, 32), "B": (1, 3, 9, 16, 16), "C": (1, 3, 3, 16, 16)}
    for name, shape in shapes.items():
        preset = load_preset(f"lvtino/{name}_clips")
        assert tuple(preset.operator.A(x).shape) == shape and preset.sigma_y == 0.001
        problem = Problem(preset.operator, 0.001, (3, 64, 64), preset=preset.meta)
        assert LVTINO(image_model="x").settings(problem)["schedule"] == name


# ---------------------------------------------------------------------------------------------- command line
def test_command_line_method_with_its_settings(priors, clip, tmp_path, capsys):
    config = tmp_path / "operator.yaml"
    config.write_text(json.dumps({"operator": OPERATOR, "sigma_y": 0.01}))
    args = [
        "--input", str(clip), "--operator", str(config), "--model", priors["video"], "--method", "LVTINO",
        "--method.schedule", "A", "--method.image_model", priors["image"], "--method.frame_batch", "5",
        "--method.time_scale", "0.5",
        "--output_dir", str(tmp_path / "cli"), "--progress", "false", "--lpips", "null", "--device", "cpu",
    ]  # fmt: skip
    main(args)
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 1 and summary["nfe"]["mean"] == 9 and "flicker" in summary
    record = json.loads((tmp_path / "cli" / "metrics.json").read_text())["run"]
    assert record["settings"] == {"image_model": priors["image"], "schedule": "A", "frame_batch": 5,
                                  "shared_image_noise": True, "time_scale": 0.5}  # fmt: skip
    assert Method.class_of("lvtino") is LVTINO and LVTINO.video and not Method.video


def test_map_times_scales_the_mapped_times(priors):
    """``time_scale`` multiplies every mapped time (rounded to 0.1) and keeps the data steps; 1 is the mapping
    itself, and a factor outside (0, 1] is refused."""
    video = FrameStackedPrior.from_pretrained(priors["video"])
    image = PixelDiffusionPrior.from_pretrained(priors["image"])
    full, half = map_times("A", video, image), map_times("A", video, image, 0.5)
    assert [r.video_step for r in half] == [r.video_step for r in full]
    assert [r.t_video for r in half] == [round(r.t_video * 0.5, 1) for r in full]
    assert [r.t_image for r in half] == [None if r.t_image is None else round(r.t_image * 0.5, 1) for r in full]
    with pytest.raises(ValueError, match="time_scale must lie in"):
        map_times("A", video, image, 1.5)
