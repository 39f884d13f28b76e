"""Forward operators: the measurement models y = A(x) + n of every solver (docs/method.md §2)."""

from ud2m.operators.base import LinearOperator, NonlinearOperator, Operator
from ud2m.operators.blur import GaussianBlur, KernelBlur, UniformBlur
from ud2m.operators.cg import conjugate_gradient
from ud2m.operators.compose import Compose
from ud2m.operators.inpainting import BoxInpainting, Denoising, Inpainting, RandomInpainting
from ud2m.operators.interop import DeepinvOperator, as_operator
from ud2m.operators.jpeg import JPEG
from ud2m.operators.learned import DegradationState, LearnedDegradation
from ud2m.operators.motion import MotionBlur
from ud2m.operators.noise import measure, sigma_internal
from ud2m.operators.simulate import Grayscale, Haze, KnownDegradation, LowLight, PixelAffine, PixelScale
from ud2m.operators.superres import SuperResolution
from ud2m.operators.video import PerFrame, TemporalAveragePool, TemporalBlur

__all__ = [
    "JPEG",
    "BoxInpainting",
    "Compose",
    "DeepinvOperator",
    "DegradationState",
    "Denoising",
    "GaussianBlur",
    "Grayscale",
    "Haze",
    "Inpainting",
    "KernelBlur",
    "KnownDegradation",
    "LearnedDegradation",
    "LinearOperator",
    "LowLight",
    "MotionBlur",
    "NonlinearOperator",
    "Operator",
    "PerFrame",
    "PixelAffine",
    "PixelScale",
    "RandomInpainting",
    "SuperResolution",
    "TemporalAveragePool",
    "TemporalBlur",
    "UniformBlur",
    "as_operator",
    "conjugate_gradient",
    "measure",
    "sigma_internal",
]
