r"""LATINO and LATINO-PRO: zero-shot restoration with a latent consistency prior (docs/method.md §4, §5).

Implements Algorithm 1 of Spagnoletti et al. (2025), "LATINO-PRO: LAtent consisTency INverse sOlver with PRompt
Optimization": a Langevin step split into a prior half, the stochastic auto-encoder (SAE) step of a consistency
model (:func:`ud2m.solvers.steps.sae_step`), and an implicit likelihood half, the prox of
:math:`g_y(x) = \|Ax - y\|^2/(2\sigma_n^2)` (:func:`ud2m.solvers.steps.data_consistency`); plus the empirical-Bayes
prompt calibration of LATINO-PRO (SAPG on the token embeddings, Fisher-identity gradients of the chain's own
transitions, §5.2-5.3), posterior sampling with Welford statistics, the inpainting hole-filling initialisation
[ref], and saving/loading an optimised condition (safetensors).

Autograd: nothing here disables it (house-style G). :func:`latino` is an ordinary differentiable function, so
``sample.py`` may wrap it in ``torch.inference_mode()``. :func:`latino_pro` NEEDS autograd for one UNet call per
transition: callers must use ``torch.no_grad()`` (the solver re-enables grad exactly where it needs it), never
``torch.inference_mode()``, which it refuses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ud2m.operators.base import Operator
from ud2m.operators.noise import sigma_internal
from ud2m.priors.base import Prior, TextCondition
from ud2m.schedules import DMD2_4, LATINO_SDXL
from ud2m.solvers.steps import data_consistency, renoise, sae_step, wiener_init
from ud2m.utils import Generator, append_dims, batch_scalar

logger = logging.getLogger(__name__)

WeightRule = Callable[..., torch.Tensor]  # rule(k, t, u, y, op, sigma_n, prior) -> gamma (B,)
Callback = Callable[[dict[str, Any]], None] | None


# ---------------------------------------------------------------------------------------------------- helpers
def _noise_std(sigma_y: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Internal noise std :math:`\\sigma_n = 2\\sigma_y` as a ``(B,)`` tensor in ``y``'s dtype (fp32 at least)."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    sigma_y = batch_scalar(sigma_y, y.shape[0], device=y.device, dtype=dtype, name="sigma_y")
    if (sigma_y < 0).any():
        raise ValueError(f"sigma_y: expected a non-negative noise level, got {sigma_y.tolist()}")
    return sigma_internal(sigma_y)


def _batch_time(t: float, batch_size: int, device: torch.device) -> torch.Tensor:
    """Native time ``t`` as a ``(B,)`` float32 tensor (integer grids are exact in float32)."""
    return torch.full((batch_size,), float(t), dtype=torch.float32, device=device)


def _check_timesteps(timesteps: Sequence[float], name: str = "timesteps") -> tuple[float, ...]:
    timesteps = tuple(float(t) for t in timesteps)
    if not timesteps:
        raise ValueError(f"{name}: expected at least one timestep, got none")
    return timesteps


def box_average(x: torch.Tensor, size: int = 19) -> torch.Tensor:
    """Mean over the ``size x size`` window inside the image (windows clipped at the border), separable."""
    pad = size // 2
    x = F.avg_pool2d(x, (size, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    # clipped windows are rectangles, so the in-image count factorises and two 1-D passes are exact
    return F.avg_pool2d(x, (1, size), stride=1, padding=(0, pad), count_include_pad=False)


def fill_holes(x: torch.Tensor, mask: torch.Tensor, *, iters: int = 200, size: int = 19) -> torch.Tensor:
    r"""Hole filling of the inpainting initialisation [ref] (§4.2): ``iters`` times, every missing pixel is replaced
    by the ``size x size`` box average of the current image, observed pixels are kept:
    :math:`x \leftarrow M \odot x + (1 - M) \odot \mathrm{box}(x)`.

    Args:
        x: ``(B, C, H, W)`` image.
        mask: ``(B or 1, 1 or C, H, W)`` 0/1 mask (1 = observed).
        iters: number of sweeps (200 in the reference).
        size: odd window side (19 in the reference).
    """
    if x.ndim != 4 or mask.ndim != 4 or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"fill_holes: expected x (B, C, H, W) and a mask of the same H, W, got {x.shape}, {mask.shape}"
        )
    m = mask.to(x.dtype)
    for _ in range(iters):
        x = m * x + (1 - m) * box_average(x, size)
    return x


def initial_estimate(
    op: Operator, y: torch.Tensor, sigma_n: float | torch.Tensor, *, fill_holes_iters: int = 0
) -> torch.Tensor:
    r"""LATINO's :math:`x^{(0)}` (§4.2 line 1): the Wiener start :func:`~ud2m.solvers.steps.wiener_init`, then
    optionally :func:`fill_holes` for operators whose observed mask is image-shaped (inpainting)."""
    x = wiener_init(op, y, sigma_n)
    if fill_holes_iters <= 0:
        return x
    mask = op.observed_mask(y)
    if mask is None or mask.ndim != 4 or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"fill_holes_iters: {type(op).__name__} has no image-shaped observed mask to fill")
    return fill_holes(x, mask, iters=fill_holes_iters)


# ---------------------------------------------------------------------------------------------------- LATINO
def latino(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    timesteps: Sequence[float] = LATINO_SDXL,
    *,
    cond: Any = None,
    weights: WeightRule,
    sigma_y: float | torch.Tensor,
    generator: Generator = None,
    callback: Callback = None,
    return_info: bool = False,
    x_vae: bool = False,
    fill_holes_iters: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    r"""Implements LATINO (Spagnoletti et al. 2025, Algorithm 1; docs/method.md §4.2) for a batch of observations.

    For :math:`k = 1..N`: :math:`u^{(k)} = \mathrm{clamp}(D(\hat z_0(a_{t_k} E(x^{(k-1)}) + b_{t_k}\varepsilon,
    t_k)), -1, 1)` (SAE step, 1 NFE) and
    :math:`x^{(k)} = \arg\min_x \tfrac{\gamma_k}{2}\|Ax - y\|^2 + \tfrac12\|x - u^{(k)}\|^2`,
    :math:`\gamma_k = \delta_k/\sigma_n^2` from the ``weights`` rule.

    Args:
        prior: latent (or pixel) consistency prior.
        op: forward operator (closed-form, CG or nonlinear prox).
        y: measurements ``(B, ...)`` on the internal scale.
        x_init: :math:`x^{(0)}`; default :func:`initial_estimate` (Wiener start [ours]).
        timesteps: native times :math:`t_1 > \dots > t_N` (default the SDXL/DMD2 8-step grid).
        cond: prior conditioning (e.g. a :class:`~ud2m.priors.base.TextCondition`), batch 1 or B.
        weights: rule ``(k, t, u, y, op, sigma_n, prior) -> gamma (B,)`` (:mod:`ud2m.solvers.weights`).
        sigma_y: noise std on the [0, 1] scale (float or ``(B,)``); :math:`\sigma_n = 2\sigma_y`.
        generator: ``torch.Generator`` or list of B generators (sample i draws only from generator i).
        callback: called after each step with ``dict(k, x, x_prior, t, gamma)``.
        return_info: also return ``dict(nfe, gammas (N, B), x_prior)`` (+ ``x_vae`` when asked).
        x_vae: add :math:`D(E(x^{(N)}))`, the reference's (not data-consistent) output, to the info dict.
        fill_holes_iters: hole-filling sweeps for the default inpainting initialisation (200 in the reference).

    Returns:
        :math:`x^{(N)}`, the last prox output (data-consistent) [ours], ``(B, ...)``; with ``return_info`` a pair
        ``(x, info)``.
    """
    timesteps = _check_timesteps(timesteps)
    if x_init is not None and not torch.is_tensor(x_init):
        raise TypeError(
            f"latino: x_init must be a tensor or None, got {type(x_init).__name__} (timesteps go by keyword)"
        )
    sigma_n = _noise_std(sigma_y, y)
    x = initial_estimate(op, y, sigma_n, fill_holes_iters=fill_holes_iters) if x_init is None else x_init  # 1.
    op.check_measurement(y, tuple(x.shape))
    prior.check_shape(tuple(x.shape))
    gammas, u = [], None
    for k, t_k in enumerate(timesteps, start=1):  # 2.
        t = _batch_time(t_k, y.shape[0], y.device)
        u = sae_step(prior, x, t, cond, generator)  # 3.-6. encode, re-noise, 1 NFE, decode + clamp
        gamma = weights(k, t, u, y, op, sigma_n, prior)  # 7.
        x = data_consistency(op, u, y, gamma)  # 8.
        gammas.append(gamma)
        if callback is not None:
            callback(dict(k=k, x=x, x_prior=u, t=t_k, gamma=gamma))  # 9.
    if not return_info:
        return x  # 10.
    info: dict[str, Any] = dict(nfe=len(timesteps), gammas=torch.stack(gammas), x_prior=u)
    if x_vae:
        info["x_vae"] = prior.decode(prior.encode(x.clamp(-1, 1)))
    return x, info


# ---------------------------------------------------------------------------------------------------- posterior
def _sample_seeds(generator: Generator, B: int, S: int, device: torch.device) -> torch.Tensor:
    """``(B, S)`` int64 seeds; with a list of B generators, row i comes from generator i only (§1.5)."""
    high = 2**62
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != B:
            raise ValueError(f"latino_posterior: got {len(generator)} generators for a batch of {B}")
        return torch.stack([torch.randint(high, (S,), generator=g, device=g.device).cpu() for g in generator])
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(high, (B, S), generator=generator, device=gen_device).cpu()


#: keyword arguments of :func:`latino` that may carry one entry per observation (batch B)
_PER_SAMPLE_KWARGS = ("x_init", "sigma_y", "cond")


def _select_rows(v: Any, index: torch.Tensor, B: int) -> Any:
    """Rows ``index`` of a per-observation value (tensor or condition dataclass of batch B); other values as given."""
    if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == B:
        return v[index.to(v.device)]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: _select_rows(getattr(v, f.name), index, B) for f in dataclasses.fields(v)}
        return dataclasses.replace(v, **fields)
    return v


def _accepts_repeated_batch(op: Operator, x: torch.Tensor) -> bool:
    """False when ``op`` holds per-sample parameters (kernels, masks) that forbid a batch of 2B."""
    if x.shape[0] == 1:
        return True
    try:
        op.A(torch.cat([x, x]))
    except ValueError:
        return False
    return True


def latino_posterior(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    *,
    num_samples: int,
    batch_size: int | None = None,
    generator: Generator = None,
    keep_samples: bool = False,
    **latino_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    r"""S independent LATINO samples per observation (§4.2 "Posterior samples") with their pixelwise mean and
    unbiased std: :func:`~ud2m.solvers.posterior.posterior_sample` around :func:`latino`.

    Sample s of image i runs with its own generator, seeded from ``generator`` (row i from generator i when a list
    of B is given), so a sample does not depend on how the work is batched. ``batch_size`` samples of every image run
    together (a batch of ``B * batch_size``); operators with per-sample parameters (B kernels or masks) run one
    sample round at a time.

    Args:
        prior, op, y: as in :func:`latino`.
        num_samples: S >= 1.
        batch_size: samples per observation per call (default S: one call of B·S).
        generator: ``torch.Generator``, list of B generators, or None (global RNG).
        keep_samples: return all samples ``(B, S, ...)`` instead of the first ``(B, ...)``.
        **latino_kwargs: the keyword arguments of :func:`latino` (``x_init``, ``timesteps``, ``cond``, ``weights``,
            ``sigma_y``, ...); per-sample tensors of batch B are repeated for every sample.

    Returns:
        ``(mean, std, samples_or_first, nfe)``; ``nfe`` = S·N network evaluations per observation (std = 0 if S = 1).
    """
    from ud2m.solvers.posterior import posterior_sample

    if num_samples < 1:
        raise ValueError(f"latino_posterior: num_samples must be >= 1, got {num_samples}")
    B, S = y.shape[0], num_samples
    k = min(S, batch_size or S)
    sigma_n = _noise_std(latino_kwargs["sigma_y"], y)
    if k > 1 and not _accepts_repeated_batch(op, wiener_init(op, y, sigma_n)):
        logger.info("latino_posterior: %s has per-sample parameters; running one sample per call", type(op).__name__)
        k = 1
    seeds = _sample_seeds(generator, B, S, y.device)
    nfe = 0

    def one_call(y_rows: torch.Tensor, gens: list[torch.Generator], index: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        kwargs = {n: _select_rows(v, index, B) if n in _PER_SAMPLE_KWARGS else v for n, v in latino_kwargs.items()}
        x, info = latino(prior, op, y_rows, generator=gens, return_info=True, **kwargs)
        nfe += info["nfe"] * y_rows.shape[0] // B
        return x

    gens = [_seeded(seeds[i, s]) for i in range(B) for s in range(S)]
    post = posterior_sample(one_call, y, num_samples=S, generators=gens, chunk=k, keep_samples=keep_samples)
    samples = post.samples if keep_samples else post.samples[:, 0]
    std = post.std if post.std is not None else torch.zeros_like(post.mean)  # one sample: no spread estimate
    return post.mean, std, samples, nfe


def _seeded(seed: torch.Tensor) -> torch.Generator:
    """A CPU generator (noise is drawn there and moved, so results do not depend on the device, §1.5)."""
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------------- LATINO-PRO
def transition_log_density(
    prior: Prior, z_next: torch.Tensor, z0_hat: torch.Tensor, t_next: float | torch.Tensor
) -> torch.Tensor:
    r"""Log transition density of the consistency sampler up to a constant (§5.2), per sample ``(B,)``:

    .. math:: \ell_i = -\frac{\|z_{i+1} - a_{t_{i+1}}\hat z_0(z_i, t_i; c)\|^2}{2 b_{t_{i+1}}^2}

    formed in fp32 at least [ours] (an fp16 squared norm overflows at t = 749).
    """
    dtype = torch.promote_types(z0_hat.dtype, torch.float32)
    t_next = batch_scalar(t_next, z_next.shape[0], device=z_next.device, dtype=torch.float32, name="t_next")
    a, b = (v.to(dtype) for v in prior.scales(t_next))
    r = z_next.to(dtype) - append_dims(a, z_next.ndim) * z0_hat.to(dtype)
    return -r.square().flatten(1).sum(1) / (2 * b**2)


def _detached(cond: TextCondition) -> TextCondition:
    fields = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    return dataclasses.replace(cond, **{n: v.detach() if torch.is_tensor(v) else v for n, v in fields.items()})


def _prompt_gradient(
    prior: Prior, z_next: torch.Tensor, t_next: torch.Tensor, z0_hat: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    r""":math:`g_i = \nabla_c \ell_i(c)` by one backward through the kept UNet graph (then freed)."""
    with torch.enable_grad():
        ell = transition_log_density(prior, z_next, z0_hat, t_next)  # (B,); samples have independent c
        (g,) = torch.autograd.grad(ell.sum(), c)
    return g  # (B, L, D)


def latino_pro_chain(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x: torch.Tensor,
    timesteps: Sequence[float] = DMD2_4,
    *,
    cond: TextCondition,
    weights: WeightRule,
    sigma_y: float | torch.Tensor,
    generator: Generator = None,
    callback: Callback = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""One LATINO chain from ``x`` that also returns the Fisher-identity gradients of its transitions (§5.2).

    The same steps as :func:`latino` (the SAE step is unrolled here because the gradient needs its latents), except
    that every UNet call but the last keeps a graph w.r.t. ``cond.prompt_embeds`` only: the input latent
    :math:`z_i` is a constant. Once :math:`z_{i+1} = a_{t_{i+1}}E(x^{(i+1)}) + b_{t_{i+1}}\varepsilon` has been drawn,
    :math:`\ell_i` (:func:`transition_log_density`) is backpropagated and that graph freed: one forward with graph
    and one backward per transition, no VAE or prox in any graph.

    Args:
        prior, op, y, timesteps, weights, sigma_y, generator: as in :func:`latino`.
        x: start image (the first SAE step re-noises :math:`E(x)` to :math:`t_1`: the warm restart [ref]).
        cond: text condition of batch B (or 1); its pooled embedding and ``time_ids`` are treated as constants.
        callback: called after each step with ``dict(k, x, x_prior, t, gamma, z)``, ``z`` the UNet's input latent.

    Returns:
        ``(x, grads)``: the last prox output and the ``N - 1`` gradients :math:`g_i` ``(B, L, D)``.
    """
    timesteps = _check_timesteps(timesteps)
    B, sigma_n = y.shape[0], _noise_std(sigma_y, y)
    cond = _detached(cond.expand(B))
    grads, pending = [], None
    for k, t_k in enumerate(timesteps, start=1):
        t = _batch_time(t_k, B, y.device)
        z = renoise(prior, prior.encode(x.detach().clamp(-1, 1)), t, generator)  # 3.-4. z_k, a constant
        if pending is not None:
            grads.append(_prompt_gradient(prior, z, t, *pending))  # g_{k-1}; frees the step-(k-1) graph
        c = cond.prompt_embeds.clone().requires_grad_(k < len(timesteps))  # the last call needs no graph
        with torch.enable_grad():
            z0_hat = prior.predict_x0(z, t, dataclasses.replace(cond, prompt_embeds=c))  # 5. 1 NFE
        pending = (z0_hat, c) if k < len(timesteps) else None
        u = prior.decode(z0_hat.detach()).clamp(-1, 1)  # 6.
        gamma = weights(k, t, u, y, op, sigma_n, prior)  # 7.
        x = data_consistency(op, u, y, gamma)  # 8.
        if callback is not None:
            callback(dict(k=k, x=x, x_prior=u, t=t_k, gamma=gamma, z=z))  # 9.
    return x, grads


