"""The built-in digits (sklearn's 8x8 digits upsampled to 32x32): sources, the held-out split and its agreement
with ``data/make_shards.py --from_digits``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ud2m.io import digits32, digits_names, discover_images, load_image, source_stem, split_train_val
from ud2m.training.data import ImageFolderImages


def test_digits_are_bilinear_upsamplings_of_sklearn_digits():
    raw = torch.from_numpy(load_digits().images).float()[:, None] / 16
    expected = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)[:, 0]
    assert np.array_equal(digits32(), expected.numpy())
    x = load_image("digits:0007", channels=1)
    assert x.shape == (1, 1, 32, 32) and torch.allclose(x[0, 0], 2 * expected[7] - 1)
    assert source_stem("digits:0007") == "digit_0007"


def test_held_out_split_is_disjoint_deterministic_and_shared_by_the_data_module():
    val, train = digits_names("val"), digits_names("train")
    names = digits_names("all")
    assert not set(val) & set(train) and sorted(val + train) == names
    _, idx = split_train_val(names, 0.05, 0)  # make_shards.py --from_digits uses the same names, fraction and seed
    assert val == [names[i] for i in idx] == discover_images("digits:val")
    dm = ImageFolderImages("digits:all", image_size=32, channels=1, val_fraction=0.05, seed=0, random_flip=False)
    dm.setup()
    assert len(dm.datasets["val"]) == len(val) and len(dm.datasets["train"]) == len(train)


def test_bad_digit_sources_are_clear():
    with pytest.raises(FileNotFoundError, match="index < 1797"):
        load_image("digits:5000")
    with pytest.raises(FileNotFoundError, match="digits:val"):
        discover_images("digits:test")
