"""Post-hoc calibration fitted on validation data.

- Temperature scaling per single head (Guo et al. 2017): T minimising the NLL of softmax(z / T); 1 where
  the validation labels cannot fit one (fewer than 10, or every one of them the top score: no minimum).
- Confidence thresholds: for single heads, the lowest score above which the validation labels as labelling
  writes them (the hierarchy-consistent choice) make half the head's errors (products below it get
  ``needs_review``); for multi heads, the threshold maximising micro-F1 on validation. A head whose
  validation labels cannot fit one (fewer than 10; a multi head with no true value among them) keeps the
  taxonomy's own threshold, else the default of its kind.
- Or, given the share of products a team can review (``review_share``), the single heads' thresholds that
  catch the most errors while flagging at most that share of validation products (:func:`fit_review_share`).

:func:`recalibrate_artifact` refits a trained model's calibration into a new artifact, weights unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fashionlabel.label.postprocess import (
    DEFAULT_MULTI_THRESHOLD,
    DEFAULT_SINGLE_THRESHOLD,
    consistent_choice,
    needs_review,
    scores,
    threshold,
)
from fashionlabel.taxonomy import Taxonomy

TEMPS = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
# error cuts tried by fit_review_share, strictest first; 1 flags nothing (every head accepts its lowest score)
ERROR_CUTS = np.round(np.linspace(0.0, 1.0, 101), 2)


def fit_temperature(logits: torch.Tensor, y: np.ndarray) -> float:
    """The temperature of ``TEMPS`` (0.25 to 8) minimising the NLL of softmax(logits / T) on known labels.

    ``y`` holds class indices, -1 for unknown; with fewer than 10 known labels the answer is 1. So it is
    where every known label is a top-scored class (a small or easy validation set): the NLL then keeps
    falling as T shrinks, so it has no minimum, and the grid's smallest T would win as an artefact of
    where the grid ends, sharpening every score of the head (a 0.5 top score to about 0.9) on no evidence
    that the model is underconfident.
    """
    known = torch.as_tensor(y >= 0)
    if int(known.sum()) < 10:
        return 1.0
    z, t = logits[known].float(), torch.as_tensor(y)[known]
    if bool((z.gather(1, t[:, None]).squeeze(1) >= z.max(dim=1).values).all()):
        return 1.0
    nll = [float(torch.nn.functional.cross_entropy(z / T, t)) for T in TEMPS]
    return float(TEMPS[int(np.argmin(nll))])


def single_threshold(
    probs: np.ndarray,
    y: np.ndarray,
    error_cut: float = 0.5,
    choice: np.ndarray | None = None,
    default: float = DEFAULT_SINGLE_THRESHOLD,
) -> float:
    """Lowest score above which validation predictions make ``error_cut`` × the head's error rate.

    A per-head target (not one fixed precision) keeps noisy heads such as colour or season from sending
    every product to review while still flagging their least certain predictions.

    Args:
        choice: the class each product is labelled with (default: its top score). Labelling writes the
            hierarchy-consistent choice (:func:`consistent_choice`) and compares *its* score with the
            threshold: fitted on the top score, a head with a parent was held to the errors of labels it
            does not write, and its products whose label the hierarchy changed scored lower than the fit
            assumed.
        default: the answer with fewer than 10 known labels (:func:`calibrate` passes the head's own
            threshold: a fixed 0.5 recorded as fitted would override the one its taxonomy declares).
    """
    known = y >= 0
    if known.sum() < 10:
        return default
    choice = probs.argmax(axis=1) if choice is None else choice
    score = probs[known, choice[known]]
    correct = choice[known] == y[known]
    precision = 1.0 - error_cut * (1.0 - correct.mean())
    order = np.argsort(-score)
    prec = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # the tolerance keeps rounding in 1 - (1 - accuracy) from refusing the whole set at error_cut = 1
    ok = np.nonzero(prec >= precision - 1e-9)[0]
    # Lowest score whose "accept everything above" set still has the target precision.
    return float(score[order][ok[-1]]) if len(ok) else 1.0


def multi_threshold(probs: np.ndarray, y: np.ndarray, default: float = DEFAULT_MULTI_THRESHOLD) -> float:
    """The threshold (0.05 to 0.95 in steps of 0.05) maximising micro-F1 over the rows with known labels.

    ``y`` is N×C of 0/1, a row holding NaN is unknown. With fewer than 10 known rows, or where no threshold
    gets a single true value right (no true value among them, or none scored 0.05 or more), the answer is
    ``default``: every threshold then ties at F1 = 0, and the first one tried, 0.05, would write every
    value scoring 5% or more into the labels.
    """
    known = ~np.isnan(y).any(axis=1)
    if known.sum() < 10:
        return default
    p, t = probs[known], y[known] > 0.5
    best, best_f1 = default, 0.0
    for th in np.linspace(0.05, 0.95, 19):
        pred = p >= th
        tp = (pred & t).sum()
        f1 = 2 * tp / max(1, pred.sum() + t.sum())
        if f1 > best_f1:
            best, best_f1 = float(th), f1
    return best


def calibrate(
    taxonomy: Taxonomy,
    logits: dict[str, torch.Tensor],
    targets: dict[str, np.ndarray],
    error_cut: float = 0.5,
    review_share: float | None = None,
) -> dict[str, Any]:
    """The artifact's ``calibration`` from validation logits: a temperature per single head and a
    threshold per head (:func:`single_threshold`, :func:`multi_threshold`), and ``error_cut``.

    Args:
        review_share: when given, ``error_cut`` is chosen by :func:`fit_review_share` instead, and the
            calibration records the target and the share of validation products it flags.
    """
    temps = {h.name: fit_temperature(logits[h.name], targets[h.name]) for h in taxonomy.single_heads}
    probs = scores(taxonomy, logits, {"temperature": temps})
    thresholds = {
        h.name: multi_threshold(probs[h.name], targets[h.name], threshold(h, {}))
        for h in taxonomy.heads
        if h.kind == "multi"
    }
    extra: dict[str, float] = {}
    choice = consistent_choice(taxonomy, probs)  # the labels labelling writes, whose scores it thresholds
    if review_share is None:
        thresholds |= _single_thresholds(taxonomy, probs, targets, error_cut, choice)
    else:
        error_cut, single, flagged = fit_review_share(taxonomy, probs, targets, review_share, choice)
        thresholds |= single
        extra = {"review_share": review_share, "val_needs_review": flagged}
    # in head order, as model.json always had them
    thresholds = {h.name: thresholds[h.name] for h in taxonomy.heads}
    return {"temperature": temps, "thresholds": thresholds, "error_cut": error_cut} | extra


def review_settings(calibration: dict[str, Any]) -> dict[str, Any]:
    """The review-queue settings an artifact's ``calibration`` was fitted with, as :func:`calibrate`'s
    keywords: its ``review_share`` where it was fitted to one, else its ``error_cut`` (0.5 when it names
    none). A model derived from it (``fashionlabel prune``) refits its thresholds to the same target."""
    share = calibration.get("review_share")
    if share is not None:
        return {"review_share": float(share)}
    return {"error_cut": float(calibration.get("error_cut", 0.5))}


def _single_thresholds(
    taxonomy: Taxonomy,
    probs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    error_cut: float,
    choice: dict[str, np.ndarray],
) -> dict[str, float]:
    return {
        # the head's own threshold where validation cannot fit one: the taxonomy's, else the default
        h.name: single_threshold(probs[h.name], targets[h.name], error_cut, choice[h.name], threshold(h, {}))
        for h in taxonomy.single_heads
    }


def fit_review_share(
    taxonomy: Taxonomy,
    probs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    review_share: float,
    choice: dict[str, np.ndarray] | None = None,
) -> tuple[float, dict[str, float], float]:
    """The smallest error cut (of ``ERROR_CUTS``) whose single-head thresholds flag at most ``review_share``
    of the validation products (else the loosest); returns (cut, thresholds, share flagged).

    The cut is the share of a head's errors left among the labels it accepts. One cut for every head, not
    one per head: each head still flags its least certain predictions in proportion to its own errors, and
    the cut is the one knob a review team's capacity sets. A product is flagged when any head is unsure, as
    labelling decides (:func:`needs_review`), so the share is measured over the heads together. A larger
    cut lowers every threshold, so the share only falls as the cut grows.
    """
    choice = consistent_choice(taxonomy, probs) if choice is None else choice
    for cut in ERROR_CUTS:
        single = _single_thresholds(taxonomy, probs, targets, float(cut), choice)
        flagged = float(needs_review(taxonomy, probs, {"thresholds": single}, choice).mean())
        if flagged <= review_share:
            break
    # else the loosest cut: a head with too few validation labels keeps its fixed threshold, and a
    # hierarchy can choose a value scored below the head's own lowest top score, so even it may flag some
    return float(cut), single, flagged


def recalibrate_artifact(
    model_dir: str,
    shards: str,
    out: str,
    *,
    review_share: float | None = None,
    error_cut: float = 0.5,
) -> dict[str, Any]:
    """Refit a model's temperatures and thresholds on the validation split of ``shards`` into a new
    artifact at ``out`` (same weights, new version); return its version, calibration and metrics.

    For a review queue of another size without training again: the new version relabels the catalog on the
    next night, since ``needs_review`` changes with the thresholds.
    """
    from types import SimpleNamespace

    from fashionlabel import settings, storage
    from fashionlabel.data import load_samples
    from fashionlabel.label.predictor import Predictor
    from fashionlabel.shards import list_shards
    from fashionlabel.train.export import check_derived_out, check_replaceable, load_artifact, save_artifact
    from fashionlabel.train.run import check_shard_labels, metrics_writer

    settings.check(
        "calibration",
        SimpleNamespace(review_share=review_share, error_cut=error_cut),
        {"review_share": review_share is None or 0 < review_share < 1, "error_cut": 0 <= error_cut <= 1},
        "0 < review share < 1; 0 ≤ error cut ≤ 1",
    )
    if storage.absolute(out).rstrip("/") == storage.absolute(model_dir).rstrip("/"):
        raise ValueError(f"--out {out} is the model being calibrated: give the new model a folder of its own")
    check_replaceable(out)
    pred = Predictor(model_dir, device="cpu")
    check_derived_out(out, pred.version, "calibrated_from")
    tax = pred.taxonomy
    check_shard_labels(tax, shards)  # the fit needs the model's labels on the validation products
    val = load_samples(list_shards(shards), tax, pred.size, split="val")
    if len(val) == 0:
        raise ValueError(f"{shards} has no validation products to calibrate on")
    calibration = calibrate(tax, pred.logits(val.images), val.targets, error_cut, review_share)
    model, spec = load_artifact(model_dir)  # saved as loaded: no device or memory-format change
    metrics: dict[str, Any] = {}
    version = save_artifact(
        out,
        model,
        architecture=spec["architecture"],
        taxonomy=tax,
        preprocessing=spec["preprocessing"],
        calibration=calibration,
        model_kwargs=spec.get("model_kwargs", {}),
        training=spec.get("training", {}) | {"calibrated_from": spec["version"]},
        finalize=metrics_writer(shards, metrics),
    )
    return {
        "version": version,
        "calibrated_from": spec["version"],
        "calibration": calibration,
        "metrics": metrics,
        "val_products": len(val),
        "out": out,
    }
