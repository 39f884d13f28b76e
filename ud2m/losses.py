r"""UD2M training losses (docs/method.md §7.5) and the pluggable LPIPS perceptual network.

Implements the per-sample losses of the UD2M paper (Mbakam et al., unfolded distillation of diffusion models) as
fixed by our spec: the conditional-consistency L2 in :math:`x_0` space with an optional SNR weight, LPIPS
(Zhang et al., 2018) on [-1, 1] inputs, the non-saturating adversarial loss on **logits** (the reference applied a
sigmoid twice), the discriminator loss and a zero-centred gradient penalty on interpolates. Every loss returns
per-sample values ``(B,)``; the LightningModule reduces and weights them (EDM ``loss.py`` convention). Losses run
in fp32.

LPIPS needs torchvision's ImageNet backbone, which torchvision downloads into ``$TORCH_HOME/hub/checkpoints``.
:func:`make_lpips` never downloads: it uses a file already there, or a local ``weights`` path, and otherwise raises
(or, only when asked, builds a random backbone flagged ``random_backbone = True`` that metrics refuse to report).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ud2m.utils import Generator, append_dims, rand

logger = logging.getLogger(__name__)

# torchvision weight file names, as in the ``url`` of ``VGG16_Weights.IMAGENET1K_V1``,
# ``AlexNet_Weights.IMAGENET1K_V1`` and ``SqueezeNet1_1_Weights.IMAGENET1K_V1`` (what lpips' ``pretrained=True`` loads).
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- L2 consistency


def l2_consistency(x0_hat: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Conditional-consistency loss :math:`L_{l2} = w(t)\,\mathrm{mean}_{pixels}(\hat x_0 - x_0)^2` (§7.5).

    Args:
        x0_hat: generator output :math:`\hat x_0 = G(x_t, y)`, ``(B, ...)``.
        x0: clean images, same shape.
        weight: optional per-sample weight :math:`w(t)`, ``(B,)`` (see :func:`l2_weight`).

    Returns:
        ``(B,)`` float32.
    """
    if x0_hat.shape != x0.shape:
        raise ValueError(f"l2_consistency: x0_hat has shape {tuple(x0_hat.shape)}, x0 has {tuple(x0.shape)}")
    loss = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)  # (B,)
    return loss if weight is None else weight.float() * loss


