"""Measurement noise and the value-range conventions of docs/method.md §1.1.

Noise never lives inside an operator: ``A`` stays linear and testable, and the noise level is explicit data.
The factor 2 between the user-facing ``sigma_y`` (std on the [0, 1] scale, as papers report it) and the internal
std on the [-1, 1] scale lives in exactly one place, :func:`sigma_internal`.
"""

from __future__ import annotations

import torch

from ud2m.operators.base import LinearOperator, NonlinearOperator
from ud2m.utils import Generator, append_dims, batch_scalar, randn


def sigma_internal(sigma_y: float | torch.Tensor) -> float | torch.Tensor:
    r"""Noise std on the internal [-1, 1] scale: :math:`\sigma_n = 2\sigma_y` (§1.1).

    >>> sigma_internal(0.05)
    0.1
    """
    return 2 * sigma_y


def measure(
    op: LinearOperator | NonlinearOperator,
    x: torch.Tensor,
    sigma_y: float | torch.Tensor,
    generator: Generator = None,
) -> torch.Tensor:
    r"""Simulate a measurement :math:`y = A(x) + \sigma_n n`, :math:`n \sim \mathcal N(0, I)`, in float32.

    No clamping or quantisation. For masks the noise is masked too (missing entries are exactly 0); for
    operators with ``noise_before_forward`` (JPEG) the noise is added before the map:
    :math:`y = J(\mathrm{clamp}(x + \sigma_n n, -1, 1))`.

    Args:
        op: forward operator.
        x: clean images on [-1, 1], ``(B, ...)``.
        sigma_y: noise std on the [0, 1] scale, a float or ``(B,)`` tensor.
        generator: a ``torch.Generator`` or a list of B generators.
    """
    x = x.float()
    sigma_y = batch_scalar(sigma_y, x.shape[0], device=x.device, name="sigma_y")
    if not bool((sigma_y >= 0).all()):
        raise ValueError(f"measure: sigma_y must be >= 0, got {sigma_y.tolist()}")
    sigma_n = sigma_internal(sigma_y)
    if getattr(op, "noise_before_forward", False):
        n = randn(x.shape, generator, device=x.device)
        return op.simulate((x + append_dims(sigma_n, x.ndim) * n).clamp(-1.0, 1.0))
    y = op.A(x)
    n = randn(y.shape, generator, device=y.device, dtype=y.dtype)
    y = y + append_dims(sigma_n, y.ndim) * n
    mask = op.observed_mask(y)
    return y if mask is None else y * mask


def to_internal(x01: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] (files) to the library's [-1, 1]."""
    return 2 * x01 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] for saving, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def measurement_to_internal(op: LinearOperator, y01: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    r"""Convert a real measurement file on [0, 1] to the internal scale: :math:`y = 2y_{01} - A(\mathbb 1)` (§1.1).

    Exact for linear A because :math:`A(2x - 1) = 2A(x) - A(\mathbb 1)`.
    """
    ones = torch.ones(x_shape, device=y01.device, dtype=y01.dtype)
    return 2 * y01 - op.A(ones)
