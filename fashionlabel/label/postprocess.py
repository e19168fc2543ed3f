"""Scores → labels: calibration, hierarchy-consistent choices, top-k, thresholds, ``needs_review``.

Hierarchy consistency: the heads of one hierarchy (coarse → … → fine, a coarse head possibly with several
fine heads) take together the consistent values with the largest summed log-probability; along a chain the
chosen fine value f maximises Σ_level log p_level(ancestor_level(f)) and every level takes f's ancestor. So
a fine label always implies its own coarse label, and a confident coarse head can overrule a fine head
that hesitates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fashionlabel.label.schema import LABEL_SCORE
from fashionlabel.taxonomy import Head, Taxonomy

TOPK = 5
MULTI_TOPK = 10  # multi heads keep their 10 best scores: enough for ranking, bounded for 1,000-value heads
DEFAULT_SINGLE_THRESHOLD = 0.5
DEFAULT_MULTI_THRESHOLD = 0.5


def scores(
    taxonomy: Taxonomy, logits: dict[str, torch.Tensor], calibration: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Logits → calibrated probabilities (softmax for single heads, sigmoid for multi heads)."""
    temps = calibration.get("temperature", {})
    out = {}
    for h in taxonomy.heads:
        z = logits[h.name].float() / float(temps.get(h.name, 1.0))
        out[h.name] = (torch.softmax(z, dim=1) if h.kind == "single" else torch.sigmoid(z)).cpu().numpy()
    return out


