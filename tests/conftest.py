"""Shared fixtures: offline hubs, a seeded ``rng`` generator and a ``device`` fixture (CPU, plus CUDA if present)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this machine has; CUDA runs are marked ``gpu``."""
    if request.param == "cuda":
        request.applymarker(pytest.mark.gpu)
    return torch.device(request.param)


@pytest.fixture
def rng():
    """A fresh CPU generator with a fixed seed: tests never touch the global RNG."""
    return torch.Generator().manual_seed(0)
