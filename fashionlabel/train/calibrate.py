"""Post-hoc calibration fitted on validation data.

- Temperature scaling per single head (Guo et al. 2017): T minimising the NLL of softmax(z / T).
- Confidence thresholds: for single heads, the lowest score above which validation predictions make half
  the head's errors (products below it get ``needs_review``); for multi heads, the threshold maximising
  micro-F1 on validation.
"""

from __future__ import annotations

import numpy as np
import torch

from fashionlabel.taxonomy import Taxonomy

TEMPS = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))


def fit_temperature(logits: torch.Tensor, y: np.ndarray) -> float:
    """The temperature of ``TEMPS`` (0.25 to 8) minimising the NLL of softmax(logits / T) on known labels.

    ``y`` holds class indices, -1 for unknown; with fewer than 10 known labels the answer is 1.
    """
    known = torch.as_tensor(y >= 0)
    if int(known.sum()) < 10:
        return 1.0
    z, t = logits[known].float(), torch.as_tensor(y)[known]
    nll = [float(torch.nn.functional.cross_entropy(z / T, t)) for T in TEMPS]
    return float(TEMPS[int(np.argmin(nll))])


def single_threshold(probs: np.ndarray, y: np.ndarray, error_cut: float = 0.5) -> float:
    """Lowest score above which validation predictions make ``error_cut`` × the head's error rate.

    A per-head target (not one fixed precision) keeps noisy heads such as colour or season from sending
    every product to review while still flagging their least certain predictions.
    """
    known = y >= 0
    if known.sum() < 10:
        return 0.5
    score = probs[known].max(axis=1)
    correct = probs[known].argmax(axis=1) == y[known]
    precision = 1.0 - error_cut * (1.0 - correct.mean())
    order = np.argsort(-score)
    prec = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(prec >= precision)[0]
    # Lowest score whose "accept everything above" set still has the target precision.
    return float(score[order][ok[-1]]) if len(ok) else 1.0


def multi_threshold(probs: np.ndarray, y: np.ndarray) -> float:
    """The threshold (0.05 to 0.95 in steps of 0.05) maximising micro-F1 over the rows with known labels.

    ``y`` is N×C of 0/1, a row holding NaN is unknown; with fewer than 10 known rows the answer is 0.5.
    """
    known = ~np.isnan(y).any(axis=1)
    if known.sum() < 10:
        return 0.5
    p, t = probs[known], y[known] > 0.5
    best, best_f1 = 0.5, -1.0
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
) -> dict[str, dict[str, float]]:
    """The artifact's ``calibration`` from validation logits: a temperature per single head and a
    threshold per head (:func:`single_threshold`, :func:`multi_threshold`), and ``error_cut``."""
    temps, thresholds = {}, {}
    for h in taxonomy.heads:
        if h.kind == "single":
            temps[h.name] = fit_temperature(logits[h.name], targets[h.name])
            p = torch.softmax(logits[h.name].float() / temps[h.name], 1).numpy()
            thresholds[h.name] = single_threshold(p, targets[h.name], error_cut)
        else:
            thresholds[h.name] = multi_threshold(
                torch.sigmoid(logits[h.name].float()).numpy(), targets[h.name]
            )
    return {"temperature": temps, "thresholds": thresholds, "error_cut": error_cut}
