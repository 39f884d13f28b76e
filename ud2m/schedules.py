"""Timestep grids of the solvers (docs/method.md §4.2, §5.3, §8, §13.3, §3.3), as pure functions of native time.

Every solver receives native timesteps (the networks are conditioned on them); the conversions to (a_t, b_t) and
s_t live in the prior's schedule, never here. :func:`time_grid` is the one entry point by name; the named constants
are the papers' fixed grids.
"""

from __future__ import annotations

import itertools
import math

#: LATINO's 8-step grid for SDXL/DMD2: t_k = 999 - 125 (k - 1) (§4.2) [ref].
LATINO_SDXL = (999, 874, 749, 624, 499, 374, 249, 124)
#: LCM's default 8-step grid, used by LATINO with LCM-LoRA SD1.5 (§4.2) [ref].
LCM_8 = (999, 879, 759, 639, 499, 379, 259, 139)
#: DMD2's native 4-step grid; also LATINO-PRO's inner chains (§5.3) [ref].
DMD2_4 = (999, 749, 499, 249)


def quadratic_grid(num_steps: int, num_train_timesteps: int = 1000, t_max: int | None = None) -> tuple[int, ...]:
    r"""UD2M sampler grid (§8): :math:`t_n = \lfloor (t_\max + 1) n^2 / N^2 \rfloor`, n = 1..N, the last replaced by
    :math:`t_\max` (default ``num_train_timesteps - 1`` = 999, which gives the paper's
    :math:`\lfloor 1000 n^2/N^2 \rfloor`), in decreasing order, integer arithmetic. A later start
    (:math:`t_\max < 999`) is the tuned start of :func:`~ud2m.unfolded.sample_ud2m` [ours].

    >>> quadratic_grid(3)
    (999, 444, 111)
    >>> quadratic_grid(5)
    (999, 640, 360, 160, 40)
    >>> quadratic_grid(3, t_max=499)
    (499, 222, 55)
    """
    if num_steps < 1:
        raise ValueError(f"quadratic_grid: num_steps must be >= 1, got {num_steps}")
    t_max = num_train_timesteps - 1 if t_max is None else int(t_max)
    if not 1 <= t_max <= num_train_timesteps - 1:
        raise ValueError(f"quadratic_grid: t_max must lie in [1, {num_train_timesteps - 1}], got {t_max}")
    grid = [(t_max + 1) * n * n // (num_steps * num_steps) for n in range(1, num_steps + 1)]
    grid[-1] = t_max
    return tuple(reversed(grid))


def uniform_grid(num_steps: int, t_max: int = 999, t_min: int = 0) -> tuple[int, ...]:
    """``num_steps`` integer times evenly spaced from ``t_max`` down to (excluding) ``t_min``.

    >>> uniform_grid(4)
    (999, 749, 499, 249)
    """
    if num_steps < 1:
        raise ValueError(f"uniform_grid: num_steps must be >= 1, got {num_steps}")
    step = (t_max + 1 - t_min) // num_steps
    return tuple(t_max - k * step for k in range(num_steps))


def quadratic_skip_grid(num_steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    r"""DiffPIR's ``skip_type="quad"`` grid (Zhu et al. 2023, reference code; deepinv's ``DiffPIR``), in native time.

    The reference walks an index :math:`j_i = \lfloor T\sqrt{i/(N-1)}\rfloor`, i = 0..N-1, the last replaced by
    :math:`T - 1`, through the noise levels in increasing-time-reversed order, i.e. native times

    .. math:: t_i = T - 1 - j_i, \qquad t_0 = T - 1, \quad t_{N-1} = 0,

    so the step density in :math:`t` grows linearly towards the clean end (:math:`i \propto (T - 1 - t)^2`). Integer
    arithmetic (``isqrt``) instead of the reference's float square root; they agree whenever the float rounding does
    not cross an integer. ``num_steps = 1`` gives ``(T - 1,)``.

    >>> quadratic_skip_grid(5)
    (999, 499, 292, 133, 0)

    Raises:
        ValueError: for ``num_steps < 1``, or so many steps that two indices coincide (about :math:`N > T/2`).
    """
    if num_steps < 1:
        raise ValueError(f"quadratic_skip_grid: num_steps must be >= 1, got {num_steps}")
    T = num_train_timesteps
    if num_steps == 1:
        return (T - 1,)
    index = [math.isqrt(i * T * T // (num_steps - 1)) for i in range(num_steps)]  # ⌊T√(i/(N-1))⌋, exact
    index[-1] = T - 1  # the reference's seq[-1] - 1: the last step is t = 0
    grid = tuple(T - 1 - j for j in index)
    if any(t1 >= t0 for t0, t1 in itertools.pairwise(grid)):
        raise ValueError(f"quadratic_skip_grid: {num_steps} steps repeat timesteps of a {T}-step schedule")
    return grid


def ddim_grid(num_steps: int, spacing: str = "leading", num_train_timesteps: int = 1000) -> tuple[int, ...]:
    r"""diffusers' DDIM spacings (docs/method.md §13.3), decreasing: ``"leading"`` [ref]
    :math:`\tau_i = (N - i)\lfloor T/N\rfloor + 1` (``steps_offset=1``); ``"trailing"``
    :math:`\mathrm{round}(T - (i-1)T/N) - 1`, which starts at T − 1.

    >>> ddim_grid(450)[:3], ddim_grid(450)[-1], ddim_grid(4, "trailing")
    ((899, 897, 895), 1, (999, 749, 499, 249))
    """
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"spacing: expected one of {DDIM_SPACINGS}, got {spacing!r}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps: expected 1..{num_train_timesteps}, got {num_steps}")
    T, N = num_train_timesteps, num_steps
    if spacing == "leading":
        return tuple((N - i) * (T // N) + 1 for i in range(1, N + 1))
    return tuple(round(T - i * T / N) - 1 for i in range(N))


def consistency_grid(num_points: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    r"""Skip-step grid of consistency distillation (docs/method.md §3.3), *increasing*: ``(0, k-1, 2k-1, ..., Nk-1)``
    with :math:`k = T/N`. The non-zero points are the times diffusers' ``LCMScheduler`` samples on with
    ``original_inference_steps=N`` (N = 50 of T = 1000: 19, 39, ..., 999); 0 is the boundary, f(z, 0) = z.

    >>> consistency_grid(4)
    (0, 249, 499, 749, 999)
    """
    if not 1 <= num_points <= num_train_timesteps or num_train_timesteps % num_points:
        raise ValueError(
            f"num_points: expected a divisor of num_train_timesteps={num_train_timesteps}, got {num_points}"
        )
    k = num_train_timesteps // num_points
    return (0, *(n * k - 1 for n in range(1, num_points + 1)))


DDIM_SPACINGS = ("leading", "trailing")
#: The decreasing sampling grids by name (:func:`time_grid`).
TIME_GRIDS = ("uniform", "quadratic", "quad", *DDIM_SPACINGS)


def time_grid(kind: str, num_steps: int, *, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """``num_steps`` decreasing native times of the named grid: ``"uniform"`` (:func:`uniform_grid`),
    ``"quadratic"`` (UD2M's sampler, :func:`quadratic_grid`), ``"quad"`` (DiffPIR, :func:`quadratic_skip_grid`),
    ``"leading"`` / ``"trailing"`` (DDIM, :func:`ddim_grid`).

    >>> time_grid("quadratic", 3), time_grid("uniform", 4)
    ((999, 444, 111), (999, 749, 499, 249))
    """
    T = num_train_timesteps
    if kind == "uniform":
        return uniform_grid(num_steps, t_max=T - 1)
    if kind == "quadratic":
        return quadratic_grid(num_steps, T)
    if kind == "quad":
        return quadratic_skip_grid(num_steps, T)
    if kind in DDIM_SPACINGS:
        return ddim_grid(num_steps, kind, T)
    raise ValueError(f"grid: expected one of {TIME_GRIDS}, got {kind!r}")
