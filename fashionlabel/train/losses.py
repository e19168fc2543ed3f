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
    """Sum of the heads' losses, weighted by the taxonomy's ``weight`` or, with ``uncertainty``, by learned
    log-variances (a parameter the optimiser must also step)."""

    def __init__(self, taxonomy: Taxonomy, uncertainty: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.heads = taxonomy.heads
        self.weights = {h.name: h.weight for h in taxonomy.heads}
        self.log_vars = nn.Parameter(torch.zeros(len(taxonomy.heads))) if uncertainty else None

    def forward(
        self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each head's (detached) loss.

        Unknowns are masked arithmetically, not by boolean indexing or ``if known.any()``: either would
        wait for the GPU at every head of every step. A head with no known label in the batch adds 0.
        """
        total = torch.zeros((), device=next(iter(logits.values())).device)
        parts: dict[str, torch.Tensor] = {}
        for i, h in enumerate(self.heads):
            z, y = logits[h.name].float(), targets[h.name]
            if h.kind == "single":
                known = (y >= 0).float()
                per = F.cross_entropy(
                    z, y.clamp(min=0), reduction="none", label_smoothing=self.label_smoothing
                )
                loss = (per * known).sum() / known.sum().clamp(min=1)
            else:
                known = (~torch.isnan(y).any(dim=1)).float()
                y = torch.nan_to_num(y, nan=0.0)
                w = torch.where(y > 0.5, h.w_pos, h.w_neg) * known[:, None]
                per = F.binary_cross_entropy_with_logits(z, y, weight=w, reduction="sum")
                loss = per / (known.sum() * y.shape[1]).clamp(min=1)
            parts[h.name] = loss.detach()
            if self.log_vars is not None:
                present = (known.sum() > 0).float()  # no labels, no evidence about this head's variance
                total = total + present * (torch.exp(-self.log_vars[i]) * loss + self.log_vars[i])
            else:
                total = total + self.weights[h.name] * loss
        return total, parts

    def head_weights(self) -> dict[str, float]:
        """Each head's weight in the summed loss: the taxonomy's, or with ``uncertainty`` the learned
        exp(-s_h) (beside which s_h itself is added). Training records these every epoch, since the loss
        alone does not show how the learned weighting shares the heads out."""
        if self.log_vars is None:
            return dict(self.weights)
        learned = torch.exp(-self.log_vars.detach()).cpu().tolist()
        return {h.name: float(w) for h, w in zip(self.heads, learned, strict=True)}

    def average_gradients(self) -> None:
        """Average the learned log-variances' gradients over the DDP ranks, as DDP does for the model's.

        The log-variances live outside the DDP-wrapped model, so without this each rank would step them on
        its own batches only: the ranks would learn different head weights, and the checkpoint (rank 0's)
        would hold weights the other ranks never trained with. Call between ``backward`` and the step.
        """
        import torch.distributed as dist

        if self.log_vars is None or not dist.is_available() or not dist.is_initialized():
            return
        world = dist.get_world_size()
        if world == 1:
            return
        if self.log_vars.grad is None:  # every rank must join the all-reduce
            self.log_vars.grad = torch.zeros_like(self.log_vars)
        dist.all_reduce(self.log_vars.grad)
        self.log_vars.grad.div_(world)
