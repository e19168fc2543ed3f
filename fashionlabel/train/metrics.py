"""Metrics, following the DeepFashion protocol plus per-head accuracy/F1.

- single heads: top-1/3/5 accuracy and macro-F1 over products with a known label;
- multi heads: top-k recall — rank all values of a product by score, count its true values in the top k,
  divide by its number of true values, average over products with ≥ 1 true value; overall and per group;
- hierarchies: the share of raw (argmax) predictions whose fine value implies the predicted coarse value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fashionlabel.taxonomy import Head, Taxonomy


def topk_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of known labels (``y`` ≥ 0) among the ``k`` highest scores; NaN when none is known."""
    known = y >= 0
    if not known.any():
        return float("nan")
    p, t = probs[known], y[known]
    k = min(k, p.shape[1])
    top = np.argpartition(-p, k - 1, axis=1)[:, :k]
    return float((top == t[:, None]).any(axis=1).mean())


def macro_f1(pred: np.ndarray, y: np.ndarray) -> float:
    """Macro-F1 over the classes present in the labels or predictions (sklearn's 'macro')."""
    known = y >= 0
    p, t = pred[known], y[known]
    classes = np.union1d(np.unique(p), np.unique(t))
    f1s = []
    for c in classes:
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def topk_recall(scores: np.ndarray, y: np.ndarray, k: int, cols: np.ndarray | None = None) -> float:
    """DeepFashion attribute top-k recall: rank all of a product's attribute scores, count its true
    attributes among the top k, divide by its number of true attributes, average over products.

    Args:
        cols: an attribute group's columns: the same ranking of *all* attributes, counting only the group's
            true attributes, over the products that have at least one (the protocol's per-group figure;
            ranking within the group alone would make a small group's recall nearly 1 by construction).
    """
    known = ~np.isnan(y).any(axis=1)
    s, t = scores[known], y[known]
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    in_top = np.zeros_like(t)
    np.put_along_axis(in_top, top, 1.0, axis=1)
    if cols is not None:
        t, in_top = t[:, cols], in_top[:, cols]
    has = t.sum(axis=1) > 0
    if not has.any():
        return float("nan")
    return float(np.mean((in_top * t)[has].sum(axis=1) / t[has].sum(axis=1)))


def confusion(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) over the known labels: rows are truth, columns predictions."""
    known = y >= 0
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y[known], pred[known]), 1)
    return m


def head_metrics(head: Head, probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """One head's metrics: top-1/3/5 and macro-F1 for a single head (``n``: known labels); recall@3/5,
    overall and per group, for a multi head (``n``, ``<group>_n``: products with at least one true value)."""
    if head.kind == "single":
        known = int((y >= 0).sum())
        pred = probs.argmax(axis=1)
        return {
            "n": known,
            "classes": head.num_classes,
            "top1": topk_accuracy(probs, y, 1),
            "top3": topk_accuracy(probs, y, 3),
            "top5": topk_accuracy(probs, y, 5),
            "macro_f1": macro_f1(pred, y),
        }
    out: dict[str, Any] = {"n": int((~np.isnan(y).any(axis=1) & (np.nan_to_num(y).sum(axis=1) > 0)).sum())}
    for k in (3, 5):
        out[f"recall@{k}"] = topk_recall(probs, y, k)
    g = head.group_of()
    for group in head.groups:
        cols = np.array([i for i, v in enumerate(head.values) if g.get(v) == group], dtype=np.int64)
        if len(cols):
            out[f"{group}_n"] = int((np.nan_to_num(y[:, cols]).sum(axis=1) > 0).sum())
            for k in (3, 5):
                out[f"{group}_recall@{k}"] = topk_recall(probs, y, k, cols)
    return out


def hierarchy_consistency(taxonomy: Taxonomy, probs: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of products whose raw argmax child implies the raw argmax parent, per parent→child edge."""
    out = {}
    for h in taxonomy.heads:
        if not h.parent or h.name not in probs or h.parent not in probs:
            continue
        parent = taxonomy.head(h.parent)
        fine = probs[h.name].argmax(axis=1)
        coarse = probs[h.parent].argmax(axis=1)
        implied = np.array([parent.index[h.parent_map[v]] for v in h.values])
        out[f"{h.parent}->{h.name}"] = float((implied[fine] == coarse).mean()) if len(fine) else float("nan")
    return out


def evaluate_probs(
    taxonomy: Taxonomy, probs: dict[str, np.ndarray], targets: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Every head's :func:`head_metrics` under ``heads`` and the raw hierarchy consistency per edge."""
    return {
        "heads": {h.name: head_metrics(h, probs[h.name], targets[h.name]) for h in taxonomy.heads},
        "hierarchy_consistency_raw": hierarchy_consistency(taxonomy, probs),
    }


def summary_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat ``{"<head> top1": …, "<head> recall@3": …}`` of an ``evaluate_probs`` result, for tables."""
    out = {}
    for h, m in metrics["heads"].items():
        for key in ("top1", "top3", "top5", "recall@3", "recall@5"):
            if key in m:
                out[f"{h} {key}"] = float(m[key])
    return out