def consistent_choice(taxonomy: Taxonomy, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chosen class index per single head, consistent along every hierarchy: each tree of heads (a coarse
    head, its fine heads, theirs, …) takes the consistent assignment with the largest summed log-probability.

    Max-sum over the tree: bottom-up, a value's score is its log-probability plus, per child head, the best
    score among the child's values under it; top-down, the root takes its best value and each child its
    best value under its parent's choice. Along a chain this is the fine value maximising
    Σ_level log p_level(ancestor_level(f)); where a coarse head has two fine heads (category and length
    under body type), both are chosen under one coarse value, which chain by chain could not guarantee.
    """
    choice = {h.name: probs[h.name].argmax(axis=1) for h in taxonomy.single_heads}
    children: dict[str, list] = {}
    for h in taxonomy.single_heads:
        if h.parent:
            children.setdefault(h.parent, []).append(h)
    if not children:
        return choice
    # parent_of[child][j] = the parent's index of the child's value j
    parent_of = {
        c.name: np.array([taxonomy.head(c.parent).index[c.parent_map[v]] for v in c.values])
        for cs in children.values()
        for c in cs
    }
    up: dict[str, np.ndarray] = {}

    def score(h) -> np.ndarray:  # bottom-up: N×C best total of h's subtree per value of h
        total = np.log(np.asarray(probs[h.name], dtype=np.float32) + 1e-12)
        for c in children.get(h.name, ()):
            sub = score(c)
            # the best child value under each parent value: one reduceat over the child's columns grouped
            # by parent (vectorised: labelling runs this on every batch); a value without children: -inf
            order = np.argsort(parent_of[c.name], kind="stable")
            grouped = parent_of[c.name][order]
            has, starts = np.unique(grouped, return_index=True)
            best = np.full_like(total, -np.inf)
            best[:, has] = np.maximum.reduceat(sub[:, order], starts, axis=1)
            total = total + best
        up[h.name] = total
        return total

    def descend(h, chosen: np.ndarray) -> None:  # top-down: each child's best value under its parent's
        choice[h.name] = chosen
        for c in children.get(h.name, ()):
            under = parent_of[c.name][None, :] == chosen[:, None]
            descend(c, np.where(under, up[c.name], -np.inf).argmax(axis=1))

    for root in (h for h in taxonomy.single_heads if h.parent is None and h.name in children):
        descend(root, score(root).argmax(axis=1))
    return choice


def to_columns(
    taxonomy: Taxonomy, probs: dict[str, np.ndarray], calibration: dict[str, Any]
) -> dict[str, pa.Array]:
    """The label columns of the labels table as Arrow arrays, built with numpy (no Python object per row).

    Vectorised on purpose: at GPU rates (10k+ products/s) one Python dict per row and per top-k entry
    would cost more CPU than the decode.
    """
    choice = consistent_choice(taxonomy, probs)
    n = len(next(iter(probs.values()))) if probs else 0
    rows = np.arange(n)[:, None]
    cols: dict[str, pa.Array] = {}
    for h in taxonomy.heads:
        p = np.asarray(probs[h.name], dtype=np.float32)
        names = pa.array(h.values, pa.string())
        if h.kind == "single":
            c = choice[h.name]
            s = p[np.arange(n), c]
            cols[h.name] = names.take(pa.array(c))
            cols[f"{h.name}_score"] = pa.array(s, pa.float32())
            cols[f"{h.name}_topk"] = _label_scores(
                names, p, np.argsort(-p, axis=1, kind="stable")[:, :TOPK], rows
            )
        else:
            t = threshold(h, calibration)
            hit = p >= t
            offsets = np.concatenate([[0], np.cumsum(hit.sum(axis=1))]).astype(np.int32)
            cols[h.name] = pa.ListArray.from_arrays(
                pa.array(offsets), names.take(pa.array(np.nonzero(hit)[1]))
            )
            topm = np.argsort(-p, axis=1, kind="stable")[:, :MULTI_TOPK]
            cols[f"{h.name}_scores"] = _label_scores(names, p, topm, rows)
    cols["needs_review"] = pa.array(needs_review(taxonomy, probs, calibration, choice), pa.bool_())
    return cols


def needs_review(
    taxonomy: Taxonomy,
    probs: dict[str, np.ndarray],
    calibration: dict[str, Any],
    choice: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Per product: some single head's chosen (hierarchy-consistent) label scores below its threshold.

    Args:
        choice: :func:`consistent_choice` of ``probs``, when the caller has it already.
    """
    choice = consistent_choice(taxonomy, probs) if choice is None else choice
    n = len(next(iter(probs.values()))) if probs else 0
    review = np.zeros(n, dtype=bool)
    for h in taxonomy.single_heads:
        p = np.asarray(probs[h.name], dtype=np.float32)  # as to_columns writes the scores
        review |= p[np.arange(n), choice[h.name]] < threshold(h, calibration)
    return review


def threshold(head: Head, calibration: dict[str, Any]) -> float:
    """The head's confidence threshold: the artifact's calibrated one, else the taxonomy's own (0.0
    included: ``or`` would read it as "not declared"), else the default of its kind."""
    fitted = calibration.get("thresholds", {}).get(head.name)
    if fitted is not None:
        return float(fitted)
    if head.threshold is not None:
        return float(head.threshold)
    return DEFAULT_SINGLE_THRESHOLD if head.kind == "single" else DEFAULT_MULTI_THRESHOLD


def _label_scores(names: pa.Array, p: np.ndarray, top: np.ndarray, rows: np.ndarray) -> pa.Array:
    """list<struct{label, score}> per row from the indices ``top`` (N×K) into ``names``."""
    n, k = top.shape
    values = pa.StructArray.from_arrays(
        [names.take(pa.array(top.ravel())), pa.array(p[rows, top].ravel(), pa.float32())],
        fields=list(LABEL_SCORE),
    )
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), values)


def to_rows(
    taxonomy: Taxonomy, probs: dict[str, np.ndarray], calibration: dict[str, Any]
) -> list[dict[str, Any]]:
    """One dict per product with the label columns of the labels table (no identity columns).

    Derived from :func:`to_columns`, so in-process labelling (``Predictor.label_rows``) gives exactly the
    rows the labelling actors write.
    """
    return pa.table(to_columns(taxonomy, probs, calibration)).to_pylist()
