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


class MultiTaskHeads(nn.Module):
    """One linear layer per taxonomy head on the shared feature (after dropout) → ``{head: logits}``."""

    def __init__(self, in_features: int, taxonomy: Taxonomy, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({h.name: nn.Linear(in_features, h.num_classes) for h in taxonomy.heads})

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.drop(feat)
        return {name: head(feat) for name, head in self.heads.items()}


class HierarchicalHeads(MultiTaskHeads):
    """Linear heads; every fine head (one with a parent) sees attention-reweighted features."""

    def __init__(self, in_features: int, taxonomy: Taxonomy, dropout: float = 0.2, reduction: int = 4):
        super().__init__(in_features, taxonomy, dropout)
        hidden = max(16, in_features // reduction)
        self.attention = nn.ModuleDict(
            {
                h.name: nn.Sequential(
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
        for name, head in self.heads.items():
            att = self.attention[name](feat) if name in self.attention else None
            out[name] = head(feat * att if att is not None else feat)
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
