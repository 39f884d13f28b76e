"""Generative priors behind one contract (docs/method.md §3): pixel VP UNets, latent consistency models, video flow
models and the analytic Gaussian prior, plus LoRA helpers.

The contract, schedules and the Gaussian prior need only torch and import eagerly; the diffusers/peft-backed names
(pixel prior, LoRA helpers) load on first access so that ``import ud2m.priors`` stays cheap.
"""

from ud2m._lazy import lazy_getattr
from ud2m.priors.base import (
    BoundaryScalings,
    ClassCondition,
    FlowMatchingSchedule,
    NoiseSchedule,
    Prior,
    PriorDenoiser,
    TextCondition,
    as_denoiser,
    cm_boundary_scalings,
    x0_from_prediction,
)
from ud2m.priors.gaussian import GaussianPrior, gaussian_w2, operator_matrix, sample_gaussian
from ud2m.priors.vp import VPSchedule, make_betas

_LAZY = {
    "LatentConsistencyPrior": "ud2m.priors.latent",
    "PixelDiffusionPrior": "ud2m.priors.pixel",
    "VideoFlowPrior": "ud2m.priors.video",
    "FrameStackedPrior": "ud2m.priors.stacked",
    "FrameWisePrior": "ud2m.priors.stacked",
    "attach_lora": "ud2m.priors.lora",
    "load_prior": "ud2m.priors.loading",
    "model_family": "ud2m.priors.loading",
    "load_lora": "ud2m.priors.lora",
    "lora_state_dict": "ud2m.priors.lora",
    "save_lora": "ud2m.priors.lora",
    "trainable_parameters": "ud2m.priors.lora",
}


__getattr__ = lazy_getattr("ud2m.priors", _LAZY)


__all__ = [
    "BoundaryScalings",
    "ClassCondition",
    "FlowMatchingSchedule",
    "FrameStackedPrior",
    "FrameWisePrior",
    "GaussianPrior",
    "LatentConsistencyPrior",
    "NoiseSchedule",
    "PixelDiffusionPrior",
    "Prior",
    "PriorDenoiser",
    "TextCondition",
    "VPSchedule",
    "VideoFlowPrior",
    "as_denoiser",
    "attach_lora",
    "cm_boundary_scalings",
    "gaussian_w2",
    "load_lora",
    "load_prior",
    "lora_state_dict",
    "make_betas",
    "model_family",
    "operator_matrix",
    "sample_gaussian",
    "save_lora",
    "trainable_parameters",
    "x0_from_prediction",
]
