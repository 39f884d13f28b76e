r"""The feature space of the digits distribution metrics (docs/method.md §10.3, §10.4).

Conditional W2 (CFID) and coverage compare embeddings, not pixels. The UD2M MNIST ablation used the encoder mean of a
fully connected VAE 784 → 512 → 512 → 12 (ReLU) whose weights were never released, so the project trains its own on
the built-in digits (``digits:train``: never the 90 held-out digits) and ships the encoder in
``ud2m/assets/embeddings/digits_vae`` with a card (hash, seed, versions, loss curve). The input is the 28×28 centre
crop of a 32×32 digit on [0, 1], as in §10.3, so φ(x) = μ_enc(crop₂₈((x + 1)/2)).

Retrain (about a minute on one CPU core, bit-identical on the same machine and thread count)::

    python -m ud2m.embedding --out ud2m/assets/embeddings/digits_vae
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DIGITS_VAE = Path(__file__).resolve().parent / "assets" / "embeddings" / "digits_vae"
WEIGHTS = "encoder.safetensors"


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitsVAE(nn.Module):
    """Fully connected VAE 784 → 512 → 512 → d (ReLU), Bernoulli decoder (§10.3).

    Args:
        latent_dim: d (12 in the UD2M ablation).
        hidden: width of the two hidden layers.
        side: side of the centre crop the encoder sees (28 of the 32×32 digits).
    """

    def __init__(self, latent_dim: int = 12, hidden: int = 512, side: int = 28) -> None:
        super().__init__()
        self.latent_dim, self.side = latent_dim, side
        self.encoder = _mlp([side * side, hidden, hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, hidden, hidden, side * side])

    def crop01(self, x: torch.Tensor) -> torch.Tensor:
        """Library images ``(B, 1, H, W)`` on [-1, 1] → flattened centre crops on [0, 1], ``(B, side²)``."""
        if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < self.side:
            raise ValueError(f"expected gray digits (B, 1, H, W) with H, W >= {self.side}, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        top, left = (H - self.side) // 2, (W - self.side) // 2
        crop = x[..., top : top + self.side, left : left + self.side]
        return ((crop.clamp(-1, 1) + 1) / 2).flatten(1)

    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder mean and log-variance of flattened crops on [0, 1]."""
        mu, logvar = self.encoder(x01).chunk(2, dim=1)
        return mu, logvar

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): the encoder mean of library images on [-1, 1], ``(B, d)`` (§10.3)."""
        return self.encode(self.crop01(x))[0]

    def negative_elbo(self, x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample negative ELBO: Bernoulli cross-entropy (summed over pixels) + KL(q(z|x) ‖ N(0, I))."""
        mu, logvar = self.encode(x01)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        logits = self.decoder(mu + (0.5 * logvar).exp() * eps)
        rec = F.binary_cross_entropy_with_logits(logits, x01, reduction="none").sum(1)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        return rec + kl


def digits_crops(split: str) -> torch.Tensor:
    """The built-in digits of a split (``"train"``, ``"val"``, ``"all"``) as library images ``(N, 1, 32, 32)``."""
    from ud2m.io import digits32, digits_names

    idx = [int(name.split(":")[1]) for name in digits_names(split)]
    return torch.from_numpy(digits32()[idx])[:, None] * 2 - 1


def train_digits_vae(
    *, epochs: int = 200, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, latent_dim: int = 12
) -> tuple[DigitsVAE, dict[str, dict[int, float]]]:
    """Train :class:`DigitsVAE` on ``digits:train`` with Adam; returns the model (eval mode) and loss curves
    (mean negative ELBO per epoch on the training digits and on the held-out ``digits:val``)."""
    torch.manual_seed(seed)
    model = DigitsVAE(latent_dim)
    x_train = model.crop01(digits_crops("train"))
    x_val = model.crop01(digits_crops("val"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curves: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for epoch in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=g)
        total = 0.0
        for start in range(0, len(order), batch_size):
            loss = model.negative_elbo(x_train[order[start : start + batch_size]], generator=g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * min(batch_size, len(order) - start)
        if epoch % 20 == 19 or epoch == epochs - 1:
            with torch.no_grad():
                val = float(model.negative_elbo(x_val, generator=torch.Generator().manual_seed(0)).mean())
            curves["train"][epoch + 1], curves["val"][epoch + 1] = round(total / len(order), 3), round(val, 3)
    return model.eval(), curves


def save_digits_vae(model: DigitsVAE, out: str | Path, card: dict) -> Path:
    """Write the encoder weights (safetensors; the decoder is not needed for φ) and ``card.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"encoder.{k}": v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(weights, out / WEIGHTS, metadata={"latent_dim": str(model.latent_dim), "side": str(model.side)})
    card = {**card, "sha256": hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def load_digits_embedding(path: str | Path = DIGITS_VAE) -> DigitsVAE:
    """The shipped (or a retrained) digits VAE encoder, eval mode; the decoder stays untrained and unused.

    Raises:
        FileNotFoundError: naming the missing weights file.
    """
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"digits embedding weights not found: {file} (retrain: python -m ud2m.embedding)")
    state = load_file(file)
    with safe_open(file, framework="pt") as f:
        side = int((f.metadata() or {}).get("side", 28))
    hidden, latent_dim = state["encoder.0.weight"].shape[0], state["encoder.4.weight"].shape[0] // 2
    model = DigitsVAE(latent_dim, hidden, side)
    model.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()})
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> Path:
    """``python -m ud2m.embedding --out DIR``: train the digits VAE and write its encoder and card."""
    parser = argparse.ArgumentParser(description="Train the digits VAE embedding of the CFID / coverage metrics.")
    parser.add_argument("--out", type=Path, default=DIGITS_VAE)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, curves = train_digits_vae(epochs=args.epochs, seed=args.seed)
    card = {
        "name": "digits_vae",
        "model": "fully connected VAE 784-512-512-12 (ReLU), Bernoulli decoder; encoder mean = the embedding",
        "data": "digits:train (1,707 built-in digits, 28x28 centre crops on [0, 1]); digits:val never used",
        "command": f"python -m ud2m.embedding --out {args.out} --epochs {args.epochs} --seed {args.seed}",
        "optimiser": "Adam lr 1e-3, batch 128",
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "train_wall_seconds": round(time.perf_counter() - start, 1),
        "negative_elbo": curves,
    }
    return save_digits_vae(model, args.out, card)


if __name__ == "__main__":
    main()
