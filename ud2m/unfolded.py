r"""The unfolded UD2M model and its N-step DDIM sampler (docs/method.md §7.1-7.3, §7.8, §8).

UD2M distils a conditional consistency model :math:`x_0 \sim p(x_0 \mid x_t, y)` from a frozen diffusion prior:
K unfolded LATINO blocks (a combined-quadratic prox on :math:`(y, x_t)`, a re-noise to a learnable level, one
:math:`\hat x_0` prediction by the LoRA-adapted prior :math:`G_{\theta+\Delta\theta}`) after a Wiener warm start.
:func:`sample_ud2m` chains the model along the quadratic grid with exact DDIM steps (NFE = N·K).

This module owns the wiring only: every formula (ρ₀, the combined prox, the warm start, the DDIM step) is a shared
kernel of :mod:`ud2m.solvers.steps`, and the operator is passed at call time, so one model serves a batch of
different kernels, masks and noise levels (generalised models, §7.8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ud2m.operators.noise import sigma_internal
from ud2m.priors.base import Prior
from ud2m.priors.lora import attach_lora, lora_config, trainable_parameters
from ud2m.schedules import quadratic_grid
from ud2m.solvers.steps import (
    Operator,
    data_consistency,
    ddim_step,
    latent_fusion,
    rho_zero,
    ud2m_data_step,
    ud2m_warm_start,
    warm_start_gamma,
    wiener_init,
    wiener_shrinkage,
)
from ud2m.utils import Generator, append_dims, batch_scalar, randn

logger = logging.getLogger(__name__)

RENOISE_MODES = ("continuous", "nearest", "residual")
NOISE_RULES = ("prior", "reference")
T_KNOTS_SPAN = 1000.0  # time knots are spread over [0, 1000] native steps
OUT_LAYER_NAMES = ("conv_norm_out", "conv_out")
SCALAR_NAMES = ("log_lambda", "log_rho_scale", "log_sigma_z_scale")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_out")
LORA_WEIGHT_DECAY = 0.01
INITIALIZER_LR_SCALE = 0.1  # the reference trains a learned initialiser at lr × 0.1 (§7.2)


class UnfoldedSampler(nn.Module):
    r"""K unfolded LATINO blocks around a LoRA-adapted frozen prior (docs/method.md §7.1-7.3).

    Block k, per sample, with :math:`a = a_t`, :math:`s = s_t`, :math:`\sigma_n = 2\sigma_y` and the
    data-scale :math:`\sigma_e` of the noise rule (§7.1 revision): ``noise_rule="prior"`` (default)
    :math:`\sigma_e = \texttt{sigma\_cap}` on the prior's data scale, so :math:`\rho_0 \approx \min(s_t,
    \sigma_e)` and the re-noise time :math:`t_z` follows the outer time below the cap; ``"reference"``
    :math:`\sigma_e = \texttt{rho\_sigma\_scale}\cdot\sigma_n` (the UD2M reference, blind to t: measured to make
    more sampler steps worse, docs/method.md §7.1 revision):

    .. math::
        \rho_0 = \frac{\sigma_e s}{\sqrt{\sigma_e^2 + s^2}},\quad \rho = \rho_0 e^{\log\rho_\text{scale}},\quad
        z = \arg\min_z \frac{\|y-Az\|^2}{2\lambda\sigma_n^2} + \frac{\|z-x_t/a\|^2}{2s^2} + \frac{\|z-x\|^2}{2\rho^2}

    .. math::
        \sigma_z = \operatorname{clamp}(\rho_0 e^{\log\sigma_{z,\text{scale}}}, s_1, s_{999}),\quad
        t_z = t(\sigma_z),\quad x \leftarrow G_{\theta+\Delta\theta}(a_{t_z} z + b_{t_z}\xi, t_z)

    Positivity by parametrisation: :math:`\lambda = e^{\log\lambda}` and the two scales are exponentials of
    parameters initialised at 0 (shape ``(1,)`` tied, ``(K,)`` untied). LoRA starts with :math:`B = 0`, so at
    initialisation the adapted prior equals the frozen prior exactly.

    Closed-form priors (``prior.net is None``, e.g. :class:`~ud2m.priors.gaussian.GaussianPrior`) get no LoRA; any
    tensor of the prior that requires grad (e.g. a small learnable correction registered by a subclass after the
    base is frozen, as the tests do) is trained like LoRA (weight decay 0.01). If ``prior.net`` already carries a
    peft adapter named ``"default"`` (e.g. loaded from an export), it is reused; its rank, alpha and targets must
    match.

    Latent priors [ours, heuristic]: x_t is a latent, the estimate x stays in pixel space, and the prox is split
    (§7.2 (i)-(v)): pixel prox with :math:`\rho_p = \sigma_e e^{\log\rho_\text{scale}}`, encode, Gaussian fusion
    with x_t at weight :math:`1/\rho_0^2`, re-noise and predict in latent space, decode.

    Args:
        prior: the frozen prior; LoRA is attached to ``prior.net`` in place.
        num_blocks: K.
        tied_scalars: one set of log-scalars shared by all blocks (``(1,)``) or one per block (``(K,)``).
        time_knots: 1 (default): the log-scalars are constants; M > 1: each is a piecewise-linear function of the
            outer time t on M equally spaced knots over [0, 1000] (shapes ``(1, M)`` / ``(K, M)``, zero at init), so
            the data weight λ, the anchor scale and the re-noise scale may differ between the early (large-t) and the
            late (small-t) steps of the chain: the block "sees" t_n through them [ours, §7.1 revision].
        noise_rule: ``"prior"`` (:math:`\sigma_e` = ``sigma_cap``) or ``"reference"`` (:math:`\sigma_e` =
            ``rho_sigma_scale`` · σ_n), §7.1 revision.
        sigma_cap: :math:`\sigma_e` of the ``"prior"`` rule, on the prior's data scale ([-1, 1] images: 1.0).
        renoise_cap: a separate cap for the re-noise level (:math:`\sigma_z` uses :math:`\rho_0` computed with
            this :math:`\sigma_e`); None: the same as ρ's.
        rho_sigma_scale: :math:`\sigma_e/\sigma_n` of the ``"reference"`` rule (1; 13 is the reference's
            inpainting preset).
        renoise: ``"continuous"`` (learnable :math:`\sigma_z`, float :math:`t_z`), ``"nearest"`` (reference
            parity: :math:`t_z = \arg\min_t |s_t - \rho_0|` over integers 1..999; no ``log_sigma_z_scale``) or
            ``"residual"`` [ours]: as ``"continuous"``, but the data step's own uncertainty counts toward the
            re-noise level (:meth:`residual_renoise`): only the missing part of :math:`b_{t_z}` is fresh noise.
        s0: prior std of the Wiener warm start.
        lora_rank, lora_alpha, lora_targets: the peft ``LoraConfig`` (r = 5, α = 1.5 [ref]).
        train_out_layer: also train ``conv_norm_out``/``conv_out`` fully (cast to fp32), as the reference did.
        gradient_checkpointing: recompute each block in backward (``use_reentrant=False``); the re-noise ξ of
            every block is drawn before the checkpointed function, so recomputation is deterministic.
        detach_encoder: latent priors only: no gradient through the VAE encoder (saves memory). ``log_lambda`` and
            ``log_rho_scale`` then have no gradient path and are frozen.
        initializer: learned warm start ``f(y, op, x_t, t) -> x0`` (pixel space) replacing the Wiener start.

    ``prior.nfe`` counts every network call, so with gradient checkpointing the backward recomputation adds K.
    """

    def __init__(
        self,
        prior: Prior,
        *,
        num_blocks: int = 3,
        tied_scalars: bool = True,
        time_knots: int = 1,
        noise_rule: str = "prior",
        sigma_cap: float = 1.0,
        renoise_cap: float | None = None,
        rho_sigma_scale: float = 1.0,
        renoise: str = "continuous",
        s0: float = 0.5,
        lora_rank: int = 5,
        lora_alpha: float = 1.5,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        train_out_layer: bool = False,
        gradient_checkpointing: bool = False,
        detach_encoder: bool = False,
        initializer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected K >= 1, got {num_blocks}")
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise: expected one of {RENOISE_MODES}, got {renoise!r}")
        if int(time_knots) != time_knots or time_knots < 1:
            raise ValueError(f"time_knots: expected an integer >= 1, got {time_knots}")
        if noise_rule not in NOISE_RULES:
            raise ValueError(f"noise_rule: expected one of {NOISE_RULES}, got {noise_rule!r}")
        if not rho_sigma_scale > 0 or not s0 > 0 or not sigma_cap > 0 or not (renoise_cap is None or renoise_cap > 0):
            raise ValueError(
                f"rho_sigma_scale, sigma_cap, renoise_cap and s0 must be positive, got {rho_sigma_scale}, "
                f"{sigma_cap}, {renoise_cap} and {s0}"
            )
        if noise_rule == "prior" and rho_sigma_scale != 1.0:
            raise ValueError(
                f"rho_sigma_scale={rho_sigma_scale} only applies to noise_rule='reference'; with the default "
                f"noise_rule='prior' set sigma_cap (the data-scale σ_e, default 1.0) instead"
            )
        self.prior = prior
        self.num_blocks = num_blocks
        self.tied_scalars = tied_scalars
        self.time_knots = int(time_knots)
        self.noise_rule = noise_rule
        self.sigma_cap = float(sigma_cap)
        self.renoise_cap = None if renoise_cap is None else float(renoise_cap)
        self.rho_sigma_scale = float(rho_sigma_scale)
        self.renoise = renoise
        self.s0 = float(s0)
        self.train_out_layer = train_out_layer
        self.gradient_checkpointing = gradient_checkpointing
        self.detach_encoder = detach_encoder
        self.initializer = initializer
        self.latent = prior.is_latent
        self._init_scalars()
        self._init_network(lora_rank, lora_alpha, tuple(lora_targets))

    # ------------------------------------------------------------------ construction
    def _init_scalars(self) -> None:
        """Log-parametrised scalars at 0 (λ = ρ_scale = σ_z_scale = 1), §7.3; one row per block (untied) and one
        column per time knot (``time_knots > 1``)."""
        rows = 1 if self.tied_scalars else self.num_blocks
        shape = (rows,) if self.time_knots == 1 else (rows, self.time_knots)
        device = self.prior.device  # beside the prior: time-knot rows are indexed by t, which lives there
        self.log_lambda = nn.Parameter(torch.zeros(shape, device=device))
        self.log_rho_scale = nn.Parameter(torch.zeros(shape, device=device))
        if self.renoise != "nearest":
            self.log_sigma_z_scale = nn.Parameter(torch.zeros(shape, device=device))
        else:
            self.register_parameter("log_sigma_z_scale", None)  # "nearest": no parameter that could never learn
        if self.latent and self.detach_encoder:
            # the split prox (§7.2 (i)) is their only path to the output, and it is cut at the encoder
            self.log_lambda.requires_grad_(False)
            self.log_rho_scale.requires_grad_(False)

    def _init_network(self, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
        """Attach (or reuse) the LoRA adapter and optionally unfreeze the output layer."""
        net = self.prior.net
        if net is None:
            if self.train_out_layer:
                raise ValueError(f"train_out_layer=True needs a network; {type(self.prior).__name__} has none")
            return
        if "default" in getattr(net, "peft_config", {}):
            _check_lora_config(lora_config(net), rank, alpha, targets)
            for name, p in net.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            attach_lora(net, rank=rank, alpha=alpha, target_modules=targets)
        if self.train_out_layer:
            for module in out_layer_modules(net).values():
                module.float().requires_grad_(True)  # trainables are fp32 (§1.4)
                if not hasattr(module, "_ud2m_input_cast"):  # once per module, also when the network is reused
                    module._ud2m_input_cast = module.register_forward_pre_hook(_cast_input_to_weight)

    # ------------------------------------------------------------------ parameters
    def generator_parameters(self) -> list[dict]:
        """AdamW parameter groups of the generator (§7.7), each tensor once (deduplicated by identity).

        Returns:
            ``[{"name": "lora", params, weight_decay: 0.01}, {"name": "initializer", params, weight_decay: 0.01,
            "lr_scale": 0.1}, {"name": "scalars", params, weight_decay: 0.0}]`` without empty groups. ``lora`` holds
            LoRA, the out layer and any other trainable prior tensor; ``lr_scale`` is for the caller to apply.
        """
        scalars = [p for p in self._scalar_params() if p.requires_grad]
        init = trainable_parameters(self.initializer) if self.initializer is not None else []
        taken = {id(p) for p in scalars + init}
        rest = [p for p in trainable_parameters(self) if id(p) not in taken]
        groups = [
            {"name": "lora", "params": rest, "weight_decay": LORA_WEIGHT_DECAY},
            {
                "name": "initializer",
                "params": init,
                "weight_decay": LORA_WEIGHT_DECAY,
                "lr_scale": INITIALIZER_LR_SCALE,
            },
            {"name": "scalars", "params": scalars, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def _scalar_params(self) -> list[nn.Parameter]:
        return [p for p in (self.log_lambda, self.log_rho_scale, self.log_sigma_z_scale) if p is not None]

    def scalars(self) -> dict[str, torch.Tensor]:
        """Current (detached) values of λ, ρ_scale and σ_z_scale (the last absent with ``renoise="nearest"``)."""
        out = {"lambda": self.log_lambda.detach().exp(), "rho_scale": self.log_rho_scale.detach().exp()}
        if self.log_sigma_z_scale is not None:
            out["sigma_z_scale"] = self.log_sigma_z_scale.detach().exp()
        return out

    def _scalar(self, p: torch.Tensor, k: int, t: torch.Tensor) -> torch.Tensor:
        """Block k's value of a log-scalar at outer times ``t`` ``(B,)``: a 0-d tensor for constant scalars (tied
        ``(1,)`` or untied ``(K,)``), else ``(B,)`` by linear interpolation between the time knots."""
        row = p[k] if p.shape[0] > 1 else p[0]
        if self.time_knots == 1:
            return row
        u = (t.to(row.dtype) / T_KNOTS_SPAN).clamp(0, 1) * (self.time_knots - 1)  # (B,) knot coordinate
        i = u.floor().long().clamp(max=self.time_knots - 2)
        w = u - i
        return (1 - w) * row[i] + w * row[i + 1]

    # ------------------------------------------------------------------ the model
    def forward(
        self,
        x_t: torch.Tensor,
        t: float | torch.Tensor,
        y: torch.Tensor,
        op: Operator,
        sigma_y: float | torch.Tensor,
        *,
        cond: Any = None,
        generator: Generator = None,
        callback: Callable[[dict], None] | None = None,
        return_prior: bool = False,
        residual_renoise: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\hat x_0 = \text{block}_{K-1} \circ \dots \circ \text{block}_0(x^{(0)})` (§7.2): K NFEs.

        Args:
            x_t: ``(B, ...)`` noisy state :math:`a_t x_0 + b_t\varepsilon` in the prior's space (latent for latent
                priors).
            t: native time, a float or ``(B,)`` tensor (per-sample times allowed).
            y: measurements ``(B, ...)`` on the internal scale.
            op: forward operator (any per-sample parameters), passed at call time.
            sigma_y: noise std on the [0, 1] scale, float or ``(B,)``.
            cond: prior conditioning (text embeddings for latent priors).
            generator: a ``torch.Generator`` or a list of B generators for the re-noise ξ.
            callback: called after each block with ``dict(k, x, x_prior, z, t_z, sigma_z)`` (``x`` pixel estimate,
                ``x_prior`` the prior-space prediction, ``z`` the data-step output).
            return_prior: also return the last block's prior-space prediction (the latent of latent priors, which
                the N-step sampler's DDIM step needs; the pixel estimate itself for pixel priors).
            residual_renoise: step 6 of every block for this call: True adds only the missing noise
                (:meth:`residual_renoise`), False the full :math:`b_{t_z}\xi`; None (default) follows ``renoise``.
                A sampling-time setting [ours, docs/method.md §8 revision]: it leaves the re-noise time
                :math:`t_z` and the trained weights as they are.

        Returns:
            :math:`\hat x_0` in pixel space, unclamped, ``(B, C, H, W)``; with ``return_prior``, the pair
            ``(x̂0, x̂0 in the prior's space)``.
        """
        x_t, t, a, s, sigma_n = self._setup(x_t, t, y, sigma_y)
        residual = self.renoise == "residual" if residual_renoise is None else bool(residual_renoise)
        x = self._warm_start(x_t, t, a, s, y, op, sigma_n)  # x^(0), pixel space
        x_prior = x
        for k in range(self.num_blocks):
            xi = randn(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)  # 6. ξ, outside the checkpoint
            x, x_prior, z, t_z, sigma_z = self._run_block(k, x_t, t, a, s, y, op, sigma_n, x, xi, cond, residual)
            if callback is not None:
                callback(dict(k=k, x=x, x_prior=x_prior, z=z, t_z=t_z, sigma_z=sigma_z))
        return (x, x_prior) if return_prior else x

    def warm_start(
        self, x_t: torch.Tensor, t: float | torch.Tensor, y: torch.Tensor, op: Operator, sigma_y: float | torch.Tensor
    ) -> torch.Tensor:
        r"""The single warm start of training and sampling (§7.2), pixel space.

        Wiener estimate under :math:`N(0, s_0^2 I)` given y and x_t (:func:`~ud2m.solvers.steps.ud2m_warm_start`),
        or ``initializer(y, op, x_t, t)`` when one is set. Latent priors [ours]: the latent Wiener shrinkage
        :math:`\tau_0^2 x_t a/b^2` is decoded, then one pixel prox with :math:`\gamma = \tau_0^2/\sigma_n^2`.
        """
        x_t, t, a, s, sigma_n = self._setup(x_t, t, y, sigma_y)
        return self._warm_start(x_t, t, a, s, y, op, sigma_n)

    def _setup(self, x_t, t, y, sigma_y) -> tuple[torch.Tensor, ...]:
        """Per-sample ``(x_t, t, a_t, s_t, σ_n)``, scalars ``(B,)`` in x_t's float dtype (fp32 or fp64)."""
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t = x_t.to(dtype)
        B, device = x_t.shape[0], x_t.device
        t = batch_scalar(t, B, device=device, dtype=dtype, name="t")  # (B,)
        a, _ = self.prior.scales(t)
        s = self.prior.sigma(t)
        sigma_n = sigma_internal(batch_scalar(sigma_y, B, device=device, dtype=dtype, name="sigma_y"))
        if y.shape[0] != B:
            raise ValueError(f"y: expected a batch of {B} measurements (like x_t), got shape {tuple(y.shape)}")
        return x_t, t, a.to(device), s.to(device), sigma_n

    def _warm_start(self, x_t, t, a, s, y, op, sigma_n) -> torch.Tensor:
        if self.initializer is not None:
            return self.initializer(y, op, x_t, t)
        if not self.latent:
            with _no_autocast(x_t):
                return ud2m_warm_start(op, y, x_t, a=a, s=s, sigma_n=sigma_n, s0=self.s0)
        m0, tau2 = wiener_shrinkage(x_t, a=a, s=s, s0=self.s0)  # the latent Wiener mean, decoded
        u = self.prior.decode(m0)
        with _no_autocast(u):
            return op.prox_l2(u.float(), y, warm_start_gamma(tau2, sigma_n))

    def _run_block(self, k, x_t, t, a, s, y, op, sigma_n, x, xi, cond, residual) -> tuple[torch.Tensor, ...]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._block, k, x_t, t, a, s, y, op, sigma_n, x, xi, cond, residual, use_reentrant=False)
        return self._block(k, x_t, t, a, s, y, op, sigma_n, x, xi, cond, residual)

    def _block(self, k, x_t, t, a, s, y, op, sigma_n, x, xi, cond, residual: bool) -> tuple[torch.Tensor, ...]:
        """Block k of §7.1 (step 6 as :meth:`residual_renoise` when ``residual``); returns ``(x_pixel,
        x_prior_space, z, t_z, sigma_z)``."""
        rho0 = rho_zero(s, self.sigma_e(sigma_n))  # 1. (B,)
        rho_scale = self._scalar(self.log_rho_scale, k, t).exp()
        lam = self._scalar(self.log_lambda, k, t).exp()
        if self.latent:
            z = self._latent_data_step(x_t, a, s, y, op, sigma_n, x, rho0=rho0, rho_scale=rho_scale, lam=lam)
        else:  # 2.-4. combined quadratic, one prox
            with _no_autocast(x):
                z = ud2m_data_step(op, y, x_t, x, a=a, s=s, rho=rho0 * rho_scale, lam=lam, sigma_n=sigma_n)
        rho0_z = rho0 if self.renoise_cap is None else rho_zero(s, torch.full_like(s, self.renoise_cap))
        sigma_z, t_z = self._renoise_level(k, rho0_z, t)  # 5.
        if residual:  # 6'. [ours]: a_{t_z} z + √(b² − a² τ²) ξ
            rho = rho0 if self.latent else rho0 * rho_scale  # the anchor std of this block's data step
            z_in = self.residual_renoise(z, t_z, xi, s=s, rho=rho)
        else:
            z_in = self.prior.add_noise(z, t_z, xi)  # 6. a_{t_z} z + b_{t_z} ξ
        x_prior = self.prior.predict_x0(z_in, t_z, cond)  # 7. 1 NFE, LoRA-adapted prior
        x_pixel = self.prior.decode(x_prior) if self.latent else x_prior
        return x_pixel, x_prior, z, t_z, sigma_z

    def _latent_data_step(self, x_t, a, s, y, op, sigma_n, x, *, rho0, rho_scale, lam) -> torch.Tensor:
        """Split prox of latent priors (§7.2 (i)-(iii)) [ours, heuristic]; returns the fused latent ζ."""
        rho_p = self.sigma_e(sigma_n) * rho_scale
        with _no_autocast(x):
            z_pix = op.prox_l2(x, y, rho_p**2 / (lam * sigma_n**2))  # (i) pixel prox around the decoded estimate
        zeta = self.prior.encode(z_pix.detach() if self.detach_encoder else z_pix)  # (ii) VAE mean
        return latent_fusion(zeta, x_t, a=a, s=s, rho0=rho0)  # (iii) Gaussian fusion with x_t in latent space

    def residual_renoise(
        self, z: torch.Tensor, t_z: torch.Tensor, xi: torch.Tensor, *, s: torch.Tensor, rho: torch.Tensor
    ) -> torch.Tensor:
        r"""The prior's input under ``renoise="residual"`` [ours]: :math:`a_{t_z} z + c\,\xi` with fresh-noise std
        :math:`c = \sqrt{\max(b_{t_z}^2 - a_{t_z}^2\tau^2, 0)}`, :math:`1/\tau^2 = 1/s_t^2 + 1/\rho^2` (``(B,)``).

        Under the block's own model (x_t/a and the estimate x are Gaussian observations of x0 with stds s_t and ρ)
        the data step's output z already differs from x0 by noise of std ≤ τ (τ exactly on the components y does
        not observe). Re-noising it with a full :math:`b_{t_z}\xi` (§7.1 step 6) hands the prior an input noisier
        than its time says: at small t, where :math:`t_z \approx t`, z ≈ x_t/a carries x_t's noise and the fresh draw
        doubles its variance (digits ×4 SR, untrained K = 1 block at t = 15: 38.4 dB, against 44.1 for the frozen
        prior on x_t). Adding only the missing variance keeps :math:`a_{t_z}z + c\xi` at noise level
        :math:`b_{t_z}` (41.0 dB there). Tested against the closed form; measured in docs/method.md §7.1.
        """
        a_z, b_z = (v.to(s) for v in self.prior.scales(t_z))
        tau2 = 1.0 / (1.0 / s**2 + 1.0 / rho**2)
        c = (b_z**2 - a_z**2 * tau2).clamp_min(1e-12).sqrt()
        return append_dims(a_z.to(z), z.ndim) * z + append_dims(c.to(z), z.ndim) * xi

    def sigma_e(self, sigma_n: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma_e` of the noise rule, ``(B,)``: ``sigma_cap`` (``"prior"``) or ``rho_sigma_scale`` · σ_n
        (``"reference"``)."""
        if self.noise_rule == "prior":
            return torch.full_like(sigma_n, self.sigma_cap)
        return self.rho_sigma_scale * sigma_n

    def _renoise_level(self, k: int, rho0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(σ_z, t_z)``: continuous :math:`t(\mathrm{clamp}(\rho_0 e^{\log\sigma_{z,scale}}, s_1, s_{999}))`, or
        the reference's nearest integer time."""
        t_lo, t_hi = self._time_range()
        if self.renoise == "nearest":
            grid = torch.arange(t_lo, t_hi + 1, device=rho0.device, dtype=rho0.dtype)  # (T,)
            s_grid = self.prior.sigma(grid).to(rho0.device)
            t_z = grid[(s_grid[None, :] - rho0.detach()[:, None]).abs().argmin(dim=1)]  # (B,)
            return self.prior.sigma(t_z).to(rho0.device), t_z
        lo, hi = (self.prior.sigma(torch.tensor(v, dtype=rho0.dtype)).to(rho0.device) for v in (t_lo, t_hi))
        sigma_z = torch.clamp(rho0 * self._scalar(self.log_sigma_z_scale, k, t).exp(), lo, hi)
        return sigma_z, self.prior.t_of_sigma(sigma_z).to(rho0.device)

    def _time_range(self) -> tuple[int, int]:
        """Integer re-noise range [1, 999] within the schedule's native range."""
        schedule = self.prior.schedule
        return max(1, int(schedule.t_min)), min(999, int(schedule.t_max))


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Proxes run in fp32 with autocast disabled (§1.4); the prior's network calls stay under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a float32 output layer inside a half-precision network: its input comes in the network's
    dtype (bf16 on CUDA, §1.4), so it is cast to the layer's; the prior casts the float32 output back."""
    param = next(module.parameters(), None)  # a norm without affine weights has none: nothing to match
    if param is None:
        return args
    return tuple(a.to(param.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def out_layer_modules(net: nn.Module) -> dict[str, nn.Module]:
    """The output layers trained with ``train_out_layer=True`` (``conv_norm_out``, ``conv_out``), by name.

    Raises:
        ValueError: if the network has none of them.
    """
    modules = {name: getattr(net, name) for name in OUT_LAYER_NAMES if isinstance(getattr(net, name, None), nn.Module)}
    if not modules:
        raise ValueError(f"train_out_layer: {type(net).__name__} has none of the output layers {OUT_LAYER_NAMES}")
    return modules


def _check_lora_config(config, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """An adapter already on the network must be the one this model would attach."""
    have = (config.r, float(config.lora_alpha), sorted(config.target_modules))
    want = (rank, float(alpha), sorted(targets))
    if have != want:
        raise ValueError(f"existing LoRA adapter 'default' has (rank, alpha, targets) = {have}, expected {want}")


# ---------------------------------------------------------------------------------------------- N-step sampler (§8)
def sample_ud2m(
    model: UnfoldedSampler,
    op: Operator,
    y: torch.Tensor,
    sigma_y: float | torch.Tensor,
    *,
    x_shape: tuple[int, ...],
    num_steps: int = 3,
    eta: float = 1.0,
    t_start: int | None = None,
    final_gamma: float | None = None,
    residual_renoise: bool | None = None,
    cond: Any = None,
    generator: Generator = None,
    callback: Callable[[dict], None] | None = None,
    clip: bool = True,
) -> torch.Tensor:
    r"""N-step UD2M sampler (docs/method.md §8): K blocks per grid point, exact DDIM steps between them.

    On the quadratic grid :math:`t_1 = 999 > \dots > t_N`, from :math:`x \sim N(0, I)`:
    :math:`\hat x_0 = G_K(x, t_n, y)`, then (n < N) :math:`\hat\varepsilon = (x - a_n\hat x_0)/b_n`,
    :math:`\varsigma = \eta (b_{n+1}/b_n)\sqrt{1 - a_n^2/a_{n+1}^2}`,
    :math:`x \leftarrow a_{n+1}\hat x_0 + \sqrt{b_{n+1}^2 - \varsigma^2}\,\hat\varepsilon + \varsigma\xi`.
    With η = 1 and blocks that sample :math:`p(x_0 \mid x_t, y)` exactly, the output is an exact posterior sample.
    NFE = N·K.

    Args:
        model: an :class:`UnfoldedSampler` (or any module with ``prior`` and the same call signature, including
            ``return_prior``).
        op: forward operator.
        y: measurements ``(B, ...)``; its float dtype (fp32, or fp64 for tests) sets the state's dtype.
        sigma_y: noise std on the [0, 1] scale.
        x_shape: pixel shape ``(B, C, H, W)`` of the result (the state has ``prior.latent_shape(x_shape)``).
        num_steps: N.
        eta: DDIM stochasticity (1 = exact DDPM posterior steps [ours]; the reference's wrong variance ≈ 0.1).
        t_start: first grid time :math:`t_1` (None: 999, the paper's start from pure noise). Below 999 the grid is
            :func:`~ud2m.schedules.quadratic_grid` up to ``t_start`` and the chain starts from the Wiener estimate
            :math:`x_w` (:func:`~ud2m.solvers.steps.wiener_init`) re-noised,
            :math:`x_{t_1} = a_{t_1} E(x_w) + b_{t_1}\xi` [ours, docs/method.md §8 revision]: a later start tuned on
            training images, as LATINO's t_max is (the photos problems' held-out crops gain 0.7 to 1.6 dB; on
            digits it is flat). The chain is then no longer the exact sampler of the Gaussian-limit argument above.
        final_gamma: None (the paper's output: the last block's :math:`\hat x_0`) or γ ≥ 0: close with one data step,
            :math:`x = \arg\min_x \tfrac\gamma2\|Ax-y\|^2 + \tfrac12\|x-\hat x_0\|^2` (LATINO's data step and γ
            convention, §4.2 line 8) [ours, docs/method.md §8 revision]: the blocks' output is the network's, which
            need not agree with y where A observes it; no extra NFE. A γ to tune on training images like LATINO's.
        residual_renoise: None (the model's ``renoise``) or a bool for every block call of this chain
            (:meth:`UnfoldedSampler.forward`): True re-noises each block's data-step output with only the noise
            its time is missing [ours, docs/method.md §8 revision], a setting to tune on training images like
            ``t_start`` (the photos problems' held-out crops gained 0.5 to 1.4 dB at N = 4 with exports trained
            without it). It narrows the samples' spread: a setting for one restoration, not for uncertainty.
        cond: prior conditioning.
        generator: ``torch.Generator`` or list of B generators (initial state, re-noise, DDIM noise).
        callback: called per grid point with ``dict(n, t, x, x0_hat, blocks)`` (``blocks``: the K block dicts).
        clip: clamp :math:`\hat x_0` to the prior's data range (:meth:`~ud2m.priors.base.Prior.clip_data`: [-1, 1]
            for image priors, the identity for the unbounded Gaussian) before each DDIM step and at the end (§8;
            diffusers' ``clip_sample``). False keeps the chain affine on the Gaussian prior (exact-law analysis).

    Returns:
        :math:`\hat x_0` at the last grid point clipped to the prior's data range (with ``final_gamma``, its data
        step, clipped again), pixel space (unclipped with ``clip=False``).
    """
    if eta < 0:
        raise ValueError(f"eta: expected a non-negative value, got {eta}")
    check_final_gamma(final_gamma)
    if t_start is not None and not 1 <= t_start <= 999:
        raise ValueError(f"t_start: expected a time in [1, 999] (None: 999), got {t_start}")
    prior = model.prior
    op.check_measurement(y, tuple(x_shape))  # wrong y shape / NaN: a clear error before any network call
    z_shape = prior.latent_shape(tuple(x_shape))
    dtype, device = torch.promote_types(y.dtype, torch.float32), y.device
    grid = quadratic_grid(num_steps, t_max=t_start)
    renoise = {} if residual_renoise is None else {"residual_renoise": bool(residual_renoise)}  # any model: None
    x = randn(z_shape, generator, device=device, dtype=dtype)  # 1. x_{t_1} ~ N(0, I)
    if grid[0] < 999:  # 1'. the tuned later start [ours]: the Wiener estimate re-noised to t_1
        t1 = torch.full((z_shape[0],), float(grid[0]), device=device, dtype=dtype)
        x_w = wiener_init(op, y, sigma_internal(batch_scalar(sigma_y, z_shape[0], device=device, dtype=dtype)))
        x = prior.add_noise(prior.encode(x_w.to(dtype)), t1, x)
    for n, t_n in enumerate(grid):
        t = torch.full((z_shape[0],), float(t_n), device=device, dtype=dtype)
        blocks: list[dict] = []
        x0_hat, x0_prior = model(
            x, t, y, op, sigma_y, cond=cond, generator=generator, callback=blocks.append, return_prior=True, **renoise
        )  # 3. K NFEs
        if callback is not None:
            callback(dict(n=n, t=t, x=x, x0_hat=x0_hat, blocks=blocks))
        if n == len(grid) - 1:  # 4.
            break
        z0_hat = x0_prior if prior.is_latent else (prior.clip_data(x0_hat) if clip else x0_hat)  # 5.
        x = _ddim(prior, x, z0_hat, t, float(grid[n + 1]), eta, generator)  # 5.-7.
    x0_hat = prior.clip_data(x0_hat) if clip else x0_hat  # 8. (latent priors: the model already decoded)
    if final_gamma is None:
        return x0_hat
    u = x0_hat.to(torch.promote_types(x0_hat.dtype, torch.float32))  # proxes in fp32 (§1.4)
    with _no_autocast(u):  # 9. the closing data step [ours]
        gamma = torch.full((u.shape[0],), float(final_gamma), device=device, dtype=u.dtype)
        x = data_consistency(op, u, y.to(u.dtype), gamma)
    return prior.clip_data(x) if clip else x


def check_final_gamma(final_gamma: float | None) -> None:
    """Refuse a closing data-step weight below 0 (``sample_ud2m``'s ``final_gamma``; None: no data step), wherever it
    is set: the sampler, the ``UD2M`` method, an export's manifest."""
    if final_gamma is not None and not final_gamma >= 0:
        raise ValueError(f"final_gamma: expected a data-step weight >= 0 (None: no final data step), got {final_gamma}")


def _ddim(prior: Prior, x, z0_hat, t, t_next: float, eta: float, generator: Generator) -> torch.Tensor:
    """One DDIM step from ``t`` to ``t_next`` with fresh ξ (§8 steps 5-7, :func:`~ud2m.solvers.steps.ddim_step`)."""
    a, b = (v.to(x.device) for v in prior.scales(t))
    a_next, b_next = (v.to(x.device) for v in prior.scales(torch.full_like(t, t_next)))
    xi = randn(x.shape, generator, device=x.device, dtype=x.dtype)  # 7. ξ ~ N(0, I)
    return ddim_step(x, z0_hat, a=a, b=b, a_next=a_next, b_next=b_next, eta=eta, xi=xi)
