"""Video forward operators on ``(B, C, T, H, W)`` tensors (docs/method.md §1.3, §2.5) and the LVTINO presets (§2.8).

Owns temporal average pooling :math:`P_f`, circular temporal blur :math:`B_k`, the frame-wise lifts of 2-D image
operators (:class:`PerFrame` for linear, :class:`PerFrameNonlinear` for JPEG-like maps), the exact proxes of
``Compose(temporal, PerFrame(op))`` in either order (registered with
:func:`ud2m.operators.compose.register_closed_form_prox`): closed form for a circular SR, and for any other frame
operator the per-slice reduction (:func:`prox_pool_frames`, :func:`prox_blur_frames`), and constructors for LVTINO
problems A, B and C (Spagnoletti et al., LVTINO). Every operator has an exact adjoint and is batched over samples and
frames.

A temporal operator acting on the T axis commutes with a frame-wise operator acting on (H, W), so both orders of a
composition are the same Kronecker product :math:`A = A_t \\otimes A_s` and share one closed form:
:math:`AA^\\top = A_tA_t^\\top \\otimes A_sA_s^\\top`, diagonal in a known basis, and

.. math:: \\mathrm{prox}(z) = r - \\gamma A^\\top(I + \\gamma AA^\\top)^{-1} A r,\\qquad r = z + \\gamma A^\\top y.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from ud2m.operators.base import LinearOperator, NonlinearOperator
from ud2m.operators.blur import check_image_batch
from ud2m.operators.compose import Compose, register_closed_form_prox
from ud2m.operators.superres import SuperResolution, mean_blocks
from ud2m.utils import append_dims, batch_scalar, broadcast_eps

__all__ = [
    "PerFrame",
    "PerFrameNonlinear",
    "TemporalAveragePool",
    "TemporalBlur",
    "batch_to_frames",
    "frames_to_batch",
    "lvtino_problem_a",
    "lvtino_problem_b",
    "lvtino_problem_c",
]


# ---------------------------------------------------------------------------------------------- layout helpers
def check_video(x: torch.Tensor, op: object) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is a 5-D ``(B, C, T, H, W)`` video batch."""
    check_image_batch(x, op, ndim=5)


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W) -> (B*T, C, H, W)``, sample-major (frame t of sample b is row ``b*T + t``)."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def batch_to_frames(xf: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Inverse of :func:`frames_to_batch`: ``(B*T, C, H, W) -> (B, C, T, H, W)``."""
    BT, C, H, W = xf.shape
    return xf.reshape(batch_size, BT // batch_size, C, H, W).transpose(1, 2)


def _is_per_sample(buffer: torch.Tensor, batch_size: int) -> bool:
    # ud2m convention: per-sample parameters lead with B (kernels (B, 1, k, k), masks (B, 1, H, W), JPEG quality (B,))
    return buffer.ndim >= 1 and buffer.shape[0] == batch_size > 1


def _repeat_per_frame(module: nn.Module, batch_size: int, num_frames: int) -> nn.Module:
    """Shallow copy of ``module`` (recursively) whose per-sample buffers are repeated ``num_frames`` times."""
    clone = copy.copy(module)
    clone._buffers = {
        name: b.repeat_interleave(num_frames, dim=0) if b is not None and _is_per_sample(b, batch_size) else b
        for name, b in module._buffers.items()
    }
    clone._modules = {
        name: None if m is None else _repeat_per_frame(m, batch_size, num_frames) for name, m in module._modules.items()
    }
    return clone


class _FrameWise:
    """Shared folding logic of :class:`PerFrame` and :class:`PerFrameNonlinear` (``self.op`` is the image op)."""

    op: nn.Module

    def _frame_op(self, batch_size: int, num_frames: int) -> nn.Module:
        """The image operator for a ``(B*T, C, H, W)`` batch: per-sample buffers repeated over the T frames."""
        for name, b in self.op.named_buffers():
            if b.ndim == 4 and b.shape[1] == 1 and b.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"{type(self).__name__}: buffer {name!r} of the image operator holds {b.shape[0]} per-sample "
                    f"entries for a batch of {batch_size} videos (expected 1 or {batch_size})"
                )
        if batch_size == 1 or num_frames == 1:
            return self.op
        if not any(_is_per_sample(b, batch_size) for b in self.op.buffers()):
            return self.op
        return _repeat_per_frame(self.op, batch_size, num_frames)

    def _per_frame(self, method: str, *videos: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run ``frame_op.<method>`` on the folded videos and unfold the result."""
        for v in videos:
            check_video(v, self)
        B, T = videos[0].shape[0], videos[0].shape[2]
        out = getattr(self._frame_op(B, T), method)(*(frames_to_batch(v) for v in videos), **kwargs)
        return batch_to_frames(out, B)


# ---------------------------------------------------------------------------------------------- temporal pooling
class TemporalAveragePool(LinearOperator):
    r"""Temporal average pooling :math:`P_f` (§2.5): replicate-pad the tail to :math:`T_{lr} f` frames,
    :math:`T_{lr} = \lceil T/f \rceil`, then average non-overlapping groups of ``f`` frames.

    The adjoint repeats each low-rate frame ``f`` times divided by ``f`` and sums the padded tail's contributions
    into the last real frame. :math:`P_fP_f^\top = \mathrm{diag}(p_\tau)` with :math:`p_\tau = 1/f` for full groups
    and :math:`(r-1)/f^2 + ((f-r+1)/f)^2` for a padded last group with ``r`` real frames, so

    .. math:: \mathrm{prox}(z) = r - \gamma P^\top\Big(\frac{P r}{1 + \gamma p_\tau}\Big),\quad r = z + \gamma P^\top y.

    Args:
        factor: pooling factor f.
        num_frames: number T of high-rate frames (needed by the adjoint; inputs are checked against it).
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(self, factor: int, num_frames: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"TemporalAveragePool: factor must be a positive integer, got {factor}")
        if int(num_frames) != num_frames or num_frames < 1:
            raise ValueError(f"TemporalAveragePool: num_frames must be a positive integer, got {num_frames}")
        self.factor = int(factor)
        self.num_frames = int(num_frames)

    @property
    def num_frames_lr(self) -> int:
        """Number of pooled frames :math:`T_{lr} = \\lceil T/f \\rceil`."""
        return math.ceil(self.num_frames / self.factor)

    def _check(self, x: torch.Tensor, expected: int, what: str) -> None:
        check_video(x, self)
        if x.shape[2] != expected:
            raise ValueError(
                f"TemporalAveragePool: {what} has {x.shape[2]} frames, expected {expected} "
                f"(num_frames={self.num_frames}, factor={self.factor})"
            )

    def frame_gains(self, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        r"""Diagonal :math:`p_\tau` of :math:`PP^\top`, shape ``(T_lr,)``."""
        f, r = self.factor, self.num_frames - (self.num_frames_lr - 1) * self.factor
        p = torch.full((self.num_frames_lr,), 1.0 / f, dtype=dtype, device=device)
        p[-1] = (r - 1) / f**2 + ((f - r + 1) / f) ** 2
        return p

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, C, T_lr, H, W)``: the mean of each full window of f frames (a view, no copy),
        and of the last, partial one with the last frame repeated (replicate padding)."""
        self._check(x, self.num_frames, "the video")
        B, C, T, H, W = x.shape
        f, m = self.factor, T // self.factor  # m full windows, r = T − m·f frames left over
        pooled = x[:, :, : m * f].reshape(B, C, m, f, H, W).mean(3)
        if m * f == T:
            return pooled
        r = T - m * f
        last = (x[:, :, m * f :].sum(2, keepdim=True) + (f - r) * x[:, :, T - 1 :]) / f
        return torch.cat([pooled, last], dim=2)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C, T_lr, H, W) -> (B, C, T, H, W)``: each pooled frame / f on its window's frames, the padded
        frames' shares summed into the last real one."""
        self._check(y, self.num_frames_lr, "the measurement")
        B, C, _, H, W = y.shape
        f, T = self.factor, self.num_frames
        m = T // f
        out = y.new_empty(B, C, T, H, W)
        out[:, :, : m * f].view(B, C, m, f, H, W).copy_((y[:, :, :m] / f).unsqueeze(3))
        if m * f < T:
            r = T - m * f
            out[:, :, m * f :] = y[:, :, m:] / f
            out[:, :, T - 1 :] += (f - r) / f * y[:, :, m:]
        return out

    def _gains(self, like: torch.Tensor) -> torch.Tensor:
        return self.frame_gains(dtype=like.dtype, device=like.device)[:, None, None]  # (T_lr, 1, 1)

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Closed form: Woodbury with the diagonal :math:`PP^\\top`."""
        g = append_dims(gamma, z.ndim)
        r = z + g * self.A_adjoint(y)
        return r - g * self.A_adjoint(self.A(r) / (1 + g * self._gains(z)))

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:math:`z + P^\\top (PP^\\top)^{-1}(y - Pz)`."""
        return z + self.A_adjoint((y - self.A(z)) / self._gains(z))

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        """:math:`P^\\top (y / (p_\\tau + \\epsilon))`."""
        return self.A_adjoint(y / (self._gains(y) + broadcast_eps(eps, y)))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Each pooled frame repeated ``f`` times, cropped to T (nearest-frame upsampling, §6.6)."""
        self._check(y, self.num_frames_lr, "the measurement")
        return y.repeat_interleave(self.factor, dim=2)[:, :, : self.num_frames]


# ---------------------------------------------------------------------------------------------- temporal blur
def temporal_kernel(kernel_size: int, kind: str = "uniform", sigma: float | None = None) -> torch.Tensor:
    """1-D temporal kernel ``(K,)``, sum 1: uniform 1/K, or Gaussian ``exp(-(j - K//2)^2 / (2 sigma^2))``."""
    if int(kernel_size) != kernel_size or kernel_size < 1:
        raise ValueError(f"TemporalBlur: kernel_size must be a positive integer, got {kernel_size}")
    if kind == "uniform":
        return torch.full((kernel_size,), 1.0 / kernel_size)
    if kind == "gaussian":
        if sigma is None or sigma <= 0:
            raise ValueError(f"TemporalBlur: kind='gaussian' needs a positive sigma (in frames), got {sigma}")
        j = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        k = torch.exp(-0.5 * (j / sigma) ** 2)
        return (k / k.sum()).float()
    raise ValueError(f"TemporalBlur: kind must be 'uniform' or 'gaussian', got {kind!r}")


class TemporalBlur(LinearOperator):
    r"""Circular convolution along T (§2.5), :math:`B_k x = F_t^{-1}(\hat h_t \cdot F_t x)` frame-wise in space.

    Tap ``K // 2`` of the kernel sits at the origin (the 1-D analogue of ``kernels.kernel_to_otf``); the adjoint
    is circular correlation (conjugate OTF) and the prox is diagonal in the temporal Fourier basis:
    :math:`\hat x = (\hat z + \gamma \bar{\hat h}_t \hat y) / (1 + \gamma |\hat h_t|^2)`.

    Args:
        kernel_size: number of taps K (LVTINO problem B: 7).
        kind: ``"uniform"`` (1/K) or ``"gaussian"``.
        sigma: std in frames of the Gaussian kernel (required for ``kind="gaussian"``).
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(
        self,
        kernel_size: int = 7,
        kind: Literal["uniform", "gaussian"] = "uniform",
        sigma: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.register_buffer("kernel", temporal_kernel(kernel_size, kind, sigma))

    def otf(self, num_frames: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Half-spectrum temporal OTF ``(T // 2 + 1,)`` for circular convolution on ``num_frames`` frames."""
        K = self.kernel.shape[0]
        if K > num_frames:
            raise ValueError(f"TemporalBlur: a {K}-tap kernel needs at least {K} frames, got T={num_frames}")
        padded = self.kernel.to(dtype).new_zeros(num_frames)
        padded[:K] = self.kernel.to(dtype)
        return torch.fft.rfft(torch.roll(padded, -(K // 2)))

    def _otf_for(self, x: torch.Tensor) -> torch.Tensor:
        check_video(x, self)
        return self.otf(x.shape[2], x.dtype)[:, None, None]  # (T//2+1, 1, 1) broadcasts over (B, C, ., H, W)

    def _filter(self, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(torch.fft.rfft(x, dim=2) * multiplier, n=x.shape[2], dim=2)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Circular temporal convolution, shape preserved."""
        return self._filter(x, self._otf_for(x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Circular temporal correlation."""
        return self._filter(y, self._otf_for(y).conj())

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        h = self._otf_for(z)
        g = append_dims(gamma, z.ndim)
        num = torch.fft.rfft(z, dim=2) + g * h.conj() * torch.fft.rfft(y, dim=2)
        return torch.fft.irfft(num / (1 + g * h.abs() ** 2), n=z.shape[2], dim=2)

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        """Wiener inverse :math:`F_t^{-1}[\\bar{\\hat h}_t \\hat y / (|\\hat h_t|^2 + \\epsilon)]` (0 where the
        denominator vanishes)."""
        h = self._otf_for(y)
        den = h.abs() ** 2 + broadcast_eps(eps, y)
        return self._filter(y, torch.where(den > 0, h.conj() / den.clamp_min(1e-30), torch.zeros_like(h)))

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return z + self.A_dagger(y - self.A(z), eps=0.0)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """The blurred video is already video-shaped."""
        return y


# ---------------------------------------------------------------------------------------------- frame-wise lifts
class PerFrame(_FrameWise, LinearOperator):
    r"""A 2-D image operator applied to every frame: :math:`A = I_T \otimes A_{\mathrm{img}}` (§2.5).

    The video is folded to ``(B*T, C, H, W)`` (sample-major). Per-sample parameters of the image operator, i.e.
    its buffers whose leading dimension equals the batch size B > 1 (the ``ud2m.operators`` convention: kernels
    ``(B, 1, k, k)``, masks ``(B, 1, H, W)``), are repeated over the T frames of each sample (``repeat_interleave``
    on a shallow copy; the operator itself is not modified); shared ones (leading dimension 1) are used as they are.
    A shared buffer whose leading dimension happens to equal B would be repeated too: image operators must follow
    the convention. Since :math:`A^\top A` is block
    diagonal over frames, the prox is the image operator's own prox (closed form or CG) with ``gamma`` repeated T
    times, which is exact.

    Args:
        op: the image operator (e.g. ``SuperResolution``, ``GaussianBlur``, ``Inpainting``).
        **kwargs: CG settings of :class:`LinearOperator` (used only by :meth:`prox_l2_cg` on the whole video).
    """

    def __init__(self, op: LinearOperator, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(op, LinearOperator):
            raise TypeError(f"PerFrame: op must be a LinearOperator, got {type(op).__name__} (see PerFrameNonlinear)")
        self.op = op

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W) -> (B, C, T, h, w)``."""
        return self._per_frame("A", x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Frame-wise adjoint."""
        return self._per_frame("A_adjoint", y)

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self._per_frame("prox_l2", z, y, gamma=gamma.repeat_interleave(z.shape[2]))

    def _project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._per_frame("prox_l2", z, y, gamma=math.inf)

    def A_dagger(self, y: torch.Tensor, eps: float | torch.Tensor = 1e-3) -> torch.Tensor:
        """Frame-wise pseudo-inverse (exact: :math:`AA^\\top` is block diagonal over frames)."""
        if torch.is_tensor(eps) and eps.ndim == 1:
            eps = eps.repeat_interleave(y.shape[2])  # one value per sample -> per frame
        return self._per_frame("A_dagger", y, eps=eps)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Frame-wise ``lift``."""
        return self._per_frame("lift", y)

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """The image operator's mask per frame, ``(B or 1, c, T or 1, h, w)``; ``None`` if all is observed."""
        check_video(y, self)
        B, T = y.shape[0], y.shape[2]
        mask = self._frame_op(B, T).observed_mask(frames_to_batch(y))
        if mask is None:
            return None
        return mask.unsqueeze(2) if mask.shape[0] == 1 else batch_to_frames(mask, B)


class PerFrameNonlinear(_FrameWise, NonlinearOperator):
    r"""A nonlinear image operator (e.g. ``JPEG``) applied to every frame, :math:`J(x)_t = J_{\mathrm{img}}(x_t)`.

    A separate class from :class:`PerFrame` because solvers dispatch on ``isinstance(op, LinearOperator)``. The
    prox delegates to the image operator's gradient-step prox with ``gamma`` repeated T times, which is the same
    iteration run on the whole video (the objective separates over frames). ``noise_before_forward`` and
    ``prox_steps`` are those of the image operator; per-sample buffers (e.g. JPEG ``quality`` ``(B,)``) are repeated
    over frames as in :class:`PerFrame`.

    Args:
        op: the image operator.
    """

    def __init__(self, op: NonlinearOperator) -> None:
        if not isinstance(op, NonlinearOperator):
            raise TypeError(f"PerFrameNonlinear: op must be a NonlinearOperator, got {type(op).__name__}")
        super().__init__(prox_steps=op.prox_steps)
        self.op = op
        self.noise_before_forward = op.noise_before_forward

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Frame-wise forward map (differentiable)."""
        return self._per_frame("A", x)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Frame-wise ``simulate`` (JPEG: exact rounding)."""
        return self._per_frame("simulate", x)

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Frame-wise vector-Jacobian product."""
        return self._per_frame("A_vjp", x, v)

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """The image operator's prox on every frame with the sample's ``gamma``."""
        gamma = batch_scalar(gamma, z.shape[0], device=z.device, dtype=z.dtype, name="gamma")
        return self._per_frame("prox_l2", z, y, gamma=gamma.repeat_interleave(z.shape[2]))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """Frame-wise ``lift``."""
        return self._per_frame("lift", y)


# ---------------------------------------------------------------------------------------------- exact proxes
def _temporal_and_frame(compose: Compose, temporal_type: type) -> tuple[LinearOperator, PerFrame]:
    """Split a temporal/frame-wise composition (either order) into its temporal and its frame-wise factor."""
    if isinstance(compose.outer, temporal_type):
        return compose.outer, compose.inner
    return compose.inner, compose.outer


def _circular_sr(frame: PerFrame) -> SuperResolution | None:
    """The frame operator when it is a circular SR (whose :math:`SS^\\top` is diagonal), else ``None``."""
    sr = frame.op
    return sr if isinstance(sr, SuperResolution) and sr.padding == "circular" else None


def _spatial_gain(sr: SuperResolution, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    r""":math:`\mathrm{mean}_b |\hat h|^2`, the spectrum of :math:`SS^\top` on the LR grid, ``(B|1, 1, 1, h, w)``."""
    return mean_blocks(sr._otf(size, dtype, onesided=False).abs() ** 2, sr.factor).unsqueeze(2)


def _woodbury(compose: Compose, z, y, gamma, solve_small) -> torch.Tensor:
    """:math:`z + \\gamma A^\\top (I + \\gamma AA^\\top)^{-1}(y - Az)`, ``solve_small(v, g)`` applying the inverse:
    the same as :math:`r - \\gamma A^\\top (I + \\gamma AA^\\top)^{-1} A r` with :math:`r = z + \\gamma A^\\top y`,
    without that form's float32 cancellation at large γ (0.08 off at γ = 1e6, 256 at 3.5e9, which DiffPIR reaches)."""
    g = append_dims(gamma, z.ndim)
    return z + g * compose.A_adjoint(solve_small(y - compose.A(z), g))


def _slice_prox(frame: PerFrame, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The frame operator's own prox on ``(B, C, S, H, W)`` stacks of S slices, slice s of sample b with its own
    step ``gamma[b, s]`` (``(B, S)``): closed form where the image operator has one, else its CG."""
    return frame._per_frame("prox_l2", z, y, gamma=gamma.reshape(-1))


def prox_pool_frames(
    pool: TemporalAveragePool, frame: PerFrame, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    r"""Exact prox of :math:`A = P \otimes S` for any frame operator S **[ours]**, by S's own prox per pooled frame.

    The rows :math:`r_\tau` of :math:`P` have disjoint supports, so with :math:`u_\tau = r_\tau/\sqrt{p_\tau}`
    (:math:`p_\tau = \|r_\tau\|^2`, :meth:`TemporalAveragePool.frame_gains`) the objective
    :math:`\tfrac\gamma2\|Ax - y\|^2 + \tfrac12\|x - z\|^2` splits into one image problem per pooled frame in
    :math:`a_\tau = u_\tau^\top x` and an untouched orthogonal part:

    .. math:: a_\tau = \mathrm{prox}^S_{\gamma p_\tau}\big(u_\tau^\top z,\; y_\tau/\sqrt{p_\tau}\big),\qquad
              x = z + P^\top\big((a - Pz/\sqrt p)/\sqrt p\big).

    For a reflect-padded SR that is T_lr well-conditioned SR proxes (CG in about ten iterations) instead of CG on
    the whole video.
    """
    p = pool._gains(z)  # (T_lr, 1, 1)
    root = p.sqrt()
    a_z = pool.A(z) / root
    g = gamma[:, None] * p.flatten()[None]  # (B, T_lr)
    a = _slice_prox(frame, a_z, y / root, g)
    return z + pool.A_adjoint((a - a_z) / root)


def prox_blur_frames(
    blur: TemporalBlur, frame: PerFrame, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    r"""Exact prox of :math:`A = B_k \otimes S` for any frame operator S **[ours]**, by S's own prox per temporal
    frequency.

    The temporal DFT diagonalises :math:`B_k^\top B_k`, so the normal equations split per frequency k into
    :math:`(I + \gamma|\hat h_k|^2 S^\top S)\hat x_k = \hat z_k + \gamma\bar{\hat h}_k S^\top\hat y_k`, which is S's
    prox with step :math:`\gamma|\hat h_k|^2` and measurement :math:`\hat y_k/\hat h_k` (:math:`\hat x_k = \hat z_k`
    where :math:`\hat h_k = 0`); S is real, so the real and imaginary parts are separate image problems
    (2(T//2 + 1) slices). On LVTINO problem B at full size (reflect-padded ×8 SR) whole-video CG stops at its
    100-iteration cap; each slice's SR prox converges in about ten.
    """
    T = z.shape[2]
    h = blur._otf_for(z)  # (T//2+1, 1, 1)
    h2 = h.abs() ** 2
    Y = torch.fft.rfft(y, dim=2) * torch.where(h2 > 0, h.conj() / h2.clamp_min(1e-30), torch.zeros_like(h))
    Z = torch.fft.rfft(z, dim=2)
    K = Z.shape[2]
    g = gamma[:, None] * h2.flatten()[None]  # (B, K)
    X = _slice_prox(frame, torch.cat([Z.real, Z.imag], 2), torch.cat([Y.real, Y.imag], 2), torch.cat([g, g], 1))
    return torch.fft.irfft(torch.complex(X[:, :, :K], X[:, :, K:]), n=T, dim=2)


@register_closed_form_prox(TemporalAveragePool, PerFrame)
@register_closed_form_prox(PerFrame, TemporalAveragePool)
def prox_pool_sr(compose: Compose, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r"""Exact prox of pooling and a frame-wise operator (either order): closed form for a circular SR,
    :math:`AA^\top = \mathrm{diag}_\tau(p_\tau) \otimes F_{lr}^{-1}\,\mathrm{diag}(\mathrm{mean}_b|\hat h|^2)\,F_{lr}`;
    :func:`prox_pool_frames` for any other frame operator.
    """
    pool, frame = _temporal_and_frame(compose, TemporalAveragePool)
    check_video(z, compose)
    sr = _circular_sr(frame)
    if sr is None:
        return prox_pool_frames(pool, frame, z, y, gamma)
    m = _spatial_gain(sr, tuple(z.shape[-2:]), z.dtype)  # (B|1, 1, 1, h, w)
    m = m[..., : m.shape[-1] // 2 + 1]  # real and even: the rfft2 half-plane suffices
    p = pool._gains(z)  # (T_lr, 1, 1)

    def solve_small(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(v) / (1 + g * p * m), s=v.shape[-2:])

    return _woodbury(compose, z, y, gamma, solve_small)


@register_closed_form_prox(TemporalBlur, PerFrame)
@register_closed_form_prox(PerFrame, TemporalBlur)
def prox_temporal_blur_sr(compose: Compose, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r"""Exact prox of circular temporal blur and a frame-wise operator (either order): closed form for a circular
    SR, :math:`AA^\top` diagonal in the 3-D Fourier basis of the LR video with eigenvalues
    :math:`|\hat h_t(k)|^2\,\mathrm{mean}_b|\hat h|^2(k_1, k_2)`; :func:`prox_blur_frames` for any other frame operator.
    """
    blur, frame = _temporal_and_frame(compose, TemporalBlur)
    check_video(z, compose)
    sr = _circular_sr(frame)
    if sr is None:
        return prox_blur_frames(blur, frame, z, y, gamma)
    T = z.shape[2]
    m = _spatial_gain(sr, tuple(z.shape[-2:]), z.dtype)  # (B|1, 1, 1, h, w)
    ht2 = blur.otf(T, z.dtype).abs()[:, None, None] ** 2  # (T//2+1, 1, 1)

    def solve_small(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        V = torch.fft.fft2(torch.fft.rfft(v, dim=2))  # temporal half spectrum, full spatial spectrum
        return torch.fft.irfft(torch.fft.ifft2(V / (1 + g * ht2 * m)), n=T, dim=2)

    return _woodbury(compose, z, y, gamma, solve_small)


# ---------------------------------------------------------------------------------------------- LVTINO problems
def lvtino_problem_a(num_frames: int = 25, *, padding: str = "reflect") -> Compose:
    """LVTINO problem A (§2.8): temporal x4 average pooling, then bicubic x4 SR per frame (reflect padding)."""
    return Compose(PerFrame(SuperResolution(4, "bicubic", padding=padding)), TemporalAveragePool(4, num_frames))


def lvtino_problem_b(*, padding: str = "reflect") -> Compose:
    """LVTINO problem B (§2.8): circular uniform temporal blur (7 taps), then bicubic x8 SR per frame (reflect);
    any T >= 7 (the preset uses 25)."""
    return Compose(PerFrame(SuperResolution(8, "bicubic", padding=padding)), TemporalBlur(7, "uniform"))


def lvtino_problem_c(num_frames: int = 81, *, padding: str = "reflect") -> Compose:
    """LVTINO problem C (§2.8): temporal x8 average pooling, then bicubic x8 SR per frame (reflect padding)."""
    return Compose(PerFrame(SuperResolution(8, "bicubic", padding=padding)), TemporalAveragePool(8, num_frames))
