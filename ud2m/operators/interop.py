r"""deepinv interoperability: use a ``deepinv.physics.LinearPhysics`` wherever ud2m expects an operator (§2.1).

deepinv is an optional dependency: it is imported lazily inside the functions that need it, never at module import.
Its ``prox_l2(z, y, gamma)`` solves :math:`\arg\min_x \tfrac{\gamma}{2}\|Ax - y\|^2 + \tfrac12\|x - z\|^2`, i.e.
:math:`(A^\top A + \gamma^{-1} I)x = A^\top y + \gamma^{-1} z` (``deepinv.optim.linear.least_squares``), which is
our convention :math:`(I + \gamma A^\top A)x = z + \gamma A^\top y` multiplied by :math:`\gamma^{-1}`: no conversion
is needed (checked against dense solves in ``tests/test_deepinv_interop.py``).
"""

from __future__ import annotations

import torch

from ud2m.operators.base import LinearOperator, NonlinearOperator

PROX_MODES = ("auto", "deepinv", "cg")


def _deepinv():
    """Import deepinv lazily, with a clear error when it is missing."""
    try:
        import deepinv
    except ImportError as err:  # optional dependency
        raise ImportError(
            "deepinv interoperability needs the optional dependency `deepinv` (pip install deepinv)"
        ) from err
    return deepinv


class DeepinvOperator(LinearOperator):
    r"""A ud2m :class:`LinearOperator` backed by a ``deepinv.physics.LinearPhysics``.

    ``A`` and ``A_adjoint`` call the physics' maps. The finite-``gamma`` prox calls ``physics.prox_l2(z, y,
    gamma)`` when ``gamma`` is the same for every sample and the prox is delegated, and our batched CG prox
    otherwise (per-sample ``gamma``). ``prox="auto"`` delegates when the physics class overrides deepinv's generic
    ``LinearPhysics.prox_l2``, i.e. has a closed form (``BlurFFT``, ``Inpainting``, any ``DecomposablePhysics``,
    ``Downsampling``, which is closed-form for circular padding); for a physics with only deepinv's generic
    iterative prox it uses our CG, which has per-sample stopping, our tolerances and an implicit backward pass
    (deepinv's CG adds ``eps = 1e-8`` to its step-size denominators, which capped its accuracy near 1e-7 on small
    float64 problems, so a tight ``tol`` is never met and it runs to its ``max_iter``).
    ``prox="deepinv"`` always delegates a scalar ``gamma``; ``prox="cg"`` never delegates. Projection
    (``gamma = inf``) and ``A_dagger`` use our CG.

    **Noise**: the physics' ``noise_model`` is ignored. In ud2m noise is separate data: simulate measurements with
    ``ud2m.operators.measure(op, x, sigma_y, generator)``, which uses only ``A`` (and the mask of a deepinv
    ``Inpainting``, exposed through :meth:`observed_mask`).

    Note that deepinv's ``prox_l2`` writes its solver settings to the physics object (a deepinv side effect);
    ud2m's own methods never write to ``self``. The physics' buffers must match the dtype of the inputs.

    Args:
        physics: a ``deepinv.physics.LinearPhysics`` (registered as a submodule, so ``.to()`` moves it).
        prox: ``"auto"``, ``"deepinv"`` or ``"cg"`` (see above).
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(self, physics, *, prox: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        deepinv = _deepinv()
        if not isinstance(physics, deepinv.physics.LinearPhysics):
            raise TypeError(f"DeepinvOperator: expected a deepinv.physics.LinearPhysics, got {type(physics).__name__}")
        if prox not in PROX_MODES:
            raise ValueError(f"DeepinvOperator: prox must be one of {PROX_MODES}, got {prox!r}")
        self.physics = physics
        generic = type(physics).prox_l2 is deepinv.physics.LinearPhysics.prox_l2
        self.delegate_prox = prox == "deepinv" or (prox == "auto" and not generic)
        self.is_masking = isinstance(physics, deepinv.physics.Inpainting)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``physics.A(x)`` (no noise)."""
        return self.physics.A(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``physics.A_adjoint(y)``."""
        return self.physics.A_adjoint(y)

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """deepinv's prox for a scalar ``gamma`` when delegating (same convention, see the module docstring), else
        our CG."""
        if self.delegate_prox and bool((gamma == gamma[0]).all()):
            return self.physics.prox_l2(z, y, gamma[0])
        return self.prox_l2_cg(z, y, gamma)

    def observed_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """The mask of a deepinv ``Inpainting`` (so ``measure`` zeroes the missing entries), else ``None``."""
        if not self.is_masking:
            return None
        return torch.broadcast_to(self.physics.mask.to(y.dtype), y.shape)


def as_operator(op, **kwargs) -> LinearOperator | NonlinearOperator:
    """Return ``op`` if it is already a ud2m operator, wrap a deepinv ``LinearPhysics``, else raise ``TypeError``.

    Args:
        op: a ud2m ``LinearOperator``/``NonlinearOperator`` or a ``deepinv.physics.LinearPhysics``.
        **kwargs: :class:`DeepinvOperator` options (used only when wrapping).

    Raises:
        TypeError: for any other type (including nonlinear deepinv physics), naming the type.
    """
    if isinstance(op, (LinearOperator, NonlinearOperator)):
        return op
    try:
        deepinv = _deepinv()
    except ImportError:
        deepinv = None
    if deepinv is not None and isinstance(op, deepinv.physics.LinearPhysics):
        return DeepinvOperator(op, **kwargs)
    raise TypeError(
        f"as_operator: expected a ud2m LinearOperator/NonlinearOperator or a deepinv.physics.LinearPhysics, "
        f"got {type(op).__module__}.{type(op).__qualname__}"
    )
