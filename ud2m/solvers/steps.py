r"""Single-step kernels shared by the zero-shot solvers (LATINO, LATINO-PRO, LVTINO) and the unfolded UD2M model
(docs/method.md §4.2, §6.6, §7.1, §7.2, §8). Written once, called everywhere: no solver pastes its own re-noise,
prox or DDIM step.

Conventions: images on [-1, 1]; ``t``, ``a``, ``s`` are ``(B,)`` tensors (native time, signal scale
:math:`a_t`, VE noise level :math:`s_t = b_t/a_t`); ``sigma_n`` is the internal noise std (``2 sigma_y``), a
float or ``(B,)``. No function here disables autograd: the same kernels are unrolled and trained.
"""

from __future__ import annotations

from typing import Any

import torch

from ud2m.operators.base import LinearOperator, Operator
from ud2m.priors.base import Prior
from ud2m.utils import Generator, append_dims, batch_scalar, randn


def wiener_init(op: Operator, y: torch.Tensor, sigma_n: float | torch.Tensor, s0: float = 0.5) -> torch.Tensor:
    r"""Tikhonov/Wiener start :math:`x^{(0)} = \mathrm{clamp}(A^\dagger_\epsilon y, -1, 1)`,
    :math:`\epsilon = \max(\sigma_n, 10^{-3})^2 / s_0^2` (§4.2 line 1, §6.6) — the MAP under :math:`N(0, s_0^2 I)`.

    Nonlinear operators (JPEG) start from :meth:`lift` of ``y``.
    """
    if not isinstance(op, LinearOperator):
        return op.lift(y).clamp(-1, 1)
    sigma = batch_scalar(sigma_n, y.shape[0], device=y.device, dtype=torch.float32, name="sigma_n")
    eps = sigma.clamp_min(1e-3) ** 2 / s0**2  # (B,): one regulariser per sample (§1.5: batch-independent)
    return op.A_dagger(y, eps=eps).clamp(-1, 1)


def renoise(prior: Prior, z0: torch.Tensor, t: float | torch.Tensor, generator: Generator = None) -> torch.Tensor:
    r"""Forward-noise a clean latent: :math:`z_t = a_t z_0 + b_t \varepsilon`, noise from ``generator``."""
    eps = randn(z0.shape, generator, device=z0.device, dtype=z0.dtype)
    return prior.add_noise(z0, t, eps)


def sae_step(
    prior: Prior,
    x: torch.Tensor,
    t: float | torch.Tensor,
    cond: Any = None,
    generator: Generator = None,
) -> torch.Tensor:
    r"""Stochastic auto-encoder step of LATINO (§4.2 lines 3-6): encode, re-noise to ``t``, one consistency
    evaluation (1 NFE), decode, clamp: :math:`u = \mathrm{clamp}(D(\hat z_0(a_t E(x) + b_t\varepsilon, t)), -1, 1)`.
    """
    z0 = prior.encode(x.clamp(-1, 1))  # 3. VAE mean
    z = renoise(prior, z0, t, generator)  # 4. forward-noise
    z0_hat = prior.predict_x0(z, t, cond)  # 5. 1 NFE
    return prior.decode(z0_hat).clamp(-1, 1)  # 6.


