"""Test-time flips: held-out accuracy of single-pass labelling against averaging each image with its mirror.

    PYTHONPATH=. python bench/tta_flip.py --shards SHARDS MODEL [MODEL …]

Per model, on one split: top-1 of every single head, articleType top-5 and attribute recall@3 for the plain
pass (what labelling does), flip-averaged logits and flip-averaged probabilities, with the same calibration,
and the difference in points. The result is in docs/models.md ("Test-time flips").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fashionlabel.data import load_samples
from fashionlabel.label.postprocess import scores
from fashionlabel.label.predictor import Predictor
from fashionlabel.shards import list_shards
from fashionlabel.train.metrics import evaluate_probs


def figures(tax, probs, targets) -> dict[str, float]:
    m = evaluate_probs(tax, probs, targets)["heads"]
    out = {h: 100 * v["top1"] for h, v in m.items() if "top1" in v}
    if "articleType" in m:
        out["articleType top5"] = 100 * m["articleType"]["top5"]
    out |= {f"{h} R@3": 100 * v["recall@3"] for h, v in m.items() if "recall@3" in v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for model in a.models:
        pred = Predictor(model, device="cpu")
        tax = pred.taxonomy
        s = load_samples(list_shards(a.shards), tax, pred.size, split=a.split)
        plain = pred.logits(s.images)
        mirror = pred.logits(np.ascontiguousarray(s.images[:, :, ::-1]))  # N×H×W×3: flip the width axis
        p_plain, p_mirror = scores(tax, plain, pred.calibration), scores(tax, mirror, pred.calibration)
        rows = {
            "plain": figures(tax, p_plain, s.targets),
            "flip (logits)": figures(
                tax, scores(tax, {k: (plain[k] + mirror[k]) / 2 for k in plain}, pred.calibration), s.targets
            ),
            "flip (probs)": figures(tax, {k: (p_plain[k] + p_mirror[k]) / 2 for k in p_plain}, s.targets),
        }
        print(f"\n{model} ({pred.version}), {len(s)} {a.split} products, %")
        cols = list(rows["plain"])
        print(f"{'':22s}" + "".join(f"{c[:14]:>15s}" for c in cols))
        for name, r in rows.items():
            print(f"{name:22s}" + "".join(f"{r[c]:15.2f}" for c in cols))
        for name in ("flip (logits)", "flip (probs)"):
            print(
                f"{name + ' − plain':22s}"
                + "".join(f"{rows[name][c] - rows['plain'][c]:+15.2f}" for c in cols)
            )


if __name__ == "__main__":
    main()
