"""Video IO (ud2m/video_io.py, issue [video]): exact round trips where the format is lossless (PNG folders, .npy,
GIF of palette-limited frames, repeated frames included), MP4 within its codec's tolerance, clear errors naming the
file, and the built-in clips (deterministic, the training module's own clips, the config's photographs)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ud2m import video_io
from ud2m.video_io import discover_videos, read_video, stack_videos, video_stem, write_video

ROOT = Path(__file__).resolve().parents[1]


def quantised(frames: torch.Tensor) -> torch.Tensor:
    """Frames on [-1, 1] that are exactly representable at 8 bits (what every lossless format stores)."""
    return ((frames + 1) / 2 * 255).round() / 255 * 2 - 1


def smooth_video(T: int = 6, H: int = 32, W: int = 48, seed: int = 0) -> torch.Tensor:
    """A moving colour gradient plus a soft blob, 8-bit exact: natural-looking content for the lossy MP4 test."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    phase = torch.rand(3, generator=g) * 6
    frames = []
    for t in range(T):
        cx = -0.5 + 0.15 * t
        blob = torch.exp(-((x - cx) ** 2 + y**2) / 0.1)
        chans = [0.6 * torch.sin(2 * x + 1.5 * y + phase[c] + 0.2 * t) + 0.3 * blob for c in range(3)]
        frames.append(torch.stack(chans))
    return quantised(torch.stack(frames).clamp(-1, 1))


