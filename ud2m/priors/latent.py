"""Latent consistency priors on diffusers' SD / SDXL parts (docs/method.md §3.1, §3.2(a), precision §1.4).

Owns :class:`LatentConsistencyPrior`: a frozen ``UNet2DConditionModel`` (``self.net``) + ``AutoencoderKL`` + CLIP text
encoder(s) on the VP scaled-linear schedule, used as a one-step x0 predictor with the LCM consistency boundary
scalings of Luo et al. (2023) (``boundary="lcm"``) or the plain Tweedie conversion (``boundary="none"``, DMD2 of
Yin et al. 2024). It loads the three model families of §3.2(a) with :meth:`LatentConsistencyPrior.from_pretrained`:

1. an LCM-distilled SD UNet (``SimianLuo/LCM_Dreamshaper_v7`` layout, ``time_cond_proj_dim``: the guidance
   embedding of :func:`guidance_scale_embedding` goes in ``timestep_cond``);
2. SD1.5 + an LCM-LoRA (``latent-consistency/lcm-lora-sdv1-5`` layout), fused into the UNet (:func:`fuse_lora`);
3. an SDXL architecture with a replacement UNet state dict (DMD2 ``dmd2_sdxl_4step_unet_fp16.bin``), a VAE folder
   override (fp16-fix VAE) and two text encoders (pooled embeddings and ``time_ids`` micro-conditioning).

No classifier-free guidance anywhere: one conditional UNet pass per :meth:`predict_x0` (1 NFE).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ud2m.priors.base import Prior, TextCondition
from ud2m.priors.vp import VPSchedule

logger = logging.getLogger(__name__)

PRIOR_CONFIG_NAME = "ud2m_prior.json"  # our settings saved next to the diffusers folders
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILE = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)/(.+)")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
_TRANSFORMERS_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ---------------------------------------------------------------------------------------------------- pure functions
def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Sinusoidal embedding of the LCM guidance scale (VDM, Kingma et al. 2021; diffusers' LCM pipeline).

    .. math:: e(w) = [\sin(1000 w\,f_k), \cos(1000 w\,f_k)]_{k<d/2}, \qquad f_k = 10000^{-k/(d/2-1)}

    with :math:`w` = guidance scale − 1 (the Imagen CFG convention), zero-padded when ``embedding_dim`` is odd. The
    operations follow diffusers' order exactly: :math:`1000w` reaches ~10^4, so float32 rounding of :math:`f_k` matters.

    Args:
        w: ``(B,)`` tensor.
        embedding_dim: ``time_cond_proj_dim`` of the UNet.
        dtype: computation dtype.

    Returns:
        ``(B, embedding_dim)`` tensor.
    """
    if w.ndim != 1:
        raise ValueError(f"w: expected a (B,) tensor, got shape {tuple(w.shape)}")
    w = w * 1000.0
    half_dim = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=dtype) * -step).to(w.device)
    angles = w.to(dtype)[:, None] * freqs[None, :]  # (B, d/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def sdxl_time_ids(height: int, width: int, batch_size: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning ``[H_orig, W_orig, crop_top, crop_left, H_target, W_target] = [H, W, 0, 0, H, W]``.

    Returns:
        ``(batch_size, 6)`` tensor (docs/method.md §3.2(a)).
    """
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(batch_size, 1)


# ---------------------------------------------------------------------------------------------------- the prior
class LatentConsistencyPrior(Prior):
    r"""SD / SDXL latent prior as a one-step x0 predictor (docs/method.md §3.2(a)).

    :math:`z_t = \sqrt{\bar\alpha_t} z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon`, with :math:`z_0 = s_\text{vae}\,
    \mu_\text{enc}(x)`. :meth:`predict_x0` makes one UNet call and returns
    :math:`c_\text{skip}(t) z_t + c_\text{out}(t)\hat z_0` (``boundary="lcm"``) or :math:`\hat z_0` (``"none"``), with
    :math:`\hat z_0` from the ε / v / sample output (:func:`~ud2m.priors.base.x0_from_prediction`).

    Args:
        unet: the (distilled or LoRA-fused) ``UNet2DConditionModel``.
        vae: ``AutoencoderKL``; its ``scaling_factor`` (and ``shift_factor`` if set) define the latent.
        text_encoders: ``[CLIPTextModel]`` (SD) or ``[CLIPTextModel, CLIPTextModelWithProjection]`` (SDXL); may be
            empty when conditions are built from embeddings directly.
        tokenizers: the matching CLIP tokenizers.
        scheduler_config: the model's diffusers scheduler config (β schedule, prediction type; kept for
            :meth:`save_pretrained`).
        schedule: VP schedule override; default :meth:`VPSchedule.from_config` of ``scheduler_config``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        boundary: ``"lcm"`` (LCM / LCM-LoRA) or ``"none"`` (DMD2).
        guidance_scale: :math:`w` of the guidance embedding (UNets with ``time_cond_proj_dim`` only).
        timestep_scaling: :math:`\kappa` of the boundary scalings (10).
        sigma_data: :math:`\sigma_d` of the boundary scalings (0.5).
        vae_tiling: tile VAE encode/decode (large images; approximate at tile seams).
        vae_slicing: encode/decode one sample at a time (exact, lower peak memory).
        sdpa: use PyTorch scaled-dot-product attention in every standard attention layer.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Sequence[nn.Module] = (),
        tokenizers: Sequence[CLIPTokenizer] = (),
        *,
        scheduler_config: dict,
        schedule: VPSchedule | None = None,
        prediction_type: str = "epsilon",
        boundary: str = "lcm",
        guidance_scale: float = 8.5,
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        sdpa: bool = True,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")
        super().__init__(
            unet,
            schedule=schedule if schedule is not None else VPSchedule.from_config(scheduler_config),
            prediction_type=prediction_type,
            boundary=boundary,
            timestep_scaling=timestep_scaling,
            sigma_data=sigma_data,
            latent_channels=unet.config.in_channels,
        )
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler_config = {"_class_name": "LCMScheduler", **dict(scheduler_config)}
        self.guidance_scale = guidance_scale
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._check_components()
        _configure_vae(vae, tiling=vae_tiling, slicing=vae_slicing)
        if sdpa:
            _use_sdpa(unet)
            _use_sdpa(vae)
        self._freeze()

    # ------------------------------------------------------------------ properties
    @property
    def is_sdxl(self) -> bool:
        """True for SDXL-style UNets (``addition_embed_type="text_time"``: pooled text + ``time_ids``)."""
        return self.net.config.addition_embed_type == "text_time"

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling factor :math:`s_\\text{vae}` from the VAE config (SD 0.18215, SDXL 0.13025)."""
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """VAE latent shift (None/0 for SD and SDXL VAEs)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _check_components(self) -> None:
        """Validate tokenizer sizes and the text-encoder / UNet pairing (SDXL: added-embedding width)."""
        for i, tok in enumerate(self.tokenizers):
            check_tokenizer(tok, f"tokenizer {i}")
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(f"got {len(self.text_encoders)} text encoders but {len(self.tokenizers)} tokenizers")
        expected = 2 if self.is_sdxl else 1
        if self.text_encoders and len(self.text_encoders) != expected:
            kind = "SDXL" if self.is_sdxl else "SD"
            raise ValueError(f"{kind} UNet: expected {expected} text encoder(s), got {len(self.text_encoders)}")
        if self.is_sdxl and self.text_encoders:
            pooled_dim = self.text_encoders[1].config.projection_dim
            passed = self.net.config.addition_time_embed_dim * 6 + pooled_dim
            expected_dim = self.net.add_embedding.linear_1.in_features
            if passed != expected_dim:
                raise ValueError(f"SDXL UNet expects added embeddings of width {expected_dim}, got 6·time + {passed}")

    # ------------------------------------------------------------------ shapes
    def check_shape(self, x_shape: tuple[int, ...]) -> None:
        """Image batches ``(B, C_vae, H, W)`` with H and W multiples of the VAE factor ``f``.

        Raises:
            ValueError: naming the expected and actual values.
        """
        if len(x_shape) != 4:
            raise ValueError(f"{type(self).__name__}: expected an image batch (B, C, H, W), got shape {x_shape}")
        channels, f = self.vae.config.in_channels, self.vae_scale_factor
        if x_shape[1] != channels:
            raise ValueError(f"{type(self).__name__}: expected {channels} image channels, got shape {x_shape}")
        H, W = x_shape[-2:]
        if H % f or W % f:
            raise ValueError(
                f"{type(self).__name__}: H and W must be multiples of the VAE factor {f}, got H={H}, W={W}"
            )

    def latent_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(B, 3, H, W) -> (B, c, H/f, W/f)`` with ``f = 2**(len(vae blocks) - 1)``."""
        self.check_shape(x_shape)
        f = self.vae_scale_factor
        return (x_shape[0], self.latent_channels, x_shape[2] // f, x_shape[3] // f)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r"""Deterministic encoder :math:`z_0 = s_\text{vae}(\mu_\text{enc}(x) - \text{shift})`, fp32 out.

        Args:
            x: ``(B, 3, H, W)`` images in [-1, 1].
        """
        self.check_shape(tuple(x.shape))
        mean = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean  # (B, c, H/f, W/f)
        return (mean.float() - self.shift_factor) * self.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        r"""VAE decode of :math:`z_0/s_\text{vae} + \text{shift}`, fp32 out, not clamped.

        Args:
            z0: ``(B, c, h, w)`` latents.
        """
        z = z0.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()  # (B, 3, h·f, w·f)

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: str | list[str], *, image_size: tuple[int, int] | None = None) -> TextCondition:
        """One conditional text pass (no classifier-free guidance).

        SD: ``prompt_embeds`` = last hidden state of the CLIP encoder, ``(B, L, D)``. SDXL: concatenation of the
        penultimate hidden states of both encoders ``(B, L, D1 + D2)``, ``pooled`` = projected pooled output of the
        second, and ``time_ids`` = :func:`sdxl_time_ids` when ``image_size`` is given (else derived from the latent
        size at call time). LCM UNets also get ``timestep_cond`` = :func:`guidance_scale_embedding`.

        Args:
            prompts: a prompt or a list of B prompts.
            image_size: ``(H, W)`` for the SDXL ``time_ids``.

        Returns:
            a fp32 :class:`TextCondition` of batch B.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.text_encoders:
            raise ValueError("encode_prompt: this prior has no text encoders; build a TextCondition from embeddings")
        if self.is_sdxl:
            prompt_embeds, pooled = self._encode_sdxl(prompts)
        else:
            prompt_embeds, pooled = self._encode_tokens(0, prompts).last_hidden_state, None
        B = len(prompts)
        time_ids = sdxl_time_ids(*image_size, B) if self.is_sdxl and image_size is not None else None
        timestep_cond = self._timestep_cond(B, torch.float32)
        pooled = pooled.float() if pooled is not None else None
        return TextCondition(prompt_embeds.float(), pooled=pooled, time_ids=time_ids, timestep_cond=timestep_cond)

    def _encode_tokens(self, i: int, prompts: list[str]):
        """Run text encoder ``i`` on max-length-padded, truncated tokens of ``prompts``."""
        tokenizer, encoder = self.tokenizers[i], self.text_encoders[i]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (B, L)
        return encoder(ids.to(encoder.device), output_hidden_states=self.is_sdxl)

    def _encode_sdxl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: penultimate hidden states of both encoders, concatenated; projected pooled output of the second."""
        out_1, out_2 = self._encode_tokens(0, prompts), self._encode_tokens(1, prompts)
        prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
        return prompt_embeds, out_2.text_embeds  # pooled: (B, P)

    def _timestep_cond(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Guidance embedding of :math:`w - 1` for UNets with ``time_cond_proj_dim``, else None."""
        dim = self.net.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((batch_size,), self.guidance_scale - 1.0)
        return guidance_scale_embedding(w, dim).to(dtype)

    def drop_text_encoders(self) -> None:
        """Free the text encoders and tokenizers (conditions already built stay valid)."""
        self.text_encoders = nn.ModuleList()
        self.tokenizers = []

    # ------------------------------------------------------------------ the network call (1 NFE)
    def _network(self, z_in: torch.Tensor, t: torch.Tensor, cond: TextCondition | None) -> torch.Tensor:
        """One UNet call on ``z_in`` ``(B, c, h, w)`` (network dtype) at native time ``t`` ``(B,)``."""
        if not isinstance(cond, TextCondition):
            raise ValueError(
                f"{type(self).__name__}.predict_x0 needs a TextCondition (use encode_prompt(''); got {type(cond)})"
            )
        B, dtype = z_in.shape[0], z_in.dtype
        timestep_cond = cond.timestep_cond
        if timestep_cond is None and self.net.config.time_cond_proj_dim is not None:
            timestep_cond = self._timestep_cond(B, dtype).to(z_in.device)
        added_cond_kwargs = None
        if self.is_sdxl:
            if cond.pooled is None:
                raise ValueError("SDXL UNet: the TextCondition has no pooled embedding (use encode_prompt)")
            time_ids = cond.time_ids
            if time_ids is None:
                f = self.vae_scale_factor
                time_ids = sdxl_time_ids(z_in.shape[-2] * f, z_in.shape[-1] * f, B, dtype=dtype).to(z_in.device)
            added_cond_kwargs = {"text_embeds": cond.pooled, "time_ids": time_ids}
        return self.net(
            z_in,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        unet_weights: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        boundary: str | None = None,
        prediction_type: str | None = None,
        guidance_scale: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        variant: str | None = None,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
    ) -> LatentConsistencyPrior:
        """Load a diffusers SD / SDXL folder (local path, offline) or hub id (online) as a latent prior.

        Args:
            path_or_hub_id: pipeline folder with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
                ``scheduler/`` (SDXL also ``text_encoder_2/``, ``tokenizer_2/``), or a hub id.
            lora: LCM-LoRA folder / hub id / ``.safetensors`` file, fused into the UNet (:func:`fuse_lora`).
            lora_scale: scale of the fused LoRA.
            unet_weights: replacement UNet state dict (local file or ``owner/repo/filename``), e.g. DMD2's
                ``tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin``; only ``unet/config.json`` is then read.
            vae: VAE folder / hub id overriding ``vae/`` (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
            boundary, prediction_type, guidance_scale: override the saved settings (``ud2m_prior.json``) or the
                defaults ``"lcm"``, the scheduler's prediction type, and 8.5.
            dtype: network dtype; default fp32 on CPU, fp16 (SDXL) or bf16 (SD) on CUDA (§1.4). A VAE whose config
                says ``force_upcast`` stays fp32 under fp16.
            device: target device.
            variant: diffusers weight variant (e.g. ``"fp16"``).
            vae_tiling, vae_slicing: see the class.

        Raises:
            FileNotFoundError: naming the path and the missing file, for a local folder or file that is incomplete.
            OSError: for a hub id that cannot be fetched (e.g. offline).
        """
        src, local = resolve_source(path_or_hub_id)
        settings = _read_settings(src) if local else {}
        if local and not (Path(src) / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"{Path(src) / 'unet'}: missing config.json (model folder {src})")
        unet_config = _call(UNet2DConditionModel.load_config, src, "unet/config.json", subfolder="unet")
        if local:
            check_pipeline_folder(src, sdxl=_is_sdxl(unet_config), need_unet=unet_weights is None, need_vae=vae is None)
        dtype = dtype or default_dtype(device, sdxl=_is_sdxl(unet_config))
        unet = _load_unet(src, unet_config, unet_weights, dtype, variant)
        if lora is not None:
            fuse_lora(unet, lora, scale=lora_scale)
        scheduler_config = dict(_call(LCMScheduler.load_config, src, "scheduler config", subfolder="scheduler"))
        prior = cls(
            unet,
            _load_vae(vae or src, None if vae else "vae", dtype, variant),
            *_load_text(src, _is_sdxl(unet_config), dtype, variant),
            scheduler_config=scheduler_config,
            prediction_type=prediction_type
            or settings.get("prediction_type")
            or scheduler_config.get("prediction_type", "epsilon"),
            boundary=boundary or settings.get("boundary", "lcm"),
            guidance_scale=guidance_scale if guidance_scale is not None else settings.get("guidance_scale", 8.5),
            timestep_scaling=settings.get("timestep_scaling", 10.0),
            sigma_data=settings.get("sigma_data", 0.5),
            vae_tiling=vae_tiling,
            vae_slicing=vae_slicing,
        )
        return prior.to(device)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> LatentConsistencyPrior:
        """Wrap the parts of an in-memory diffusers SD / LCM / SDXL pipeline (shared, not copied).

        Args:
            pipe: a pipeline with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (SDXL: also
                ``text_encoder_2``, ``tokenizer_2``).
            kwargs: constructor arguments (``boundary``, ``guidance_scale``, ...); ``prediction_type`` defaults to
                the scheduler's.
        """
        names = ["", "_2"] if getattr(pipe, "text_encoder_2", None) is not None else [""]
        config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
        kwargs.setdefault("prediction_type", config.get("prediction_type", "epsilon"))
        return cls(
            pipe.unet,
            pipe.vae,
            [getattr(pipe, "text_encoder" + n) for n in names],
            [getattr(pipe, "tokenizer" + n) for n in names],
            scheduler_config=config,
            **kwargs,
        )

    @classmethod
    def from_lcm_lora(
        cls,
        base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        lora: str = "latent-consistency/lcm-lora-sdv1-5",
        **kwargs,
    ) -> LatentConsistencyPrior:
        """SD1.5 + LCM-LoRA, fused (docs/method.md §3.2(a), first row); ``kwargs`` go to :meth:`from_pretrained`."""
        return cls.from_pretrained(base, lora=lora, boundary="lcm", **kwargs)

    @classmethod
    def from_sdxl_dmd2(
        cls,
        base: str = "stabilityai/stable-diffusion-xl-base-1.0",
        unet_weights: str = "tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin",
        vae: str | None = "madebyollin/sdxl-vae-fp16-fix",
        **kwargs,
    ) -> LatentConsistencyPrior:
        """SDXL architecture + DMD2 4-step UNet + fp16-fix VAE, ``boundary="none"`` (§3.2(a), third row)."""
        return cls.from_pretrained(base, unet_weights=unet_weights, vae=vae, boundary="none", **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a diffusers pipeline folder (fused / replaced UNet included) plus ``ud2m_prior.json``.

        Raises:
            ValueError: if the text encoders were dropped.
        """
        if not self.text_encoders:
            raise ValueError("save_pretrained: the text encoders were dropped; nothing complete to save")
        directory = Path(directory)
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        for name, encoder, tokenizer in zip(names, self.text_encoders, self.tokenizers, strict=True):
            encoder.save_pretrained(directory / name)
            tokenizer.save_pretrained(directory / name.replace("text_encoder", "tokenizer"))
        self.net.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        (directory / "scheduler").mkdir(parents=True, exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        (directory / "model_index.json").write_text(json.dumps(self._model_index(names), indent=2))
        settings = dict(
            boundary=self.boundary,
            prediction_type=self.prediction_type,
            guidance_scale=self.guidance_scale,
            timestep_scaling=self.timestep_scaling,
            sigma_data=self.sigma_data,
        )
        (directory / PRIOR_CONFIG_NAME).write_text(json.dumps(settings, indent=2))
        return directory

    def _model_index(self, encoder_names: list[str]) -> dict:
        """``model_index.json`` so that diffusers' own pipelines can load the saved folder too."""
        import diffusers

        sdxl = self.is_sdxl
        index = {
            "_class_name": "StableDiffusionXLPipeline" if sdxl else "LatentConsistencyModelPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", self.scheduler_config["_class_name"]],
        }
        for name, encoder in zip(encoder_names, self.text_encoders, strict=True):
            index[name] = ["transformers", type(encoder).__name__]
            index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        if not sdxl:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        return index


