"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``): timing, and writing a
generated section between two markers of the README."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_ms(fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call, synchronised on CUDA."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module (a script's tuned rows, helpers and constants for another script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replace_section(path: Path, begin: str, end: str, text: str) -> bool:
    """Put ``text`` between the marker lines ``begin`` and ``end`` of the file ``path`` (a README section that a
    benchmark generates); the file is left alone when it lacks either marker. Returns whether it was written."""
    body = path.read_text() if path.is_file() else ""
    if begin not in body or end not in body:
        return False
    head, rest = body.split(begin, 1)
    path.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    return True


def mean_pm_std(stat: dict | None, fmt: str = ".2f") -> str:
    """``"mean ± std"`` of a ``{"mean", "std"}`` summary, ``"–"`` when there is none."""
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}" if stat else "–"


def nfe_text(calls: float, chains: int = 1) -> str:
    """A table's NFE cell: ``calls`` network evaluations per run, times ``chains`` runs batched per image (a "mean of
    M chains" row): ``"134"`` or ``"536 (4 × 134)"``."""
    return f"{calls:.0f}" if chains == 1 else f"{chains * calls:.0f} ({chains} × {calls:.0f})"


def write_readme_section(path: Path, begin: str, end: str, text: str, rerun: str) -> bool:
    """:func:`replace_section`, and when ``path`` lacks the markers a note on stderr that names them and the command
    to rerun once they are added. Returns whether the section was written."""
    if replace_section(path, begin, end, text):
        return True
    print(
        f"note: {path} lacks the markers of this benchmark's section, so it was not written; add these two lines "
        f"where the section belongs and rerun `{rerun}`:\n  {begin}\n  {end}",
        file=sys.stderr,
    )
    return False


def write_report(
    results: Path, name: str, quick: bool, render: Callable[[dict], str], readme: Path, begin: str, end: str
) -> str:
    """The report of ``benchmarks/<name>.py``: ``<name>[_quick].md`` rendered from ``<name>[_quick].json`` in
    ``results``, printed, and for a full run also written into the README section between ``begin`` and ``end``."""
    path = results / (f"{name}_quick.json" if quick else f"{name}.json")
    if not path.is_file():
        raise SystemExit(f"report: {path} does not exist; run `python benchmarks/{name}.py run{' --quick' * quick}`")
    text = render(json.loads(path.read_text()))
    path.with_suffix(".md").write_text(text.rstrip("\n") + "\n")
    print(text)
    if not quick:
        write_readme_section(readme, begin, end, text, f"python benchmarks/{name}.py report")
    return text


class CallTimer:
    """Summed wall time and count of the calls of ``owner.name`` (an instance attribute shadows the method)."""

    def __init__(self, owner: object, name: str, sync: Callable[[], None]) -> None:
        self.seconds, self.calls = 0.0, 0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0