def data_consistency(op: Operator, u: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    r"""Likelihood step :math:`x = \arg\min_x \tfrac\gamma2\|Ax-y\|^2 + \tfrac12\|x-u\|^2` (§4.2 line 8): a thin,
    named call so that every solver's data step reads the same."""
    return op.prox_l2(u, y, gamma)


# ---------------------------------------------------------------------------------------------- UD2M block (§7.1)
def rho_zero(s: torch.Tensor, sigma_e: float | torch.Tensor) -> torch.Tensor:
    r""":math:`\rho_0 = \sigma_e s/\sqrt{\sigma_e^2 + s^2}`, i.e. :math:`1/\rho_0^2 = 1/\sigma_e^2 + 1/s^2` (§7.1.1)."""
    return sigma_e * s / torch.sqrt(sigma_e**2 + s**2)


def ud2m_data_step(
    op: Operator,
    y: torch.Tensor,
    x_t: torch.Tensor,
    x: torch.Tensor,
    *,
    a: torch.Tensor,
    s: torch.Tensor,
    rho: torch.Tensor,
    lam: torch.Tensor,
    sigma_n: float | torch.Tensor,
) -> torch.Tensor:
    r"""UD2M's combined quadratic (§7.1 steps 3-4):

    .. math:: z = \arg\min_z \frac{\|y - Az\|^2}{2\lambda\sigma_n^2} + \frac{\|z - x_t/a\|^2}{2s^2}
              + \frac{\|z - x\|^2}{2\rho^2}

    solved as one ``prox_l2`` by merging the two anchors: :math:`1/\tau^2 = 1/s^2 + 1/\rho^2`,
    :math:`m = \tau^2(x_t a/b^2 + x/\rho^2)` (:math:`x_t a / b^2 = x_t/(a s^2)`),
    :math:`\gamma = \tau^2/(\lambda\sigma_n^2)`.
    All scalars are ``(B,)`` (or broadcastable); differentiable in every argument.
    """
    B = x.shape[0]
    sigma_n = batch_scalar(sigma_n, B, device=x.device, dtype=x.dtype, name="sigma_n")
    if not bool((sigma_n > 0).all()):
        raise ValueError(
            f"UD2M data step: the noise level must be positive (got sigma_n = {sigma_n.tolist()}); for noiseless "
            "data such as JPEG give the data term an effective noise level (sigma_eff, docs/method.md §2.6)"
        )
    tau2 = 1.0 / (1.0 / s**2 + 1.0 / rho**2)  # (B,)
    m = append_dims(tau2, x.ndim) * (x_t / append_dims(a * s**2, x.ndim) + x / append_dims(rho**2, x.ndim))
    return op.prox_l2(m, y, tau2 / (lam * sigma_n**2))


def ud2m_warm_start(
    op: Operator,
    y: torch.Tensor,
    x_t: torch.Tensor,
    *,
    a: torch.Tensor,
    s: torch.Tensor,
    sigma_n: float | torch.Tensor,
    s0: float = 0.5,
) -> torch.Tensor:
    r"""UD2M warm start [ours] (§7.2): the Wiener estimate under :math:`N(0, s_0^2 I)` given y and x_t, one prox:
    :math:`1/\tau_0^2 = 1/s^2 + 1/s_0^2`, :math:`m_0 = \tau_0^2 x_t a/b^2`, :math:`x^{(0)} = \mathrm{prox}(m_0, y,
    \tau_0^2/\sigma_n^2)`. Used identically in training and sampling."""
    B = x_t.shape[0]
    sigma_n = batch_scalar(sigma_n, B, device=x_t.device, dtype=x_t.dtype, name="sigma_n")
    m0, tau2 = wiener_shrinkage(x_t, a=a, s=s, s0=s0)
    return op.prox_l2(m0, y, warm_start_gamma(tau2, sigma_n))


def wiener_shrinkage(
    x_t: torch.Tensor, *, a: torch.Tensor, s: torch.Tensor, s0: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The posterior mean of :math:`x_0 \sim N(0, s_0^2 I)` given :math:`x_t = a x_0 + b\varepsilon` alone (§7.2):
    :math:`m_0 = \tau_0^2 x_t a/b^2 = \tau_0^2 x_t/(a s^2)` with :math:`1/\tau_0^2 = 1/s^2 + 1/s_0^2`; returns
    ``(m0, tau0²)`` (``(B,)``). Pixel priors apply it to pixels, latent priors to the latent (then decode)."""
    tau2 = 1.0 / (1.0 / s**2 + 1.0 / s0**2)
    return append_dims(tau2 / (a * s**2), x_t.ndim) * x_t, tau2


def warm_start_gamma(tau2: torch.Tensor, sigma_n: torch.Tensor) -> torch.Tensor:
    r"""The warm start's prox step :math:`\tau_0^2/\sigma_n^2` (§7.2); noiseless data (σ_n = 0, e.g. JPEG) would
    make it infinite, so σ_n is floored at 1e-3 and every prox stays defined."""
    return tau2 / sigma_n.clamp_min(1e-3) ** 2


def latent_fusion(
    zeta: torch.Tensor, x_t: torch.Tensor, *, a: torch.Tensor, s: torch.Tensor, rho0: torch.Tensor
) -> torch.Tensor:
    r"""Gaussian fusion in latent space of the encoded data-step output ζ (weight :math:`1/\rho_0^2`) with
    :math:`x_t` (weight :math:`1/s^2` on :math:`x_t/a`), §7.2 (iii) [ours, heuristic]:

    .. math:: \frac{\zeta/\rho_0^2 + x_t/(a s^2)}{1/\rho_0^2 + 1/s^2}.
    """
    n = zeta.ndim
    w0 = 1.0 / rho0**2
    return (append_dims(w0, n) * zeta + x_t / append_dims(a * s**2, n)) / append_dims(w0 + 1.0 / s**2, n)


# ---------------------------------------------------------------------------------------------- DDIM step (§8)
def ddim_step(
    x: torch.Tensor,
    x0_hat: torch.Tensor,
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    a_next: torch.Tensor,
    b_next: torch.Tensor,
    eta: float,
    xi: torch.Tensor,
) -> torch.Tensor:
    r"""DDIM step from time t to t' < t with stochasticity :math:`\eta` (§8 steps 5-7):

    .. math:: \hat\varepsilon = (x - a\hat x_0)/b,\quad
              \varsigma = \eta\,\frac{b'}{b}\sqrt{1 - a^2/a'^2},\quad
              x' = a'\hat x_0 + \sqrt{b'^2 - \varsigma^2}\,\hat\varepsilon + \varsigma\,\xi

    With :math:`\eta = 1`, :math:`x'` is an exact sample of the DDPM posterior :math:`q(x_{t'} | x_t, \hat x_0)`.
    """
    n = x.ndim
    eps_hat = (x - append_dims(a, n) * x0_hat) / append_dims(b, n)
    varsigma = eta * (b_next / b) * torch.sqrt((1 - a**2 / a_next**2).clamp_min(0))
    scale_eps = torch.sqrt((b_next**2 - varsigma**2).clamp_min(0))
    return append_dims(a_next, n) * x0_hat + append_dims(scale_eps, n) * eps_hat + append_dims(varsigma, n) * xi


# ---------------------------------------------------------------------------------------------- CM sampling (§3.3)
def consistency_sampling(
    prior: Prior,
    shape: tuple[int, ...],
    timesteps: list[int] | tuple[int, ...],
    *,
    cond: Any = None,
    generator: Generator = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; diffusers' ``LCMScheduler``):
    :math:`z \sim N(0, I)` at :math:`t_0`; for each :math:`t_k`: :math:`\hat x = f(z, t_k)` (1 NFE), then
    :math:`z = a_{t_{k+1}}\hat x + b_{t_{k+1}}\xi`; the last :math:`\hat x` is the sample. One step is a one-call
    sample; with a Tweedie prior (``boundary="none"``) the same loop gives the blurry one-call mean at one step.

    Args:
        prior: the consistency model (any prior of the contract; encode/decode are not applied: latents in, out).
        shape: ``(B, c, ...)`` of the latent.
        timesteps: decreasing native times, e.g. ``[999, 759, 499, 259]`` (diffusers' LCM grid of 4 steps).
        cond: conditioning of the prior.
        generator: a generator or a list of B generators (§1.5); the initial noise is drawn first, then one
            re-noise per step, in diffusers' order.
        device: device of the samples.
    """
    if len(timesteps) == 0:
        raise ValueError("consistency_sampling: timesteps is empty")
    z = randn(shape, generator, device=device)
    B = z.shape[0]
    for k, t in enumerate(timesteps[:-1]):
        x_hat = prior.predict_x0(z, torch.full((B,), float(t), device=z.device), cond)
        z = renoise(prior, x_hat, torch.full((B,), float(timesteps[k + 1]), device=z.device), generator)
    return prior.predict_x0(z, torch.full((B,), float(timesteps[-1]), device=z.device), cond)
