"""Metrics, following the DeepFashion protocol plus per-head accuracy/F1.

- single heads: top-1/3/5 accuracy and macro precision, recall and F1 over products with a known label
  (micro precision, recall and F1 of a single-choice head all equal its top-1 accuracy);
- multi heads: top-k recall — rank all values of a product by score, count its true values in the top k,
  divide by its number of true values, average over products with ≥ 1 true value; overall and per group;
  and, for the lists labelling writes (the values at or above the head's threshold), micro and macro
  precision, recall and F1 (``thresholded_prf``);
- hierarchies: the share of raw (argmax) predictions whose fine value implies the predicted coarse value.
"""

from __future__ import annotations

import json
import math
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


def macro_prf(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over the classes present in the labels or predictions of the known
    labels (sklearn's 'macro' with ``zero_division=0``); NaN when no label is known."""
    known = y >= 0
    p, t = pred[known], y[known]
    classes = np.union1d(np.unique(p), np.unique(t))
    if not len(classes):
        return float("nan"), float("nan"), float("nan")
    tp = np.array([np.sum((p == c) & (t == c)) for c in classes], dtype=np.float64)
    n_pred = np.array([np.sum(p == c) for c in classes], dtype=np.float64)
    n_true = np.array([np.sum(t == c) for c in classes], dtype=np.float64)
    return _prf(tp, n_pred, n_true)


def _prf(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> tuple[float, float, float]:
    """Means over classes of precision, recall and F1 from per-class counts; 0 where a ratio is 0/0."""
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=n_true > 0)
    f1 = np.divide(2 * tp, n_pred + n_true, out=np.zeros_like(tp), where=(n_pred + n_true) > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def macro_f1(pred: np.ndarray, y: np.ndarray) -> float:
    """Macro-F1 over the classes present in the labels or predictions (sklearn's 'macro')."""
    return macro_prf(pred, y)[2]


def thresholded_prf(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """Micro and macro precision, recall and F1 of a multi head's label lists (every value scoring at or
    above ``threshold``, as labelling writes them) over the products with known labels (no NaN), those
    without any true value included, as calibration fits the threshold on them. Macro averages over the
    values that are true or predicted at least once (sklearn's 'macro' with ``zero_division=0`` over
    those columns). ``empty``: the share of products given no value at all."""
    known = ~np.isnan(y).any(axis=1)
    if not known.any():
        return {"threshold": threshold, "n": 0}
    pred, t = probs[known] >= threshold, y[known] > 0.5
    tp, n_pred, n_true = (pred & t).sum(0), pred.sum(0), t.sum(0)
    micro = _prf(*(np.array([float(v.sum())]) for v in (tp, n_pred, n_true)))
    used = (n_pred + n_true) > 0
    macro = _prf(*(v[used].astype(np.float64) for v in (tp, n_pred, n_true)))
    return {
        "threshold": threshold,
        "n": int(known.sum()),
        **{f"micro_{m}": v for m, v in zip(("precision", "recall", "f1"), micro, strict=True)},
        **{f"macro_{m}": v for m, v in zip(("precision", "recall", "f1"), macro, strict=True)},
        "empty": float((pred.sum(1) == 0).mean()),
    }


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
        precision, recall, f1 = macro_prf(probs.argmax(axis=1), y)
        return {
            "n": known,
            "classes": head.num_classes,
            "top1": topk_accuracy(probs, y, 1),
            "top3": topk_accuracy(probs, y, 3),
            "top5": topk_accuracy(probs, y, 5),
            "macro_precision": precision,
            "macro_recall": recall,
            "macro_f1": f1,
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


def metrics_json(metrics: Any) -> str:
    """``metrics`` as strict JSON: a figure with nothing to measure (NaN: no product known, none accepted)
    is written as null. Python writes NaN as a bare ``NaN``, which jq, JavaScript and Spark refuse."""

    def finite(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        if isinstance(v, float | np.floating):
            return float(v) if math.isfinite(v) else None
        return v

    return json.dumps(finite(metrics), indent=2, default=float, allow_nan=False)
