"""Restore images with a zero-shot solver (LATINO, LATINO-PRO, DPS, DiffPIR, Tikhonov, TV, Wiener) or an exported
UD2M model: a thin wrapper of :mod:`ud2m.cli.sample` (also installed as ``ud2m-sample`` and ``python -m ud2m sample``;
docs/cli.md has every option and examples).

    python sample.py --input skimage:astronaut --operator ud2m/sr_x4 --output_dir outputs/astronaut
    python sample.py --input photos/ --operator latino/deblur_gaussian --model path/to/lcm --num_samples 4
    python sample.py --input photos/ --checkpoint exports/ud2m_sr4 --output_dir outputs/ud2m
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a source checkout without installing

from ud2m.cli.sample import cli, main, sample

__all__ = ["cli", "main", "sample"]

if __name__ == "__main__":
    cli()
