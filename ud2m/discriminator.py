r"""The conditional discriminator of UD2M training (docs/method.md §7.4 and its revision).

:math:`D(x, c)` scores an image ``x`` (clean :math:`x_0` or generated :math:`\hat x_0`) given a conditioning tensor
``c``, identical for real and fake. UD2M samples :math:`p(x_0 \mid x_t, y)`, so by default ``c`` carries the whole
condition (:func:`conditioning`): :math:`\mathrm{lift}(y)`, the noisy state :math:`x_t` and the time :math:`t/T` as a
constant channel; the game then compares the joint laws of :math:`(x_0, x_t, t, y)` and
:math:`(\hat x_0, x_t, t, y)`. Conditioned on :math:`y` alone (the reference, ``condition=("y",)``) it cannot
penalise a sample that ignores :math:`x_t`, and with the L2 term the optimum is the conditional mean (§7.5).
The architecture follows the UD2M reference, but it ends in **one logit without a sigmoid**: the reference applied a
sigmoid and then BCE-with-logits, a double sigmoid that floored the D loss and capped the generator's gradient. It
always runs in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

CONDITIONS = ("y", "x_t", "t")
T_SCALE = 1000.0  # t / T with T = 1000 native steps


def conditioning(
    condition: tuple[str, ...],
    *,
    lift_y: torch.Tensor,
    x_t: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    size: tuple[int, int],
) -> torch.Tensor:
    r"""The discriminator's conditioning tensor ``c`` ``(B, C_c, H, W)``, detached, in ``condition``'s order.

    ``"y"``: :math:`\mathrm{lift}(y)`; ``"x_t"``: the noisy state (latents of latent priors too), resized bilinearly to
    ``size`` when it differs; ``"t"``: a constant channel :math:`t/T`, T = 1000.

    >>> c = conditioning(("y", "x_t", "t"), lift_y=torch.zeros(2, 1, 4, 4), x_t=torch.ones(2, 1, 4, 4),
    ...                  t=torch.tensor([500.0, 250.0]), size=(4, 4))
    >>> tuple(c.shape), c[1, 2, 0, 0].item()
    ((2, 3, 4, 4), 0.25)
    """
    parts = []
    for name in condition:
        if name == "y":
            parts.append(_resized(lift_y, size))
        elif name == "x_t":
            if x_t is None:
                raise ValueError("conditioning: 'x_t' is in the condition but no x_t was given")
            parts.append(_resized(x_t, size))
        elif name == "t":
            if t is None:
                raise ValueError("conditioning: 't' is in the condition but no t was given")
            B = lift_y.shape[0]
            parts.append((t.float() / T_SCALE).view(B, 1, 1, 1).expand(B, 1, *size))
        else:
            raise ValueError(f"conditioning: unknown condition {name!r}, expected names from {CONDITIONS}")
    return torch.cat(parts, dim=1).detach()


def _resized(v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    v = v.float()
    return (
        v if tuple(v.shape[-2:]) == tuple(size) else F.interpolate(v, size=size, mode="bilinear", align_corners=False)
    )


def default_num_blocks(image_size: tuple[int, int]) -> int:
    r"""Number of downsampling blocks :math:`L = \min(5, \lfloor\log_2 \min(H, W)\rfloor - 2)` (§7.4).

    >>> default_num_blocks((256, 256)), default_num_blocks((32, 32))
    (5, 3)
    """
    return min(5, math.floor(math.log2(min(image_size))) - 2)


def block_channels(num_blocks: int, base_channels: int = 32) -> list[int]:
    r"""Channels after the stem and each block: doubling for :math:`\lceil L/2\rceil` blocks, then halving.

    >>> block_channels(5)
    [32, 64, 128, 256, 128, 64]
    >>> block_channels(3)
    [32, 64, 128, 64]
    """
    up = math.ceil(num_blocks / 2)
    return [base_channels * 2 ** min(i, 2 * up - i) for i in range(num_blocks + 1)]


class ConditionalDiscriminator(nn.Module):
    r"""Conditional discriminator :math:`D(x, c) \in \mathbb R` (logit), input :math:`[x, c]`.

    Stem: Conv3×3(2C → 32) + LeakyReLU(0.01); then L blocks AvgPool2 → Conv3×3 → InstanceNorm(affine=False) →
    LeakyReLU(0.2) with channels from :func:`block_channels`; flatten → Linear → one logit (§7.4). About 0.76 M
    parameters at 256² RGB.

    Args:
        in_channels: image channels C.
        image_size: ``H`` or ``(H, W)``; the Linear layer fixes the spatial size.
        condition: what ``c`` holds (:func:`conditioning`): ``("y", "x_t", "t")`` (default: the joint law of the
            sampler's inputs, §7.4 revision) or ``("y",)`` (the reference).
        state_channels: channels of x_t (None: ``in_channels``, pixel priors; 4 for SD-family latents).
        base_channels: channels of the stem.
        num_blocks: L; default :func:`default_num_blocks`.
        spectral_norm: wrap every conv and the linear layer in spectral normalisation.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | tuple[int, int],
        *,
        condition: tuple[str, ...] = CONDITIONS,
        state_channels: int | None = None,
        base_channels: int = 32,
        num_blocks: int | None = None,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        L = default_num_blocks((H, W)) if num_blocks is None else num_blocks
        if L < 1 or min(H, W) >> L < 2:
            raise ValueError(
                f"ConditionalDiscriminator: {L} blocks need min(H, W) >= {2 << max(L, 1)} (InstanceNorm needs more "
                f"than one pixel after the last pooling), got image_size {(H, W)}"
            )
        unknown = [c for c in condition if c not in CONDITIONS]
        if not condition or unknown or "y" not in condition:
            raise ValueError(f"ConditionalDiscriminator: condition must contain 'y' and names from {CONDITIONS}, "
                             f"got {tuple(condition)}")  # fmt: skip
        self.in_channels, self.image_size, self.num_blocks = in_channels, (H, W), L
        self.condition = tuple(condition)
        self.state_channels = in_channels if state_channels is None else state_channels
        widths = {"y": in_channels, "x_t": self.state_channels, "t": 1}
        self.cond_channels = sum(widths[c] for c in self.condition)
        sn = _spectral_norm if spectral_norm else (lambda m: m)
        ch = block_channels(L, base_channels)
        stem = nn.Conv2d(in_channels + self.cond_channels, ch[0], 3, padding=1)
        self.stem = nn.Sequential(sn(stem), nn.LeakyReLU(0.01))
        self.blocks = nn.Sequential(*[self._block(ch[i], ch[i + 1], sn) for i in range(L)])
        self.head = sn(nn.Linear(ch[-1] * (H >> L) * (W >> L), 1))

    @staticmethod
    def _block(c_in: int, c_out: int, sn) -> nn.Sequential:
        conv = sn(nn.Conv2d(c_in, c_out, 3, padding=1))
        return nn.Sequential(nn.AvgPool2d(2), conv, nn.InstanceNorm2d(c_out, affine=False), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` float32 for images ``x`` ``(B, C, H, W)`` and conditioning ``c`` (detached,
        :func:`conditioning`, ``cond_channels`` channels).

        ``c`` is resized bilinearly to ``x``'s spatial size when it differs (e.g. a low-resolution ``lift(y)``).
        """
        self._check(x, c)
        if c.shape[-2:] != x.shape[-2:]:
            c = F.interpolate(c.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        with torch.autocast(device_type=x.device.type, enabled=False):  # D and the GP run in fp32 (§1.4)
            h = torch.cat([x.float(), c.detach().float()], dim=1)  # (B, 2C, H, W)
            h = self.blocks(self.stem(h))  # (B, C_L, H / 2^L, W / 2^L)
            return self.head(h.flatten(1)).squeeze(1)  # (B,)

    def _check(self, x: torch.Tensor, c: torch.Tensor) -> None:
        expected = (self.in_channels, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ConditionalDiscriminator: x must be (B, {expected}), got {tuple(x.shape)}")
        if c.ndim != 4 or tuple(c.shape[:2]) != (x.shape[0], self.cond_channels):
            raise ValueError(
                f"ConditionalDiscriminator: c must be (B, C_c, h, w) with (B, C_c) = {(x.shape[0], self.cond_channels)}"
                f" (condition {self.condition}), got {tuple(c.shape)}"
            )
