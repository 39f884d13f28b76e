"""The analytic Gaussian prior x ~ N(μ, diag(s²)) and its exact posteriors (docs/method.md §3.2d, §10.5).

Everything here is closed form, so solver tests can compare a sampler's output law with the truth: the exact x0
predictor E[x0 | z_t], the posterior p(x | y) for a linear operator and Gaussian noise, UD2M's conditional
p(x0 | y, x_t), and the 2-Wasserstein distance between Gaussians. Operators are duck-typed (any object with a
batched ``A`` method, or a dense matrix), so this module never imports ``ud2m.operators``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ud2m.priors.base import NoiseSchedule, Prior
from ud2m.priors.vp import VPSchedule, make_betas
from ud2m.utils import Generator, append_dims, randn


class HasA(Protocol):
    """Anything with a batched forward map ``A(x)`` (e.g. a ``ud2m.operators.LinearOperator``)."""

    def A(self, x: torch.Tensor) -> torch.Tensor: ...


def operator_matrix(op: HasA | torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """Dense matrix of a linear map on images of ``x_shape = (C, H, W)``: ``A[:, j] = A(e_j)`` (float64).

    Args:
        op: a dense ``(m, d)`` tensor (returned as float64) or an object with a batched ``A`` method.
        x_shape: one image's shape, ``d = prod(x_shape)``.

    Returns:
        ``(m, d)`` float64 matrix.
    """
    d = int(torch.Size(x_shape).numel())
    if torch.is_tensor(op):
        if op.ndim != 2 or op.shape[1] != d:
            raise ValueError(f"A: expected a matrix with {d} columns for images {tuple(x_shape)}, got {op.shape}")
        return op.to(torch.float64)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *x_shape)  # (d, C, H, W): e_j
    device = next((b.device for b in op.buffers()), None) if hasattr(op, "buffers") else None
    columns = op.A(basis.to(device=device)) if device is not None else op.A(basis)  # (d, *y_shape)
    return columns.reshape(d, -1).T.to(device="cpu", dtype=torch.float64)


def gaussian_w2(m1: torch.Tensor, C1: torch.Tensor, m2: torch.Tensor, C2: torch.Tensor) -> torch.Tensor:
    r"""2-Wasserstein distance between :math:`N(m_1, C_1)` and :math:`N(m_2, C_2)` (docs/method.md §3.2d), fp64.

    .. math:: W_2^2 = \|m_1-m_2\|^2 + \operatorname{tr}\big(C_1 + C_2 - 2(C_2^{1/2} C_1 C_2^{1/2})^{1/2}\big)

    Square roots use symmetric eigendecompositions with negative eigenvalues clipped to 0.

    Args:
        m1, m2: means (flattened to ``(d,)``).
        C1, C2: ``(d, d)`` covariances.

    Returns:
        0-d float64 tensor :math:`W_2` (not squared).
    """
    m1, m2 = m1.reshape(-1).to(torch.float64), m2.reshape(-1).to(torch.float64)
    C1, C2 = C1.to(torch.float64), C2.to(torch.float64)
    root2 = sym_sqrtm(C2)
    cross = sym_sqrtm(root2 @ C1 @ root2)
    w2_sq = (m1 - m2).square().sum() + torch.trace(C1 + C2 - 2 * cross)
    return w2_sq.clamp(min=0.0).sqrt()


def sym_sqrtm(C: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via ``eigh`` with clipped eigenvalues (symmetrised input, fp64)."""
    C = 0.5 * (C + C.transpose(-1, -2)).to(torch.float64)
    lam, U = torch.linalg.eigh(C)
    return (U * lam.clamp(min=0.0).sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)


def sample_gaussian(mean: torch.Tensor, cov: torch.Tensor, n: int, generator: Generator = None) -> torch.Tensor:
    r"""``n`` draws :math:`m + L\xi` from :math:`N(m, C)`, :math:`C = LL^\top` (eigen-root, so PSD ``C`` works).

    Args:
        mean: ``(d,)`` mean.
        cov: ``(d, d)`` covariance.
        n: number of samples.
        generator: torch generator for :math:`\xi`.

    Returns:
        ``(n, d)`` samples in ``mean``'s dtype.
    """
    xi = randn((n, mean.numel()), generator, device=mean.device, dtype=torch.float64)
    return (mean.reshape(1, -1).to(torch.float64) + xi @ sym_sqrtm(cov).T).to(mean.dtype)


