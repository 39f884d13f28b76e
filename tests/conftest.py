"""Shared fixtures: offline hubs, a seeded ``rng`` generator and a ``device`` fixture (CPU, plus CUDA if present)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# One intra-op thread per test process: small FFTs and convs gain nothing from two threads, and OpenMP spinning
# under a busy machine made them up to 60x slower (measured on the 2-core CI machine kind).
torch.set_num_threads(1)

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
