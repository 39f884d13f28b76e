"""Solvers: the single-step kernels shared by the zero-shot algorithms and the unfolded sampler (``steps``), and
one pure function per paper algorithm: ``latino`` / ``latino_posterior`` / ``latino_pro`` (LATINO, LATINO-PRO),
``solve_dps``, ``solve_diffpir``, ``solve_tikhonov``, ``solve_total_variation`` (baselines),
``consistency_sampling`` (multistep sampling of a consistency model), ``lvtino`` (LVTINO, video restoration) and
``ld_rps`` (LD-RPS, blind restoration with a learned degradation). Names load on first access.
"""

from ud2m._lazy import lazy_getattr

_LAZY = {
    "latino": "ud2m.solvers.latino_algorithms",
    "latino_posterior": "ud2m.solvers.latino_algorithms",
    "latino_pro": "ud2m.solvers.latino_algorithms",
    "lvtino": "ud2m.solvers.lvtino",
    "LVTINO_SCHEDULES": "ud2m.solvers.lvtino",
    "generic_schedule": "ud2m.solvers.lvtino",
    "solve_dps": "ud2m.solvers.baselines",
    "solve_diffpir": "ud2m.solvers.baselines",
    "solve_tikhonov": "ud2m.solvers.baselines",
    "solve_total_variation": "ud2m.solvers.baselines",
    "consistency_sampling": "ud2m.solvers.steps",
    "ld_rps": "ud2m.solvers.ld_rps",
    "task_defaults": "ud2m.solvers.ld_rps",
}


__getattr__ = lazy_getattr("ud2m.solvers", _LAZY)


__all__ = sorted(_LAZY)
