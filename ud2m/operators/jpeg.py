r"""Differentiable JPEG compression as a nonlinear forward operator (docs/method.md §2.6 and §1.1).

The baseline JPEG codec (ITU-T T.81) written in batched torch: RGB -> YCbCr (JFIF, full range), 4:2:0 chroma by
2x2 average pooling, level shift -128, orthonormal 8x8 DCT-II, quantisation :math:`\mathrm{round}(D/Q)\,Q` with the
Annex K tables scaled by the quality factor, inverse DCT, nearest x2 chroma upsampling, YCbCr -> RGB and a clamp to
[0, 1]. Images live on [-1, 1] inside the library, so the operator is

.. math:: J_{\mathrm{int}}(x) = 2\,J_{01}\big((x + 1)/2\big) - 1.

The rounding is exact when measurements are simulated and, in the prox and in training, differentiable through a
straight-through estimator (Bengio et al. 2013) or the cubic surrogate of Shin & Song (2017).

Model mismatch with libjpeg (documented, small): libjpeg rounds the colour conversion and its output pixels to
integers, uses an integer DCT and, when decoding, a triangular ("fancy") chroma upsampling filter instead of
nearest-neighbour. Real JPEG files therefore differ from :math:`J` by a small amount (see ``tests/test_jpeg.py``,
which compares with Pillow's encoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ud2m.operators.base import NonlinearOperator
from ud2m.operators.blur import check_batch, check_image_batch

# ITU-T T.81 Annex K, Table K.1 (luminance) and Table K.2 (chrominance), natural (row-major) order.
LUMINANCE_BASE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMINANCE_BASE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)
# JFIF luma weights (ITU-R BT.601); K_G = 1 - K_R - K_B.
K_R, K_B = 0.299, 0.114
BLOCK = 8  # DCT block size
MCU = 16  # 4:2:0 minimum coded unit: H, W are padded to multiples of this

RoundFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- pure building blocks
def dct_matrix(n: int = BLOCK, *, device: torch.device | None = None, dtype: torch.dtype = torch.float64):
    r"""Orthonormal DCT-II matrix :math:`C_{ki} = \alpha_k \cos\big(\pi(2i + 1)k / 2n\big)`, with
    :math:`\alpha_0 = \sqrt{1/n}` and :math:`\alpha_k = \sqrt{2/n}` otherwise, so :math:`C C^\top = I`.

    The 2-D DCT of a block :math:`X` is :math:`C X C^\top`.

    >>> C = dct_matrix(8)
    >>> bool(torch.allclose(C @ C.T, torch.eye(8, dtype=C.dtype)))
    True
    """
    k = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    i = torch.arange(n, device=device, dtype=torch.float64)[None, :]
    alpha = torch.full_like(k, math.sqrt(2.0 / n))
    alpha[0] = math.sqrt(1.0 / n)
    return (alpha * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))).to(dtype)  # (n, n)


def quantization_tables(quality: float | Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Annex K luminance and chrominance tables scaled by the quality factor QF (IJG / libjpeg convention).

    .. math::
        s = \begin{cases} \lfloor 5000 / QF \rfloor & QF < 50 \\ 200 - 2\,QF & QF \ge 50 \end{cases}, \qquad
        Q = \mathrm{clamp}\big(\lfloor (Q_{\mathrm{base}}\, s + 50) / 100 \rfloor, 1, 255\big).

    The floor in :math:`s` is the integer division of libjpeg's ``jpeg_quality_scaling``; with it the tables equal
    those Pillow/libjpeg write for every integer QF (docs/method.md §2.6 writes :math:`5000/QF`, which agrees for
    QF in {1, 2, 4, 5, 8, 10, 20, 25, 40} and QF >= 50 and differs by one step in a few entries otherwise).

    Args:
        quality: QF in [1, 100], a float or a ``(Q,)`` sequence/tensor (one per sample).

    Returns:
        ``(Q_lum, Q_chrom)``, each ``(Q, 8, 8)`` float64 on ``quality``'s device.
    """
    qf = torch.as_tensor(quality, dtype=torch.float64).reshape(-1, 1, 1)  # (Q, 1, 1)
    scale = torch.where(qf < 50, torch.floor(5000.0 / qf), 200.0 - 2.0 * qf)
    tables = []
    for base in (LUMINANCE_BASE, CHROMINANCE_BASE):
        base_t = torch.tensor(base, dtype=torch.float64, device=qf.device)  # (8, 8)
        tables.append(torch.floor((base_t * scale + 50.0) / 100.0).clamp(1.0, 255.0))  # (Q, 8, 8)
    return tables[0], tables[1]


def _ycbcr_matrix() -> torch.Tensor:
    """Forward JFIF matrix M with [Y, Cb - 128, Cr - 128] = M [R, G, B], derived from K_R, K_B (float64)."""
    k_g = 1.0 - K_R - K_B
    b_cb, r_cr = 2 * (1 - K_B), 2 * (1 - K_R)
    luma = (K_R, k_g, K_B)
    cb = (-K_R / b_cb, -k_g / b_cb, 0.5)  # Cb' = (B - Y) / (2 (1 - K_B))
    cr = (0.5, -k_g / r_cr, -K_B / r_cr)  # Cr' = (R - Y) / (2 (1 - K_R))
    return torch.tensor((luma, cb, cr), dtype=torch.float64)


