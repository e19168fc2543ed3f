"""Multi-task heads declared by a taxonomy, on a shared pooled feature.

- ``MultiTaskHeads``: one linear layer per head (softmax logits for single heads, sigmoid logits for
  multi heads) — "Cloth ResNet A" (research §2).
- ``HierarchicalHeads`` (research §3): coarse heads read the shared feature; a head with a ``parent``
  (a fine level) reads the feature reweighted by its own attention MLP (Linear → ReLU → Linear → sigmoid),
  so the fine level can attend to what separates siblings. Loss stays the sum over levels.
Hierarchy consistency of predictions is enforced after the forward pass
(``fashionlabel.label.postprocess.consistent_choice``), so heads stay independent during training.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fashionlabel.taxonomy import Taxonomy

ESCAPED = "head:"


def module_key(name: str) -> str:
    """The key of head ``name`` in the heads' ``nn.ModuleDict``: the name itself, unless torch refuses it
    as a module name. A name that is an attribute of a module (the DeepFashion coarse head ``type``,
    ``train``, ``values``, …) or holds a '.' is escaped, behind a prefix no plain key has, so that keys
    stay distinct and the weights of every other head keep their names in saved state_dicts."""
    if name and "." not in name and not name.startswith(ESCAPED) and not hasattr(nn.ModuleDict(), name):
        return name
    return ESCAPED + name.replace("%", "%25").replace(".", "%2E")


class MultiTaskHeads(nn.Module):
    """One linear layer per taxonomy head on the shared feature (after dropout) → ``{head: logits}``."""

    def __init__(self, in_features: int, taxonomy: Taxonomy, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.names = {module_key(h.name): h.name for h in taxonomy.heads}  # ModuleDict key → head name
        self.heads = nn.ModuleDict(
            {module_key(h.name): nn.Linear(in_features, h.num_classes) for h in taxonomy.heads}
        )

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.drop(feat)
        return {self.names[key]: head(feat) for key, head in self.heads.items()}


class HierarchicalHeads(MultiTaskHeads):
    """Linear heads; every fine head (one with a parent) sees attention-reweighted features."""

    def __init__(self, in_features: int, taxonomy: Taxonomy, dropout: float = 0.2, reduction: int = 4):
        super().__init__(in_features, taxonomy, dropout)
        hidden = max(16, in_features // reduction)
        self.attention = nn.ModuleDict(
            {
                module_key(h.name): nn.Sequential(
                    nn.Linear(in_features, hidden),
                    nn.ReLU(inplace=True),
                    nn.Linear(hidden, in_features),
                    nn.Sigmoid(),
                )
                for h in taxonomy.heads
                if h.parent
            }
        )

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.drop(feat)
        out = {}
        for key, head in self.heads.items():
            att = self.attention[key](feat) if key in self.attention else None
            out[self.names[key]] = head(feat * att if att is not None else feat)
        return out


class TrunkWithHeads(nn.Module):
    """A feature trunk (image → N×C×H×W) + global average pool + taxonomy heads."""

    def __init__(
        self,
        trunk: nn.Module,
        features: int,
        taxonomy: Taxonomy,
        dropout: float = 0.2,
        hierarchical: bool = False,
    ):
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = (HierarchicalHeads if hierarchical else MultiTaskHeads)(features, taxonomy, dropout)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(torch.flatten(self.pool(self.trunk(x)), 1))
