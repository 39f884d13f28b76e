r"""Video flow-matching prior: Wan2.1 text-to-video with CausVid distilled weights (docs/method.md §3.2(c)).

This module owns :class:`VideoFlowPrior` (a diffusers ``WanTransformer3DModel`` + ``AutoencoderKLWan`` + UMT5 text
encoder seen through the prior contract of §3.1), the flow-shift map used to build schedules from step counts, and
the loader of CausVid-style checkpoints (Yin et al. 2025, ``tianweiy/CausVid`` ``bidirectional_checkpoint2``) that
are stored in the *original* Wan key layout (Wan Team 2025, ``Wan-Video/Wan2.1`` ``wan/modules/model.py``) and are
converted here to the diffusers layout.

Flow matching (§1.2): :math:`z_t = (1-\sigma_\text{fm}) z_0 + \sigma_\text{fm}\varepsilon` with native time
:math:`t = 1000\,\sigma_\text{fm}`; the transformer takes ``t`` and predicts :math:`v \approx \varepsilon - z_0`, so
:math:`\hat z_0 = z_t - \sigma_\text{fm}\hat v` (one transformer call = 1 NFE). Videos are ``(B, C, T, H, W)`` on
[-1, 1] (diffusers layout, §1.3).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from ud2m.priors.base import FlowMatchingSchedule, Prior, TextCondition

logger = logging.getLogger(__name__)

WAN_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")


# ---------------------------------------------------------------------------------------------------- schedules
def flow_shift(u: float | torch.Tensor, shift: float) -> torch.Tensor:
    r"""Shifted flow-matching noise level (Esser et al. 2024, SD3; Wan/CausVid ``shift``; §3.2(c)).

    .. math:: \sigma' = \frac{\text{shift}\cdot u}{1 + (\text{shift} - 1)\,u}

    >>> flow_shift(torch.tensor([0.0, 0.5, 1.0]), 8.0)
    tensor([0.0000, 0.8889, 1.0000])
    """
    u = torch.as_tensor(u, dtype=u.dtype if torch.is_tensor(u) and u.is_floating_point() else torch.float32)
    return shift * u / (1 + (shift - 1) * u)


# ---------------------------------------------------------------------------------------------------- key conversion
# Original Wan module path -> diffusers module path. Parameters keep their last name (weight/bias) except the
# modulation tables, which are parameters themselves. Order matters only for prefixes of one another (none here).
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",  # image-to-video variants only
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_I2V_ATTENTION = {"k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k"}
_BLOCK = {
    **{f"self_attn.{k}": f"attn1.{v}" for k, v in _ATTENTION.items()},
    **{f"cross_attn.{k}": f"attn2.{v}" for k, v in {**_ATTENTION, **_I2V_ATTENTION}.items()},
    # the original norm3 is the (affine) cross-attention norm, diffusers calls it norm2; the original norm2 (pre-FFN)
    # has no parameters
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
# wrappers around the original WanModel: CausVid's WanDiffusionWrapper (model.), ComfyUI (model.diffusion_model.),
# torch.compile (_orig_mod.), DDP (module.)
_WRAPPER_PREFIXES = ("model.diffusion_model.", "model.", "_orig_mod.", "module.")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """``key`` with its module path renamed through ``table``, or None when no entry matches."""
    for old, new in table.items():
        if key == old:
            return new
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def convert_wan_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout Wan transformer state dict (Wan2.1 / CausVid) to the diffusers layout.

    Wrapper prefixes (``model.``, ``model.diffusion_model.``, ``_orig_mod.``, ``module.``) are stripped first. The
    tensors themselves are unchanged (the original modulation tables ``(1, 6, D)``/``(1, 2, D)`` already have the
    shape of diffusers' ``scale_shift_table``).

    Args:
        state_dict: original-layout keys, e.g. ``blocks.0.self_attn.q.weight``, ``head.modulation``.

    Returns:
        A new dict with diffusers keys, e.g. ``blocks.0.attn1.to_q.weight``, ``scale_shift_table``.

    Raises:
        ValueError: listing (a few of) the keys that are not part of the original Wan layout.
    """
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        bare = _strip_wrappers(key)
        block = _BLOCK_KEY.fullmatch(bare)
        new = _rename(block.group(2), _BLOCK) if block else _rename(bare, _TOP_LEVEL)
        if new is None:
            unknown.append(key)
            continue
        converted[f"blocks.{block.group(1)}.{new}" if block else new] = tensor
    if unknown:
        raise ValueError(
            f"convert_wan_original_to_diffusers: {len(unknown)} key(s) are not in the original Wan layout, e.g. "
            f"{unknown[:5]}"
        )
    return converted


