"""ud2m: fast Bayesian image and video restoration with diffusion and consistency-model priors.

The public API: ``ud2m.UnfoldedSampler`` and ``ud2m.sample_ud2m`` (the distilled sampler), ``ud2m.load_checkpoint``
(an export), and the packages ``ud2m.operators`` (forward models), ``ud2m.priors`` (prior wrappers) and
``ud2m.solvers`` (zero-shot algorithms). Names load on first access, so ``import ud2m`` stays cheap.
"""

from ud2m._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "UnfoldedSampler": "ud2m.unfolded",
    "sample_ud2m": "ud2m.unfolded",
    "load_checkpoint": "ud2m.export",
}


__getattr__ = lazy_getattr("ud2m", _LAZY)


__all__ = ["UnfoldedSampler", "load_checkpoint", "sample_ud2m"]
