"""Nightly cost: an incremental night (5% new + 5% changed products) vs rebuilding everything that night.

Both paths run in the same process on the same local Ray, the same catalog and the same model:

- ours: ``run_nightly`` for night 1 (everything is new), then night 2 with 5% new and 5% changed images;
  night 2 is the figure (hash pass over known products, shard the 10%, label them, merge latest, report);
- baseline: what a non-incremental pipeline does on night 2: ``shard_catalog`` of the whole night-2
  catalog into a fresh folder, then ``label_shards`` of all of it.

It prints stage times and rates from the night's manifest (shard, label, and the hash pass: known
products checked per second) — the inputs of docs/scaling.md.

    PYTHONPATH=$PWD python bench/nightly_throughput.py --model demo-out/model           # the bundled sample
    PYTHONPATH=$PWD python bench/nightly_throughput.py --model M --products 20000       # images repeated
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashionlabel.label.pipeline import LabelConfig, label_shards  # noqa: E402
from fashionlabel.nightly import NightlyConfig, run_nightly  # noqa: E402
from fashionlabel.runtime import ray_session  # noqa: E402
from fashionlabel.shards import ShardConfig, shard_catalog  # noqa: E402
from fashionlabel.train.export import load_artifact  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"


def catalogs(n: int, tmp: Path) -> tuple[Path, Path]:
    """Night-1 and night-2 catalogs over the sample's images (repeated under new ids past 2,500)."""
    with open(SAMPLE / "catalog.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (SAMPLE / r["image_uri"]).exists()]
    base = []
    for i in range(n + n // 20):
        r = dict(rows[i % len(rows)])
        r["product_id"] = r["product_id"] if i < len(rows) else f"{r['product_id']}r{i // len(rows)}"
        r["image_uri"] = str(SAMPLE / r["image_uri"])
        base.append(r)
    night1, extra = base[:n], base[n:]
    k = n // 20
    night2 = [dict(r) for r in night1]
    for j, r in enumerate(night2[:k]):  # 5% changed: another product's photo
        r["image_uri"] = night1[-1 - j]["image_uri"]
    night2 += extra[:k]  # 5% new
    paths = []
    for name, rs in (("night1.csv", night1), ("night2.csv", night2)):
        with open(tmp / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rs[0]))
            w.writeheader()
            w.writerows(rs)
        paths.append(tmp / name)
    return paths[0], paths[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--products", type=int, default=2500)
    p.add_argument("--samples-per-shard", type=int, default=500)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="flbench-"))
    cfg = NightlyConfig(shard=ShardConfig(samples_per_shard=args.samples_per_shard), label=LabelConfig())
    _, spec = load_artifact(args.model)
    try:
        c1, c2 = catalogs(args.products, tmp)
        with ray_session():
            run_nightly(str(c1), args.model, str(tmp / "root"), "2026-01-01", cfg)
            t0 = time.time()
            m = run_nightly(str(c2), args.model, str(tmp / "root"), "2026-01-02", cfg)
            ours = time.time() - t0
            t0 = time.time()
            s = shard_catalog(str(c2), str(tmp / "full" / "shards"), spec["taxonomy_obj"], cfg.shard)
            t_shard = time.time() - t0
            lab = label_shards(
                str(tmp / "full" / "shards"),
                args.model,
                str(tmp / "full" / "labels"),
                "2026-01-02",
                cfg.label,
            )
            base = time.time() - t0
        sec = m["seconds"]
        print(
            f"catalog night 2          {m['catalog_products']} products ({m['new']} new, {m['changed']} changed, "
            f"{m['unchanged']} unchanged), model {spec['architecture']}"
        )
        print(
            f"ours: incremental night  {ours:8.1f} s  (shard stage {sec['shard']:.1f} s incl. hash pass over "
            f"{m['unchanged'] + m['changed']} known products, label {sec['label']:.1f} s, "
            f"latest+report {sec['total'] - sec['shard'] - sec['label']:.1f} s)"
        )
        print(
            f"baseline: full rebuild   {base:8.1f} s  (shard {t_shard:.1f} s = {s.packed / t_shard:.0f} img/s, "
            f"label {base - t_shard:.1f} s = {lab['labelled'] / (base - t_shard):.0f} img/s)"
        )
        print(f"ratio baseline / ours    {base / ours:8.2f}x")
        print(
            f"hash pass                {(m['unchanged'] + m['changed']) / sec['shard']:8.0f} known products/s "
            f"(upper bound: whole shard stage)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
