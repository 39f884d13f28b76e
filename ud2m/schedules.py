"""Timestep grids of the solvers (algorithms.md §4.2, §5.3, §8), as pure functions of native time.

Every solver receives native timesteps (the networks are conditioned on them); the conversions to (a_t, b_t) and
s_t live in the prior's schedule, never here.
"""

from __future__ import annotations

#: LATINO's 8-step grid for SDXL/DMD2: t_k = 999 - 125 (k - 1) (§4.2) [ref].
LATINO_SDXL = (999, 874, 749, 624, 499, 374, 249, 124)
#: LCM's default 8-step grid, used by LATINO with LCM-LoRA SD1.5 (§4.2) [ref].
LCM_8 = (999, 879, 759, 639, 499, 379, 259, 139)
#: DMD2's native 4-step grid; also LATINO-PRO's inner chains (§5.3) [ref].
DMD2_4 = (999, 749, 499, 249)


def quadratic_grid(num_steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    r"""UD2M sampler grid (§8): :math:`t_n = \lfloor 1000 n^2 / N^2 \rfloor`, n = 1..N, the last replaced by 999,
    in decreasing order, integer arithmetic.

    >>> quadratic_grid(3)
    (999, 444, 111)
    >>> quadratic_grid(5)
    (999, 640, 360, 160, 40)
    """
    if num_steps < 1:
        raise ValueError(f"quadratic_grid: num_steps must be >= 1, got {num_steps}")
    grid = [num_train_timesteps * n * n // (num_steps * num_steps) for n in range(1, num_steps + 1)]
    grid[-1] = num_train_timesteps - 1
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
