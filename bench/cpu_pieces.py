"""CPU forward passes in cache-sized pieces (``Predictor.forward``) against one pass over the whole batch.

    PYTHONPATH=. python bench/cpu_pieces.py [--models fl_small,cloth_resnet_a] [--sizes 80x60,224x224]

For each model and input size: a predictor on a temporary artifact (random weights) labels the same batch
of random images with its pieces (``cpu_piece``: about ``CPU_PIECE_PIXELS`` pixels each) and as one pass,
alternating which goes first; prints the medians in images per CPU-second, on ``--threads`` threads, and
the ratio. This is the measurement behind ``CPU_PIECE_PIXELS`` in ``fashionlabel/label/predictor.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
from fashionlabel.label.predictor import Predictor
from fashionlabel.models import create_model
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.export import save_artifact


def rate(pred: Predictor, x: torch.Tensor, piece: int) -> float:
    pred.piece = piece
    t = time.process_time()
    with torch.inference_mode():
        pred.forward(x)
    return len(x) / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fl_small,cloth_resnet_a")
    ap.add_argument("--sizes", default="80x60,224x224", help="HxW,…")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tax = Taxonomy.load("fashion-product-images")
    print(
        f"{'model':16s}{'input':>9s}{'batch':>7s}{'piece':>7s}{'pieces img/CPU-s':>18s}{'one pass':>10s}{'ratio':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            for size in a.sizes.split(","):
                h, w = (int(v) for v in size.split("x"))
                art = Path(tmp, f"{name}-{h}x{w}")
                pre = {"size": [h, w], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
                save_artifact(
                    art, create_model(name, tax), architecture=name, taxonomy=tax, preprocessing=pre
                )
                pred = Predictor(art, device="cpu", batch_size=a.batch)
                piece = pred.piece
                x = torch.randn(a.batch, 3, h, w).contiguous(memory_format=torch.channels_last)
                rate(pred, x[: max(1, piece)], piece)  # warm-up: allocator, oneDNN kernel choice
                got: dict[str, list[float]] = {"pieces": [], "one": []}
                for r in range(a.rounds):
                    for kind in ("pieces", "one") if r % 2 == 0 else ("one", "pieces"):
                        got[kind].append(rate(pred, x, piece if kind == "pieces" else 0))
                ours, one = statistics.median(got["pieces"]), statistics.median(got["one"])
                print(f"{name:16s}{size:>9s}{a.batch:7d}{piece:7d}{ours:18.1f}{one:10.1f}{ours / one:7.2f}×")


if __name__ == "__main__":
    main()