def palette_video(T: int = 5, H: int = 16, W: int = 20, colours: int = 8, seed: int = 0) -> torch.Tensor:
    """Frames drawn from a palette of ``colours`` RGB values; frames 1 and 2 identical (Pillow merges those)."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (colours, 3), generator=g)
    idx = torch.randint(0, colours, (T, H, W), generator=g)
    if T > 2:
        idx[2] = idx[1]
    return palette[idx].permute(0, 3, 1, 2).float() / 255 * 2 - 1


def test_png_folder_round_trip_is_exact(tmp_path):
    v = quantised(torch.rand(4, 3, 10, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    written = write_video(v, tmp_path / "v.gif", frames_dir=tmp_path / "frames")
    assert written == tmp_path / "v.gif"
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_{t:04d}.png" for t in range(4)]
    out = read_video(tmp_path / "frames", expected_frames=4)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 10, 12)
    torch.testing.assert_close(out, v, atol=1e-6, rtol=0)


def test_npy_round_trip_uint8_and_float(tmp_path):
    v = quantised(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    arr01 = ((v + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "u8.npy", (arr01 * 255).round().astype(np.uint8))
    np.save(tmp_path / "f.npy", arr01.astype(np.float32))
    np.save(tmp_path / "gray.npy", (arr01[..., 0] * 255).round().astype(np.uint8))  # (T, H, W)
    torch.testing.assert_close(read_video(tmp_path / "u8.npy"), v, atol=1e-6, rtol=0)
    torch.testing.assert_close(read_video(tmp_path / "f.npy"), v, atol=1e-6, rtol=0)
    assert read_video(tmp_path / "gray.npy").shape == (3, 1, 8, 8)


def test_gif_round_trip_is_exact_for_palette_frames_with_repeats(tmp_path):
    """≤ 256 colours per frame: exact; the repeated frame that Pillow merges is restored from its duration."""
    v = palette_video()
    path = write_video(v, tmp_path / "p.gif", fps=10)
    out = read_video(path, expected_frames=5)
    torch.testing.assert_close(out, v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("runs", [(8,), (4, 4), (1, 3, 2)])
def test_gif_round_trip_restores_every_merged_run(runs, tmp_path):
    """Every run of identical frames that Pillow merges comes back at its length, including a video of one
    constant frame (it read back as 1 frame while the shortest kept frame was taken as one frame's duration)."""
    levels = torch.tensor([0, 51, 255, 102])[: len(runs)] / 255 * 2 - 1  # 8-bit levels: exact in a GIF
    v = torch.cat([torch.full((n, 3, 8, 8), float(v)) for n, v in zip(runs, levels, strict=True)])
    path = write_video(v, tmp_path / "runs.gif", fps=8)
    torch.testing.assert_close(read_video(path, expected_frames=sum(runs)), v, atol=1e-6, rtol=0)


def test_gray_video_round_trip(tmp_path):
    v = palette_video(T=3)[:, :1]
    write_video(v, tmp_path / "g.gif", frames_dir=tmp_path / "g")
    torch.testing.assert_close(read_video(tmp_path / "g"), v, atol=1e-6, rtol=0)
    assert read_video(tmp_path / "g.gif").shape == (3, 3, 16, 20)  # GIF frames are read as RGB


@pytest.mark.skipif(not video_io.ffmpeg_available(), reason="imageio-ffmpeg not installed")
def test_mp4_round_trip_within_codec_tolerance(tmp_path):
    """H.264 at CRF 10 with 4:2:0 chroma: the chroma of each 2x2 block is averaged and YCbCr is rounded, so smooth
    content comes back within a few 8-bit levels. Bound: PSNR >= 35 dB ([0, 1] scale, i.e. RMS error under 4.5
    levels of 255), max error under 0.1 (13 levels, at the colour edges of the blob). Measured: about 45 dB here,
    37 dB on a 64x64 clip of coffee."""
    v = smooth_video()
    path = write_video(v, tmp_path / "s.mp4", fps=8)
    assert path.suffix == ".mp4"
    out = read_video(path, expected_frames=6)
    assert out.shape == v.shape
    mse01 = ((out - v) / 2).square().mean()
    assert 10 * torch.log10(1 / mse01) >= 35
    assert (out - v).abs().max() < 0.2  # [-1, 1] scale: 0.1 on [0, 1]


def test_mp4_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(video_io, "ffmpeg_available", lambda: False)
    v = palette_video()
    with caplog.at_level(logging.WARNING, logger="ud2m.video_io"):
        path = write_video(v, tmp_path / "x.mp4")
    assert path == tmp_path / "x.gif" and path.is_file() and not (tmp_path / "x.mp4").exists()
    assert "GIF" in caplog.text
    torch.testing.assert_close(read_video(path), v, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        (tmp_path / "y.mp4").write_bytes(b"\x00")
        read_video(tmp_path / "y.mp4")


def test_write_accepts_a_batch_of_one_video(tmp_path):
    v = palette_video(T=3)
    write_video(v.transpose(0, 1)[None], tmp_path / "b.gif", frames_dir=tmp_path / "b")
    torch.testing.assert_close(read_video(tmp_path / "b"), v, atol=1e-6, rtol=0)
    torch.testing.assert_close(stack_videos([v, v]), v.transpose(0, 1)[None].expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="one video at a time"):
        write_video(torch.zeros(2, 3, 3, 8, 8), tmp_path / "c.gif")
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        write_video(torch.zeros(3, 8, 8), tmp_path / "c.gif")
    with pytest.raises(ValueError, match="suffix"):
        write_video(v, tmp_path / "c.png")


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    if video_io.ffmpeg_available():
        with pytest.raises(ValueError, match=r"broken\.mp4: not a readable video"):
            read_video(bad)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a garbage")
    with pytest.raises(ValueError, match=r"broken\.gif"):
        read_video(tmp_path / "broken.gif")
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    with pytest.raises(FileNotFoundError, match="empty: no frame images"):
        read_video(empty)
    mixed = tmp_path / "mixed"
    write_video(palette_video(T=2, H=8, W=8), tmp_path / "a.gif", frames_dir=mixed)
    write_video(palette_video(T=1, H=8, W=10), tmp_path / "b.gif", frames_dir=tmp_path / "other")
    (tmp_path / "other" / "frame_0000.png").rename(mixed / "frame_0002.png")
    with pytest.raises(ValueError, match=r"mixed: frames of different sizes: frame_0000.png is \(8, 8\), "):
        read_video(mixed)
    np.save(tmp_path / "neg.npy", -np.ones((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"neg.npy: float image values must lie in \[0, 1\]"):
        read_video(tmp_path / "neg.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"flat\.npy: expected frames"):
        read_video(tmp_path / "flat.npy")
    write_video(palette_video(T=3), tmp_path / "three.gif")
    with pytest.raises(ValueError, match=r"three\.gif: expected 9 frames, got 3"):
        read_video(tmp_path / "three.gif", expected_frames=9)
    (tmp_path / "frame.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"frame\.png: not a video"):
        read_video(tmp_path / "frame.png")


def test_discover_videos(tmp_path):
    assert discover_videos("clips:val") == [f"clips:val:{i}" for i in range(video_io.CLIPS_PER_SPLIT)]
    assert discover_videos("clips:train")[:2] == ["clips:train:0", "clips:train:1"]
    assert discover_videos("clips:3") == ["clips:val:3"]
    with pytest.raises(FileNotFoundError, match="clips:test"):
        discover_videos("clips:test")
    v = palette_video(T=2)
    for name in ("b", "a"):
        write_video(v, tmp_path / "vids" / f"{name}.gif", frames_dir=tmp_path / "frames_of_many" / name)
    assert discover_videos(tmp_path / "vids") == [str(tmp_path / "vids" / f"{n}.gif") for n in ("a", "b")]
    assert discover_videos(tmp_path / "frames_of_many" / "a") == [str(tmp_path / "frames_of_many" / "a")]
    assert discover_videos(tmp_path / "frames_of_many") == [str(tmp_path / "frames_of_many" / n) for n in ("a", "b")]
    assert discover_videos(str(tmp_path / "vids" / "*.gif"))[0].endswith("a.gif")
    assert video_stem("clips:val:3") == "clip_val_3" and video_stem(tmp_path / "vids" / "a.gif") == "a"
    with pytest.raises(FileNotFoundError, match="input not found"):
        discover_videos(tmp_path / "nothing")


def test_clips_are_deterministic_and_the_training_modules():
    """clips:val:i is item i of the validation ClipDataset of configs/priors/clips.yaml (clips 0 and 1 are the
    training run's own validation clips), the same on every call, on [-1, 1], (9, 3, 64, 64)."""
    from ud2m.training.clips import PhotoClips, unstack

    clips = [read_video(s, expected_frames=9) for s in ("clips:val:0", "clips:val:1", "clips:2")]
    for c in clips:
        assert c.shape == (9, 3, 64, 64) and c.dtype == torch.float32
        assert -1 <= c.min() and c.max() <= 1 and c.std() > 0.05
    torch.testing.assert_close(read_video("clips:val:0"), clips[0], atol=0, rtol=0)
    assert not torch.equal(clips[0], clips[2]) and not torch.equal(clips[0][0], clips[0][-1])  # moving windows
    cfg = yaml.safe_load((ROOT / "configs" / "priors" / "clips.yaml").read_text())["data"]["init_args"]
    assert set(cfg["val_sources"]) == set(video_io.CLIP_VAL_PHOTOS)
    assert set(cfg["root"]) == set(video_io.CLIP_VAL_PHOTOS) | set(video_io.CLIP_TRAIN_PHOTOS)
    assert (cfg["frames"], cfg["image_size"], cfg["seed"]) == (
        video_io.CLIP_FRAMES,
        video_io.CLIP_SIZE,
        video_io.CLIP_SEED,
    )
    data = PhotoClips(**{**cfg, "num_workers": 0})
    data.setup()
    for i in (0, 1):
        x = data.datasets["val"][i]["x"]
        torch.testing.assert_close(unstack(x, 9).transpose(0, 1), clips[i], atol=0, rtol=0)
    train = read_video("clips:train:0")
    assert train.shape == (9, 3, 64, 64) and not torch.equal(train, clips[0])