def normalise_tokens(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Per-token L2 normalisation :math:`\hat g_r = g_r/(\|g_r\| + \epsilon)` over the last dim (§5.3 line 5)."""
    return g / (g.norm(dim=-1, keepdim=True) + eps)


def project_to_balls(c: torch.Tensor, c0: torch.Tensor, radius: float) -> torch.Tensor:
    r""":math:`\Pi_C`: shrink each token's offset :math:`c_r - c_{0,r}` to norm at most ``radius`` (§5.3)."""
    d = c - c0
    scale = (radius / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return c0 + d * scale


def sapg_step_size(j: int, step0: float = 0.08, decay: float = 0.9, decay_after: int = 10, floor: float = 1e-3):
    r""":math:`\gamma_j = \gamma_0\max(\rho^{\max(0, j - j_0)}, \gamma_\text{floor})` (§5.3 line 8).

    >>> sapg_step_size(10), round(sapg_step_size(12), 6)
    (0.08, 0.0648)
    """
    return step0 * max(decay ** max(0, j - decay_after), floor)


class PromptAscent:
    r"""State of LATINO-PRO's prompt update (§5.3 lines 5-9): the embedding :math:`c`, the SAPG direction
    :math:`h` (``"cumulative"``: never reset [ref]; ``"fresh"``: reset every outer iteration, textbook SAPG [ours])
    or Adam's moments (``optimizer="adam"`` on :math:`-\sum_i\ell_i` [ours]); rows ``< frozen_tokens`` never move
    and every update ends with :func:`project_to_balls` around :math:`c_0`.

    Args:
        c0: initial embedding ``(B, L, D)``.
        step0, decay, decay_after, step_floor: :func:`sapg_step_size`.
        radius: per-token ball radius around ``c0``.
        frozen_tokens: number of leading rows kept at ``c0`` (BOS + "a photo of").
        direction: ``"cumulative"`` or ``"fresh"``.
        optimizer: ``"sapg"`` or ``"adam"``.
        adam_lr, adam_betas, adam_eps: Adam constants (lr 0.02, betas (0.9, 0.999); untuned).
    """

    def __init__(
        self,
        c0: torch.Tensor,
        *,
        step0: float = 0.08,
        decay: float = 0.9,
        decay_after: int = 10,
        step_floor: float = 1e-3,
        radius: float = 15.0,
        frozen_tokens: int = 4,
        direction: str = "cumulative",
        optimizer: str = "sapg",
        adam_lr: float = 0.02,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        _check_pro_options(c0, radius, frozen_tokens, direction, optimizer)
        self.c0 = c0.detach().float()
        self.c = self.c0.clone()
        self.steps = dict(step0=step0, decay=decay, decay_after=decay_after, floor=step_floor)
        self.radius, self.direction, self.optimizer = radius, direction, optimizer
        self.mask = torch.ones_like(self.c0[:1, :, :1])  # (1, L, 1)
        self.mask[:, :frozen_tokens] = 0
        self.h = torch.zeros_like(self.c0)  # the SAPG direction
        self.adam = None
        if optimizer == "adam":  # on a copy of c (no autograd: the gradient is given); frozen rows get zero gradients
            self._leaf = self.c0.clone()
            self.adam = torch.optim.Adam([self._leaf], lr=adam_lr, betas=adam_betas, eps=adam_eps)

    def update(self, j: int, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Apply outer iteration ``j``'s update from the transition gradients :math:`g_i`; returns the new ``c``."""
        if self.optimizer == "adam":
            return self._adam([g.float() for g in grads])
        if self.direction == "fresh":
            self.h = torch.zeros_like(self.h)
        for g in grads:
            self.h = self.h + normalise_tokens(g.float())  # 5.-6.
        self.h = self.h * self.mask  # 7.
        step = sapg_step_size(j, **self.steps)  # 8.
        self.c = project_to_balls(self.c + step * self.h, self.c0, self.radius)  # 9.
        return self.c

    def _adam(self, grads: list[torch.Tensor]) -> torch.Tensor:
        r"""One ``torch.optim.Adam`` step on :math:`-\sum_i \ell_i` (gradient :math:`-\sum_i g_i`), frozen rows
        masked, then the projection onto the balls."""
        G = -torch.stack(grads).sum(0) * self.mask if grads else torch.zeros_like(self.c)
        self._leaf.grad = G.to(self._leaf.dtype)
        self.adam.step()
        self._leaf.copy_(project_to_balls(self._leaf, self.c0, self.radius))
        self.c = self._leaf.clone()
        return self.c


def _check_pro_options(c0: torch.Tensor, radius: float, frozen_tokens: int, direction: str, optimizer: str) -> None:
    if c0.ndim != 3:
        raise ValueError(f"latino_pro: prompt_embeds must be (B, L, D), got shape {tuple(c0.shape)}")
    if not 0 <= frozen_tokens <= c0.shape[1]:
        raise ValueError(f"latino_pro: frozen_tokens must be in [0, {c0.shape[1]}], got {frozen_tokens}")
    if radius <= 0:
        raise ValueError(f"latino_pro: radius must be > 0, got {radius}")
    if direction not in ("cumulative", "fresh"):
        raise ValueError(f"latino_pro: direction must be 'cumulative' or 'fresh', got {direction!r}")
    if optimizer not in ("sapg", "adam"):
        raise ValueError(f"latino_pro: optimizer must be 'sapg' or 'adam', got {optimizer!r}")


def latino_pro(
    prior: Prior,
    op: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor | None = None,
    *,
    cond: TextCondition,
    num_outer: int = 15,
    inner_timesteps: Sequence[float] = DMD2_4,
    final_timesteps: Sequence[float] = LATINO_SDXL,
    step0: float = 0.08,
    decay: float = 0.9,
    decay_after: int = 10,
    step_floor: float = 1e-3,
    radius: float = 15.0,
    frozen_tokens: int = 4,
    direction: str = "cumulative",
    optimizer: str = "sapg",
    weights_inner: WeightRule,
    weights_final: WeightRule,
    sigma_y: float | torch.Tensor,
    generator: Generator = None,
    callback: Callback = None,
    return_info: bool = False,
) -> tuple[torch.Tensor, TextCondition] | tuple[torch.Tensor, TextCondition, dict[str, Any]]:
    r"""Implements LATINO-PRO (Spagnoletti et al. 2025; docs/method.md §5.3): empirical-Bayes calibration of the
    prompt embedding :math:`\hat c(y) = \arg\max_c \log p(y \mid c)` by SAPG, then a final LATINO run.

    Each outer iteration j runs a short LATINO chain (:func:`latino_pro_chain`) warm-restarted from the previous
    one, collects :math:`g_i = \nabla_c\ell_i` for its transitions (Fisher's identity,
    :math:`\nabla_c\log p(y\mid c) = E[\nabla_c\log p(z_{1:n}\mid c)\mid y, c]`), and ascends
    (:class:`PromptAscent`): :math:`h \mathrel{+}= \sum_i g_i/(\|g_i\|_\text{row} + 10^{-8})`,
    :math:`c \leftarrow \Pi_C(c + \gamma_j h)`. Only ``prompt_embeds`` move; the pooled embedding and ``time_ids``
    stay at the initial prompt's values. Each image of the batch has its own :math:`c`.

    Cost: ``num_outer * len(inner_timesteps) + len(final_timesteps)`` UNet forwards (68 by default) and
    ``num_outer * (len(inner_timesteps) - 1)`` backwards (45). Needs autograd: call it under ``torch.no_grad()``
    (grad is re-enabled internally for the UNet calls) or with grad enabled, never under ``torch.inference_mode()``.

    Args:
        prior, op, y, x_init, sigma_y, generator: as in :func:`latino`.
        cond: the initial prompt's :class:`~ud2m.priors.base.TextCondition` :math:`c_0` (batch 1 or B).
        num_outer: M, number of SAPG iterations.
        inner_timesteps: grid of the inner chains (DMD2's 4 steps).
        final_timesteps: grid of the final LATINO run (8 steps).
        step0, decay, decay_after, step_floor: step sizes :func:`sapg_step_size`.
        radius: per-token ball radius around :math:`c_0` (15 for SDXL; about 9.2 for SD1.5).
        frozen_tokens: leading rows never optimised (BOS + "a photo of").
        direction: ``"cumulative"`` [ref] or ``"fresh"`` [ours].
        optimizer: ``"sapg"`` [ref] or ``"adam"`` [ours].
        weights_inner, weights_final: data-weight rules of the inner chains and the final run.
        callback: called after each outer iteration with ``dict(j, x, prompt_embeds, step)``.
        return_info: also return ``dict(nfe, backward, step_sizes)``.

    Returns:
        ``(x, cond)``: the final LATINO output and the optimised condition (detached); with ``return_info`` a
        third element, the info dict.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("latino_pro needs autograd: call it under torch.no_grad(), not torch.inference_mode()")
    if num_outer < 0:
        raise ValueError(f"latino_pro: num_outer must be >= 0, got {num_outer}")
    cond = _detached(cond.expand(y.shape[0]))
    steps = dict(step0=step0, decay=decay, decay_after=decay_after, step_floor=step_floor)
    ascent = PromptAscent(
        cond.prompt_embeds,
        radius=radius,
        frozen_tokens=frozen_tokens,
        direction=direction,
        optimizer=optimizer,
        **steps,
    )
    chain = dict(weights=weights_inner, sigma_y=sigma_y, generator=generator)
    x = initial_estimate(op, y, _noise_std(sigma_y, y)) if x_init is None else x_init  # 1.
    backward, step_sizes = 0, []
    for j in range(num_outer):  # 2.
        cond_j = dataclasses.replace(cond, prompt_embeds=ascent.c.to(cond.prompt_embeds.dtype))
        x, grads = latino_pro_chain(prior, op, y, x, inner_timesteps, cond=cond_j, **chain)  # 3.-4., 10.
        ascent.update(j, grads)  # 5.-9.
        backward += len(grads)
        step_sizes.append(sapg_step_size(j, step0, decay, decay_after, step_floor))
        if callback is not None:
            callback(dict(j=j, x=x, prompt_embeds=ascent.c, step=step_sizes[-1]))
    cond = dataclasses.replace(cond, prompt_embeds=ascent.c)
    x = latino(
        prior, op, y, x, final_timesteps, cond=cond, weights=weights_final, sigma_y=sigma_y, generator=generator
    )  # 11.
    if not return_info:
        return x, cond  # 12.
    nfe = num_outer * len(_check_timesteps(inner_timesteps)) + len(_check_timesteps(final_timesteps))
    return x, cond, dict(nfe=nfe, backward=backward, step_sizes=step_sizes)


# ---------------------------------------------------------------------------------------------------- conditions
_CONDITION_FORMAT = "ud2m.TextCondition"


def save_condition(cond: TextCondition, path: str | os.PathLike) -> Path:
    """Save a :class:`~ud2m.priors.base.TextCondition` (e.g. LATINO-PRO's optimised embedding) as safetensors."""
    from safetensors.torch import save_file

    tensors = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    tensors = {n: v.detach().cpu().contiguous() for n, v in tensors.items() if v is not None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": _CONDITION_FORMAT})
    return path


def load_condition(path: str | os.PathLike, device: torch.device | str = "cpu") -> TextCondition:
    """Load a condition written by :func:`save_condition`.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a safetensors file that is not a saved condition.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"condition file not found: {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        fmt = (f.metadata() or {}).get("format")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    names = {fl.name for fl in dataclasses.fields(TextCondition)}
    if fmt != _CONDITION_FORMAT or "prompt_embeds" not in tensors or not set(tensors) <= names:
        raise ValueError(f"{path}: not a saved TextCondition (format {fmt!r}, tensors {sorted(tensors)})")
    return TextCondition(**tensors)


__all__ = [
    "PromptAscent",
    "box_average",
    "fill_holes",
    "initial_estimate",
    "latino",
    "latino_posterior",
    "latino_pro",
    "latino_pro_chain",
    "load_condition",
    "normalise_tokens",
    "project_to_balls",
    "sapg_step_size",
    "save_condition",
    "transition_log_density",
]
