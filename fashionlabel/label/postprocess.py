"""Scores → labels: calibration, hierarchy-consistent choices, top-k, thresholds, ``needs_review``.

Hierarchy consistency: along a chain coarse → … → fine, the chosen fine value f maximises
Σ_level log p_level(ancestor_level(f)); every level then takes f's ancestor. So a fine label always implies
its own coarse label, and a confident coarse head can overrule a fine head that hesitates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fashionlabel.taxonomy import Taxonomy

TOPK = 5
MULTI_TOPK = 10  # multi heads keep their 10 best scores: enough for ranking, bounded for 1,000-value heads
DEFAULT_SINGLE_THRESHOLD = 0.5
DEFAULT_MULTI_THRESHOLD = 0.5


def scores(taxonomy: Taxonomy, logits: dict[str, torch.Tensor], calibration: dict[str, Any]
           ) -> dict[str, np.ndarray]:
    """Logits → calibrated probabilities (softmax for single heads, sigmoid for multi heads)."""
    temps = calibration.get("temperature", {})
    out = {}
    for h in taxonomy.heads:
        z = logits[h.name].float() / float(temps.get(h.name, 1.0))
        out[h.name] = (torch.softmax(z, dim=1) if h.kind == "single" else torch.sigmoid(z)).cpu().numpy()
    return out


def consistent_choice(taxonomy: Taxonomy, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chosen class index per single head, consistent along every hierarchy chain."""
    choice = {h.name: probs[h.name].argmax(axis=1) for h in taxonomy.single_heads}
    for chain in taxonomy.chains():
        leaf = chain[-1]
        # ancestors[level][f] = index at `level` of the ancestor of leaf value f
        anc = [np.arange(leaf.num_classes)]
        for child, parent in zip(chain[::-1][:-1], chain[::-1][1:], strict=True):
            step = np.array([parent.index[child.parent_map[v]] for v in child.values])
            anc.append(step[anc[-1]])
        anc = anc[::-1]  # aligned with chain (coarse first)
        total = sum(np.log(probs[h.name][:, a] + 1e-12) for h, a in zip(chain, anc, strict=True))
        best = total.argmax(axis=1)
        for h, a in zip(chain, anc, strict=True):
            choice[h.name] = a[best]
    return choice


def to_rows(taxonomy: Taxonomy, probs: dict[str, np.ndarray], calibration: dict[str, Any]
            ) -> list[dict[str, Any]]:
    """One dict per product with the label columns of the labels table (no identity columns)."""
    thresholds = calibration.get("thresholds", {})
    choice = consistent_choice(taxonomy, probs)
    n = len(next(iter(probs.values()))) if probs else 0
    cols: dict[str, list] = {}
    review = np.zeros(n, dtype=bool)
    for h in taxonomy.heads:
        p = probs[h.name]
        names = np.array(h.values, dtype=object)
        top = np.argsort(-p, axis=1, kind="stable")[:, :TOPK]
        if h.kind == "single":
            c = choice[h.name]
            s = p[np.arange(n), c].astype(np.float32)
            cols[h.name] = names[c].tolist()
            cols[f"{h.name}_score"] = s.tolist()
            cols[f"{h.name}_topk"] = [[{"label": names[j], "score": float(p[i, j])} for j in top[i]]
                                      for i in range(n)]
            review |= s < float(thresholds.get(h.name, h.threshold or DEFAULT_SINGLE_THRESHOLD))
        else:
            t = float(thresholds.get(h.name, h.threshold or DEFAULT_MULTI_THRESHOLD))
            cols[h.name] = [names[p[i] >= t].tolist() for i in range(n)]
            topm = np.argsort(-p, axis=1, kind="stable")[:, :MULTI_TOPK]
            cols[f"{h.name}_scores"] = [[{"label": names[j], "score": float(p[i, j])} for j in topm[i]]
                                        for i in range(n)]
    cols["needs_review"] = review.tolist()
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]
