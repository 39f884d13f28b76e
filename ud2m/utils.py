"""Small tensor helpers shared by every layer: broadcasting of per-sample scalars and seeded noise.

Nothing here knows about diffusion or measurements; it is the bottom of the import graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def seed_for(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` by numpy's ``SeedSequence`` hashing (docs/method.md §1.5): the project's one
    way to derive the seed of a sample, a chain or an epoch from a base seed, so that no two keys share a stream."""
    return int(
        np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


def append_dims(v: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that a ``(B,)`` tensor broadcasts against ``target_ndim`` dims.

    >>> append_dims(torch.ones(3), 4).shape
    torch.Size([3, 1, 1, 1])
    """
    missing = target_ndim - v.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {v.ndim} dims, more than the target {target_ndim}")
    return v[(...,) + (None,) * missing]


def batch_scalar(
    value: float | torch.Tensor,
    batch_size: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "value",
) -> torch.Tensor:
    """Turn a float, a 0-d tensor or a ``(B,)``/``(1,)`` tensor into a ``(B,)`` tensor.

    Raises:
        ValueError: if a tensor has a shape other than ``()``, ``(1,)`` or ``(batch_size,)``.
    """
    v = torch.as_tensor(value, device=device, dtype=dtype)
    if v.ndim == 0 or v.shape == (1,):
        return v.reshape(1).expand(batch_size)
    if v.shape != (batch_size,):
        raise ValueError(f"{name}: expected a float or a tensor of shape ({batch_size},), got {tuple(v.shape)}")
    return v


def broadcast_eps(eps: float | torch.Tensor, y: torch.Tensor) -> float | torch.Tensor:
    """A float, or a ``(B,)`` tensor reshaped to broadcast against ``y`` (per-sample regularisation)."""
    if torch.is_tensor(eps) and eps.ndim == 1:
        return append_dims(eps.to(device=y.device, dtype=y.real.dtype if y.is_complex() else y.dtype), y.ndim)
    return eps


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, diffusers-style generator handling.

    With a list of B generators, sample ``i`` draws only from ``generator[i]`` so the result does not depend on
    the batch composition (docs/method.md §1.5). Noise is drawn on the generator's device and moved afterwards.
    """
    shape = tuple(shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"randn: got {len(generator)} generators for a batch of {shape[0]}")
        parts = [_randn_one((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(parts, dim=0)
    return _randn_one(shape, generator, device, dtype)


def rand(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) noise with the same generator conventions as :func:`randn`."""
    shape = tuple(shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"rand: got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.rand((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _randn_one(shape, generator, device, dtype) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample real inner product ``<a_i, b_i>`` accumulated in float64, returned as ``(B,)`` float64."""
    dims = tuple(range(1, a.ndim))
    return torch.sum(a * b, dim=dims, dtype=torch.float64)


def batch_norm_sq(a: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Euclidean norm accumulated in float64, ``(B,)``."""
    return batch_dot(a, a)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise a clear ``ValueError`` if ``t`` holds NaN or Inf."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf values (shape {tuple(t.shape)})")


class Welford:
    r"""Running pixelwise mean and unbiased std over posterior samples (Welford, 1962; Chan et al. merge).

    Each :meth:`update` adds one sample per observation, ``(B, ...)``, or several along ``sample_dim``. With
    :math:`n` samples, ``mean`` is :math:`\bar x` and ``std`` is :math:`\sqrt{\sum (x_s - \bar x)^2 / (n - 1)}`.

    Args:
        dtype: accumulator dtype (default: the dtype of the first update).
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.count = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, sample_dim: int | None = None) -> None:
        """Add one sample ``x`` (``sample_dim=None``) or ``x.shape[sample_dim]`` samples stacked along that dim."""
        x = x.detach().to(self.dtype or x.dtype)
        xs = x.unsqueeze(0) if sample_dim is None else x.movedim(sample_dim, 0)  # (n_b, B, ...)
        n_b, mean_b = xs.shape[0], xs.mean(0)
        m2_b = (xs - mean_b).pow(2).sum(0)
        if self.mean is None:
            self.count, self.mean, self._m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"Welford: sample shape {tuple(mean_b.shape)} differs from {tuple(self.mean.shape)}")
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta.pow(2) * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> torch.Tensor:
        """Unbiased pixelwise variance; needs at least two samples."""
        if self.count < 2:
            raise ValueError(f"Welford: the unbiased variance needs at least 2 samples, got {self.count}")
        return self._m2 / (self.count - 1)

    @property
    def std(self) -> torch.Tensor:
        """Unbiased pixelwise standard deviation (square root of :attr:`var`)."""
        return self.var.sqrt()


def copy_safetensors_into(targets: dict[str, torch.Tensor], path, *, what: str = "the model") -> None:
    """Copy every tensor of the safetensors file ``path`` into ``targets`` in place (read without unpickling).

    The key sets must be equal and every shape must match; all is checked before anything is copied.

    Raises:
        ValueError: naming the file and ``what`` it was meant for: the counts and first names of missing and
            unexpected tensors, or the first tensor whose shape differs (stored and expected).
    """
    from safetensors.torch import load_file

    saved = load_file(str(path))
    missing, unexpected = sorted(targets.keys() - saved.keys()), sorted(saved.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit {what}: {len(missing)} tensors missing (first: {missing[:1]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:1]})"
        )
    for name, target in targets.items():
        if saved[name].shape != target.shape:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(saved[name].shape)}, {what} expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(saved[name])