class GaussianPrior(Prior):
    r"""Pixel-space Gaussian prior :math:`x \sim N(\mu, \operatorname{diag}(s^2))` with its exact x0 predictor.

    .. math:: E[x_0 \mid z_t] = \mu + k_t \odot (z_t - a_t\mu), \qquad k_t = \frac{a_t s^2}{a_t^2 s^2 + b_t^2}

    (docs/method.md §3.2d). ``predict_x0`` counts 1 NFE like a network would.

    Args:
        mu: mean, shape ``(C, H, W)`` (one image).
        s: standard deviations, broadcastable to ``mu``'s shape, positive.
        schedule: any :class:`NoiseSchedule`; the linear VP schedule (β 1e-4 to 0.02, 1000 steps) by default.
    """

    data_range = None  # unbounded data: solvers never clamp its estimates (the exact-posterior tests rely on it)

    def __init__(self, mu: torch.Tensor, s: torch.Tensor | float, *, schedule: NoiseSchedule | None = None) -> None:
        schedule = schedule if schedule is not None else VPSchedule.from_betas(make_betas("linear"))
        super().__init__(None, schedule=schedule, prediction_type="x0", latent_channels=mu.shape[0])
        if mu.ndim != 3:
            raise ValueError(f"mu: expected one image (C, H, W), got shape {tuple(mu.shape)}")
        s = torch.as_tensor(s, dtype=mu.dtype, device=mu.device).expand_as(mu).clone()
        if not (s > 0).all():
            raise ValueError("s: expected strictly positive standard deviations")
        self.register_buffer("mu", mu.clone())  # (C, H, W)
        self.register_buffer("s", s)  # (C, H, W)

    @property
    def dim(self) -> int:
        """Dimension :math:`d = CHW`."""
        return self.mu.numel()

    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Require ``(B, *mu.shape)``.

        Raises:
            ValueError: for any other shape.
        """
        if tuple(x_shape[1:]) != tuple(self.mu.shape) or len(x_shape) != 4:
            raise ValueError(f"GaussianPrior: expected shape (B, {', '.join(map(str, self.mu.shape))}), got {x_shape}")

    def _predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self.check_shape(tuple(z_t.shape))
        a_t, b_t = (append_dims(v.to(z_t.dtype), z_t.ndim) for v in self.scales(t))  # (B, 1, 1, 1)
        mu, s2 = self.mu.to(z_t.dtype), self.s.to(z_t.dtype).square()
        k_t = a_t * s2 / (a_t**2 * s2 + b_t**2)
        return mu + k_t * (z_t - a_t * mu)

    def sample(self, n: int, generator: Generator = None) -> torch.Tensor:
        """``n`` prior draws ``(n, C, H, W)``."""
        return self.mu + self.s * randn((n, *self.mu.shape), generator, device=self.mu.device, dtype=self.mu.dtype)

    def covariance(self) -> torch.Tensor:
        r"""Dense prior covariance :math:`\Sigma_0 = \operatorname{diag}(s^2)`, ``(d, d)`` float64."""
        return torch.diag(self.s.reshape(-1).to(torch.float64) ** 2)

    def posterior(self, A: HasA | torch.Tensor, y: torch.Tensor, sigma_n: float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Exact posterior of :math:`y = Ax + n`, :math:`n \sim N(0, \sigma_n^2 I)` (information form, fp64).

        .. math:: \Sigma = (\Sigma_0^{-1} + A^\top A/\sigma_n^2)^{-1}, \qquad
                  m = \Sigma(\Sigma_0^{-1}\mu + A^\top y/\sigma_n^2)

        Args:
            A: dense ``(m, d)`` matrix or an object with a batched ``A`` method.
            y: ``B`` measurements, ``(B, ...)`` with ``m`` entries each.
            sigma_n: internal noise std (> 0).

        Returns:
            ``(mean, cov)``: mean ``(B, C, H, W)`` float64 and cov ``(d, d)`` float64 (shared by the batch).
        """
        return self.conditional_posterior(A, y, sigma_n)

    def conditional_posterior(
        self,
        A: HasA | torch.Tensor,
        y: torch.Tensor,
        sigma_n: float,
        x_t: torch.Tensor | None = None,
        t: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""UD2M's exact :math:`p(x_0 \mid y, x_t)` (docs/method.md §3.2d), or :math:`p(x_0 \mid y)` without ``x_t``.

        .. math:: \Sigma^{-1} = \Sigma_0^{-1} + A^\top A/\sigma_n^2 + (a_t^2/b_t^2) I, \qquad
                  m = \Sigma\big(\Sigma_0^{-1}\mu + A^\top y/\sigma_n^2 + a_t x_t/b_t^2\big)

        Args:
            A: dense ``(m, d)`` matrix or an object with a batched ``A`` method.
            y: ``(B, ...)`` measurements.
            sigma_n: internal noise std (> 0).
            x_t: ``(B, C, H, W)`` noisy state :math:`a_t x_0 + b_t\varepsilon`, or None.
            t: native time of ``x_t``, a float (then cov is ``(d, d)``) or a ``(B,)`` tensor (cov ``(B, d, d)``).

        Returns:
            ``(mean, cov)`` in float64, mean ``(B, C, H, W)``.
        """
        if not sigma_n > 0:
            raise ValueError(f"sigma_n: expected a positive noise level, got {sigma_n}")
        A_mat = operator_matrix(A, tuple(self.mu.shape)).to(self.mu.device)  # (m, d)
        Y = y.reshape(-1, A_mat.shape[0]).to(torch.float64)  # (B, m)
        prec0 = 1.0 / self.s.reshape(-1).to(torch.float64) ** 2  # (d,) Σ0^{-1}
        P = torch.diag(prec0) + A_mat.T @ A_mat / sigma_n**2  # (d, d)
        h = prec0 * self.mu.reshape(-1).to(torch.float64) + Y @ A_mat / sigma_n**2  # (B, d)
        if x_t is not None:
            a_t, b_t = (v.to(torch.float64) for v in self.scales(torch.as_tensor(t, device=self.mu.device)))
            P = P + (a_t**2 / b_t**2)[..., None, None] * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
            h = h + append_dims(a_t / b_t**2, 2) * x_t.reshape(Y.shape[0], -1).to(torch.float64)
        cov = torch.cholesky_inverse(torch.linalg.cholesky(P))  # (d, d) or (B, d, d)
        mean = (cov @ h.unsqueeze(-1)).squeeze(-1) if cov.ndim == 3 else h @ cov
        return mean.reshape(Y.shape[0], *self.mu.shape), cov