# ---------------------------------------------------------------------------------------------------- helpers
def check_tokenizer(tokenizer, where: str) -> None:
    """Raise if a tokenizer has degraded to the 2-token offline fallback (environment.md).

    Raises:
        ValueError: naming ``where`` and the vocabulary size.
    """
    if len(tokenizer) <= 2:
        raise ValueError(
            f"{where}: the CLIP tokenizer has only {len(tokenizer)} tokens (expected > 2). This is what "
            "CLIPTokenizer.from_pretrained silently returns for a hub id when offline: pass a local folder."
        )


def default_dtype(device: torch.device | str, *, sdxl: bool) -> torch.dtype:
    """Network dtype of docs/method.md §1.4: fp32 on CPU; fp16 for SDXL/DMD2 and bf16 otherwise on GPU."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.float16 if sdxl else torch.bfloat16


def resolve_source(path_or_hub_id: str | os.PathLike) -> tuple[str, bool]:
    """``(source, is_local)``: an existing local folder, or a string that looks like a hub id ``owner/name``.

    Raises:
        FileNotFoundError: for a missing local path (anything that is neither an existing folder nor a hub id).
        NotADirectoryError: for a file where a folder was expected.
    """
    s = os.fspath(path_or_hub_id)
    path = Path(s).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"expected a model folder, got a file: {path}")
        return str(path), True
    if s.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(s):
        raise FileNotFoundError(f"model folder not found: {path} (neither a local folder nor a hub id owner/name)")
    return s, False


def check_pipeline_folder(root: str, *, sdxl: bool, need_unet: bool = True, need_vae: bool = True) -> None:
    """Check that a local pipeline folder has every config, weight and tokenizer file we load.

    Raises:
        FileNotFoundError: naming the folder and the missing file.
    """
    root_path = Path(root)
    required = {"scheduler": [("scheduler_config.json",)], "unet": [("config.json",)]}
    if need_unet:
        required["unet"].append(_DIFFUSERS_WEIGHTS)
    if need_vae:
        required["vae"] = [("config.json",), _DIFFUSERS_WEIGHTS]
    for suffix in ("", "_2") if sdxl else ("",):
        required["text_encoder" + suffix] = [("config.json",), _TRANSFORMERS_WEIGHTS]
        required["tokenizer" + suffix] = [_TOKENIZER_FILES]
    for sub, patterns in required.items():
        for alternatives in patterns:
            if not any(any((root_path / sub).glob(p)) for p in alternatives):
                raise FileNotFoundError(f"{root_path / sub}: missing {' or '.join(alternatives)} (model folder {root})")


def fuse_lora(unet: UNet2DConditionModel, lora: str | os.PathLike, *, scale: float = 1.0) -> None:
    """Fuse a LoRA (e.g. LCM-LoRA) into ``unet`` in place, exactly as ``pipe.load_lora_weights(); pipe.fuse_lora()``.

    The LoRA layers are removed afterwards: ``unet`` is a plain UNet with :math:`W \\leftarrow W + s\\,BA\\,\\alpha/r`.
    Diffusers / PEFT / kohya key layouts are accepted (``lora_state_dict`` converts them).

    Args:
        unet: the base UNet.
        lora: a folder holding ``pytorch_lora_weights.safetensors``, that file itself, or a hub id.
        scale: LoRA scale.

    Raises:
        FileNotFoundError: for a local folder without the weight file, or a missing path.
        ValueError: if the file has no UNet LoRA weights.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    source, weight_name = _lora_source(lora)
    sdxl = _is_sdxl(unet.config)
    loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    kwargs = dict(unet_config=unet.config) if sdxl else {}
    state_dict, network_alphas = loader.lora_state_dict(source, weight_name=weight_name, **kwargs)
    prefixed = [k for k in state_dict if k.startswith("unet.")]
    others = [k for k in state_dict if k.startswith("text_encoder")]
    if others:
        logger.warning("LoRA %s also holds %d text-encoder tensors; only the UNet LoRA is fused", lora, len(others))
    if not prefixed and len(others) == len(state_dict):
        raise ValueError(f"LoRA {lora}: no UNet LoRA weights found ({len(state_dict)} tensors, all text encoder)")
    unet.load_lora_adapter(
        state_dict, prefix="unet" if prefixed else None, network_alphas=network_alphas, adapter_name="fused_lora"
    )
    unet.fuse_lora(lora_scale=scale)
    unet.unload_lora()  # keeps the merged base weights, removes the PEFT wrappers


