r"""A learned, blind degradation operator: the F-PAM ψ_φ of LD-RPS with its two discriminators (docs/method.md §13).

LD-RPS (seed 002) fits a small pixel-space network ψ_φ online so that decoded diffusion estimates x̂ "look like" the
measurement y: ψ is trained unpaired (CycleGAN-style) by a patch discriminator D1 (real: y, fake: ψ(x̂)), and a
"type" discriminator D2 on residuals (real: x̂ − ψ(x̂), fake: x̂⁺ − y) feeds the fidelity term (§13.1).

Unlike the §2 operators, ψ changes at every diffusion step, so this module holds architecture and hyper-parameters
only and everything that changes lives in an explicit :class:`DegradationState` owned by the solver (§13.2). Every
weight and every Adam moment carries a leading per-sample dimension B: layers are grouped convolutions
(``groups=B``), so sample b's parameters touch only loss b, one backward of Σ_b S_b gives each sample its own
gradient, and the hand-written batched Adam equals B sequential ``torch.optim.Adam`` runs. Nothing is shared
across the images of a batch and nothing persists between calls.

Conventions: ψ, D1, D2 and the feature network see [0, 1] images: ``x_hat`` arguments of :meth:`adapt` and
:meth:`fidelity` are on [0, 1] (x̂ = (decode(ž0) + 1)/2, unclamped), measurements ``y`` are on the internal scale
(y₀₁ = (y + A₀(𝟙))/2, A₀ = I without ``base``); :meth:`LearnedDegradation.A` maps internal images to the internal
scale, 2·ψ((x + 1)/2) − A₀(𝟙) (§1.1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ud2m.operators.base import LinearOperator, NonlinearOperator
from ud2m.utils import Generator, append_dims, batch_scalar, randn

logger = logging.getLogger(__name__)

LEAKY_SLOPE = 0.01  # LeakyReLU slope of ψ, D1 and D2 [ref]
PHYSICAL = ("tone", "scattering", "luma")  # low-dimensional, physically parametrised ψ fitted paired [ours] (§13.9)
ARCHS = ("fpam", "tao", *PHYSICAL)
TONE_FLOOR = 1e-3  # x ↦ max(x, 1e-3)^γ: finite γ-gradient at x ≤ 0 (x̂ is unclamped)
Layer = tuple[str, int, int, int, int]  # (name, in_channels, out_channels, kernel, stride)
FeatureNet = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- state
@dataclasses.dataclass(frozen=True)
class AdamState:
    """Per-sample parameters of one network and their Adam moments; every tensor is ``(B, ...)``.

    Attributes:
        params: parameter name -> ``(B, *shape)`` tensor.
        m, v: first and second moments, same keys and shapes.
        step: ``(B,)`` int64 number of optimiser steps taken.
    """

    params: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    step: torch.Tensor

    @classmethod
    def fresh(cls, params: dict[str, torch.Tensor]) -> AdamState:
        """Zero moments and step 0 for ``params``."""
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        B = next(iter(params.values())).shape[0]
        step = torch.zeros(B, dtype=torch.int64, device=next(iter(params.values())).device)
        return cls(params, zeros, {k: z.clone() for k, z in zeros.items()}, step)

    def numel(self, prefix: str = "") -> int:
        """Parameters per sample whose name starts with ``prefix``."""
        return sum(p[0].numel() for k, p in self.params.items() if k.startswith(prefix))

    def select(self, index: torch.Tensor | slice | int) -> AdamState:
        """The state of the samples ``index`` (keeps the leading dimension)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        pick = lambda d: {k: t[index] for k, t in d.items()}  # noqa: E731
        return AdamState(pick(self.params), pick(self.m), pick(self.v), self.step[index])


@dataclasses.dataclass(frozen=True)
class DegradationState:
    """Everything :class:`LearnedDegradation` fits, per sample (docs/method.md §13.2).

    Attributes:
        psi: ψ_φ (F-PAM) parameters, prefixes ``h1.``, ``h2.``, ``p``.
        d1: patch discriminator D1.
        d2: residual ("type") discriminator D2; None when the residual shapes differ (``base`` changes the shape).
    """

    psi: AdamState
    d1: AdamState
    d2: AdamState | None

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return int(self.psi.step.shape[0])

    def select(self, index: torch.Tensor | slice | int) -> DegradationState:
        """The state of the samples ``index``."""
        return DegradationState(
            self.psi.select(index), self.d1.select(index), None if self.d2 is None else self.d2.select(index)
        )