def _read_checkpoint(path: Path, key: str) -> Mapping[str, torch.Tensor]:
    """The state dict stored in ``path`` (``.safetensors``, or a ``torch.save`` file holding tensors only)."""
    if not path.is_file():
        raise FileNotFoundError(f"transformer_weights: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as err:  # pickle errors carry no path
        raise ValueError(f"transformer_weights: cannot read {path} as a tensors-only torch checkpoint: {err}") from err
    if isinstance(ckpt, Mapping) and key in ckpt:
        return ckpt[key]
    if isinstance(ckpt, Mapping) and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    found = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f"transformer_weights: expected a state dict under key {key!r} in {path}, found {found}")


def load_original_wan_weights(
    transformer: WanTransformer3DModel, path: str | os.PathLike, *, key: str = "generator"
) -> None:
    """Load original-layout Wan weights (e.g. CausVid ``bidirectional_checkpoint2/model.pt``) into ``transformer``.

    Args:
        transformer: a diffusers transformer with the checkpoint's architecture (weights are overwritten in place).
        path: ``torch.save`` file (``{key: state_dict}`` or a bare state dict) or ``.safetensors`` file.
        key: entry of the checkpoint dict holding the state dict (``"generator"`` for CausVid).

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if keys are unknown, missing or unexpected (a few are listed), or shapes differ.
    """
    path = Path(path)
    state_dict = convert_wan_original_to_diffusers(_read_checkpoint(path, key))
    expected = transformer.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"transformer_weights {path}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (after conversion to the diffusers layout)"
        )
    wrong = [k for k, v in state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"transformer_weights {path}: {len(wrong)} tensor(s) with the wrong shape, e.g. {k}: expected "
            f"{tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        )
    transformer.load_state_dict(state_dict, strict=True)
    logger.info("loaded %d original-layout Wan tensors from %s", len(state_dict), path)


# ---------------------------------------------------------------------------------------------------- model folders
def _check_model_folder(path: Path, components: tuple[str, ...]) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` and the first missing file of a diffusers Wan folder."""
    for name in components:
        folder = path / name
        if name == "tokenizer":
            if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                raise FileNotFoundError(f"Wan model folder {path}: missing {folder}/ with one of {_TOKENIZER_FILES}")
            continue
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"Wan model folder {path}: missing file {folder / 'config.json'}")
        if not any(
            f.name.startswith(_WEIGHT_PREFIXES) and f.suffix in (".safetensors", ".bin") for f in folder.iterdir()
        ):
            raise FileNotFoundError(f"Wan model folder {path}: no weight file (*.safetensors / *.bin) in {folder}")


def _resolve_source(path_or_hub_id: str | os.PathLike, components: tuple[str, ...]) -> str:
    """A checked local folder, or a hub id (``owner/name``) passed through to ``from_pretrained``."""
    source = str(path_or_hub_id)
    path = Path(source).expanduser()
    if path.is_dir():
        _check_model_folder(path, components)
        return str(path)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(f"Wan model folder {source}: not a directory (and not a hub id owner/name)")
    return source


# ---------------------------------------------------------------------------------------------------- the prior
class VideoFlowPrior(Prior):
    r"""Wan2.1 flow-matching video prior (docs/method.md §3.2(c)); optionally CausVid one-step weights.

    * ``encode``: :math:`z_0 = (\mu_\phi(x) - m)/s` per latent channel (posterior mean, ``latents_mean``/``std``
      from the VAE config); ``decode`` inverts it.
    * :math:`z_t = (1-\sigma_\text{fm}) z_0 + \sigma_\text{fm}\varepsilon`, :math:`t = 1000\sigma_\text{fm}` (no
      snapping to a discrete grid **[ours]**); :math:`\hat z_0 = z_t - \sigma_\text{fm}\hat v(z_t, t)`.
    * shapes: video ``(B, 3, T, H, W)`` with ``T = f_t k + 1`` and ``H, W`` multiples of ``f_s p`` (16 for Wan2.1:
      VAE factors 4 and 8, patch 2); latent ``(B, 16, (T-1)/f_t + 1, H/f_s, W/f_s)``.

    Args:
        transformer: ``WanTransformer3DModel`` (becomes ``self.net``).
        vae: ``AutoencoderKLWan``.
        text_encoder: ``UMT5EncoderModel`` or None (then pass ``prompt_embeds`` to :meth:`encode_prompt`).
        tokenizer: tokenizer of ``text_encoder`` or None.
        shift: flow shift, used only by :meth:`timesteps` (8 for CausVid).
        max_sequence_length: text tokens (512 for Wan2.1).
        num_train_timesteps: :math:`t = \text{num\_train\_timesteps}\cdot\sigma_\text{fm}`.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        *,
        shift: float = 8.0,
        max_sequence_length: int = 512,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__(
            transformer,
            schedule=FlowMatchingSchedule(num_train_timesteps),
            prediction_type="flow",
            latent_channels=transformer.config.in_channels,
        )
        if vae.config.z_dim != transformer.config.in_channels:
            raise ValueError(f"vae.z_dim ({vae.config.z_dim}) != transformer.in_channels ({self.latent_channels})")
        if tokenizer is not None and len(tokenizer) <= 2:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens: it silently degraded (offline hub?)")
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.shift = shift
        self.max_sequence_length = max_sequence_length
        self._latent_stats(torch.device("cpu"))  # fail early on a config without per-channel statistics
        self._freeze()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike = WAN_T2V_1_3B,
        *,
        transformer_weights: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shift: float = 8.0,
        max_sequence_length: int = 512,
        load_text_encoder: bool = True,
    ) -> VideoFlowPrior:
        """Build the prior from a diffusers Wan folder (offline) or hub id, optionally with CausVid weights.

        Args:
            path_or_hub_id: local ``WanPipeline`` folder or hub id (e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``).
            transformer_weights: local original-layout checkpoint (CausVid ``model.pt``, key ``generator``).
            dtype: transformer and text-encoder dtype (bf16 on GPU, fp32 on CPU, §1.4).
            vae_dtype: VAE dtype (fp32 by default, as Wan recommends).
            device: where to move the prior.
            shift: flow shift for :meth:`timesteps`.
            max_sequence_length: text tokens.
            load_text_encoder: False skips UMT5 (then conditioning comes as ``prompt_embeds``).

        Raises:
            FileNotFoundError: naming the folder and the missing file, or a missing ``transformer_weights`` file.
        """
        components = _COMPONENTS if load_text_encoder else ("transformer", "vae")
        source = _resolve_source(path_or_hub_id, components)
        transformer = WanTransformer3DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype)
        if transformer_weights is not None:
            load_original_wan_weights(transformer, transformer_weights)
        vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
        text_encoder = tokenizer = None
        if load_text_encoder:
            from transformers import AutoTokenizer, UMT5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
            text_encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
        prior = cls(transformer, vae, text_encoder, tokenizer, shift=shift, max_sequence_length=max_sequence_length)
        return prior.to(device) if device is not None else prior

    # ------------------------------------------------------------------ schedules
    def timesteps(self, num_steps: int) -> torch.Tensor:
        r"""Native times ``(num_steps,)`` from uniform :math:`u_k = 1 - k/N` through :func:`flow_shift` (§3.2(c))."""
        u = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
        return (self.schedule.num_train_timesteps * flow_shift(u, self.shift)).float()

    # ------------------------------------------------------------------ shapes
    @property
    def factors(self) -> tuple[int, int, int]:
        """``(f_t, f_s, p)``: VAE temporal and spatial factors (from the VAE config) and transformer patch size."""
        cfg = self.vae.config
        f_t = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        f_s = 2 ** len(cfg.temperal_downsample) * (cfg.patch_size or 1)
        _, p_h, p_w = self.net.config.patch_size
        if p_h != p_w:
            raise ValueError(
                f"transformer patch_size: expected equal spatial patches, got {self.net.config.patch_size}"
            )
        return f_t, f_s, p_h

    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Check a video shape ``(B, C, T, H, W)``: ``T = f_t k + 1``, ``H, W`` multiples of ``f_s p`` (§3.2(c)).

        Raises:
            ValueError: naming the expected and actual values.
        """
        f_t, f_s, p = self.factors
        x_shape = tuple(x_shape)
        if len(x_shape) != 5:
            raise ValueError(f"{type(self).__name__}: expected a video (B, C, T, H, W), got shape {x_shape}")
        _, c, t, h, w = x_shape
        if c != self.vae.config.in_channels:
            raise ValueError(f"video: expected {self.vae.config.in_channels} channels, got {c} (shape {x_shape})")
        if t < 1 or (t - 1) % f_t:
            raise ValueError(f"video: expected T = {f_t}k + 1 frames (e.g. {f_t * ((t - 1) // f_t) + 1}), got T = {t}")
        if h % (f_s * p) or w % (f_s * p):
            raise ValueError(f"video: expected H and W multiples of {f_s * p}, got H = {h}, W = {w}")

    def latent_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(B, z_dim, (T-1)/f_t + 1, H/f_s, W/f_s)`` for a video of ``x_shape``."""
        self.check_shape(x_shape)
        f_t, f_s, _ = self.factors
        b, _, t, h, w = x_shape
        return (b, self.latent_channels, (t - 1) // f_t + 1, h // f_s, w // f_s)

    def _check_latent(self, z: torch.Tensor, name: str) -> None:
        _, _, p = self.factors
        if z.ndim != 5 or z.shape[1] != self.latent_channels or z.shape[-1] % p or z.shape[-2] % p:
            raise ValueError(
                f"{name}: expected a latent video (B, {self.latent_channels}, T', h, w) with h, w multiples of {p}, "
                f"got shape {tuple(z.shape)}"
            )

    # ------------------------------------------------------------------ VAE
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`z_0 = (\mu_\phi(x) - m)/s` per channel (posterior mean, §3.2(c)); fp32 ``(B, 16, T', h, w)``.

        Args:
            x: video ``(B, 3, T, H, W)`` on [-1, 1].
        """
        self.check_shape(x.shape)
        mu = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()  # (B, z_dim, T', h, w)
        mean, std = self._latent_stats(mu.device)
        return (mu - mean) / std

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        r"""Video :math:`D_\phi(s z_0 + m)`, fp32 ``(B, 3, T, H, W)``.

        We add no clamp, but diffusers' ``AutoencoderKLWan`` clamps its output to [-1, 1] internally.
        """
        self._check_latent(z0, "z0")
        mean, std = self._latent_stats(z0.device)
        mu = z0.float() * std + mean
        return self.vae.decode(mu.to(self.vae.dtype)).sample.float()

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(latents_mean, latents_std)`` from the VAE config, fp32 ``(1, z_dim, 1, 1, 1)`` each.

        Built from the config on every call (not buffers) so that ``prior.to(torch.bfloat16)`` cannot round them.
        """
        z_dim, cfg = self.vae.config.z_dim, self.vae.config
        for name, values in (("latents_mean", cfg.latents_mean), ("latents_std", cfg.latents_std)):
            if values is None or len(values) != z_dim:
                raise ValueError(f"vae config {name}: expected {z_dim} values, got {values}")
        stats = torch.tensor([cfg.latents_mean, cfg.latents_std], dtype=torch.float32, device=device)
        return stats[0].view(1, z_dim, 1, 1, 1), stats[1].view(1, z_dim, 1, 1, 1)

    # ------------------------------------------------------------------ text
    def encode_prompt(
        self, prompts: str | list[str] | None = None, *, prompt_embeds: torch.Tensor | None = None
    ) -> TextCondition:
        """UMT5 conditioning as in diffusers' ``WanPipeline`` (padding positions set to 0), or given embeddings.

        Args:
            prompts: one prompt or a list of B prompts (None: the empty prompt).
            prompt_embeds: ``(B, L, D)`` embeddings to use directly instead (D = transformer ``text_dim``).

        Returns:
            ``TextCondition(prompt_embeds)`` in float32, ``(B, max_sequence_length, D)`` when encoded here.
        """
        if prompt_embeds is not None:
            return self._condition_from_embeds(prompt_embeds)
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("encode_prompt: this prior has no text encoder; pass prompt_embeds=(B, L, D)")
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the pipeline's own text normalisation

        prompts = [prompts or ""] if prompts is None or isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)  # (B, L)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state  # (B, L, D)
        return TextCondition(prompt_embeds=(hidden * mask[..., None].to(hidden.dtype)).float())

    def _condition_from_embeds(self, prompt_embeds: torch.Tensor) -> TextCondition:
        text_dim = self.net.config.text_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != text_dim:
            raise ValueError(f"prompt_embeds: expected (B, L, {text_dim}), got {tuple(prompt_embeds.shape)}")
        return TextCondition(prompt_embeds=prompt_embeds)

    # ------------------------------------------------------------------ the network
    def _network(self, z_in: torch.Tensor, t: torch.Tensor, cond: TextCondition | None) -> torch.Tensor:
        r"""Velocity :math:`\hat v(z_t, t)`; the transformer's time input is the native ``t = 1000\sigma_\text{fm}``."""
        self._check_latent(z_in, "z_t")
        if not isinstance(cond, TextCondition):
            raise ValueError(f"cond: expected a TextCondition from encode_prompt, got {type(cond).__name__}")
        return self.net(
            hidden_states=z_in,
            timestep=t.float(),  # as WanPipeline: fp32 timesteps whatever the network dtype
            encoder_hidden_states=cond.prompt_embeds,
            return_dict=False,
        )[0]