def _rgb_matrix() -> torch.Tensor:
    """Exact inverse of :func:`_ycbcr_matrix` in closed form (JFIF: R = Y + 1.402 Cr', B = Y + 1.772 Cb', ...)."""
    k_g = 1.0 - K_R - K_B
    r_cr, b_cb = 2 * (1 - K_R), 2 * (1 - K_B)
    g_cb, g_cr = -K_B * b_cb / k_g, -K_R * r_cr / k_g
    return torch.tensor(((1.0, 0.0, r_cr), (1.0, g_cb, g_cr), (1.0, b_cb, 0.0)), dtype=torch.float64)


def _apply_color(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3x3 colour transform of a ``(B, 3, H, W)`` tensor."""
    return torch.einsum("oc,bchw->bohw", matrix.to(device=x.device, dtype=x.dtype), x)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    r"""JFIF full-range RGB -> YCbCr on the 0..255 scale, ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.

    .. math:: Y = 0.299R + 0.587G + 0.114B,\quad C_b = 128 + \frac{B - Y}{1.772},\quad C_r = 128 + \frac{R - Y}{1.402}.
    """
    offset = torch.tensor((0.0, 128.0, 128.0), device=x.device, dtype=x.dtype)[:, None, None]
    return _apply_color(_ycbcr_matrix(), x) + offset


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    r"""Inverse of :func:`rgb_to_ycbcr` (JFIF), ``(B, 3, H, W)`` on the 0..255 scale.

    .. math:: R = Y + 1.402(C_r - 128),\quad G = Y - 0.344136(C_b - 128) - 0.714136(C_r - 128),\quad
              B = Y + 1.772(C_b - 128).
    """
    offset = torch.tensor((0.0, 128.0, 128.0), device=x.device, dtype=x.dtype)[:, None, None]
    return _apply_color(_rgb_matrix(), x - offset)


# ---------------------------------------------------------------------------------------------- rounding
def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding: forward exactly ``round(v)`` (the added ``v - v.detach()`` is exactly zero),
    backward the identity."""
    return torch.round(v).detach() + (v - v.detach())


def round_cubic(v: torch.Tensor) -> torch.Tensor:
    r"""Cubic rounding surrogate of Shin & Song (2017): :math:`\lfloor v \rceil + (v - \lfloor v \rceil)^3`."""
    r = torch.round(v).detach()
    return r + (v - r) ** 3


ROUNDINGS: dict[str, RoundFn] = {"ste": round_ste, "cubic": round_cubic, "exact": torch.round}


# ---------------------------------------------------------------------------------------------- the codec
def _block_dct(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    r"""Blockwise 2-D DCT :math:`C X C^\top` of ``(B, c, H, W)`` -> coefficients ``(B, c, H/8, W/8, 8, 8)``.

    Applied as one GEMM with :math:`C \otimes C`, since :math:`\mathrm{vec}(C X C^\top) = (C \otimes C)\,
    \mathrm{vec}(X)` for row-major vec (thousands of tiny 8x8 batched products are much slower on CPU).
    """
    B, c, H, W = x.shape
    blocks = x.reshape(B, c, H // BLOCK, BLOCK, W // BLOCK, BLOCK).transpose(3, 4)  # (B, c, h, w, 8, 8)
    D = blocks.reshape(B, c, H // BLOCK, W // BLOCK, BLOCK * BLOCK) @ torch.kron(C, C).T  # (B, c, h, w, 64)
    return D.reshape(B, c, H // BLOCK, W // BLOCK, BLOCK, BLOCK)


def _block_idct(D: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    r"""Inverse of :func:`_block_dct` (:math:`C^\top D C`): ``(B, c, h, w, 8, 8)`` -> ``(B, c, 8h, 8w)``."""
    B, c, h, w = D.shape[:4]
    blocks = (D.reshape(B, c, h, w, BLOCK * BLOCK) @ torch.kron(C, C)).reshape(B, c, h, w, BLOCK, BLOCK)
    return blocks.transpose(3, 4).reshape(B, c, h * BLOCK, w * BLOCK)  # (B, c, h, 8, w, 8) -> (B, c, H, W)


def _code_plane(plane: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, round_fn: RoundFn) -> torch.Tensor:
    r"""Encode and decode one set of planes on the 0..255 scale: level shift, DCT, :math:`\mathrm{round}(D/Q)Q`,
    inverse DCT. ``Q`` is ``(Q, 8, 8)`` with Q in {1, B}."""
    D = _block_dct(plane - 128.0, C)  # (B, c, h, w, 8, 8)
    Qb = Q[:, None, None, None]  # (Q, 1, 1, 1, 8, 8)
    return _block_idct(round_fn(D / Qb) * Qb, C) + 128.0


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of ``(B, c, h, w)``."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def jpeg_01(x: torch.Tensor, quality: torch.Tensor | float, *, round_fn: RoundFn = torch.round) -> torch.Tensor:
    r"""JPEG compression and decompression :math:`J_{01}` of images on [0, 1] (docs/method.md §2.6).

    Colour images are coded as Y at full resolution and CbCr 4:2:0 (2x2 average pooling, nearest x2 upsampling);
    gray images as luminance only. ``H, W`` are replicate-padded to multiples of 16 and cropped back.

    Args:
        x: ``(B, C, H, W)`` on [0, 1], C in {1, 3}.
        quality: QF, a float or ``(Q,)`` tensor with Q in {1, B}.
        round_fn: rounding of :math:`D/Q` (exact, straight-through, cubic, or anything elementwise).

    Returns:
        Decoded images ``(B, C, H, W)`` clamped to [0, 1].
    """
    c, H, W = x.shape[1:]
    Q_lum, Q_chrom = (t.to(device=x.device, dtype=x.dtype) for t in quantization_tables(quality))
    C = dct_matrix(BLOCK, device=x.device, dtype=x.dtype)
    pad = (0, -W % MCU, 0, -H % MCU)
    x255 = (F.pad(x, pad, mode="replicate") if any(pad) else x) * 255.0  # (B, c, Hp, Wp)
    if c == 1:
        out = _code_plane(x255, Q_lum, C, round_fn)
    else:
        ycc = rgb_to_ycbcr(x255)
        luma = _code_plane(ycc[:, :1], Q_lum, C, round_fn)  # (B, 1, Hp, Wp)
        chroma = _code_plane(F.avg_pool2d(ycc[:, 1:], 2), Q_chrom, C, round_fn)  # (B, 2, Hp/2, Wp/2)
        out = ycbcr_to_rgb(torch.cat([luma, _upsample2(chroma)], dim=1))
    return (out / 255.0).clamp(0.0, 1.0)[..., :H, :W]


def check_quality(quality: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate quality factors and return them as a ``(Q,)`` float32 tensor; raise ``ValueError`` otherwise."""
    q = torch.as_tensor(quality, dtype=torch.float32).detach().reshape(-1)
    if q.numel() == 0:
        raise ValueError("JPEG: quality must hold at least one value, got an empty sequence")
    bad = ~((q >= 1) & (q <= 100))  # also catches NaN
    if bool(bad.any()):
        raise ValueError(f"JPEG: quality must lie in [1, 100], got {q[bad].tolist()}")
    return q


# ---------------------------------------------------------------------------------------------- the operator
class JPEG(NonlinearOperator):
    r"""JPEG compression :math:`J_{\mathrm{int}}(x) = 2 J_{01}((x + 1)/2) - 1` of images on [-1, 1] (§2.6, §1.1).

    :meth:`A` rounds with the configured ``rounding``; :meth:`simulate` (used by ``measure``) always rounds
    exactly. The prox is the inherited ``prox_steps`` projected gradient steps, unrolled when autograd is on.
    The operator differs slightly from libjpeg (integer colour conversion and DCT, output rounding, fancy chroma
    upsampling), a documented model mismatch for real JPEG files.

    Args:
        quality: quality factor QF in [1, 100], a float or a list/tensor of B values (one per sample).
        rounding: ``"ste"`` (exact forward, identity backward), ``"cubic"`` (:math:`r + (v - r)^3`,
            :math:`r = \mathrm{round}(v)`) or ``"exact"`` (zero gradient almost everywhere).
        prox_steps: number of gradient steps of the prox.

    Raises:
        ValueError: for a quality outside [1, 100] or an unknown rounding mode.
    """

    def __init__(
        self,
        quality: float | list[float] | torch.Tensor = 10,
        *,
        rounding: str = "ste",
        prox_steps: int = 5,
    ) -> None:
        super().__init__(prox_steps=prox_steps)
        if rounding not in ROUNDINGS:
            raise ValueError(f"JPEG: rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")
        self.rounding = rounding
        self.register_buffer("quality", check_quality(quality))  # (Q,), Q in {1, B}

    def _check(self, x: torch.Tensor) -> None:
        check_image_batch(x, self)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG: expected 1 (gray) or 3 (RGB) channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        check_batch(self.quality.shape[0], x.shape[0], self, "quality value")

    def _jpeg_int(self, x: torch.Tensor, round_fn: RoundFn) -> torch.Tensor:
        self._check(x)
        x01 = (x.to(torch.promote_types(x.dtype, torch.float32)) + 1.0) / 2.0  # fp32 at least
        return 2.0 * jpeg_01(x01, self.quality, round_fn=round_fn) - 1.0

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Compress and decompress ``x`` (``(B, C, H, W)`` on [-1, 1]) with the configured rounding."""
        return self._jpeg_int(x, ROUNDINGS[self.rounding])

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Compress and decompress with exact rounding (data simulation in ``measure``)."""
        return self._jpeg_int(x, torch.round)

    def extra_repr(self) -> str:
        return f"quality={self.quality.tolist()}, rounding={self.rounding!r}, prox_steps={self.prox_steps}"
