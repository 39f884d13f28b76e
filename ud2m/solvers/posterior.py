r"""Posterior sampling around any one-call sampler (docs/method.md §4.2 "Posterior samples", §8, §10.2): S independent
samples per observation, their pixelwise mean :math:`\bar x = \frac1S\sum_s x_s` and unbiased std
:math:`\sqrt{\frac1{S-1}\sum_s (x_s - \bar x)^2}`, accumulated by Welford/Chan merging so that memory does not grow
with S. One helper serves ``sample.py`` (every method), :func:`~ud2m.solvers.latino_algorithms.latino_posterior`,
the benchmarks and the tests.

Seeds (§1.5): sample s of observation i runs with its own generator, so a sample does not depend on how the work is
chunked or batched; the caller gives one generator per (i, s) (:func:`sample_generators` derives them from a seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ud2m.utils import Welford, seed_for

#: ``sample_fn(y_rows, generators, index) -> samples`` or ``(samples, extras)``: one call of a sampler on a batch of
#: rows; ``index[r]`` is the observation (row of ``y``) that row r restores
SampleFn = Callable[[torch.Tensor, list[torch.Generator], torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict]"]


@dataclass
class Posterior:
    """What :func:`posterior_sample` returns.

    Attributes:
        mean: ``(B, ...)`` pixelwise posterior mean (float64 accumulation, cast back to the samples' dtype).
        std: ``(B, ...)`` unbiased pixelwise std, or None with one sample (no spread estimate).
        samples: ``(B, S, ...)`` all samples with ``keep_samples``, else ``(B, 1, ...)``: sample 0 of each observation.
        extras: what the first call returned beside its samples (its rows: the first chunk, observation-major).
        calls: sampler calls made.
    """

    mean: torch.Tensor
    std: torch.Tensor | None
    samples: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    calls: int = 0


def sample_generators(seed: int, indices: Sequence[int], num_samples: int, device: torch.device | str = "cpu"):
    """One generator per (observation, sample), observation-major: sample s of observation ``indices[i]`` is seeded
    by ``seed_for(seed, 0, indices[i], s)`` (stream 0 of §1.5), whatever else runs in the same batch. Keep the
    default CPU ``device`` for results that replay across devices (CUDA generators draw other numbers)."""
    keys = [(i, s) for i in indices for s in range(num_samples)]
    return [torch.Generator(device).manual_seed(seed_for(seed, 0, i, s)) for i, s in keys]


def posterior_sample(
    sample_fn: SampleFn,
    y: torch.Tensor,
    *,
    num_samples: int,
    generators: Sequence[torch.Generator],
    chunk: int | None = None,
    keep_samples: bool = False,
) -> Posterior:
    r"""S samples of each of the B observations ``y`` by calls of ``sample_fn`` on ``chunk`` samples of every
    observation at a time (a batch of ``B·chunk`` rows, observation-major), with Welford statistics.

    Args:
        sample_fn: one sampler call (:data:`SampleFn`); it must use ``generators[r]`` for row r only.
        y: ``(B, ...)`` observations.
        num_samples: S >= 1.
        generators: B·S generators, observation-major (``generators[i * S + s]``: sample s of observation i).
        chunk: samples per observation per call (default S: one call); 1 suits operators with per-observation
            parameters (B kernels or masks), which refuse a batch of B·k.
        keep_samples: keep every sample (``samples`` is ``(B, S, ...)``), else only sample 0.
    """
    B, S = y.shape[0], num_samples
    if S < 1:
        raise ValueError(f"posterior_sample: num_samples must be >= 1, got {S}")
    if len(generators) != B * S:
        raise ValueError(f"posterior_sample: expected {B * S} generators (B = {B} x S = {S}), got {len(generators)}")
    k = S if chunk is None else max(1, min(int(chunk), S))
    stats, kept, extras, calls = Welford(torch.float64), [], {}, 0
    for s0 in range(0, S, k):
        kk = min(k, S - s0)
        rows = [(i, s) for i in range(B) for s in range(s0, s0 + kk)]
        index = torch.tensor([i for i, _ in rows], device=y.device)
        out = sample_fn(y[index], [generators[i * S + s] for i, s in rows], index)
        x, more = out if isinstance(out, tuple) else (out, {})
        x = x.detach().reshape(B, kk, *x.shape[1:])
        stats.update(x, sample_dim=1)
        if keep_samples or calls == 0:  # without keep_samples only sample 0 is kept
            kept.append(x if keep_samples else x[:, :1])
        extras = more if calls == 0 else extras
        calls += 1
    samples = torch.cat(kept, dim=1)
    dtype = samples.dtype
    std = stats.std.to(dtype) if stats.count > 1 else None
    return Posterior(stats.mean.to(dtype), std, samples, extras, calls)


__all__ = ["Posterior", "SampleFn", "posterior_sample", "sample_generators"]
