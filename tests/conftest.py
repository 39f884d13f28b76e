"""Shared fixtures: offline hubs, a seeded ``rng`` generator, a ``device`` fixture (CPU, plus CUDA if present) and
``cli_inputs`` (digit shards and a tiny prior folder for the train.py tests)."""

import importlib.util
import os
import sys
from pathlib import Path

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
    """Every device this machine has; CUDA runs are marked ``gpu`` (by :func:`pytest_collection_modifyitems`)."""
    return torch.device(request.param)


def pytest_collection_modifyitems(items):
    """Mark the CUDA cases of the ``device`` fixture ``gpu`` at collection, so that ``pytest -m gpu`` selects them
    (a marker applied inside the fixture comes after ``-m`` has deselected them)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def rng():
    """A fresh CPU generator with a fixed seed: tests never touch the global RNG."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """Digit shards (data/make_shards.py, 4 training shards) and a tiny 1-channel prior folder, once per module."""
    from ud2m.priors.tiny import save_tiny_pixel_pipeline, tiny_pixel_prior

    root = tmp_path_factory.mktemp("cli")
    spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).parents[1] / "data" / "make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    make_shards.main(["--from_digits", "--out", str(root / "shards"), "--limit", "40", "--maxcount", "8", "--quiet"])
    save_tiny_pixel_pipeline(root / "prior", tiny_pixel_prior(in_channels=1))
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny FFTs are ~1000x slower with 2 threads when the cores are shared
    (spin-wait contention). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def benchmark_script(tmp_path, monkeypatch):
    """``load(name)``: ``benchmarks/<name>.py`` as a fresh module whose ``RESULTS`` folder and ``README`` (holding
    only its generated section, "old", between the script's ``README_BEGIN`` and ``README_END``) live in
    ``tmp_path``, so a report under test never touches the repository's files."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # @dataclass looks its module up there
        spec.loader.exec_module(module)
        (tmp_path / "results").mkdir(exist_ok=True)
        readme = tmp_path / "README.md"
        readme.write_text(f"# title\n\n{module.README_BEGIN}\nold\n{module.README_END}\ntail\n")
        monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
        monkeypatch.setattr(module, "README", readme)
        return module

    return load
