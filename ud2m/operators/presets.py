"""Operator presets: YAML files that name an operator by ``class_path``/``init_args`` plus its noise level
(docs/method.md §2.8). The same ``operator:`` block is what ``train.py`` and ``sample.py`` read.

A preset file looks like::

    operator:
      class_path: ud2m.operators.GaussianBlur
      init_args: {sigma: 6.0, size: 43}
    sigma_y: 0.01            # noise std on the [0, 1] scale
    image_size: [1024, 1024]
    source: LATINO-PRO code

Shipped presets live in the package, ``ud2m/assets/operators/<paper>/<name>.yaml`` (read through
:mod:`importlib.resources`, so installed wheels have them), and can be named as ``"<paper>/<name>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ud2m.operators.base import LinearOperator, NonlinearOperator

#: Shipped presets.
PRESET_DIR = Path(str(resources.files("ud2m") / "assets" / "operators"))  # package data: installed with ud2m


@dataclass(frozen=True)
class Preset:
    """A loaded preset: the operator, its noise level and the remaining metadata of the file."""

    operator: LinearOperator | NonlinearOperator
    sigma_y: float
    meta: dict[str, Any] = field(default_factory=dict)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve ``"latino/deblur_gaussian"`` or a path to an existing YAML file (clear error otherwise)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))
    raise FileNotFoundError(f"unknown operator preset {str(name_or_path)!r}: not a file, and not one of {known}")


def instantiate_operator(spec: dict[str, Any], *, source: str = "<dict>") -> LinearOperator | NonlinearOperator:
    """Build an operator from a ``{class_path, init_args}`` mapping with jsonargparse (no string registries)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--operator", type=LinearOperator | NonlinearOperator)
    try:
        cfg = parser.parse_object({"operator": spec})
    except Exception as err:  # jsonargparse raises ArgumentError / ValueError / TypeError
        raise ValueError(f"{source}: invalid operator specification: {err}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return instantiate(cfg).operator


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset file: ``Preset(operator, sigma_y, meta)``."""
    path = preset_path(name_or_path)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "operator" not in data or "sigma_y" not in data:
        raise ValueError(f"{path}: a preset needs the keys 'operator' and 'sigma_y', got {sorted(data or {})}")
    operator = instantiate_operator(data.pop("operator"), source=str(path))
    sigma_y = float(data.pop("sigma_y"))
    return Preset(operator, sigma_y, data)


def list_presets() -> list[str]:
    """Names of the shipped presets (empty when the package is installed without its configs)."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))