def _lora_source(lora: str | os.PathLike) -> tuple[str, str | None]:
    """``(folder or hub id, weight_name)`` of a LoRA argument, checking local files exist."""
    s = os.fspath(lora)
    path = Path(s).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"LoRA folder {path}: missing {LORA_WEIGHT_NAME}")
        return str(path), LORA_WEIGHT_NAME
    resolve_source(s)  # raises FileNotFoundError for paths that are not hub ids
    return s, None


def _is_sdxl(unet_config) -> bool:
    return dict(unet_config).get("addition_embed_type") == "text_time"


def _read_settings(root: str) -> dict:
    """Our saved prior settings (``ud2m_prior.json``) or ``{}``."""
    path = Path(root) / PRIOR_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _call(fn, src: str, what: str, **kwargs):
    """Call a diffusers/transformers loader, turning hub failures into an ``OSError`` that names source and part."""
    try:
        return fn(src, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise OSError(
            f"could not load {what} from {src!r} (read as a hub id unless it is a local folder; "
            f"HF_HUB_OFFLINE={offline}): {e}"
        ) from e


def _load_unet(src: str, unet_config, unet_weights, dtype: torch.dtype, variant: str | None) -> UNet2DConditionModel:
    """The pipeline's UNet, or its architecture filled with a replacement state dict (DMD2)."""
    if unet_weights is None:
        return _call(
            UNet2DConditionModel.from_pretrained, src, "unet", subfolder="unet", torch_dtype=dtype, variant=variant
        )
    state_dict = load_state_dict_file(unet_weights)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    try:
        unet.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"UNet weights {unet_weights} do not match the UNet config of {src}: {e}") from e
    left = [name for name, v in [*unet.named_parameters(), *unet.named_buffers()] if v.is_meta]
    if left:
        raise ValueError(f"UNet weights {unet_weights}: tensors not set by the state dict: {left[:5]}")
    return unet.to(dtype)


