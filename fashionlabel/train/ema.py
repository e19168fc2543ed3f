"""Exponential moving average of a model's weights (Polyak averaging), as in torchvision's reference recipe.

The average of the last few thousand steps' weights generalises better than the last step's weights of a
from-scratch run that is still noisy (Izmailov et al. 2018; timm and torchvision train their best ImageNet
models with it). The horizon is given in epochs, not as a decay, so one setting means the same at any
batch size, worker count or catalog size.
"""

from __future__ import annotations

import copy

import torch


def decay_for(horizon_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay whose averaging window (1 / (1 - decay) steps) spans ``horizon_epochs`` epochs."""
    if horizon_epochs <= 0:
        raise ValueError(f"EMA horizon must be positive, got {horizon_epochs}")
    return 1.0 - 1.0 / max(1.0, horizon_epochs * steps_per_epoch)


class EMA:
    """An averaged copy of ``model``: parameters and floating-point buffers (BatchNorm statistics) follow
    the training weights with ``decay``; integer buffers are copied.

    The first updates use ``min(decay, (1 + n) / (10 + n))`` so the average is not dominated by the random
    initial weights when the horizon is long compared with the run.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        # Build it after the model has its final device and memory format: it keeps views of its tensors.
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = self._tensors(model)

    def _tensors(self, model: torch.nn.Module):
        mine, theirs = self.model.state_dict(), model.state_dict()  # same keys: one is a deep copy
        floats = [(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point()]
        others = [(mine[k], theirs[k]) for k in mine if not mine[k].is_floating_point()]
        return [a for a, _ in floats], [b for _, b in floats], others

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        avg, live, others = self._pairs
        # One fused kernel over all tensors: on a GPU a per-tensor loop would cost more than the step.
        torch._foreach_lerp_(avg, live, 1.0 - d)
        for a, t in others:
            a.copy_(t)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
