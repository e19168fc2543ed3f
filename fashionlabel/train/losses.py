"""Multi-task loss: a weighted sum over the taxonomy's heads.

- single heads: cross-entropy, unknown labels (-1) masked;
- multi heads: binary cross-entropy with ``w_pos`` on positives and ``w_neg`` on negatives (research §2:
  1 and 0.1, since recall of true attributes matters more than false alarms), unknown rows masked;
- head weights come from the taxonomy, or are learned with homoscedastic uncertainty weighting
  (Kendall, Gal & Cipolla 2018): L = Σ exp(-s_i)·L_i + s_i, with s_i = log σ_i² learned.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionlabel.taxonomy import Taxonomy


class MultiTaskLoss(nn.Module):
    def __init__(self, taxonomy: Taxonomy, uncertainty: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.heads = taxonomy.heads
        self.weights = {h.name: h.weight for h in taxonomy.heads}
        self.log_vars = nn.Parameter(torch.zeros(len(taxonomy.heads))) if uncertainty else None

    def forward(
        self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=next(iter(logits.values())).device)
        parts: dict[str, float] = {}
        for i, h in enumerate(self.heads):
            z, y = logits[h.name].float(), targets[h.name]
            if h.kind == "single":
                known = y >= 0
                if not known.any():
                    continue
                loss = F.cross_entropy(z[known], y[known], label_smoothing=self.label_smoothing)
            else:
                known = ~torch.isnan(y).any(dim=1)
                if not known.any():
                    continue
                z, y = z[known], y[known]
                w = torch.where(y > 0.5, h.w_pos, h.w_neg)
                loss = F.binary_cross_entropy_with_logits(z, y, weight=w)
            parts[h.name] = float(loss.detach())
            if self.log_vars is not None:
                total = total + torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            else:
                total = total + self.weights[h.name] * loss
        return total, parts
