"""Multi-task heads declared by a taxonomy: one linear layer per head on a shared pooled feature.

Single heads give softmax logits, multi heads sigmoid logits; hierarchy consistency is applied after the
forward pass (``fashionlabel.label.postprocess``), so the heads stay independent during training.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fashionlabel.taxonomy import Taxonomy


class MultiTaskHeads(nn.Module):
    def __init__(self, in_features: int, taxonomy: Taxonomy, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({h.name: nn.Linear(in_features, h.num_classes) for h in taxonomy.heads})

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.drop(feat)
        return {name: head(feat) for name, head in self.heads.items()}


class TrunkWithHeads(nn.Module):
    """A feature trunk (image → N×C×H×W) + global average pool + taxonomy heads."""

    def __init__(self, trunk: nn.Module, features: int, taxonomy: Taxonomy, dropout: float = 0.2):
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = MultiTaskHeads(features, taxonomy, dropout)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(torch.flatten(self.pool(self.trunk(x)), 1))