def energy_score(
    x0_hat: torch.Tensor, x0_hat_2: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Energy score of two independent generator samples [ours, §7.5 revision]: a strictly proper scoring rule,
    so its expected value is minimised by the true conditional law :math:`p(x_0 \mid x_t, y)`, not by its mean.

    .. math::
        L_{es} = w(t)\Big(\tfrac12\|\hat x_0 - x_0\| + \tfrac12\|\hat x_0' - x_0\| - \tfrac12\|\hat x_0 -
        \hat x_0'\|\Big)/\sqrt d

    (Gneiting & Raftery 2007, β = 1; norms over all d pixels, divided by √d so the value is an RMS). The L2 loss
    :math:`\|\hat x_0 - x_0\|^2` is minimised by the conditional mean: trained with it, the unfolded blocks collapse
    to the mean and the N-step chain under-disperses (§7.5 "Mean collapse"). The negative term rewards spread
    between two samples drawn with independent re-noise ξ for the same :math:`(x_t, y)`.

    Args:
        x0_hat, x0_hat_2: two generator samples for the same inputs, ``(B, ...)``.
        x0: clean images, same shape.
        weight: optional per-sample weight ``(B,)``.

    Returns:
        ``(B,)`` float32.

    >>> x = torch.zeros(1, 4)
    >>> energy_score(x + 1, x - 1, x).item()  # ½·2 + ½·2 − ½·4 = 0, over √4
    0.0
    """
    if not x0_hat.shape == x0_hat_2.shape == x0.shape:
        raise ValueError(
            f"energy_score: shapes differ: {tuple(x0_hat.shape)}, {tuple(x0_hat_2.shape)}, {tuple(x0.shape)}"
        )
    d = x0[0].numel()
    norm = lambda v: v.float().flatten(1).norm(dim=1) / d**0.5  # noqa: E731  (B,) RMS
    loss = 0.5 * (norm(x0_hat - x0) + norm(x0_hat_2 - x0)) - 0.5 * norm(x0_hat - x0_hat_2)
    return loss if weight is None else weight.float() * loss


def _snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    if ((alpha_bar <= 0) | (alpha_bar >= 1)).any():
        lo, hi = alpha_bar.min().item(), alpha_bar.max().item()
        raise ValueError(f"l2_weight: alpha_bar must lie in (0, 1), got values in [{lo}, {hi}]")
    return alpha_bar / (1 - alpha_bar)


_L2_WEIGHTS = {
    "none": lambda alpha_bar, gamma: torch.ones_like(alpha_bar),
    "snr": lambda alpha_bar, gamma: _snr(alpha_bar),
    "min_snr": lambda alpha_bar, gamma: _snr(alpha_bar).clamp_max(gamma),
    "max_snr1": lambda alpha_bar, gamma: _snr(alpha_bar).clamp_min(1.0),
}


def l2_weight(alpha_bar: torch.Tensor, kind: str = "none", gamma: float = 5.0) -> torch.Tensor:
    r"""Per-sample L2 weight :math:`w(t)` of the conditional-consistency loss (§7.5).

    ``none``: 1; ``snr``: :math:`\bar\alpha_t/(1-\bar\alpha_t)`; ``min_snr``: :math:`\min(\mathrm{SNR}_t, \gamma)`;
    ``max_snr1``: :math:`\max(\mathrm{SNR}_t, 1)` [ours]: 1 wherever x_t is noisier than the data (s_t ≥ 1) and
    :math:`1/s_t^2` below, so the late, small-t blocks, whose errors are small in absolute terms but decide the
    chain's output, are not drowned by the large-t samples. ``snr`` is what the reference code minimises (its MSE is
    in ε space); ``none`` is the paper's formula. The module applies :math:`\sqrt{w}` to the energy score (an RMS).

    >>> l2_weight(torch.tensor([0.5, 0.75]), "snr")
    tensor([1., 3.])

    Args:
        alpha_bar: :math:`\bar\alpha_t` per sample (the VP-equivalent :math:`1 - \nu_t` for other families), ``(B,)``.
        kind: ``"none"``, ``"snr"``, ``"min_snr"`` or ``"max_snr1"``.
        gamma: the cap of ``min_snr``.

    Returns:
        ``(B,)`` in the dtype of ``alpha_bar``.
    """
    if kind not in _L2_WEIGHTS:
        raise ValueError(f"l2_weight: kind must be one of {sorted(_L2_WEIGHTS)}, got {kind!r}")
    return _L2_WEIGHTS[kind](torch.as_tensor(alpha_bar), gamma)


# --------------------------------------------------------------------------------------------- perceptual


def lpips_loss(perceptual: PerceptualFn, x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    r"""Perceptual loss :math:`L_{ps} = \mathrm{LPIPS}(\hat x_0, x_0)` on [-1, 1] inputs, fp32 (§7.5).

    Grayscale images are repeated to 3 channels. ``perceptual`` is any callable ``(a, b) -> (B,)`` or
    ``(B, 1, 1, 1)`` taking [-1, 1] images, e.g. :func:`make_lpips` (LPIPS with ``normalize=False``).

    Returns:
        ``(B,)`` float32.
    """
    if x0_hat.shape != x0.shape or x0.ndim != 4 or x0.shape[1] not in (1, 3):
        raise ValueError(
            f"lpips_loss: expected two (B, 1 or 3, H, W) images of equal shape, got {tuple(x0_hat.shape)} and "
            f"{tuple(x0.shape)}"
        )
    if x0.shape[1] == 1:
        x0_hat, x0 = x0_hat.expand(-1, 3, -1, -1), x0.expand(-1, 3, -1, -1)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        return perceptual(x0_hat.float(), x0.float()).reshape(x0.shape[0])


class Perceptual(nn.Module):
    """A frozen LPIPS network ``(a, b) -> (B,)`` on [-1, 1] inputs, labelled with its backbone.

    Built by :func:`make_lpips`. The wrapped ``lpips.LPIPS`` stays in eval mode even when a parent module calls
    ``.train()`` (its linear heads carry dropout), and no parameter requires a gradient; gradients still flow to the
    inputs.

    Attributes:
        backbone: ``"vgg"``, ``"alex"`` or ``"squeeze"``.
        random_backbone: ``True`` when the trunk is randomly initialised: fine for plumbing, never a metric.
    """

    def __init__(self, net: nn.Module, backbone: str, random_backbone: bool) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.backbone = backbone
        self.random_backbone = random_backbone

    def train(self, mode: bool = True) -> Perceptual:
        """Keep the LPIPS network in eval mode whatever ``mode`` is (dropout off, deterministic)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, inputs ``(B, 3, H, W)`` on [-1, 1] (``normalize=False``); returns ``(B,)``."""
        return self.net(a, b, normalize=False).reshape(a.shape[0])


def backbone_path(net: str) -> Path:
    """Where torchvision looks for the ImageNet weights of LPIPS backbone ``net`` (``$TORCH_HOME/hub/checkpoints``)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def make_lpips(net: str = "vgg", weights: str | os.PathLike | None = None, allow_random_backbone: bool = False):
    """Build a frozen LPIPS :class:`Perceptual` module without any network access (environment.md, §10.2).

    Backbone weights are taken, in order, from the local torchvision state dict ``weights`` (e.g. a copy of
    ``vgg16-397923af.pth``), or from torchvision's cache ``$TORCH_HOME/hub/checkpoints/<file>`` (see
    :data:`BACKBONE_FILES`); the LPIPS linear heads ship with the ``lpips`` package. Without either, this raises,
    unless ``allow_random_backbone`` is set: then the trunk is random, ``random_backbone`` is ``True`` and a warning
    is logged.

    Args:
        net: ``"vgg"`` (the UD2M loss), ``"alex"`` or ``"squeeze"``.
        weights: optional path of a torchvision backbone state dict.
        allow_random_backbone: build a random-trunk LPIPS instead of raising when no weights are found.

    Returns:
        :class:`Perceptual`.

    Raises:
        FileNotFoundError: naming the expected file, if no weights are found and random backbones are not allowed.
    """
    expected = backbone_path(net)
    if weights is not None:
        module = _lpips(net, pnet_rand=True)
        _load_backbone(module.net, Path(weights))
        return Perceptual(module, net, random_backbone=False)
    if expected.is_file():
        return Perceptual(_lpips(net, pnet_rand=False), net, random_backbone=False)  # torchvision reads the cache
    if not allow_random_backbone:
        raise FileNotFoundError(
            f"LPIPS[{net}]: the torchvision backbone weights are missing: expected {expected} (set TORCH_HOME or copy "
            f"{BACKBONE_FILES[net]} there from a machine with internet), or pass weights=<local path of that file>"
        )
    logger.warning("LPIPS[%s]: no backbone weights at %s; RANDOM backbone (not a perceptual metric)", net, expected)
    return Perceptual(_lpips(net, pnet_rand=True), net, random_backbone=True)


def _lpips(net: str, pnet_rand: bool) -> nn.Module:
    import lpips  # lazy: pulls in torchvision

    with warnings.catch_warnings():  # lpips uses torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=pnet_rand, verbose=False)


def _load_backbone(trunk: nn.Module, path: Path) -> None:
    """Load a torchvision ``features.<i>.*`` state dict into lpips' ``slice<k>.<i>.*`` trunk (strict)."""
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS: backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for name in trunk.state_dict():
        source = "features." + name.split(".", 1)[1]  # slice<k>.<i>.weight -> features.<i>.weight
        if source not in state:
            raise ValueError(f"LPIPS: {path} has no entry {source!r}; expected a torchvision backbone state dict")
        mapped[name] = state[source]
    trunk.load_state_dict(mapped, strict=True)


# --------------------------------------------------------------------------------------------- adversarial


def generator_adversarial(d_fake_logits: torch.Tensor) -> torch.Tensor:
    r"""Non-saturating generator loss :math:`L_{adv}^G = \mathrm{softplus}(-D(\hat x_0, c))` on logits (§7.5).

    >>> generator_adversarial(torch.zeros(2))  # log 2
    tensor([0.6931, 0.6931])
    """
    return F.softplus(-d_fake_logits.float())


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    r"""Discriminator loss on logits (BCE with logits, §7.5); the gradient penalty is added separately.

    .. math:: L_D = \tfrac12\,\mathrm{softplus}(-D(x_0, c)) + \tfrac12\,\mathrm{softplus}(D(\mathrm{sg}(\hat x_0), c))

    Args:
        d_real: logits on clean images, ``(B,)``.
        d_fake: logits on detached generator outputs, ``(B,)``.

    Returns:
        ``(B,)`` float32.
    """
    return 0.5 * F.softplus(-d_real.float()) + 0.5 * F.softplus(d_fake.float())


def gradient_penalty(
    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    cond: torch.Tensor,
    generator: Generator = None,
) -> torch.Tensor:
    r"""Zero-centred gradient penalty :math:`GP = \|\nabla_{\tilde x} D(\tilde x, c)\|^2` on logits (§7.5).

    :math:`\tilde x = u x_0 + (1 - u)\,\mathrm{sg}(\hat x_0)`, :math:`u \sim U(0, 1)` per sample; the squared norm
    sums over all pixels. The graph is kept (``create_graph=True``) so the penalty trains D's parameters.

    Args:
        discriminator: ``D(x, c) -> (B,)`` logits.
        x0: clean images ``(B, C, H, W)``.
        x0_hat: generator outputs (detached here).
        cond: conditioning image ``c``.
        generator: randomness for ``u`` (a ``torch.Generator`` or a list of B).

    Returns:
        ``(B,)`` float32.
    """
    u = append_dims(rand((x0.shape[0],), generator, device=x0.device), x0.ndim)  # (B, 1, 1, 1)
    x_tilde = (u * x0.detach().float() + (1 - u) * x0_hat.detach().float()).requires_grad_(True)
    with torch.autocast(device_type=x0.device.type, enabled=False):
        d = discriminator(x_tilde, cond)  # (B,)
    (grad,) = torch.autograd.grad(d.sum(), x_tilde, create_graph=True)  # samples are independent: sum -> per-sample
    return grad.pow(2).flatten(1).sum(1)
