"""Build the bundled sample catalog and the built-in `fashion-product-images` taxonomy.

Run once by maintainers against a copy of the Fashion Product Images (small) data set:

    python examples/make_sample.py --source PATH/fashion-product-images --n 2500

It writes `examples/sample/catalog.csv` + `examples/sample/images/<id>.jpg` (a stratified-by-chance
sample that keeps a handful of real bad rows: missing image files, `NA` labels) and
`fashionlabel/taxonomies/fashion-product-images.yaml` (values and hierarchy read off the full catalog,
attribute patterns copied from the data set's `attributes.yaml`). Nothing at run time reads the source.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = {"", "NA"}
SINGLE = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]


def _values(df: pd.DataFrame, col: str) -> list[str]:
    return sorted(v for v in df[col].unique() if v not in UNKNOWN)


def _parent_map(df: pd.DataFrame, child: str, parent: str) -> dict[str, str]:
    # The catalog's hierarchy is noisy (Tshirts once under Belts, Socks 10x under Apparel): the declared
    # parent of a value is its majority parent. Noisy rows still train each head on its own label.
    known = df[~df[child].isin(UNKNOWN) & ~df[parent].isin(UNKNOWN)]
    majority = known.groupby(child)[parent].agg(lambda s: s.value_counts().index[0])
    return dict(sorted(majority.items()))


def build_taxonomy(styles: pd.DataFrame, attributes: dict) -> dict:
    heads = []
    for col in SINGLE:
        head = {"name": col, "kind": "single", "column": col, "values": _values(styles, col), "weight": 1.0}
        if col == "subCategory":
            head |= {"parent": "masterCategory", "parent_map": _parent_map(styles, col, "masterCategory")}
        if col == "articleType":
            head |= {"parent": "subCategory", "parent_map": _parent_map(styles, col, "subCategory")}
        heads.append(head)
    heads.append(
        {
            "name": "attributes",
            "kind": "multi",
            "column": attributes["source_column"],
            # Mined from product text: a value is present when its word-bounded pattern matches.
            "patterns": {g: dict(p) for g, p in attributes["groups"].items()},
            "w_pos": 1.0,
            "w_neg": 0.1,
            # BCE over 33 mostly-negative outputs starts ~20x smaller than a softmax CE (research §2).
            "weight": 10.0,
        }
    )
    return {
        "name": "fashion-product-images",
        "description": "Fashion Product Images: 7 catalog columns + 33 attributes mined from product names.",
        "unknown_values": sorted(UNKNOWN),
        "heads": heads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    styles = pd.read_csv(args.source / "styles.csv", dtype=str, keep_default_na=False, on_bad_lines="skip")
    attributes = yaml.safe_load((args.source / "attributes.yaml").read_text())
    tax = build_taxonomy(styles, attributes)
    tax_path = ROOT / "fashionlabel" / "taxonomies" / "fashion-product-images.yaml"
    tax_path.write_text(yaml.safe_dump(tax, sort_keys=False, allow_unicode=True, width=1000))

    with tarfile.open(args.source / "images-60x80.tar") as tar:
        members = {Path(m.name).stem: m for m in tar.getmembers() if m.isfile()}
        have = styles[styles["id"].isin(members)]
        missing = styles[~styles["id"].isin(members)]
        sample = have.sample(n=args.n, random_state=args.seed)
        # Real bad rows kept on purpose: products whose image file does not exist.
        bad = missing.sample(n=min(6, len(missing)), random_state=args.seed)
        out = ROOT / "examples" / "sample"
        (out / "images").mkdir(parents=True, exist_ok=True)
        for pid in sample["id"]:
            (out / "images" / f"{pid}.jpg").write_bytes(tar.extractfile(members[pid]).read())
    cat = pd.concat([sample, bad]).sort_values("id", key=lambda s: s.astype(int))
    cat = cat.rename(columns={"id": "product_id"})
    cat.insert(1, "image_uri", "images/" + cat["product_id"] + ".jpg")
    cat.to_csv(out / "catalog.csv", index=False)
    na = int((cat[SINGLE] == "NA").any(axis=1).sum())
    print(f"wrote {len(cat)} rows ({len(bad)} without image, {na} with NA labels) and {tax_path}")


if __name__ == "__main__":
    main()
