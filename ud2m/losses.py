r"""UD2M training losses (docs/method.md §7.5): per-sample loss functions and :class:`UD2MLoss`, their weighted sum.

Implements the per-sample losses of the UD2M paper (Mbakam et al., unfolded distillation of diffusion models) as
fixed by our spec: the conditional-consistency L2 in :math:`x_0` space with an optional SNR weight, LPIPS
(Zhang et al., 2018) on [-1, 1] inputs, the non-saturating adversarial loss on **logits** (the reference applied a
sigmoid twice), the discriminator loss and a zero-centred gradient penalty on interpolates. Every loss returns
per-sample values ``(B,)``; the LightningModule reduces and weights them (EDM ``loss.py`` convention). Losses run
in fp32.

The LPIPS network itself (building it offline from local backbone weights) lives in :mod:`ud2m.perceptual`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ud2m.utils import Generator, append_dims, rand

logger = logging.getLogger(__name__)

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


#: Per-sample weights of the generator's adversarial term [ours]: ``"nu"`` is the VP noise variance 1 − ᾱ_t.
_ADV_WEIGHTS = {"none": None, "nu": lambda alpha_bar: 1.0 - alpha_bar}


def adv_weight(alpha_bar: torch.Tensor, kind: str = "none") -> torch.Tensor | None:
    r"""Per-sample weight of the generator's adversarial term [ours] (§7.5), or None for ``"none"`` (uniform).

    ``"nu"``: :math:`1 - \bar\alpha_t`, the noise variance of x_t. Near t = 0 the conditional law p(x0 | x_t, y)
    is almost a point mass at x_t / a_t: the energy score already pins the block there, and a discriminator that
    sees (y, x_t, t) can only push the samples away from it, which the exact Gaussian study measures as W2 rising
    with N. This weight fades the adversarial term where the noise fades and keeps it where x_t says little.
    Measured (README, "Sampler design"): W2 lower than with ``"none"`` at every N of the Gaussian study, but still
    rising after N = 3; on the digits quick start equal PSNR and equal or better CFID and coverage at N <= 4.

    >>> adv_weight(torch.tensor([0.99, 0.5]), "nu")
    tensor([0.0100, 0.5000])
    """
    rule = _adv_rule(kind)
    return None if rule is None else rule(torch.as_tensor(alpha_bar))


def _adv_rule(kind: str):
    """The rule of ``kind`` in :data:`_ADV_WEIGHTS` (None: uniform); an unknown name is refused."""
    if kind not in _ADV_WEIGHTS:
        raise ValueError(f"adv_weighting: kind must be one of {sorted(_ADV_WEIGHTS)}, got {kind!r}")
    return _ADV_WEIGHTS[kind]


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


# --------------------------------------------------------------------------------------------- adversarial


#: Generator losses on D's logits ``l`` [ours: the choice]. With the optimal balanced-BCE discriminator
#: ``l = log p/q`` (p the data law, q the sampler's), each weighs a fake sample's ``∇l`` by a different factor:
#: ``non_saturating`` by q/(p + q) (the paper; at the optimum it minimises KL(q‖p) − 2 JS, mode-seeking: it pulls in
#: samples where the sampler over-covers and barely moves the under-covered tails), ``minimax`` by p/(p + q) (the
#: original GAN loss, JS: it pushes out where the sampler under-covers).
_ADV_LOSSES = {
    "non_saturating": lambda logits: F.softplus(-logits),
    "minimax": lambda logits: -F.softplus(logits),
}
ADV_LOSSES = tuple(_ADV_LOSSES)


def _adv_loss_rule(kind: str):
    """The generator loss ``kind`` of :data:`_ADV_LOSSES`; an unknown name is refused."""
    if kind not in _ADV_LOSSES:
        raise ValueError(f"adv_loss: expected one of {ADV_LOSSES}, got {kind!r}")
    return _ADV_LOSSES[kind]


def generator_adversarial(d_fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    r"""Generator adversarial loss per sample on logits (§7.5): ``"non_saturating"`` (the paper),
    :math:`L_{adv}^G = \mathrm{softplus}(-D(\hat x_0, c))`, or ``"minimax"`` [ours: the option],
    :math:`L_{adv}^G = -\mathrm{softplus}(D(\hat x_0, c)) = \log(1 - \sigma(D))` (:data:`ADV_LOSSES`).

    >>> generator_adversarial(torch.zeros(2))  # log 2
    tensor([0.6931, 0.6931])
    >>> generator_adversarial(torch.zeros(1), "minimax")  # -log 2
    tensor([-0.6931])
    """
    return _adv_loss_rule(kind)(d_fake_logits.float())


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


# --------------------------------------------------------------------------------------------- the UD2M loss
Weighting = Callable[[torch.Tensor], torch.Tensor]


class UD2MLoss:
    r"""The generator objective of docs/method.md §7.5 as one object, batch means of per-sample terms:

    .. math:: \omega_{l2}\,L_{cons} + \omega_{ps}\,L_{ps} + \omega_{adv}\,L^G_{adv},

    with :math:`L_{cons}` the energy score of two samples (``consistency="energy"``, the default: minimised by the
    conditional law) or the conditional-consistency L2 (``"l2"``: minimised by the conditional mean), each optionally
    weighted per sample by ``weighting(alpha_bar)`` (e.g. ``functools.partial(l2_weight, kind="min_snr")``; the
    energy score, an RMS, gets its square root).

    Args:
        consistency: ``"energy"`` or ``"l2"``.
        omega_l2, omega_lpips, omega_adv: the weights.
        weighting: None (uniform) or a callable ``(B,) alpha_bar -> (B,)`` weight.
        adv_weighting: the adversarial term's per-sample weight, ``"none"`` or ``"nu"`` (:func:`adv_weight`).
        adv_loss: the generator's adversarial loss, ``"non_saturating"`` or ``"minimax"``
            (:func:`generator_adversarial`).
        perceptual: an LPIPS callable (:func:`ud2m.perceptual.make_lpips`) or None (no perceptual term). Held by
            reference: it is registered (and frozen) by whoever owns it.
    """

    def __init__(
        self,
        consistency: str = "energy",
        *,
        omega_l2: float = 1.0,
        omega_lpips: float = 0.0,
        omega_adv: float = 0.0,
        weighting: Weighting | None = None,
        adv_weighting: str = "none",
        adv_loss: str = "non_saturating",
        perceptual: PerceptualFn | None = None,
    ) -> None:
        if consistency not in ("energy", "l2"):
            raise ValueError(f"consistency_loss: expected 'energy' or 'l2', got {consistency!r}")
        _adv_rule(adv_weighting)  # unknown names fail here, not at the first adversarial step
        _adv_loss_rule(adv_loss)
        self.consistency, self.weighting, self.perceptual = consistency, weighting, perceptual
        self.adv_weighting, self.adv_loss = adv_weighting, adv_loss
        self.omega = {"l2": omega_l2, "lpips": omega_lpips, "adv": omega_adv}

    def __call__(
        self,
        x0_hat: torch.Tensor,
        x0_hat_2: torch.Tensor | None,
        x0: torch.Tensor,
        alpha_bar: torch.Tensor,
        d_fake_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The loss and its terms: ``l2`` (always, of the first sample), ``energy``, ``lpips``,
        ``lpips_random_backbone``, ``adv_g`` (when present) and ``loss_g``.

        Args:
            x0_hat, x0_hat_2: two samples of the sampler for the same (x_t, y) (``x0_hat_2`` only for the energy
                score).
            x0: the clean images.
            alpha_bar: ``(B,)`` VP-equivalent ᾱ_t of each sample's time (the weighting's argument).
            d_fake_logits: the discriminator's logits on ``x0_hat`` (None: no adversarial term).
        """
        weight = None if self.weighting is None else self.weighting(alpha_bar)
        logs: dict[str, torch.Tensor | float] = {"l2": l2_consistency(x0_hat, x0, weight).mean()}
        if self.consistency == "l2":
            loss = self.omega["l2"] * logs["l2"]
        else:
            if x0_hat_2 is None:
                raise ValueError("UD2MLoss: the energy score needs a second sample x0_hat_2")
            root = None if weight is None else weight.sqrt()  # the energy score is an RMS: √w on it is w on squares
            logs["energy"] = energy_score(x0_hat, x0_hat_2, x0, root).mean()
            logs["l2"] = logs["l2"].detach()
            loss = self.omega["l2"] * logs["energy"]
        if self.perceptual is not None:
            logs["lpips"] = lpips_loss(self.perceptual, x0_hat, x0).mean()
            logs["lpips_random_backbone"] = float(getattr(self.perceptual, "random_backbone", False))
            loss = loss + self.omega["lpips"] * logs["lpips"]
        if d_fake_logits is not None:
            adv = generator_adversarial(d_fake_logits, self.adv_loss)
            w_adv = adv_weight(alpha_bar.to(adv.device), self.adv_weighting)
            logs["adv_g"] = (adv if w_adv is None else w_adv.to(adv.dtype) * adv).mean()
            loss = loss + self.omega["adv"] * logs["adv_g"]
        logs["loss_g"] = loss
        return loss, logs