def adam_step(
    state: AdamState,
    grads: dict[str, torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> AdamState:
    r"""One batched Adam step (Kingma & Ba 2015, coupled L2 decay as ``torch.optim.Adam``), per sample.

    .. math:: g \leftarrow g + \lambda\phi,\quad m \leftarrow \beta_1 m + (1-\beta_1)g,\quad
              v \leftarrow \beta_2 v + (1-\beta_2)g^2,\quad
              \phi \leftarrow \phi - \frac{\eta}{1-\beta_1^k}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^k} + \epsilon}

    Elementwise, so sample b's update depends only on sample b's gradient (batched = sequential).
    """
    beta1, beta2 = betas
    step = state.step + 1
    k = step.to(torch.float64)
    bc1, bc2 = 1 - beta1**k, 1 - beta2**k  # (B,)
    params, m_new, v_new = {}, {}, {}
    for name, p in state.params.items():
        g = grads[name] + weight_decay * p if weight_decay else grads[name]
        m = state.m[name].lerp(g, 1 - beta1)
        v = state.v[name] * beta2 + (1 - beta2) * g * g
        denom = v.sqrt() / append_dims(bc2.sqrt().to(p.dtype), p.ndim) + eps
        params[name] = p - append_dims((lr / bc1).to(p.dtype), p.ndim) * m / denom
        m_new[name], v_new[name] = m, v
    return AdamState(params, m_new, v_new, step)


# ---------------------------------------------------------------------------------------------------- layers
def fpam_layers(c_in: int, c_out: int, width: int, arch: str = "fpam") -> list[Layer]:
    """Layer table of ψ (docs/method.md §13.1): h1 = conv3×3 → 1×1, h2 = 3 conv3×3 (w, 2w, 4w) → 1×1.

    ``arch="tao"`` is h2 alone on the input (the reference's plain 4-conv CNN, for ablations).
    """
    if arch not in ("fpam", "tao"):
        raise ValueError(f"arch: expected 'fpam' or 'tao' for a layer table, got {arch!r}")
    h2_in = c_in if arch == "tao" else c_out
    h2 = [("h2.0", h2_in, width, 3, 1), ("h2.1", width, 2 * width, 3, 1)]
    h2 += [("h2.2", 2 * width, 4 * width, 3, 1), ("h2.3", 4 * width, c_out, 1, 1)]
    if arch == "tao":
        return h2
    return [("h1.0", c_in, width, 3, 1), ("h1.1", width, c_out, 1, 1), *h2]


def discriminator_layers(c_in: int, width: int = 64) -> list[Layer]:
    """D1/D2 (§13.1): conv3×3 stride 2, c → w → 2w → 4w, then conv1×1 4w → 1 logit per (H/8)×(W/8) patch."""
    return [
        ("0", c_in, width, 3, 2),
        ("1", width, 2 * width, 3, 2),
        ("2", 2 * width, 4 * width, 3, 2),
        ("3", 4 * width, 1, 1, 1),
    ]


def init_layers(
    layers: Sequence[Layer], B: int, generator: Generator, *, device, dtype, zero: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    r"""Per-sample conv weights, Kaiming-normal fan-in :math:`\mathcal N(0, 2/\text{fan\_in})`, biases 0 [ref].

    Layers named in ``zero`` start at 0 (the ``base`` residual). Draws follow the layer order, one per layer.
    """
    params = {}
    for name, c_in, c_out, k, _ in layers:
        w = randn((B, c_out, c_in, k, k), generator, device=device, dtype=dtype) * math.sqrt(2.0 / (c_in * k * k))
        params[f"{name}.weight"] = torch.zeros_like(w) if name in zero else w
        params[f"{name}.bias"] = torch.zeros(B, c_out, device=device, dtype=dtype)
    return params


def grouped_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Per-sample convolution, zero padding k//2: x ``(B, n, C, H, W)``, weight ``(B, O, C, k, k)`` -> ``(B, n, O,
    H', W')``; one grouped conv (``groups=B``), so sample b only ever meets its own weights."""
    B, n, C, H, W = x.shape
    O, k = weight.shape[1], weight.shape[-1]
    out = F.conv2d(
        x.transpose(0, 1).reshape(n, B * C, H, W),  # (n, B·C, H, W)
        weight.reshape(B * O, C, k, k),
        bias.reshape(B * O),
        stride=stride,
        padding=k // 2,
        groups=B,
    )
    return out.reshape(n, B, O, *out.shape[-2:]).transpose(0, 1)  # (B, n, O, H', W')


def conv_stack(x: torch.Tensor, params: dict[str, torch.Tensor], layers: Sequence[Layer]) -> torch.Tensor:
    """Grouped convs with LeakyReLU(0.01) between them (none after the last), on ``(B, n, C, H, W)``."""
    for j, (name, _, _, _, stride) in enumerate(layers):
        x = grouped_conv(x, params[f"{name}.weight"], params[f"{name}.bias"], stride)
        if j < len(layers) - 1:
            x = F.leaky_relu(x, LEAKY_SLOPE)
    return x


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """BCE of sigmoid(logits) against a constant label, averaged per sample over chains and patches, ``(B,)``."""
    loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return loss.flatten(1).mean(1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every entry (and chain), ``(B,)``."""
    return (a - b).square().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------- physical ψ
def init_physical(arch: str, B: int, c_in: int, c_out: int, grid: int, *, device, dtype) -> dict[str, torch.Tensor]:
    """Parameters of a physical ψ (§13.9) at its start: the identity for ``tone``, near-clear air (t ≈ 0.98,
    grey airlight 0.5) for ``scattering``, the channel mean for ``luma``. Nothing is random."""
    kw = dict(device=device, dtype=dtype)
    if arch == "tone":
        return {"log_gain": torch.zeros(B, c_out, **kw), "log_gamma": torch.zeros(B, c_out, **kw)}
    if arch == "scattering":
        return {"depth": torch.full((B, 1, grid, grid), -4.0, **kw), "airlight": torch.zeros(B, c_out, **kw)}
    if arch == "luma":
        return {"luma": torch.zeros(B, c_in, **kw)}
    raise ValueError(f"arch: expected one of {PHYSICAL}, got {arch!r}")


def physical_psi(arch: str, u: torch.Tensor, phi: dict[str, torch.Tensor], c_out: int) -> torch.Tensor:
    r"""A physical ψ on ``(B, n, C, H, W)`` [0, 1] images [ours] (§13.9); every parameter is per sample.

    - ``tone``: :math:`\psi(u)_c = g_c\,\max(u_c, 10^{-3})^{\gamma_c}`, g = e^ℓ, γ = e^κ per channel: a monotone
      pointwise tone curve (low light: g < 1, γ > 1 darken; noise: the fit stays at the identity).
    - ``scattering``: :math:`\psi(u) = t \odot u + a(1 - t)`, t = exp(−softplus(τ)) ∈ (0, 1) with τ a
      ``grid``×``grid`` optical-depth map upsampled bilinearly (smooth depth), a = sigmoid(α) per channel (the
      atmospheric scattering model of haze).
    - ``luma``: :math:`\psi(u) = (w^\top u)\mathbb 1`, w = softmax(ω) (a convex mix of the channels, grey images).
    """
    B, n, _, H, W = u.shape
    if arch == "tone":
        gain, gamma = (phi[k].exp()[:, None, :, None, None] for k in ("log_gain", "log_gamma"))
        return gain * u.clamp(min=TONE_FLOOR).pow(gamma)
    if arch == "scattering":
        tau = F.interpolate(phi["depth"], size=(H, W), mode="bilinear", align_corners=False)  # (B, 1, H, W)
        t = torch.exp(-F.softplus(tau))[:, None]  # (B, 1, 1, H, W)
        a = torch.sigmoid(phi["airlight"])[:, None, :, None, None]
        return t * u + a * (1 - t)
    if arch == "luma":
        w = torch.softmax(phi["luma"], 1)[:, None, :, None, None]
        return (w * u).sum(2, keepdim=True).expand(B, n, c_out, H, W)
    raise ValueError(f"arch: expected one of {PHYSICAL}, got {arch!r}")


# ---------------------------------------------------------------------------------------------------- features
class ImageNetFeatures(nn.Module):
    """A frozen feature trunk on [0, 1] RGB images, ImageNet-normalised first (grey inputs repeated to RGB)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of ``x`` ``(N, C, H, W)`` on [0, 1]."""
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.trunk((x - self.mean) / self.std)


def vgg16_relu2_2(path: str | os.PathLike) -> ImageNetFeatures:
    """torchvision VGG16 up to relu2_2 (``features[:9]``) from a local state-dict file, ``weights_only=True``.

    Raises:
        FileNotFoundError: naming ``path`` when the file does not exist (nothing is ever downloaded).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"feature_net: VGG16 weights file not found: {path} (nothing is downloaded)")
    from torchvision.models import vgg16

    trunk = vgg16(weights=None).features[:9]
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")} or state
    trunk.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) < 9})
    return ImageNetFeatures(trunk)


def _feature_net(spec: FeatureNet | str | os.PathLike | None) -> FeatureNet | None:
    if spec is None:
        logger.info("LearnedDegradation: feature_net=None, the perceptual/feature terms are off (w_pse = λ_p = 0)")
        return None
    if isinstance(spec, (str, os.PathLike)):
        return vgg16_relu2_2(spec)
    if not callable(spec):
        raise TypeError(f"feature_net: expected None, a callable or a weights path, got {type(spec).__name__}")
    return spec


# ---------------------------------------------------------------------------------------------------- the operator
class LearnedDegradation(nn.Module):
    r"""LD-RPS's learned degradation ψ_φ with discriminators D1, D2, functional over a :class:`DegradationState`.

    Implements docs/method.md §13.1-13.2: ψ(u) = h2(h1(u)) + p ⊙ h1(u) (F-PAM, 9×9 receptive field); ψ's loss
    S(φ) = w_mse·MSE(ψ(x̂), x̂) + clip(w_pse·F(ψ(x̂), x̂)) + w_adv·BCE(D1(ψ(x̂)), 1); fidelity
    L = MSE(ψ(x̂⁺), y₀₁) + λ_p·F(ψ(x̂⁺), y₀₁) + λ_a·BCE(D2(x̂⁺ − y₀₁), 1).

    Args:
        width: F-PAM width w (64).
        disc_width: first width of D1/D2 (64).
        arch: ``"fpam"`` [ref], ``"tao"`` (plain 4-conv CNN, ablation), or a physical ψ [ours] (§13.9):
            ``"tone"``, ``"scattering"``, ``"luma"`` (see :func:`physical_psi`). A physical ψ is fitted *paired*,
            S(φ) = MSE(ψ(x̂⁺), y₀₁) on the guided chain and only in guided steps, with no D1 and no identity or
            feature term (w_mse, w_pse, w_adv are unused); it cannot take ``base``.
        grid: control points per side of the ``"scattering"`` optical-depth map.
        psi_iters: Adam steps of ψ per :meth:`adapt` (1 [ref]).
        w_mse, w_pse, w_adv: ψ loss weights (defaults: dehazing, §13.4).
        lambda_p, lambda_a: fidelity weights of the feature and D2 terms.
        psi_lr, psi_weight_decay, d1_lr, d2_lr: Adam settings; betas/eps shared.
        feature_net: None (feature terms off, offline), a callable on [0, 1] images, or a local VGG16 weights file.
        base: known linear A₀ on [0, 1]: ψ(x) = u + r_φ(u), u = A₀x, with r_φ = 0 at init [ours].
        t1: stage boundary used by :meth:`adapt` when called with ``t`` (clip and D2 step only below it).
        clip_threshold, clip_factor: clip(v) = 0.2·v for v > 10 (below t1) [ref].
        prox_steps: iterations of the inexact :meth:`prox_l2`.
    """

    def __init__(
        self,
        *,
        width: int = 64,
        disc_width: int = 64,
        arch: str = "fpam",
        grid: int = 8,
        psi_iters: int = 1,
        w_mse: float = 0.2,
        w_pse: float = 0.5,
        w_adv: float = 0.2,
        lambda_p: float = 5e-3,
        lambda_a: float = 0.0,
        psi_lr: float = 5e-4,
        psi_weight_decay: float = 1e-5,
        d1_lr: float = 1e-4,
        d2_lr: float = 4e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        feature_net: FeatureNet | str | os.PathLike | None = None,
        base: LinearOperator | None = None,
        t1: float = 700.0,
        clip_threshold: float = 10.0,
        clip_factor: float = 0.2,
        prox_steps: int = 5,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
        if base is not None and not isinstance(base, LinearOperator):
            raise TypeError(f"base: expected a LinearOperator, got {type(base).__name__}")
        if base is not None and arch in PHYSICAL:
            raise ValueError(f"base: a physical ψ (arch={arch!r}) takes no base operator")
        self.width, self.disc_width, self.arch = width, disc_width, arch
        self.grid, self.psi_iters = grid, psi_iters
        self.feature_net = _feature_net(feature_net)
        has_features = self.feature_net is not None
        self.w_mse, self.w_adv, self.lambda_a = w_mse, w_adv, (0.0 if arch in PHYSICAL else lambda_a)
        self.w_pse, self.lambda_p = (w_pse, lambda_p) if has_features else (0.0, 0.0)
        self.psi_lr, self.psi_weight_decay, self.d1_lr, self.d2_lr = psi_lr, psi_weight_decay, d1_lr, d2_lr
        self.betas, self.adam_eps = tuple(betas), adam_eps
        self.base = base
        self.t1, self.clip_threshold, self.clip_factor = t1, clip_threshold, clip_factor
        self.prox_steps = prox_steps

    # ------------------------------------------------------------------ shapes and scales
    def image_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        """Shape of the images x behind ``y``: ``y``'s own shape, or ``base.lift(y)``'s with a base operator."""
        return tuple(y.shape) if self.base is None else tuple(self.base.lift(y).shape)

    def _base_offset(self, x_shape: Sequence[int], like: torch.Tensor) -> torch.Tensor | float:
        """A₀(𝟙) of §1.1 (1 without a base), so that y = 2y₀₁ − A₀(𝟙)."""
        if self.base is None:
            return 1.0
        return self.base.A(torch.ones(tuple(x_shape), device=like.device, dtype=like.dtype))

    def unit_measurement(self, y: torch.Tensor) -> torch.Tensor:
        """y₀₁ = (y + A₀(𝟙))/2 on [0, 1] (§13.2)."""
        return (y + self._base_offset(self.image_shape(y), y)) / 2

    # ------------------------------------------------------------------ state
    def init_state(self, y: torch.Tensor, *, generator: Generator = None) -> DegradationState:
        """Fresh φ (p = 1; with ``base``: p = 0 and h2's last conv 0), D1, D2, zero Adam moments, step 0.

        Draws, per sample from its generator, ψ then D1 then D2 weights (layer order). Parameters are fp32 (fp64
        when ``y`` is fp64). Sample b's parameters depend only on generator b.
        """
        B, c_y = y.shape[0], y.shape[1]
        c_x = self.image_shape(y)[1]
        dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        kw = dict(device=y.device, dtype=dtype)
        c_psi_in = c_y if self.base is not None else c_x
        zero = ("h2.3",) if self.base is not None else ()
        if self.physical:
            phi = init_physical(self.arch, B, c_x, c_y, self.grid, **kw)
        else:
            phi = init_layers(fpam_layers(c_psi_in, c_y, self.width, self.arch), B, generator, zero=zero, **kw)
        if self.arch == "fpam":
            phi["p"] = torch.full((B, c_y), 0.0 if self.base is not None else 1.0, **kw)
        d1 = init_layers(discriminator_layers(c_y, self.disc_width), B, generator, **kw)
        same = tuple(self.image_shape(y)) == tuple(y.shape)
        d2 = init_layers(discriminator_layers(c_x, self.disc_width), B, generator, **kw) if same else None
        return DegradationState(AdamState.fresh(phi), AdamState.fresh(d1), None if d2 is None else AdamState.fresh(d2))

    # ------------------------------------------------------------------ networks
    @property
    def physical(self) -> bool:
        """Whether ψ is a physical model (§13.9) fitted paired, rather than F-PAM fitted unpaired."""
        return self.arch in PHYSICAL

    def _fpam(self, u: torch.Tensor, phi: dict[str, torch.Tensor]) -> torch.Tensor:
        """F-PAM on ``(B, n, C, H, W)``: h2(h1(u)) + p ⊙ h1(u) (``"tao"``: h2(u))."""
        layers = fpam_layers(u.shape[2], phi["h2.3.bias"].shape[1], self.width, self.arch)
        if self.arch == "tao":
            return conv_stack(u, phi, layers)
        h = conv_stack(u, phi, layers[:2])
        return conv_stack(h, phi, layers[2:]) + phi["p"][:, None, :, None, None] * h

    def psi_chains(self, x01: torch.Tensor, phi: dict[str, torch.Tensor]) -> torch.Tensor:
        """ψ_φ on ``(B, n, C, H, W)`` [0, 1] images (n chains per sample); with ``base``: u + r_φ(u), u = A₀x."""
        if self.physical:
            return physical_psi(self.arch, x01, phi, c_out=x01.shape[2])
        if self.base is None:
            return self._fpam(x01, phi)
        u = torch.stack([self.base.A(x01[:, j]) for j in range(x01.shape[1])], 1)  # loop over chains, not samples
        return u + self._fpam(u, phi)

    def psi(self, x01: torch.Tensor, state: DegradationState) -> torch.Tensor:
        """ψ_φ(x) for ``(B, C, H, W)`` images on [0, 1]."""
        return self.psi_chains(x01[:, None], state.psi.params)[:, 0]

    def discriminate(self, x: torch.Tensor, d: AdamState | dict[str, torch.Tensor]) -> torch.Tensor:
        """Patch logits of D1/D2 on ``(B, n, C, H, W)``: ``(B, n, 1, H/8, W/8)``."""
        params = d.params if isinstance(d, AdamState) else d
        return conv_stack(x, params, discriminator_layers(x.shape[2], self.disc_width))

    def features(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """F(a, b): per-sample MSE of frozen feature maps of ``(B, n, C, H, W)`` inputs, ``(B,)`` (0 when off)."""
        if self.feature_net is None:
            return a.new_zeros(a.shape[0])
        fa, fb = self.feature_net(a.flatten(0, 1)), self.feature_net(b.flatten(0, 1))  # (B·n, ...)
        return (fa - fb).square().reshape(a.shape[0], -1).mean(1)

    # ------------------------------------------------------------------ the operator view
    def A(self, x: torch.Tensor, state: DegradationState) -> torch.Tensor:
        """ŷ = 2·ψ((x + 1)/2) − A₀(𝟙) on the internal scale, differentiable in ``x`` ``(B, C, H, W)``."""
        return 2 * self.psi((x + 1) / 2, state) - self._base_offset(x.shape, x)

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor, state: DegradationState) -> torch.Tensor:
        r"""Vector-Jacobian product :math:`A'(x)^\top v` by autograd (graph kept when autograd is on)."""
        create_graph = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.A(xg, state), xg, v, create_graph=create_graph)
        return g

    def fidelity(self, x_hat: torch.Tensor, y: torch.Tensor, state: DegradationState) -> torch.Tensor:
        r"""L(x̂⁺) = MSE(ψ(x̂⁺), y₀₁) + λ_p F(ψ(x̂⁺), y₀₁) + λ_a BCE(D2(x̂⁺ − y₀₁), 1), ``(B,)`` (§13.1).

        Args:
            x_hat: guided estimate ``(B, C, H, W)`` on [0, 1] (may carry a graph); the state is read-only.
            y: measurement on the internal scale.
        """
        y01 = self.unit_measurement(y)[:, None]
        x = x_hat[:, None]
        out = self.psi_chains(x, {k: p.detach() for k, p in state.psi.params.items()})
        loss = mse(out, y01)
        if self.lambda_p:
            loss = loss + self.lambda_p * self.features(out, y01)
        if self.lambda_a and state.d2 is not None:
            d2 = {k: p.detach() for k, p in state.d2.params.items()}
            loss = loss + self.lambda_a * bce_logits(self.discriminate(x - y01, d2), 1.0)
        return loss

    # ------------------------------------------------------------------ fitting
    def adapt(
        self,
        x_hat: torch.Tensor,
        y: torch.Tensor,
        state: DegradationState,
        *,
        t: float | None = None,
        guided: bool | None = None,
    ) -> tuple[DegradationState, dict[str, torch.Tensor]]:
        """One D1 step, ``psi_iters`` ψ steps, then one D2 step in the guided stage when λ_a > 0 (§13.1, §13.3).

        A physical ψ (§13.9) takes only its ``psi_iters`` paired steps, and only in guided steps: unguided
        estimates are not aligned with y, so nothing is fitted to them (no D1, no D2).

        Args:
            x_hat: detached estimates ``(B, n, C, H, W)`` (chain 0 guided) or ``(B, C, H, W)``, on [0, 1].
            y: measurement on the internal scale ``(B, ...)``.
            state: current state (not modified; a new one is returned).
            t: native time; ``guided`` defaults to ``t < self.t1``.
            guided: whether this is a guided step (enables the clip of the feature term and the D2 step).

        Returns:
            ``(new_state, logs)`` with per-sample ``(B,)`` losses ``d1``, ``psi``, ``d2`` (NaN where no step).
        """
        guided = (t is not None and t < self.t1) if guided is None else guided
        x = (x_hat if x_hat.ndim == 5 else x_hat[:, None]).detach()
        y01 = self.unit_measurement(y)[:, None].detach()
        nan = torch.full((x.shape[0],), float("nan"), device=x.device, dtype=x.dtype)
        if self.physical:
            psi, loss_psi = state.psi, nan
            with torch.enable_grad():
                for _ in range(self.psi_iters if guided else 0):
                    psi, loss_psi = self._paired_step(x, y01, psi)
            return DegradationState(psi, state.d1, state.d2), {"d1": nan, "psi": loss_psi, "d2": nan}
        with torch.enable_grad():
            d1, loss_d1 = self._d1_step(x, y01, state) if self.w_adv else (state.d1, nan)  # D1 only feeds w_adv
            psi = state.psi
            for _ in range(self.psi_iters):
                psi, loss_psi = self._psi_step(x, psi, d1, guided)
            d2, loss_d2 = state.d2, nan
            if guided and self.lambda_a and state.d2 is not None:
                d2, loss_d2 = self._d2_step(x, y01, psi, state.d2)
        return DegradationState(psi, d1, d2), {"d1": loss_d1, "psi": loss_psi, "d2": loss_d2}

    def _d1_step(self, x: torch.Tensor, y01: torch.Tensor, state: DegradationState) -> tuple[AdamState, torch.Tensor]:
        """D1 on BCE(D1(ψ(x̂)), 0) + BCE(D1(y₀₁), 1), ψ(x̂) detached."""
        fake = self.psi_chains(x, state.psi.params).detach()
        params = _leaves(state.d1.params)
        loss = bce_logits(self.discriminate(fake, params), 0.0) + bce_logits(self.discriminate(y01, params), 1.0)
        grads = _grads(loss, params)
        return adam_step(state.d1, grads, lr=self.d1_lr, betas=self.betas, eps=self.adam_eps), loss.detach()

    def _psi_step(self, x: torch.Tensor, psi: AdamState, d1: AdamState, guided: bool) -> tuple[AdamState, torch.Tensor]:
        """ψ on S(φ) = w_mse·MSE(ψ(x̂), x̂) + clip(w_pse·F(ψ(x̂), x̂)) + w_adv·BCE(D1(ψ(x̂)), 1), with decay."""
        params = _leaves(psi.params)
        out = self.psi_chains(x, params)
        target = x if self.base is None else torch.stack([self.base.A(x[:, j]) for j in range(x.shape[1])], 1)
        loss = self.w_mse * mse(out, target)
        if self.w_pse:
            pse = self.w_pse * self.features(out, target)
            clipped = guided and self.clip_factor != 1.0
            loss = loss + (torch.where(pse > self.clip_threshold, self.clip_factor * pse, pse) if clipped else pse)
        if self.w_adv:
            d1_params = {k: p.detach() for k, p in d1.params.items()}
            loss = loss + self.w_adv * bce_logits(self.discriminate(out, d1_params), 1.0)
        grads = _grads(loss, params)
        kw = dict(lr=self.psi_lr, betas=self.betas, eps=self.adam_eps, weight_decay=self.psi_weight_decay)
        return adam_step(psi, grads, **kw), loss.detach()

    def _paired_step(self, x: torch.Tensor, y01: torch.Tensor, psi: AdamState) -> tuple[AdamState, torch.Tensor]:
        """A physical ψ on S(φ) = MSE(ψ(x̂⁺), y₀₁), the guided chain against y (§13.9), with decay."""
        params = _leaves(psi.params)
        loss = mse(self.psi_chains(x[:, :1], params), y01)  # the free chains are not aligned with y
        kw = dict(lr=self.psi_lr, betas=self.betas, eps=self.adam_eps, weight_decay=self.psi_weight_decay)
        return adam_step(psi, _grads(loss, params), **kw), loss.detach()

    def _d2_step(
        self, x: torch.Tensor, y01: torch.Tensor, psi: AdamState, d2: AdamState
    ) -> tuple[AdamState, torch.Tensor]:
        """D2 on BCE(D2(x̂⁺ − y₀₁), 0) + BCE(D2(x̂ − ψ(x̂)), 1), both detached (real: all chains)."""
        real = (x - self.psi_chains(x, psi.params)).detach()
        fake = (x[:, :1] - y01).detach()
        params = _leaves(d2.params)
        loss = bce_logits(self.discriminate(fake, params), 0.0) + bce_logits(self.discriminate(real, params), 1.0)
        grads = _grads(loss, params)
        return adam_step(d2, grads, lr=self.d2_lr, betas=self.betas, eps=self.adam_eps), loss.detach()

    # ------------------------------------------------------------------ prox and freezing
    def prox_objective(
        self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, state
    ) -> torch.Tensor:
        r""":math:`\tfrac{\gamma}{2}\|A(x) - y\|^2 + \tfrac12\|x - z\|^2` per sample, ``(B,)``."""
        return gamma / 2 * (self.A(x, state) - y).square().flatten(1).sum(1) + (x - z).square().flatten(1).sum(1) / 2

    def prox_l2(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        gamma: float | torch.Tensor,
        state: DegradationState,
        *,
        n_iter: int | None = None,
        max_halvings: int = 30,
    ) -> torch.Tensor:
        r"""Inexact prox :math:`\arg\min_x \tfrac{\gamma}{2}\|A(x) - y\|^2 + \tfrac12\|x - z\|^2` [ours] (§13.2).

        ``n_iter`` projected gradient steps (onto [-1, 1]) from ``z``; per sample, the trial step
        :math:`1/(1+\gamma)` is halved until the objective does not rise (Armijo backtracking without slope
        term), and a sample with no acceptable step stays put: the objective never rises. For ψ = identity the
        first step is exactly :math:`(z + \gamma y)/(1 + \gamma)`.
        """
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        x, f = z, self.prox_objective(z, z, y, gamma, state)
        for _ in range(self.prox_steps if n_iter is None else n_iter):
            grad = append_dims(gamma, z.ndim) * self.A_vjp(x, self.A(x, state) - y, state) + (x - z)
            eta, moved = 1 / (1 + gamma), torch.zeros_like(gamma, dtype=torch.bool)
            x_next, f_next = x, f
            for _ in range(max_halvings):  # per-sample backtracking, vectorised over the batch
                trial = (x - append_dims(eta, z.ndim) * grad).clamp(-1.0, 1.0)
                f_trial = self.prox_objective(trial, z, y, gamma, state)
                accept = ~moved & (f_trial <= f)
                x_next = torch.where(append_dims(accept, z.ndim), trial, x_next)
                f_next = torch.where(accept, f_trial, f_next)
                moved, eta = moved | accept, torch.where(moved | accept, eta, eta / 2)
                if bool(moved.all()):
                    break
            x, f = x_next, f_next
        return x

    def freeze(self, state: DegradationState) -> FrozenDegradation:
        """A pure :class:`NonlinearOperator` view of the fitted ψ (e.g. for DPS or LATINO) [ours]."""
        return FrozenDegradation(self, state)


def _leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: p.detach().requires_grad_(True) for k, p in params.items()}


def _grads(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of Σ_b loss_b: sample b's parameters only touch loss b, so each gets its own gradient."""
    grads = torch.autograd.grad(loss.sum(), list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads, strict=True)}


class FrozenDegradation(NonlinearOperator):
    """A fitted ψ as an ordinary (time-free, pure) nonlinear operator: A(x) = 2ψ((x + 1)/2) − A₀(𝟙).

    ψ's parameters are copied into buffers (``.to()`` moves them); noise is added after the map by ``measure``.
    """

    noise_before_forward = False

    def __init__(self, degradation: LearnedDegradation, state: DegradationState) -> None:
        super().__init__(prox_steps=degradation.prox_steps)
        self.degradation = degradation
        self._names = list(state.psi.params)
        for j, name in enumerate(self._names):
            self.register_buffer(f"phi_{j}", state.psi.params[name].detach().clone())

    def _state(self) -> DegradationState:
        params = {name: getattr(self, f"phi_{j}") for j, name in enumerate(self._names)}
        step = torch.zeros(params[self._names[0]].shape[0], dtype=torch.int64)
        frozen = AdamState(params, {}, {}, step)  # only ψ's parameters are read by A
        return DegradationState(frozen, frozen, None)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """ψ's internal-scale forward map (differentiable)."""
        return self.degradation.A(x, self._state())

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """The monotone inexact prox of :meth:`LearnedDegradation.prox_l2`."""
        return self.degradation.prox_l2(z, y, gamma, self._state())

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` itself (base: ``base.lift(y)``)."""
        return y if self.degradation.base is None else self.degradation.base.lift(y)

    def check_measurement(self, y: torch.Tensor, x_shape: tuple[int, ...] | None = None) -> None:
        """Finite ``y`` of the shape ``A`` gives for images of ``x_shape``."""
        if self.degradation.base is None:
            super().check_measurement(y, x_shape)
        else:
            self.degradation.base.check_measurement(y, x_shape)
