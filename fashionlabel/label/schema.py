"""The labels table's explicit pyarrow schema (its columns for analysts: docs/analysts.md "Columns")."""

from __future__ import annotations

import pyarrow as pa

from fashionlabel.taxonomy import Taxonomy

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])


def labels_schema(taxonomy: Taxonomy) -> pa.Schema:
    """The labels table's schema for ``taxonomy``: ids, versions and run, then per head its label and
    score(s) (``_score`` and ``_topk`` for a single head, ``_scores`` for a multi head), then
    ``needs_review`` and ``error``."""
    fields = [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("taxonomy_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("labeled_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    for h in taxonomy.heads:
        if h.kind == "single":
            fields += [
                pa.field(h.name, pa.string()),
                pa.field(f"{h.name}_score", pa.float32()),
                pa.field(f"{h.name}_topk", pa.list_(LABEL_SCORE)),
            ]
        else:
            fields += [
                pa.field(h.name, pa.list_(pa.string())),
                pa.field(f"{h.name}_scores", pa.list_(LABEL_SCORE)),
            ]
    fields += [pa.field("needs_review", pa.bool_()), pa.field("error", pa.string())]
    return pa.schema(fields)
