"""Composition of linear operators, A = outer ∘ inner (docs/method.md §2.5), with the CG prox by default."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ud2m.operators.base import LinearOperator

ProxFn = Callable[["Compose", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Closed-form proxes of compositions, keyed by ``(type(outer), type(inner))`` (§2.5: "registered by operator-type
#: pair, not by string"). A registered function takes ``(compose, z, y, gamma)`` with ``gamma`` ``(B,)`` and returns
#: the exact prox, or ``None`` when this instance does not qualify (e.g. reflect padding), so CG is used instead.
CLOSED_FORM_PROX: dict[tuple[type, type], ProxFn] = {}


def register_closed_form_prox(outer: type, inner: type) -> Callable[[ProxFn], ProxFn]:
    """Decorator registering an exact prox for ``Compose(outer: outer, inner: inner)``."""

    def decorate(fn: ProxFn) -> ProxFn:
        CLOSED_FORM_PROX[(outer, inner)] = fn
        return fn

    return decorate


class Compose(LinearOperator):
    r""":math:`A = A_{\mathrm{outer}} A_{\mathrm{inner}}`, :math:`A^\top = A_{\mathrm{inner}}^\top
    A_{\mathrm{outer}}^\top`; prox and pseudo-inverse by CG.

    Args:
        outer: applied second.
        inner: applied first.
        **kwargs: CG settings of :class:`LinearOperator`.
    """

    def __init__(self, outer: LinearOperator, inner: LinearOperator, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, op in (("outer", outer), ("inner", inner)):
            if not isinstance(op, LinearOperator):
                raise TypeError(f"Compose: {name} must be a LinearOperator, got {type(op).__name__}")
        self.outer = outer
        self.inner = inner

    def at_size(self, hw: tuple[int, int]) -> Compose:
        """Both factors for ``H x W`` images (the outer one at the inner one's output size)."""
        inner = self.inner.at_size(hw)
        with torch.no_grad():
            y_hw = tuple(inner.A(torch.zeros(1, 1, *hw, device=self._device())).shape[-2:])
        outer = self.outer.at_size(y_hw)
        if inner is self.inner and outer is self.outer:
            return self
        return Compose(outer, inner, cg_rtol=self.cg_rtol, cg_max_iter=self.cg_max_iter, cg_backward=self.cg_backward)

    def _device(self) -> torch.device:
        tensor = next(iter(self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``outer.A(inner.A(x))``."""
        return self.outer.A(self.inner.A(x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``inner.A_adjoint(outer.A_adjoint(y))``."""
        return self.inner.A_adjoint(self.outer.A_adjoint(y))

    def has_closed_form_prox(self) -> bool:
        """A closed form is registered for this operator-type pair (it may still decline an instance)."""
        return (type(self.outer), type(self.inner)) in CLOSED_FORM_PROX

    def _prox(self, z: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """A registered closed form for this pair of operator types when one applies, else CG."""
        fn = CLOSED_FORM_PROX.get((type(self.outer), type(self.inner)))
        x = fn(self, z, y, gamma) if fn is not None else None
        return self.prox_l2_cg(z, y, gamma) if x is None else x
