"""``fashionlabel report``: one self-contained HTML file (PNG charts inlined) for a labels run or a night.

Charts: label distribution per head, confidence histogram per single head, ``needs_review`` and error
shares, the run's counts and throughput (from its ``_SUCCESS`` manifest). The *night* report
(:func:`write_night_report`, written by ``fashionlabel nightly``) draws the same over the active products
of ``labels/latest`` and adds the night's counts and throughput and the drift against the previous night:
per head, the change of each label's share (percentage points) and the products whose label flipped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from fashionlabel import storage
from fashionlabel.label.writer import part_uris

log = logging.getLogger(__name__)

# What the reports draw and compare, a run's and a night's. The top-k and score lists are most of the
# labels' bytes, and as pandas objects (a list of dicts per row) ~10 KB a product: read whole, a
# 1M-product snapshot and the previous one held 13 GB on the head for charts that never look at them.
REPORT_COLUMNS = ("product_id", "active", "error", "needs_review", "model_version")
REPORT_SUFFIXES = ("", "_score")


def latest_run(labels: str) -> str:
    """The newest finished ``history/run_date=…`` folder under ``labels`` (its ``_SUCCESS`` written), or
    ``labels`` itself if it holds parts.

    A run folder without ``_SUCCESS`` is still being written, or its run was killed: reported, it would
    show part of a run as a whole one. Raises FileNotFoundError when no run folder is finished, and
    ValueError for a folder under ``history/`` whose name is no date, as ``query`` does
    (:func:`~fashionlabel.query.run_folders`): a copy such as ``run_date=2026-05-01.bak`` sorts after its
    night, and was reported as the newest run.
    """
    from fashionlabel.query import run_folders

    hist = storage.join(labels, "history")
    folders = run_folders(labels)  # name -> its files, oldest night first
    runs = list(folders)
    if not runs:
        return str(labels)
    done = [r for r in runs if "_SUCCESS" in folders[r]]
    if not done:
        raise FileNotFoundError(
            f"no finished run under {hist}: {runs[-1]} has no _SUCCESS (its run is still labelling, or was "
            "stopped: the same label command re-run completes it)"
        )
    if done[-1] != runs[-1]:
        log.warning(
            "report: %s is not finished (no _SUCCESS); reporting %s, the newest finished run",
            runs[-1],
            done[-1],
        )
    return storage.join(hist, done[-1])


def _run_dataset(run_dir: str) -> pads.Dataset:
    """The label parts of ``run_dir`` as one dataset; FileNotFoundError when it holds none."""
    fs, path = storage.filesystem(run_dir)
    files = part_uris(run_dir)
    if not files:
        raise FileNotFoundError(f"no labels Parquet under {run_dir}")
    return pads.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


def heads_of(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(single heads, multi heads) of a labels table, from its columns: a single head is a text column
    ``h`` beside ``h_topk``, a multi head a list column ``h`` beside ``h_scores``. Both columns are looked
    at, not the suffix alone: a single head named ``fit_scores`` was taken for a multi head ``fit``, and
    the report failed on a column ``fit`` that the table does not have."""

    def has(name: str, is_list: bool) -> bool:
        return name in schema.names and pa.types.is_list(schema.field(name).type) == is_list

    single = [
        c[: -len("_topk")] for c in schema.names if c.endswith("_topk") and has(c[: -len("_topk")], False)
    ]
    multi = [
        c[: -len("_scores")]
        for c in schema.names
        if c.endswith("_scores") and has(c[: -len("_scores")], True)
    ]
    return single, multi


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _charts(df: pd.DataFrame, heads: list[str], multi: list[str]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    ok = df[df["error"].isna()]
    for h in heads:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        counts = ok[h].value_counts().head(15)[::-1]
        ax[0].barh(counts.index.astype(str), counts.values, color="#3b75af")
        ax[0].set(title=f"{h}: label distribution (top 15)", xlabel="products")
        ax[0].tick_params(axis="y", labelsize=7)
        ax[1].hist(ok[f"{h}_score"].dropna(), bins=20, range=(0, 1), color="#e1812c")
        ax[1].set(title=f"{h}: confidence", xlabel="score of the chosen label", ylabel="products")
        charts.append((f"dist-{h}", _png(fig)))
    for h in multi:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        counts = ok[h].explode().value_counts().head(20)
        ax.bar(counts.index.astype(str), counts.values, color="#519e3e")
        ax.set(title=f"{h}: products per value (top 20)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        charts.append((f"dist-{h}", _png(fig)))
    fig, ax = plt.subplots(figsize=(5, 2.6))
    n = max(1, len(df))
    shares = {
        "needs_review": df["needs_review"].fillna(False).sum() / n,
        "error": df["error"].notna().sum() / n,
    }
    ax.bar(list(shares), [100 * v for v in shares.values()], color=["#c03d3e", "#7f7f7f"])
    ax.set(title="review queue and errors", ylabel="% of products", ylim=(0, 100))
    charts.append(("review", _png(fig)))
    return charts


def write_report(labels: str, out: str | Path, run_dir: str | None = None) -> dict[str, Any]:
    """Render the report of ``run_dir`` (default: the newest run under ``labels``) to ``out``."""
    run_dir = run_dir or latest_run(labels)
    data = _run_dataset(run_dir)
    heads, multi = heads_of(data.schema)
    # the columns it draws and counts, not the top-k and score lists (REPORT_COLUMNS): a whole catalog's
    # run read whole held ~10 KB a product
    want = {*REPORT_COLUMNS, "taxonomy_version", *(h + s for h in heads + multi for s in REPORT_SUFFIXES)}
    df = data.to_table(columns=[c for c in data.schema.names if c in want]).to_pandas()
    manifest_uri = storage.join(run_dir, "_SUCCESS")
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    charts = _charts(df, heads, multi)
    n = len(df)
    facts = {
        "products": n,
        "labelled": int(df["error"].isna().sum()),
        "errors": int(df["error"].notna().sum()),
        # an incremental run that found nothing new has no rows: the manifest still names its model
        "skipped (labelled before by this model)": int(manifest.get("skipped", 0)),
        "needs review": f"{100 * df['needs_review'].fillna(False).mean():.1f}%" if n else "n/a",
        "model version": ", ".join(sorted(df["model_version"].unique()))
        or manifest.get("model_version", "n/a"),
        "taxonomy version": ", ".join(sorted(df["taxonomy_version"].unique()))
        or manifest.get("taxonomy_version", "n/a"),
        "throughput": (
            f"{manifest['last_run_images_per_s']:.0f} img/s (the run that completed it"
            + (
                f"; first labels after {first:.1f} s)"
                if (first := manifest.get("last_run_first_batch_seconds")) is not None
                else ")"
            )
            if manifest.get("last_run_images_per_s")
            else "n/a (nothing to do)"
            if "last_run_images_per_s" in manifest
            else "n/a"
        ),
        "run": manifest.get("last_run_id", Path(str(run_dir)).name),
    }
    mean_scores = {h: float(df[f"{h}_score"].mean()) for h in heads}
    conf = "".join(f"<tr><th>{html.escape(h)}</th><td>{v:.3f}</td></tr>" for h, v in mean_scores.items())
    body = (
        f"<h2>Mean confidence per head</h2><table>{conf}</table>"
        if n
        else "<p>This run labelled no products: every product was skipped or the shards were empty. "
        "The labels of skipped products are in the earlier runs under <code>history/</code>.</p>"
    )
    _write(out, _page("fashionlabel report", str(run_dir), "Run", facts, body, charts))
    return {"out": str(out), "charts": [c for c, _ in charts], **facts}


def _write(out: str | Path, page: str) -> None:
    storage.write_bytes(out, page.encode())  # atomic, local or s3://


def _page(
    title: str, source: str, facts_title: str, facts: dict[str, Any], body: str, charts: list[tuple[str, str]]
) -> str:
    """One self-contained HTML page: a table of facts, ``body`` (HTML), then the charts inlined as PNGs."""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()
    )
    imgs = "".join(
        f'<figure id="{cid}"><img alt="{cid}" src="data:image/png;base64,{b64}"></figure>'
        for cid, b64 in charts
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(source)} — generated
{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC</p>
<h2>{html.escape(facts_title)}</h2><table>{rows}</table>{body}<h2>Charts</h2>{imgs}</body></html>"""


# ---- the night report ---------------------------------------------------------------------------
def drift(cur: pd.DataFrame, prev: pd.DataFrame, heads: list[str]) -> dict[str, dict[str, Any]]:
    """Per single head: share change per label (points) and the products whose label flipped.

    Both frames hold active products only; flips are counted over products present in both nights.
    """
    both = cur[["product_id", *heads]].merge(
        prev[["product_id", *heads]], on="product_id", suffixes=("", "_prev")
    )
    out = {}
    for h in heads:
        share = (
            cur[h].value_counts(normalize=True).subtract(prev[h].value_counts(normalize=True), fill_value=0)
            * 100
        )
        flipped = both[both[h].fillna("∅") != both[f"{h}_prev"].fillna("∅")]
        out[h] = {
            "share_change_pp": share.sort_values(key=abs, ascending=False),
            "flipped": len(flipped),
            "compared": len(both),
            "examples": flipped[["product_id", f"{h}_prev", h]].head(10).values.tolist(),
        }
    return out


def _drift_charts(d: dict[str, dict[str, Any]], prev_date: str) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    charts = []
    for h, v in d.items():
        top = v["share_change_pp"].head(12)[::-1]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh(
            top.index.astype(str), top.values, color=["#c03d3e" if x < 0 else "#3b75af" for x in top.values]
        )
        ax.axvline(0, color="#444", lw=0.8)
        ax.set(
            title=f"{h}: share change vs {prev_date} (points); {v['flipped']} of {v['compared']} flipped",
            xlabel="percentage points",
        )
        ax.tick_params(axis="y", labelsize=7)
        charts.append((f"drift-{h}", _png(fig)))
    return charts


def rate_text(done_now: int, done: int, rate: float) -> str:
    """A stage's rate, or why there is none: a re-run rates only the work it did itself."""
    if done_now:  # a night that labelled a handful of products has a rate below 1 img/s, not 0
        return f"{rate:,.0f} img/s" if rate >= 10 else f"{rate:.2g} img/s"
    return "n/a (done by an earlier run)" if done else "n/a (nothing to do)"


def night_rate(m: dict[str, Any], stage: str) -> str:
    """``rate_text`` of a night's "shard" or "label" stage from its manifest ("?" without one)."""
    if not m:
        return "?"
    done = {"shard": "sharded", "label": "labelled"}[stage]
    return rate_text(
        m.get(f"{done}_this_attempt", m.get(done, 0)), m.get(done, 0), m.get(f"{stage}_images_per_s", 0)
    )


def _run_chart(m: dict[str, Any]) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    keys = ["new", "changed", "unchanged", "quarantined", "labelled", "relabelled", "errors"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [3, 1]})
    ax[0].bar(keys, [m.get(k, 0) for k in keys], color="#3b75af")
    ax[0].set(title=f"night {m.get('run_date')}: products", yscale="symlog")
    ax[0].tick_params(axis="x", rotation=30, labelsize=8)
    tp = {"shard": m.get("shard_images_per_s", 0.0), "label": m.get("label_images_per_s", 0.0)}
    ax[1].bar(list(tp), list(tp.values()), color="#e1812c")
    ax[1].set(title="throughput", ylabel="images / s")
    return "run", _png(fig)


def _read_for_report(labels: str, date: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The columns of snapshot ``date`` that the night report uses (``REPORT_COLUMNS``, every head's
    label and a single head's score), in the snapshot's order; and its single and multi heads, named by
    the schema's ``_topk`` and ``_scores`` lists (which are not read)."""
    from fashionlabel import latest

    schema = latest.snapshot_schema(labels, date)
    names = schema.names
    single, multi = heads_of(schema)
    want = {*REPORT_COLUMNS, *(h + s for h in single + multi for s in REPORT_SUFFIXES)}
    table = latest.read_snapshot(labels, date, columns=[c for c in names if c in want])
    return table.to_pandas(), single, multi


def write_night_report(
    labels: str,
    date: str,
    out: str | Path,
    manifest: dict[str, Any] | None = None,
    previous: str | None = None,
) -> dict[str, Any]:
    """The report of night ``date``: latest's active products, the night's counts, drift vs ``previous``.

    Args:
        labels: the labels root (``history/`` and ``latest/`` under it).
        manifest: the night's counts and throughput (``run_nightly`` passes its manifest).
        previous: the previous night's snapshot date (default: the snapshot before ``date``, if any).
    """
    from fashionlabel import latest

    snaps = latest.snapshots(labels)
    if date not in snaps:
        raise FileNotFoundError(f"no latest snapshot for {date} under {labels}")
    if previous is None:
        older = [s for s in snaps if s < date]
        previous = older[-1] if older else None
    # an earlier night whose snapshot is pruned (keep_snapshots) leaves nothing to compare with, but date is
    # not the first night
    runs = [
        r.removeprefix("run_date=") for r in storage.listdirs(storage.join(labels, "history"), "run_date=")
    ]
    earlier = [r for r in runs if r < date]
    no_previous = (
        f"{earlier[-1]} (its latest snapshot is no longer kept: no drift)"
        if earlier
        else "none (first night)"
    )
    cur, heads, multi = _read_for_report(labels, date)
    active = cur[cur["active"]]
    charts = _charts(active, heads, multi)
    d, new_heads = {}, []
    if previous:
        prev, _, _ = _read_for_report(labels, previous)
        # a model whose taxonomy grew predicts heads the previous night's did not: nothing to compare
        new_heads = [h for h in heads if h not in prev.columns]
        shared = [h for h in heads if h in prev.columns]
        d = drift(active[active["error"].isna()], prev[prev["active"] & prev["error"].isna()], shared)
        charts += _drift_charts(d, previous)
    m = manifest or {}
    charts.append(_run_chart(m | {"run_date": date}))
    facts = {
        "night": date,
        "previous night": previous or no_previous,
        "active products": len(active),
        "inactive (gone from catalog)": int((~cur["active"]).sum()),
        "new / changed / unchanged": f"{m.get('new', '?')} / {m.get('changed', '?')} / {m.get('unchanged', '?')}",
        "labelled tonight": m.get("labelled", "?"),
        # error rows are in "labelled tonight" too, and latest keeps an earlier label over them
        "errors tonight": m.get("errors", "?"),
        "relabelled": m.get("relabelled", 0),
        "relabel reason": m.get("relabel_reason") or "none",
        "quarantined": m.get("quarantined", "?"),
        "needs review": f"{100 * active['needs_review'].fillna(False).mean():.1f}%" if len(active) else "n/a",
        "model version": ", ".join(sorted(active["model_version"].unique())),
        "shard throughput": night_rate(m, "shard"),
        "label throughput": night_rate(m, "label"),
    }
    flips = "".join(
        f"<tr><th>{html.escape(h)}</th><td>{v['flipped']}</td><td>{v['compared']}</td><td>"
        + html.escape("; ".join(f"{p}: {a} → {b}" for p, a, b in v["examples"][:5]))
        + "</td></tr>"
        for h, v in d.items()
    )
    flips = (
        f"<table><tr><th>head</th><th>flipped</th><th>compared (active in both snapshots)</th><th>examples</th></tr>{flips}</table>"
        if d
        else f"<p>previous night: {html.escape(no_previous)}; nothing to compare with</p>"
    )
    if new_heads:
        flips += (
            f"<p>new heads tonight, which the previous night's model did not predict (nothing to compare): "
            f"{html.escape(', '.join(new_heads))}</p>"
        )
    body = f"<h2>Drift against the previous night</h2>{flips}"
    _write(out, _page(f"fashionlabel night {date}", str(labels), "Night", facts, body, charts))
    return {
        "out": str(out),
        "charts": [c for c, _ in charts],
        "drift": {h: v["flipped"] for h, v in d.items()},
        "new heads": new_heads,
        **facts,
    }
