"""Keeping pruned weights exactly zero while training (masked retraining, mask-kept attacks).

Three things are needed, in this order around every optimizer step:
1. mask the gradient (the step sees no signal at pruned positions);
2. mask the weight after the step (weight decay, momentum or Adam moments built up
   before pruning would otherwise move a pruned weight);
3. zero the optimizer's per-parameter moments at pruned positions (so stale momentum
   does not keep pushing, and a saved optimizer state carries nothing there).

:class:`MaskedOptimizer` does all three. Masks are boolean (``True`` = kept).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ntp_ssl.errors import ConfigError


def apply_masks_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """In place, without autograd: ``W <- W * M`` (pruned entries become ``+0.0``)."""
    with torch.no_grad():
        for name, m in masks.items():
            p = _param(params, name, m)
            p.masked_fill_(~_bool_on(m, p), 0)


def mask_gradients_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """In place: ``grad <- grad * M`` for every masked parameter that has a gradient."""
    with torch.no_grad():
        for name, m in masks.items():
            p = _param(params, name, m)
            if p.grad is not None:
                p.grad.masked_fill_(~_bool_on(m, p), 0)


def zero_optimizer_state_(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> None:
    """Zero, at pruned positions, every state tensor of a masked parameter that has the parameter's shape.

    Covers SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq`` and
    ``max_exp_avg_sq``, RMSprop ``square_avg`` and the like; scalar entries such as
    ``step`` are left alone.
    """
    with torch.no_grad():
        for name, m in masks.items():
            p = _param(params, name, m)
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if key != "step" and isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(~_bool_on(m, value), 0)


class MaskedOptimizer:
    """Wrap a torch optimizer so that masked parameters stay exactly zero.

    ``step()`` = mask gradients, ``inner.step()``, mask weights, zero moments at pruned
    positions. ``zero_grad``, ``state_dict``, ``load_state_dict``, ``param_groups`` and
    ``state`` pass through (loading a state also zeroes its moments at pruned positions).
    LR schedulers insist on a real ``torch.optim.Optimizer``: give them ``.optimizer``;
    they share its ``param_groups``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]
    ) -> None:
        for name, m in masks.items():
            _param(params, name, m)  # validates names and shapes up front
        self.optimizer = optimizer
        self.params = dict(params)
        self.masks = {name: m.to(torch.bool) for name, m in masks.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._follow_devices()
        if closure is None:
            mask_gradients_(self.params, self.masks)
            loss = self.optimizer.step()
        else:

            def masked_closure() -> Any:
                with torch.enable_grad():
                    value = closure()
                mask_gradients_(self.params, self.masks)
                return value

            loss = self.optimizer.step(masked_closure)
        apply_masks_(self.params, self.masks)
        zero_optimizer_state_(self.optimizer, self.params, self.masks)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        zero_optimizer_state_(self.optimizer, self.params, self.masks)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def _follow_devices(self) -> None:
        """Keep each mask on its parameter's device (one copy, not one per step)."""
        for name, m in self.masks.items():
            device = self.params[name].device
            if m.device != device:
                self.masks[name] = m.to(device)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r}, masked={len(self.masks)})"


def _param(params: Mapping[str, Tensor], name: str, mask: Tensor) -> Tensor:
    if name not in params:
        raise ConfigError(f"mask names parameter {name!r}, which the model does not have")
    p = params[name]
    if tuple(mask.shape) != tuple(p.shape):
        raise ConfigError(f"mask for {name!r} has shape {tuple(mask.shape)}; expected {tuple(p.shape)}")
    return p


def _bool_on(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(device=like.device, dtype=torch.bool)
