"""Clips with known motion made from photographs (ud2m.training.clips, issue [video]): the frames sample exactly the
window path of the drawn motion, never leave the photograph, and the DataModule is seeded like the image modules."""

from __future__ import annotations

import math

import pytest
import torch

from ud2m.training.clips import PhotoClips, clip_frames, clip_motion, stack, unstack

H, W = 120, 160


def coordinate_image() -> torch.Tensor:
    """Channel 0 holds each pixel's x, channel 1 its y (in pixels): bilinear sampling returns the sampled position."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([x, y])


def test_frames_follow_the_window_path():
    """Pan v px/frame: every sampled x moves by exactly vx per frame; a pure rotation keeps the window centre; the
    window centre of frame t is c0 + v t; a zoom at rate r widens the window by exp(r) per frame."""
    motion = {"s0": 20.0, "vx": 2.5, "vy": -1.0, "r": 0.0, "omega": 0.0, "cx": 60.0, "cy": 70.0}
    x, y = _unclamped(motion)
    torch.testing.assert_close(x[1:] - x[:-1], torch.full_like(x[1:], 2.5), atol=1e-9, rtol=0)
    torch.testing.assert_close(y[1:] - y[:-1], torch.full_like(y[1:], -1.0), atol=1e-9, rtol=0)
    t = torch.arange(9, dtype=torch.float64)
    torch.testing.assert_close(x.mean((-2, -1)), 60.0 + 2.5 * t, atol=1e-9, rtol=0)  # symmetric window: mean = centre
    spin = {**motion, "vx": 0.0, "vy": 0.0, "omega": math.radians(3)}
    x, y = _unclamped(spin)
    torch.testing.assert_close(x.mean((-2, -1)), torch.full((9,), 60.0, dtype=torch.float64), atol=1e-9, rtol=0)
    zoom = {**motion, "vx": 0.0, "vy": 0.0, "r": 0.05}
    x, _ = _unclamped(zoom)
    width = x[:, :, -1] - x[:, :, 0]  # the window's sampled extent grows as exp(r t)
    torch.testing.assert_close(width[1:, 0] / width[:-1, 0], torch.full((8,), math.exp(0.05), dtype=torch.float64))


def _unclamped(motion: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled (x, y) positions of every frame pixel: clip_frames of the coordinate image."""
    out = clip_frames(coordinate_image(), motion, 9, 16, clamp=False)
    return out[:, 0], out[:, 1]


@pytest.mark.parametrize("seed", range(40))
def test_drawn_motions_keep_every_frame_inside_the_photograph(seed):
    motion = clip_motion((H, W), 32, 9, torch.Generator().manual_seed(seed), max_pan=3, max_zoom=0.02, max_rotation=3)
    x, y = _unclamped(motion)
    assert x.min() >= 0 and x.max() <= W - 1 and y.min() >= 0 and y.max() <= H - 1


def test_a_photograph_too_small_for_the_window_is_refused():
    with pytest.raises(ValueError, match="a 40x40 photograph is too small for 64x64 clip windows"):
        clip_motion((40, 40), 64, 9, torch.Generator().manual_seed(0), max_pan=3, max_zoom=0.02, max_rotation=2)


def test_stack_and_unstack_are_inverse_layouts():
    video = torch.randn(2, 9, 3, 8, 8)  # (B, T, C, H, W)
    stacked = stack(video)
    assert stacked.shape == (2, 27, 8, 8) and torch.equal(stacked[:, 3:6], video[:, 1])
    assert torch.equal(unstack(stacked, 9), video.transpose(1, 2))  # (B, C, T, H, W)


def test_photo_clips_batches_are_seeded_and_stacked():
    kwargs = dict(val_sources=["skimage:coffee"], batch_size=2, samples_per_epoch=4, seed=3, image_size=32)
    batches = []
    for _ in range(2):
        dm = PhotoClips(["skimage:astronaut", "skimage:coffee"], frames=5, channels=15, **kwargs)
        dm.setup()
        batches.append(next(iter(dm.train_dataloader())))
    assert batches[0]["x"].shape == (2, 15, 32, 32) and batches[0]["x"].abs().max() <= 1
    assert torch.equal(batches[0]["x"], batches[1]["x"]) and batches[0]["key"] == batches[1]["key"]
    val = next(iter(dm.val_dataloader()))
    assert val["x"].shape == (1, 15, 32, 32) and val["key"][0].startswith("coffee-")
    with pytest.raises(ValueError, match="channels \\(16\\) must be a multiple of frames \\(5\\)"):
        PhotoClips(["skimage:astronaut"], frames=5, channels=16)
    for augment in ({"rot90": True}, {"zoom": [0.5, 1.0]}):  # image-crop options would be ignored: refused
        with pytest.raises(ValueError, match="rot90 and zoom"):
            PhotoClips(["skimage:astronaut"], frames=5, channels=15, **augment)