def load_state_dict_file(spec: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from a local ``.safetensors``/``.bin``/``.pt`` file or a hub ``owner/repo/filename``.

    ``.bin``/``.pt`` files are read with ``torch.load(weights_only=True)`` (no pickled code).

    Raises:
        FileNotFoundError: naming the file when it is neither a local file nor a hub file spec.
    """
    s = os.fspath(spec)
    path = Path(s).expanduser()
    if not path.is_file():
        match = _HUB_FILE.fullmatch(s)
        if path.exists() or s.startswith(("/", ".", "~")) or match is None:
            raise FileNotFoundError(f"UNet weights file not found: {path}")
        from huggingface_hub import hf_hub_download

        path = Path(_call(hf_hub_download, match[1], "UNet weights", filename=match[2]))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_vae(src: str, subfolder: str | None, dtype: torch.dtype, variant: str | None) -> AutoencoderKL:
    """VAE in the network dtype, except fp32 when its config asks for it (``force_upcast``) under fp16."""
    if subfolder is None:
        src, local = resolve_source(src)
        if local and not any(any(Path(src).glob(p)) for p in _DIFFUSERS_WEIGHTS):
            raise FileNotFoundError(f"VAE folder {src}: missing {' or '.join(_DIFFUSERS_WEIGHTS)}")
    vae = _call(AutoencoderKL.from_pretrained, src, "vae", subfolder=subfolder, torch_dtype=dtype, variant=variant)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = vae.to(torch.float32)
    return vae


def _load_text(src: str, sdxl: bool, dtype: torch.dtype, variant: str | None) -> tuple[list, list]:
    """Text encoder(s) and tokenizer(s): CLIP-L for SD; CLIP-L + CLIP-bigG with projection for SDXL."""
    parts = [("", CLIPTextModel)] + ([("_2", CLIPTextModelWithProjection)] if sdxl else [])
    encoders, tokenizers = [], []
    for suffix, encoder_cls in parts:
        enc, tok = "text_encoder" + suffix, "tokenizer" + suffix
        encoders.append(_call(encoder_cls.from_pretrained, src, enc, subfolder=enc, dtype=dtype, variant=variant))
        tokenizers.append(_call(CLIPTokenizer.from_pretrained, src, tok, subfolder=tok))
        check_tokenizer(tokenizers[-1], f"{src}/{tok}")
    return encoders, tokenizers


def _configure_vae(vae: AutoencoderKL, *, tiling: bool, slicing: bool) -> None:
    """Switch VAE tiling / slicing on or off (large images, docs/method.md §3.2(a))."""
    vae.enable_tiling() if tiling else vae.disable_tiling()
    vae.enable_slicing() if slicing else vae.disable_slicing()


def _use_sdpa(module: nn.Module) -> None:
    """Use ``AttnProcessor2_0`` (PyTorch SDPA) when every processor is a standard (non-LoRA, non-custom) one."""
    processors = getattr(module, "attn_processors", None)
    if not processors or not hasattr(nn.functional, "scaled_dot_product_attention"):
        return
    if all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in processors.values()):
        module.set_attn_processor(AttnProcessor2_0())


__all__ = [
    "LatentConsistencyPrior",
    "check_tokenizer",
    "fuse_lora",
    "guidance_scale_embedding",
    "load_state_dict_file",
    "resolve_source",
    "sdxl_time_ids",
]
