"""The LPIPS perceptual network (Zhang et al., 2018), built without any network access (docs/method.md §7.5, §10.2).

LPIPS needs torchvision's ImageNet backbone, which torchvision downloads into ``$TORCH_HOME/hub/checkpoints``.
:func:`make_lpips` never downloads: it uses a file already there, or a local ``weights`` path, and otherwise raises
(or, only when asked, builds a random backbone flagged ``random_backbone = True`` that metrics refuse to report).
Used by the UD2M loss (:mod:`ud2m.losses`) and the LPIPS metric (:mod:`ud2m.metrics`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# torchvision weight file names, as in the ``url`` of ``VGG16_Weights.IMAGENET1K_V1``,
# ``AlexNet_Weights.IMAGENET1K_V1`` and ``SqueezeNet1_1_Weights.IMAGENET1K_V1`` (what lpips' ``pretrained=True`` loads).
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class Perceptual(nn.Module):
    """A frozen LPIPS network ``(a, b) -> (B,)`` on [-1, 1] inputs, labelled with its backbone.

    Built by :func:`make_lpips`. The wrapped ``lpips.LPIPS`` stays in eval mode even when a parent module calls
    ``.train()`` (its linear heads carry dropout), and no parameter requires a gradient; gradients still flow to the
    inputs.

    Attributes:
        backbone: ``"vgg"``, ``"alex"`` or ``"squeeze"``.
        random_backbone: ``True`` when the trunk is randomly initialised: fine for plumbing, never a metric.
    """

    def __init__(self, net: nn.Module, backbone: str, random_backbone: bool) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.backbone = backbone
        self.random_backbone = random_backbone

    def train(self, mode: bool = True) -> Perceptual:
        """Keep the LPIPS network in eval mode whatever ``mode`` is (dropout off, deterministic)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image, inputs ``(B, 3, H, W)`` on [-1, 1] (``normalize=False``); returns ``(B,)``."""
        return self.net(a, b, normalize=False).reshape(a.shape[0])


def backbone_path(net: str) -> Path:
    """Where torchvision looks for the ImageNet weights of LPIPS backbone ``net`` (``$TORCH_HOME/hub/checkpoints``)."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def make_lpips(net: str = "vgg", weights: str | os.PathLike | None = None, allow_random_backbone: bool = False):
    """Build a frozen LPIPS :class:`Perceptual` module without any network access (environment.md, §10.2).

    Backbone weights are taken, in order, from the local torchvision state dict ``weights`` (e.g. a copy of
    ``vgg16-397923af.pth``), or from torchvision's cache ``$TORCH_HOME/hub/checkpoints/<file>`` (see
    :data:`BACKBONE_FILES`); the LPIPS linear heads ship with the ``lpips`` package. Without either, this raises,
    unless ``allow_random_backbone`` is set: then the trunk is random, ``random_backbone`` is ``True`` and a warning
    is logged.

    Args:
        net: ``"vgg"`` (the UD2M loss), ``"alex"`` or ``"squeeze"``.
        weights: optional path of a torchvision backbone state dict.
        allow_random_backbone: build a random-trunk LPIPS instead of raising when no weights are found.

    Returns:
        :class:`Perceptual`.

    Raises:
        FileNotFoundError: naming the expected file, if no weights are found and random backbones are not allowed.
    """
    expected = backbone_path(net)
    if weights is not None:
        module = _lpips(net, pnet_rand=True)
        _load_backbone(module.net, Path(weights))
        return Perceptual(module, net, random_backbone=False)
    if expected.is_file():
        return Perceptual(_lpips(net, pnet_rand=False), net, random_backbone=False)  # torchvision reads the cache
    if not allow_random_backbone:
        raise FileNotFoundError(
            f"LPIPS[{net}]: the torchvision backbone weights are missing: expected {expected} (set TORCH_HOME or copy "
            f"{BACKBONE_FILES[net]} there from a machine with internet), or pass weights=<local path of that file>"
        )
    logger.warning("LPIPS[%s]: no backbone weights at %s; RANDOM backbone (not a perceptual metric)", net, expected)
    return Perceptual(_lpips(net, pnet_rand=True), net, random_backbone=True)


def _lpips(net: str, pnet_rand: bool) -> nn.Module:
    import lpips  # lazy: pulls in torchvision

    with warnings.catch_warnings():  # lpips uses torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=pnet_rand, verbose=False)


def _load_backbone(trunk: nn.Module, path: Path) -> None:
    """Load a torchvision ``features.<i>.*`` state dict into lpips' ``slice<k>.<i>.*`` trunk (strict)."""
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS: backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for name in trunk.state_dict():
        source = "features." + name.split(".", 1)[1]  # slice<k>.<i>.weight -> features.<i>.weight
        if source not in state:
            raise ValueError(f"LPIPS: {path} has no entry {source!r}; expected a torchvision backbone state dict")
        mapped[name] = state[source]
    trunk.load_state_dict(mapped, strict=True)
