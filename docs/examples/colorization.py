"""Worked example of a user-defined degradation: colourisation (RGB -> luminance) written with ``A`` and
``A_adjoint`` only. Everything else (prox_l2 by CG with an implicit backward, pseudo-inverse, projection,
``measure``, ``lift``) comes from :class:`ud2m.operators.LinearOperator`.

Run it end to end on a real photograph (no download)::

    python docs/examples/colorization.py
"""

from __future__ import annotations

import torch

from ud2m.operators import LinearOperator, measure


class Grayscale(LinearOperator):
    r""":math:`A x = \sum_c w_c x_c` (ITU-R BT.601 luma weights): ``(B, 3, H, W) -> (B, 1, H, W)``."""

    def __init__(self, weights: tuple[float, float, float] = (0.299, 0.587, 0.114), **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("w", torch.tensor(weights).view(1, 3, 1, 1))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Grayscale: expected (B, 3, H, W), got {tuple(x.shape)}")
        return (self.w.to(x.dtype) * x).sum(dim=1, keepdim=True)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.w.to(y.dtype) * y  # (B, 1, H, W) -> (B, 3, H, W)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        return y.expand(-1, 3, -1, -1)  # a gray image shown as RGB


def main() -> None:
    from skimage import data

    x01 = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    x = 2 * x01 - 1  # library range [-1, 1]
    op = Grayscale()
    print("adjointness error:", op.adjointness_test(x.double().clone(), torch.Generator().manual_seed(0)).item())
    y = measure(op, x, sigma_y=0.01, generator=torch.Generator().manual_seed(0))
    # one data-consistency step from a flat grey guess: argmin γ/2||Ax − y||² + ½||x − z||²
    z = torch.zeros_like(x)
    x_hat = op.prox_l2(z, y, gamma=100.0)
    residual = (op.A(x_hat) - y).pow(2).mean().sqrt().item()
    print(f"y {tuple(y.shape)}, prox output {tuple(x_hat.shape)}, RMS data residual {residual:.4f}")


if __name__ == "__main__":
    main()
