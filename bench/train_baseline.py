"""The plain baseline: a from-scratch ResNet-18 in a bare PyTorch loop, one linear head per column.

    PYTHONPATH=. python bench/train_baseline.py --styles PATH/styles.csv --images /tmp/fpi/images \
        [--epochs 30] [--out baseline.json] [--against MODEL --shards SHARDS]

What it is: torchvision ResNet-18 (random init) on 60×80 photos; one linear head per catalog column
(gender, masterCategory, subCategory, articleType, baseColour, season, usage) with summed cross-entropy,
and a sigmoid ``attributes`` head with plain BCE; AdamW; random flips and small crops; 30 epochs. No Ray,
no shards: images are read straight from the folder. Products are split with ``fashionlabel.data.split_of``
(the same split as fashionlabel's training), attributes mined by the same patterns, and metrics computed by
``fashionlabel.train.metrics``, so its held-out figures compare one to one with ``fashionlabel evaluate``.

With ``--against MODEL --shards SHARDS`` (shards of the same catalog), the same run also evaluates a
fashionlabel model on the same held-out products and prints both side by side, with the difference and
whether it clears the bar: above the baseline on every figure, articleType top-1 by 2 points and fabric
recall@3 by 5. On a GPU (``--device cuda``, the default when one is visible) it trains in bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from fashionlabel.data import encode_targets, split_of
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.metrics import evaluate_probs

log = logging.getLogger("baseline")
MEAN, STD = (
    torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
    torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
)


def load(styles: str, images: str, tax: Taxonomy, limit: int | None) -> tuple[np.ndarray, dict, list[str]]:
    df = pd.read_csv(styles, dtype=str, keep_default_na=False, on_bad_lines="skip")
    df = df[[Path(images, f"{i}.jpg").exists() for i in df["id"]]].head(limit)
    imgs = np.stack(
        [np.asarray(Image.open(Path(images, f"{i}.jpg")).convert("RGB").resize((60, 80))) for i in df["id"]]
    )
    # the catalog's labels exactly as `fashionlabel shard` reads them (unknowns masked, attributes mined)
    ys = encode_targets([tax.labels_from_row(r) for r in df.to_dict("records")], tax)
    return imgs, ys, list(df["id"])


class Net(nn.Module):
    def __init__(self, tax: Taxonomy):
        super().__init__()
        self.trunk = torchvision.models.resnet18(weights=None)
        self.trunk.fc = nn.Identity()
        self.heads = nn.ModuleDict({h.name: nn.Linear(512, h.num_classes) for h in tax.heads})

    def forward(self, x):
        f = self.trunk(x)
        return {k: h(f) for k, h in self.heads.items()}


# Margins over the baseline that the best fashionlabel model must clear (points); every other figure: > 0.
MARGINS = {("articleType", "top1"): 2.0, ("attributes", "fabric_recall@3"): 5.0}


def compared(head: str, key: str) -> bool:
    """The figures the bar names: top-1 of every single head, articleType's top-3/5 too, and the attribute
    recall@3/@5, overall and per group."""
    if "recall@" in key:
        return key.endswith(("recall@3", "recall@5"))
    return key == "top1" or (head == "articleType" and key in ("top3", "top5"))


def batch(imgs: np.ndarray, train: bool, device: str = "cpu") -> torch.Tensor:
    x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float() / 255
    x = (x - MEAN.to(device)) / STD.to(device)
    if train:
        flip = torch.rand(len(x), device=device) < 0.5
        x[flip] = x[flip].flip(3)
        xp = F.pad(x, (4, 4, 4, 4), mode="replicate")
        dy, dx = np.random.randint(0, 9, 2)
        x = xp[:, :, dy : dy + 80, dx : dx + 60]
    return x.contiguous(memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--styles", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="first N products only (smoke runs)")
    p.add_argument("--out", default="baseline.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--against", help="a fashionlabel model artifact to evaluate on the same products")
    p.add_argument("--shards", help="shards of the same catalog (with --against)")
    a = p.parse_args(argv)
    if bool(a.against) != bool(a.shards):
        p.error("--against and --shards go together")
    if a.against:
        # Checked before training, not after it: the comparison is the run's point, and a model that is not
        # there yet (its training stopped before export) would otherwise cost the whole baseline run first.
        from fashionlabel.shards import list_shards
        from fashionlabel.train.export import load_artifact

        try:
            load_artifact(a.against)
            if not list_shards(a.shards):
                raise ValueError(f"no shards in {a.shards}")
        except Exception as e:  # noqa: BLE001 - any reason is the same answer: nothing to compare against
            p.error(f"--against {a.against} --shards {a.shards}: {str(e)[:300]}")
    dev = a.device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    np.random.seed(0)  # epoch order and crops: the same run gives the same figures
    tax = Taxonomy.load("fashion-product-images")
    imgs, ys, ids = load(a.styles, a.images, tax, a.limit)
    split = np.array([split_of(i) for i in ids])
    tr, te = np.nonzero(split == "train")[0], np.nonzero(split == "test")[0]
    net = Net(tax).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.epochs * -(-len(tr) // a.batch))
    t0 = time.time()
    for epoch in range(a.epochs):
        net.train()
        order = np.random.permutation(tr)
        for s in range(0, len(order), a.batch):
            idx = order[s : s + a.batch]
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
                out = {k: v.float() for k, v in net(batch(imgs[idx], True, dev)).items()}
            loss = sum(
                F.cross_entropy(out[h.name], torch.from_numpy(ys[h.name][idx]).to(dev), ignore_index=-1)
                for h in tax.single_heads
            )
            att = torch.from_numpy(ys["attributes"][idx]).to(dev)
            known = ~att.isnan().any(1)
            loss = loss + F.binary_cross_entropy_with_logits(out["attributes"][known], att[known])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d done, %.0f s", epoch, time.time() - t0)
    net.eval()
    probs: dict[str, list] = {}
    with torch.no_grad():
        for s in range(0, len(te), 256):
            for k, v in net(batch(imgs[te[s : s + 256]], False, dev)).items():
                probs.setdefault(k, []).append(
                    (torch.sigmoid(v) if k == "attributes" else torch.softmax(v, 1)).float().cpu().numpy()
                )
    metrics = evaluate_probs(
        tax, {k: np.concatenate(v) for k, v in probs.items()}, {k: v[te] for k, v in ys.items()}
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(metrics, indent=2, default=float))
    for h, m in metrics["heads"].items():
        print(h, {k: round(100 * v, 1) for k, v in m.items() if k != "n"})
    print(f"train images {len(tr)}, test images {len(te)}, {time.time() - t0:.0f} s")
    if a.against:
        compare(metrics, a.against, a.shards, len(te), write_to=str(Path(a.out).with_suffix("")) + "-against")


def compare(baseline: dict, model: str, shards: str, n_test: int, write_to: str) -> list[tuple]:
    """Evaluate ``model`` on the held-out products of ``shards`` and print it beside the baseline."""
    from fashionlabel.train.run import evaluate

    ours = evaluate(model, shards, "test", write_to=write_to)
    print(
        f"\nheld-out products: baseline {n_test}, {model} {ours['n']} (the same when both come from one catalog)"
    )
    rows = []
    for head, bm in baseline["heads"].items():
        om = ours["metrics"]["heads"].get(head, {})
        for key in sorted(bm, key=lambda k: (k.count("_"), k)):
            if key not in om or not compared(head, key):
                continue
            b, o = 100 * bm[key], 100 * om[key]
            need = MARGINS.get((head, key), 0.0)
            rows.append((head, key, b, o, o - b, need, o - b > need))
    print(f"{'head':16s}{'metric':20s}{'baseline':>10s}{'ours':>8s}{'diff':>8s}{'bar':>7s}  cleared")
    for head, key, b, o, d, need, ok in rows:
        print(
            f"{head:16s}{key:20s}{b:10.1f}{o:8.1f}{d:+8.1f}{'>' + format(need, '.0f'):>7s}  {'yes' if ok else 'NO'}"
        )
    print(f"cleared {sum(r[-1] for r in rows)} of {len(rows)}")
    return rows


if __name__ == "__main__":
    main()
