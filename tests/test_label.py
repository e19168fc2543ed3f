import datetime as dt
import io
import json
import shutil
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import resave_artifact

from fashionlabel.data import load_samples
from fashionlabel.label import aot
from fashionlabel.label.pipeline import CRASH_ONCE_ENV, LabelConfig, LabelError, label_shards, plan_resources
from fashionlabel.label.postprocess import MULTI_TOPK, TOPK
from fashionlabel.label.predictor import Predictor, cpu_piece
from fashionlabel.label.reader import TarFormatError, read_shards, read_tar, shard_samples
from fashionlabel.label.reader import decode as reader_decode
from fashionlabel.label.schema import labels_schema
from fashionlabel.label.writer import labelled_keys
from fashionlabel.models import create_model
from fashionlabel.shards import iter_shard, list_shards
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.export import save_artifact

ONE_ROW_PER_PRODUCT = (
    "SELECT count(*), count(DISTINCT product_id) FROM read_parquet('{}/history/*/*.parquet')"
)


def _count(out) -> tuple[int, int]:
    return duckdb.connect().execute(ONE_ROW_PER_PRODUCT.format(out)).fetchall()[0]


def _rewrite_shard(src: str, dest: Path, edit) -> None:
    """Copy a shard member by member; ``edit(index, name, payload)`` may return new bytes."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for i, m in enumerate(tin):
            data = edit(i, m.name, tin.extractfile(m).read())
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def odd_shards(small_shards, tmp_path_factory) -> Path:
    """Two shards copied from the sample set; the second has one corrupt JPEG (member 6: sample 3's jpg)."""
    out = tmp_path_factory.mktemp("odd-shards")
    uris = list_shards(str(small_shards))
    _rewrite_shard(uris[0], out / "shard-000000.tar", lambda i, n, b: b)
    _rewrite_shard(
        uris[1],
        out / "shard-000001.tar",
        lambda i, n, b: b[:40] + b"\x00garbage" * 64 if n.endswith(".jpg") and i == 6 else b,
    )
    return out


@pytest.fixture(scope="module")
def odd_labels(ray_session, odd_shards, tiny_model, tmp_path_factory) -> dict:
    """``odd_shards`` labelled once by ``tiny_model`` on 2026-01-01, with the run's wall-clock window.
    Tests that label on top of it copy the run folder first (:func:`_copy_run`)."""
    out = tmp_path_factory.mktemp("odd-labels")
    start = dt.datetime.now(dt.UTC)
    summary = label_shards(str(odd_shards), str(tiny_model), str(out), "2026-01-01")
    end = dt.datetime.now(dt.UTC)
    return {"summary": summary, "window": (start, end), "run": out / "history" / "run_date=2026-01-01"}


def _copy_run(labels: dict, out: Path) -> Path:
    shutil.copytree(labels["run"], out / "history" / labels["run"].name)
    return out


# The labels table of the built-in taxonomy as docs/analysts.md ("Columns") and infra/athena/tables.sql
# state it, written out here rather than taken from labels_schema(): a change to the schema module must
# show up as a change to the contract.
LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])
SINGLE_HEADS = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
LABELS_TABLE = {
    "product_id": pa.string(),
    "image_sha256": pa.string(),
    "model_version": pa.string(),
    "taxonomy_version": pa.string(),
    "run_id": pa.string(),
    "labeled_at": pa.timestamp("us", tz="UTC"),
    **{
        col: typ
        for h in SINGLE_HEADS
        for col, typ in (
            (h, pa.string()),
            (f"{h}_score", pa.float32()),
            (f"{h}_topk", pa.list_(LABEL_SCORE)),
        )
    },
    "attributes": pa.list_(pa.string()),
    "attributes_scores": pa.list_(LABEL_SCORE),
    "needs_review": pa.bool_(),
    "error": pa.string(),
}


def test_fast_tar_reader_matches_tarfile(small_shards):
    uri = list_shards(str(small_shards))[0]
    ids, shas, jpgs = shard_samples(uri)
    want = list(iter_shard(uri))
    assert ids == [s["json"]["product_id"] for s in want]
    assert shas == [s["json"]["sha256"] for s in want]
    assert jpgs == [s["jpg"] for s in want]
    data = Path(uri).read_bytes()
    with pytest.raises(TarFormatError, match="truncated"):
        list(read_tar(data[: len(data) // 2]))


def test_plan_never_takes_every_cpu_and_uses_gpus():
    cpu = plan_resources(LabelConfig(), cpus=2, gpus=0)
    assert cpu.device == "cpu" and cpu.decode == "cpu" and cpu.actors == 2 and cpu.threads == 1
    assert cpu.read_in_actor and not plan_resources(LabelConfig(read="tasks"), 2, 0).read_in_actor
    assert cpu.actors * cpu.actor_cpus + cpu.read_cpus <= 2  # a read task always fits beside the pool
    big = plan_resources(LabelConfig(), cpus=64, gpus=0)
    assert big.actors == 8 and big.threads == 8 and big.actors * big.actor_cpus + big.read_cpus <= 64
    gpu = plan_resources(LabelConfig(), cpus=16, gpus=1)
    assert gpu.device == "cuda" and gpu.decode == "gpu" and gpu.actors == 2 and gpu.actor_gpus == 0.5
    assert gpu.read_tasks == 14 and gpu.batch_size == 512 and not gpu.read_in_actor
    assert plan_resources(LabelConfig(decode="cpu", actors_per_gpu=1), 16, 2).actors == 2
    with pytest.raises(ValueError, match="decode='fpga'"):
        LabelConfig(decode="fpga")
    with pytest.raises(ValueError, match="read='driver'"):
        LabelConfig(read="driver")
    # a zero is refused, not read as "the default"; a GPU asked for where there is none is refused too
    with pytest.raises(ValueError, match="invalid label setting.*batch_size=0, actors=0"):
        LabelConfig(batch_size=0, actors=0)
    with pytest.raises(LabelError, match="no GPU"):
        plan_resources(LabelConfig(device="cuda"), 2, 0)


@pytest.mark.parametrize("read", ["tasks", "actor"])
def test_labels_stream_back_shard_by_shard(ray_session, small_shards, tiny_model, tmp_path, read):
    # With read tasks, read and predict must stay two operators: were Ray Data to fuse them (same remote
    # args), one actor call would receive every shard URI at once and nothing would come back before the
    # very end. With reads in the actor, each call is one shard.
    sizes: list[int] = []
    s = label_shards(
        str(small_shards),
        str(tiny_model),
        str(tmp_path / "labels"),
        "2026-01-01",
        LabelConfig(actors=2, batch_size=64, read=read),
        progress=sizes.append,
    )
    assert s["labelled"] == sum(sizes) == 600
    assert len(sizes) >= 4 and max(sizes) <= 150, sizes


def test_a_labelling_run_says_how_far_it_is_with_an_eta(
    ray_session, small_shards, tiny_model, tmp_path, caplog, monkeypatch
):
    """Ray Data's own lines count output rows against a guess (``0/?`` in a night's relabel of a whole
    catalog) and give no eta: the run logs its shards written, products, rate and eta (every 10 s; after
    every shard here)."""
    import logging
    import re

    from fashionlabel.label import pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="fashionlabel.label.pipeline"):
        s = label_shards(
            str(small_shards),
            str(tiny_model),
            str(tmp_path / "labels"),
            "2026-01-01",
            LabelConfig(actors=2, batch_size=64, read="actor"),
        )
    lines = [r.getMessage() for r in caplog.records if "shards written" in r.getMessage()]
    assert s["labelled"] == 600 and lines, "no progress line while the run labelled"
    for text in lines:
        assert re.fullmatch(
            r"label: [0-3]/4 shards written, \d+ products, (\d+ img/s, eta \d+ s|\d+ s in; rate and eta once "
            r"the first shard is written)",
            text,
        ), text
    assert pipeline.progress_line(1, 4, 150, 10.0) == "1/4 shards written, 150 products, 15 img/s, eta 30 s"


def test_label_schema_rows_rerun_and_equal_to_predictor(
    ray_session, small_shards, odd_shards, tiny_model, tmp_path
):
    out = tmp_path / "labels"
    s = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert s["labelled"] == 600 and s["errored"] == 0 and s["files"] == 4
    run = out / "history" / "run_date=2026-01-01"
    success = json.loads((run / "_SUCCESS").read_text())
    assert success["rows"] == success["labelled"] == 600 and success["files"] == 4
    assert 0 < s["first_batch_seconds"] < s["seconds"]
    assert success["last_run_first_batch_seconds"] == s["first_batch_seconds"]
    assert success["model_version"] == s["model_version"] and success["taxonomy_version"]
    tax = Taxonomy.load("fashion-product-images")
    parts = sorted(run.glob("*.parquet"))
    assert len(parts) == 4 and all(pq.read_schema(f).equals(labels_schema(tax)) for f in parts)
    assert _count(out) == (600, 600)
    con = duckdb.connect()
    # every single head's label comes from its own value list; hierarchy is consistent
    art = con.execute(f"SELECT articleType, subCategory, masterCategory FROM '{run}/*.parquet'").fetchall()
    sub, master = tax.head("articleType").parent_map, tax.head("subCategory").parent_map
    assert all(sub[a] == s_ and master[s_] == m for a, s_, m in art)
    again = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert again["shards_done_before"] == 4 and again["labelled"] == 0
    assert again["first_batch_seconds"] is None  # nothing was labelled
    # the run it names is the one whose rows are there, not a new id no row carries
    assert again["run_id"] == s["run_id"] == success["last_run_id"] and not again["wrote"] and s["wrote"]
    assert duckdb.sql(f"SELECT DISTINCT run_id FROM '{run}/*.parquet'").fetchall() == [(s["run_id"],)]
    # a killed attempt's folder (its last part and the manifest unwritten) is finished under the same run id
    parts[-1].unlink()
    (run / "_SUCCESS").unlink()
    resumed = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert resumed["shards_done_before"] == 3 and resumed["labelled"] == 150 and resumed["wrote"]
    assert resumed["run_id"] == s["run_id"] == json.loads((run / "_SUCCESS").read_text())["last_run_id"]
    assert duckdb.sql(f"SELECT DISTINCT run_id FROM '{run}/*.parquet'").fetchall() == [(s["run_id"],)]
    assert _count(out) == (600, 600)
    same = f"{small_shards.parent}/./{small_shards.name}/"  # the same shards, spelled another way
    assert label_shards(same, str(tiny_model), str(out), "2026-01-01")["shards_done_before"] == 4
    # other shards whose file names are taken in this run folder are refused, not skipped as "done"
    with pytest.raises(LabelError, match="already holds other labels under the same names .* from /"):
        label_shards(str(odd_shards), str(tiny_model), str(out), "2026-01-01")
    # and so is another model: its labels must not be taken as written because this model's are there
    other = tmp_path / "other-model"
    torch.manual_seed(7)
    save_artifact(
        other,
        create_model("fl_tiny", tax).eval(),
        architecture="fl_tiny",
        taxonomy=tax,
        preprocessing=json.loads((tiny_model / "model.json").read_text())["preprocessing"],
    )
    with pytest.raises(
        LabelError, match=rf"from model version {s['model_version']}\); label .* with model version "
    ):
        label_shards(str(small_shards), str(other), str(out), "2026-01-01")
    assert _count(out) == (600, 600)

    # the labels are exactly those of the predictor that `fashionlabel evaluate` uses, on the same images
    got = pq.read_table(run).sort_by("product_id")
    pred = Predictor(tiny_model, device="cpu")
    samples = load_samples(list_shards(str(small_shards)), pred.taxonomy, pred.size)
    want = (
        pa.Table.from_pylist(pred.label_rows(samples.images))
        .append_column("product_id", pa.array(samples.product_ids))
        .append_column("image_sha256", pa.array(samples.sha256))
        .sort_by("product_id")
    )
    for col in ["product_id", "image_sha256", "needs_review", *(h.name for h in tax.heads)]:
        assert got[col].to_pylist() == want[col].to_pylist(), col
    for h in tax.single_heads:
        assert np.allclose(got[f"{h.name}_score"].to_numpy(), want[f"{h.name}_score"].to_numpy(), atol=1e-5)

    # evaluate's "as labelled" figures are those of the table labelling wrote, on the test products
    from fashionlabel.train.run import evaluate

    m = evaluate(str(tiny_model), str(small_shards), "test", write_to=str(tmp_path / "eval"))["metrics"]
    test = load_samples(list_shards(str(small_shards)), pred.taxonomy, pred.size, split="test")
    by_id = {r["product_id"]: r for r in got.to_pylist()}
    rows = [by_id[p] for p in test.product_ids]
    assert m["needs_review"] == pytest.approx(np.mean([r["needs_review"] for r in rows]))
    for h in tax.single_heads:
        y = test.targets[h.name]
        right = [
            r[h.name] == h.values[t] for r, t in zip(rows, y, strict=True) if t >= 0 and not r["needs_review"]
        ]
        assert m["heads"][h.name]["n_accepted"] == len(right)
        if right:
            assert m["heads"][h.name]["top1_accepted"] == pytest.approx(np.mean(right))
    attrs = tax.head("attributes")
    tp = n_pred = n_true = 0
    for r, t in zip(rows, test.targets["attributes"], strict=True):
        if not np.isnan(t).any():
            truth = {attrs.values[i] for i in np.nonzero(t > 0.5)[0]}
            tp, n_pred, n_true = (
                tp + len(truth & set(r["attributes"])),
                n_pred + len(r["attributes"]),
                n_true + len(truth),
            )
    at = m["heads"]["attributes"]["at_threshold"]
    assert at["micro_precision"] == pytest.approx(tp / n_pred if n_pred else 0.0)
    assert at["micro_recall"] == pytest.approx(tp / n_true if n_true else 0.0)


def test_corrupt_image_error_row_incremental_and_device_decode(odd_labels, odd_shards, tiny_model, tmp_path):
    out = _copy_run(odd_labels, tmp_path / "labels")
    first = odd_labels["summary"]
    assert (first["labelled"], first["errored"], first["skipped"]) == (299, 1, 0)
    bad = (
        duckdb.connect()
        .execute(
            f"SELECT product_id, error, articleType, gender_score, attributes, needs_review "
            f"FROM '{out}/history/*/*.parquet' WHERE error IS NOT NULL"
        )
        .fetchall()
    )
    assert len(bad) == 1 and bad[0][1].startswith("undecodable image") and bad[0][2:5] == (None, None, None)
    assert bad[0][5] is True

    # next night, one product's image changed: only it and the failed one are labelled again
    changed = {}

    def new_sha(i, name, b):
        if name.endswith(".json") and i == 1:
            meta = json.loads(b)
            changed[meta["product_id"]] = meta["sha256"] = "f" * 64
            return json.dumps(meta).encode()
        return b

    tmp = tmp_path / "odd-shards-next"
    tmp.mkdir()
    _rewrite_shard(str(odd_shards / "shard-000000.tar"), tmp / "shard-000000.tar", new_sha)
    _rewrite_shard(str(odd_shards / "shard-000001.tar"), tmp / "shard-000001.tar", lambda i, n, b: b)
    nxt = label_shards(str(tmp), str(tiny_model), str(out), "2026-01-02", incremental=True)
    assert (nxt["labelled"], nxt["errored"], nxt["skipped"]) == (1, 1, 298)
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT product_id, image_sha256 FROM '{out}/history/run_date=2026-01-02/*.parquet' "
            f"WHERE error IS NULL"
        )
        .fetchall()
    )
    assert rows == list(changed.items())
    success = json.loads((out / "history" / "run_date=2026-01-02" / "_SUCCESS").read_text())
    assert (success["rows"], success["skipped"], success["files"]) == (2, 298, 2)
    # a third night with nothing new writes (empty) parts only: the run is complete, nothing relabelled
    third = label_shards(str(tmp), str(tiny_model), str(out), "2026-01-03", incremental=True)
    assert (third["labelled"], third["skipped"], third["files"]) == (0, 299, 2)

    # decode on the actor's device (nvJPEG on a GPU; libjpeg-turbo here): same rows, same error,
    # and labels that agree with PIL decode up to resampling differences
    dev = label_shards(
        str(odd_shards), str(tiny_model), str(tmp_path / "dev"), "2026-01-01", LabelConfig(decode="gpu")
    )
    assert (dev["labelled"], dev["errored"], dev["decode"]) == (299, 1, "gpu")
    agree = (
        duckdb.connect()
        .execute(
            f"SELECT avg((a.articleType = b.articleType)::INT), count(*) "
            f"FROM '{out}/history/run_date=2026-01-01/*.parquet' a "
            f"JOIN '{tmp_path}/dev/history/*/*.parquet' b USING (product_id) WHERE a.error IS NULL"
        )
        .fetchall()
    )
    assert agree[0][1] == 299 and agree[0][0] >= 0.9

    # decode split between the read and the device: the same rows and error; the rows decoded by the read
    # have PIL's pixels, so their labels are those of the CPU-decode run exactly
    split = label_shards(
        str(odd_shards),
        str(tiny_model),
        str(tmp_path / "split"),
        "2026-01-01",
        LabelConfig(decode="split", cpu_decode_share=0.25),
    )
    assert (split["labelled"], split["errored"], split["decode"]) == (299, 1, "split (25% decoded at read)")
    assert _count(tmp_path / "split") == (300, 300)
    # with a 25% share the read decodes every 4th product of each shard (the 4th of shard 1 is the corrupt one)
    at_read = [pid for uri in list_shards(str(odd_shards)) for pid in shard_samples(uri)[0][3::4]]
    agree = " AND ".join(f"a.{h} = b.{h}" for h in SINGLE_HEADS)
    same = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(*) FILTER ({agree}) "
            f"FROM '{out}/history/run_date=2026-01-01/*.parquet' a "
            f"JOIN '{tmp_path}/split/history/*/*.parquet' b USING (product_id) "
            f"WHERE a.error IS NULL AND product_id IN (SELECT unnest(?))",
            [at_read],
        )
        .fetchall()
    )
    assert same == [(len(at_read) - 1, len(at_read) - 1)]


def test_labels_files_hold_the_documented_columns_types_and_run_identity(odd_labels):
    run, summary = odd_labels["run"], odd_labels["summary"]
    parts = sorted(run.glob("*.parquet"))
    assert len(parts) == 2
    for part in parts:
        assert {f.name: f.type for f in pq.read_schema(part)} == LABELS_TABLE, part.name
    # read back as analysts do: DuckDB sees an instant in UTC, not a local wall-clock time
    con = duckdb.connect()
    (kind,) = con.execute(f"SELECT typeof(labeled_at) FROM '{run}/*.parquet' LIMIT 1").fetchone()
    assert kind == "TIMESTAMP WITH TIME ZONE"
    t = pq.read_table(run, columns=["labeled_at", "run_id", "model_version"])
    start, end = odd_labels["window"]
    assert t.num_rows == 300 and all(start <= at <= end for at in t["labeled_at"].to_pylist())
    assert set(t["run_id"].to_pylist()) == {summary["run_id"]}
    assert set(t["model_version"].to_pylist()) == {summary["model_version"]}


def test_topk_is_each_heads_own_best_scores_in_order_led_by_its_label(odd_labels):
    tax = Taxonomy.load("fashion-product-images")
    rows = [r for r in pq.read_table(odd_labels["run"]).to_pylist() if r["error"] is None]
    assert len(rows) == 299
    (chain,) = tax.chains()  # masterCategory → subCategory → articleType
    in_chain = {h.name for h in chain}
    for h in tax.single_heads:
        k = min(TOPK, len(h.values))
        for r in rows:
            top, label, score = r[f"{h.name}_topk"], r[h.name], r[f"{h.name}_score"]
            scores, labels = [e["score"] for e in top], [e["label"] for e in top]
            assert len(top) == k and scores == sorted(scores, reverse=True), (h.name, r["product_id"])
            assert len(set(labels)) == k and set(labels) <= set(h.values)
            assert score <= scores[0] and (label not in labels or scores[labels.index(label)] == score)
            if h.name not in in_chain:
                assert top[0] == {"label": label, "score": score}, (h.name, r["product_id"])
    # A hierarchy head's label is the chain's joint choice, its top-k the head's own scores: the two part
    # only where the heads' own best values contradict each other. Where they agree, each head's top entry
    # is its label.
    agreeing = [
        r
        for r in rows
        if all(
            h.parent_map[r[f"{h.name}_topk"][0]["label"]] == r[f"{h.parent}_topk"][0]["label"]
            for h in chain
            if h.parent
        )
    ]
    assert agreeing
    for r in agreeing:
        for h in chain:
            assert r[f"{h.name}_topk"][0] == {"label": r[h.name], "score": r[f"{h.name}_score"]}, h.name
    for h in (h for h in tax.heads if h.kind == "multi"):
        for r in rows:
            scores = [e["score"] for e in r[f"{h.name}_scores"]]
            assert len(scores) == min(MULTI_TOPK, len(h.values)) and scores == sorted(scores, reverse=True)


def test_incremental_with_a_new_model_version_relabels_every_product(
    odd_labels, odd_shards, tiny_model, tmp_path
):
    out = _copy_run(odd_labels, tmp_path / "labels")
    old = odd_labels["summary"]["model_version"]
    assert len(labelled_keys(str(out), old)) == 299  # the history an incremental run of that model skips
    new = resave_artifact(tiny_model, tmp_path / "v2", "retrained")
    assert new != old
    s = label_shards(str(odd_shards), str(tmp_path / "v2"), str(out), "2026-01-02", incremental=True)
    assert (s["labelled"], s["errored"], s["skipped"]) == (299, 1, 0)
    night = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(DISTINCT product_id), any_value(model_version), "
            f"count(DISTINCT model_version) FROM '{out}/history/run_date=2026-01-02/*.parquet'"
        )
        .fetchall()
    )
    assert night == [(300, 300, new, 1)]


def test_split_decode_hands_a_share_decoded_and_the_device_decodes_the_rest(odd_shards, tiny_model):
    uri = str(odd_shards / "shard-000001.tar")  # sample 3's JPEG is corrupt
    size = (80, 60)
    read = read_shards({"shard": np.array([uri], dtype=object)}, "split", size, cpu_share=0.25)
    n = len(read["product_id"])
    decoded = [i for i in range(n) if len(read["pixels"][i])]
    # an even interleave: one row in four decoded by the read, never both columns filled
    assert decoded == [i for i in range(n) if i % 4 == 3 and i != 3] and read["error"][3].startswith(
        "undecod"
    )
    assert all(bool(len(read["jpg"][i])) != bool(len(read["pixels"][i])) for i in range(n) if i != 3)
    _, _, jpgs = shard_samples(uri)
    assert np.array_equal(
        np.frombuffer(read["pixels"][7], np.uint8).reshape(80, 60, 3), reader_decode(jpgs[7], size)
    )

    # the device gets JPEGs and decoded pixels mixed (the rows without an error, as an actor does), and
    # gives one image per decodable input, in input order; a JPEG it cannot decode is named by its index
    pred = Predictor(tiny_model, device="cpu")
    ok = [i for i in range(n) if i != 3]
    jpg_in, pix_in = [read["jpg"][i] for i in ok], [read["pixels"][i] for i in ok]
    jpg_in[0] = b"\xff\xd8 not a JPEG"
    mixed, bad = pred.decode_on_device(jpg_in, pix_in)
    assert list(bad) == [0] and len(mixed) == len(ok) - 1
    everything, _ = pred.decode_on_device([jpgs[i] for i in ok])
    for k, i in enumerate(ok[1:], start=1):
        want = torch.from_numpy(reader_decode(jpgs[i], size)) if i in decoded else everything[k]
        assert torch.equal(mixed[k - 1], want)


def test_damaged_shards_are_salvaged_and_their_lost_products_get_error_rows(
    ray_session, small_shards, tiny_model, tmp_path
):
    """A truncated tar and one with a garbled header: the products before the damage are labelled, every
    product the index places in the shard after it gets an error row, and the run counts both shards."""
    shards = tmp_path / "shards"
    shards.mkdir()
    uris = list_shards(str(small_shards))
    index = pq.read_table(small_shards / "index.parquet")  # the three shards copied here, not the fourth
    pq.write_table(index.filter(pc.not_equal(index["shard"], "shard-000003")), shards / "index.parquet")
    (shards / "shard-000000.tar").write_bytes(Path(uris[0]).read_bytes())
    data = Path(uris[1]).read_bytes()
    cut = data[: len(data) // 2]  # ends inside a member
    (shards / "shard-000001.tar").write_bytes(cut)
    garbled = bytearray(Path(uris[2]).read_bytes())
    with tarfile.open(uris[2]) as tar:
        at = [m.offset for m in tar][100]  # member 100: sample 50's first member
    garbled[at + 124 : at + 136] = b"77777777777\0"  # its size field
    (shards / "shard-000002.tar").write_bytes(bytes(garbled))
    with pytest.raises(TarFormatError, match="corrupt tar: bad header"):
        shard_samples(str(shards / "shard-000002.tar"))
    # samples complete (image and sidecar) before the cut, by the standard library's reader
    whole: dict[str, set] = {}
    with tarfile.open(uris[1]) as tar:
        for m in tar:
            if m.offset_data + m.size <= len(cut):
                whole.setdefault(m.name.partition(".")[0], set()).add(m.name.partition(".")[2])
    readable = sum(exts == {"jpg", "json"} for exts in whole.values())
    assert 0 < readable < 150

    out = tmp_path / "labels"
    s = label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")
    assert s["damaged_shards"] == 2 and s["labelled"] + s["errored"] == 450
    assert _count(out) == (450, 450)  # every product of the three shards once, lost ones included
    errors = (
        duckdb.connect()
        .execute(
            f"SELECT split_part(error, ':', 2), count(*), count(articleType) "
            f"FROM '{out}/history/*/*.parquet' WHERE error LIKE 'unreadable shard:%' GROUP BY 1 ORDER BY 1"
        )
        .fetchall()
    )
    assert errors == [(" corrupt tar", 100, 0), (" truncated tar", 150 - readable, 0)]
    success = json.loads((out / "history" / "run_date=2026-01-01" / "_SUCCESS").read_text())
    assert success["damaged"] == 2 and success["rows"] == 450
    again = label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")
    assert again["shards_done_before"] == 3 and _count(out) == (450, 450)

    # without an index the lost products are unknown: the readable ones are labelled, the damage counted
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "shard-000001.tar").write_bytes(cut)
    b = label_shards(str(bare), str(tiny_model), str(tmp_path / "bare-labels"), "2026-01-01")
    assert (b["damaged_shards"], b["labelled"], b["errored"]) == (1, readable, 0)


def test_a_sidecar_damaged_in_place_is_a_lost_product_not_one_labelled_under_its_key(tmp_path):
    """A tar's payloads carry no checksum: a byte of a sidecar overwritten in place was read as a sample
    without one, so the product was labelled under its shard key (``SKU_1670_A--…`` for ``SKU.1670/A``)
    with no error, a product no catalog has, and ``SKU.1670/A`` never. Training refuses such a shard by
    name (``iter_shard``); labelling now counts the sample lost: the index names its product, which gets an
    error row, and the shard is reported damaged."""
    from conftest import sample_rows

    from fashionlabel.catalog import check_ids
    from fashionlabel.shards import ShardConfig, index_schema, pack_shard

    tax = Taxonomy.load("fashion-product-images")
    rows = [dict(r, product_id=f"SKU.{r['product_id']}/A") for r in sample_rows(10)]
    rows = [r for r in rows if Path(r["image_uri"]).exists()][:3]
    valid, _ = check_ids(rows, str(tmp_path / "catalog.csv"))
    pack_shard(0, valid, str(tmp_path), ShardConfig(fetches_in_flight=1), index_schema(tax), tax)
    shutil.copy(tmp_path / "_parts" / "shard-000000.parquet", tmp_path / "index.parquet")
    tar = tmp_path / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[data.find(f'"product_id": "{rows[1]["product_id"]}'.encode())] = 0  # one byte, in place
    tar.write_bytes(bytes(data))
    key = valid[1].key
    assert key != rows[1]["product_id"]

    with pytest.raises(TarFormatError, match=f"not a JSON object \\(member {key}.json\\)"):
        shard_samples(str(tar))
    b = read_shards({"shard": np.array([str(tar)], dtype=object)}, decode_on="cpu", size=(80, 60))
    got = dict(zip(b["product_id"], b["error"], strict=True))
    assert sorted(got) == sorted(r["product_id"] for r in rows)  # catalog ids only: no key among them
    assert got[rows[0]["product_id"]] is None and got[rows[2]["product_id"]] is None
    assert got[rows[1]["product_id"]].startswith("unreadable shard: the sidecar of 1 sample(s)")
    assert set(b["shard_damage"]) == {f"the sidecar of 1 sample(s) is not a JSON object (member {key}.json)"}

    # a sidecar damaged into two JSON values: the whole shard's sidecars parsed in one call read one value
    # too many, and every later sample took its neighbour's id (or the read task failed on zip(strict=True))
    from fashionlabel.label.reader import salvage_shard
    from fashionlabel.tarwriter import TarWriter

    two = tmp_path / "two.tar"
    with TarWriter(open(two, "wb")) as t:  # noqa: SIM115 - the writer closes it
        for k, sidecar in (("a", b'{"product_id": "A"}'), ("b", b"1, 2"), ("c", b'{"product_id": "C"}')):
            t.add(f"{k}.json", sidecar)
            t.add(f"{k}.jpg", b"jpg")
    assert salvage_shard(str(two))[0] == ["A", "C"]
    with pytest.raises(TarFormatError, match=r"\(member b\.json\)"):
        shard_samples(str(two))


def test_a_tar_cut_where_no_member_notices_is_damage_not_a_shorter_shard(
    ray_session, small_shards, tiny_model, tmp_path
):
    """A zero-byte tar, one cut exactly between two members and one cut inside a header read as complete
    shards with fewer products (the run said nothing of the 150 products of the empty one): without the
    end-of-archive marker each is damaged, and every product the index places after the cut gets a row."""
    uris = list_shards(str(small_shards))
    assert len(uris) == 4
    data = [Path(u).read_bytes() for u in uris]
    with tarfile.open(uris[2]) as tar:
        between = [m.offset for m in tar][100]  # the header of member 100: a sample boundary
    with tarfile.open(uris[3]) as tar:
        in_header = [m.offset for m in tar][61] + 200  # 200 bytes into a header
    for cut in (b"", data[2][:between], data[3][:in_header]):
        with pytest.raises(TarFormatError, match="truncated tar: no end-of-archive marker"):
            list(read_tar(cut))
    assert len(list(read_tar(data[0]))) == 300  # a whole shard: 150 images and their sidecars

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.parquet").write_bytes((small_shards / "index.parquet").read_bytes())
    (shards / "shard-000000.tar").write_bytes(data[0])
    (shards / "shard-000001.tar").write_bytes(b"")
    (shards / "shard-000002.tar").write_bytes(data[2][:between])
    (shards / "shard-000003.tar").write_bytes(data[3][:in_header])
    out = tmp_path / "labels"
    s = label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")
    assert s["damaged_shards"] == 3 and s["labelled"] + s["errored"] == 600
    assert _count(out) == (600, 600)
    lost = (
        duckdb.connect()
        .execute(f"SELECT count(*) FROM '{out}/history/*/*.parquet' WHERE error LIKE 'unreadable shard:%'")
        .fetchone()[0]
    )
    assert lost == 150 + (150 - 50) + (150 - 30)  # all of the empty one, the samples after each cut


def test_a_damaged_part_is_labelled_again_not_a_run_that_cannot_finish(
    ray_session, small_shards, tiny_model, tmp_path
):
    """A published part cut short on disk (a partial copy, a bad sector) failed every re-run with
    `Parquet magic bytes not found in footer`, naming no file, while the report said the re-run completes
    the run. The re-run labels that shard again and replaces the part; the others stay done."""
    out = tmp_path / "labels"
    first = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    run = out / "history" / "run_date=2026-01-01"
    part = run / "part-shard-000001.parquet"
    part.write_bytes(part.read_bytes()[:1000])
    (run / "_SUCCESS").unlink()
    again = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert again["shards_done_before"] == 3 and again["labelled"] == 150
    assert _count(out) == (first["labelled"] + first["errored"],) * 2
    assert json.loads((run / "_SUCCESS").read_text())["rows"] == _count(out)[0]


def test_dead_actor_is_replaced_and_batch_retried(ray_session, odd_shards, tiny_model, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    out = tmp_path / "labels"
    s = label_shards(str(odd_shards), str(tiny_model), str(out), "2026-01-01")
    assert marker.exists()  # an actor process did die mid-run
    assert (s["labelled"], s["errored"]) == (299, 1)
    assert _count(out) == (300, 300)


def test_labels_to_s3(ray_session, s3, odd_shards, tiny_model):
    bucket = s3.make_bucket("labels-out")
    uri = f"s3://{bucket}/labels"
    s = label_shards(str(odd_shards), str(tiny_model), uri, "2026-01-01")
    assert (s["labelled"], s["errored"], s["files"]) == (299, 1, 2)
    again = label_shards(str(odd_shards), str(tiny_model), uri, "2026-01-02", incremental=True)
    assert (again["labelled"], again["skipped"]) == (0, 299)
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert "labels/history/run_date=2026-01-01/_SUCCESS" in keys
    assert "labels/history/run_date=2026-01-01/part-shard-000001.parquet" in keys


def test_reader_reads_s3_shard_in_one_get(s3, odd_shards):
    bucket = s3.make_bucket("shards-in")
    s3.client().upload_file(str(odd_shards / "shard-000001.tar"), bucket, "set/shard-000001.tar")
    assert shard_samples(f"s3://{bucket}/set/shard-000001.tar") == shard_samples(
        str(odd_shards / "shard-000001.tar")
    )


def test_cpu_forward_in_cache_sized_pieces_gives_the_same_scores(tiny_model):
    assert (cpu_piece((80, 60), 256), cpu_piece((224, 224), 256), cpu_piece((80, 60), 16)) == (64, 8, 16)
    pred = Predictor(tiny_model, device="cpu", batch_size=256)
    images = np.random.default_rng(0).integers(0, 256, (150, *pred.size, 3), dtype=np.uint8)
    assert 0 < pred.piece < len(images)
    pieces = pred.probs_on_device(images)
    pred.piece = 0
    whole = pred.probs_on_device(images)
    for k in whole:
        assert np.allclose(pieces[k], whole[k], atol=1e-5), k


@pytest.mark.timeout(300)
def test_compiled_predictor_matches_eager_and_later_ones_load_the_package_the_first_built(
    tiny_model, tmp_path, monkeypatch
):
    # Predictor sets the variable for the rest of its process: monkeypatch puts it back after the test.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "not-this-one"))
    cache = tmp_path / "compiled"
    images = np.random.default_rng(1).integers(0, 256, (40, 80, 60, 3), dtype=np.uint8)
    eager = Predictor(tiny_model, device="cpu", batch_size=32).probs_on_device(images)

    def compiled_probs() -> tuple[dict[str, np.ndarray], str]:
        p = Predictor(tiny_model, device="cpu", batch_size=32, compile=True, compile_cache=cache)
        return p.probs_on_device(images), p.compiled_from  # 32 + a short batch of 8, padded to 32

    def same_as_eager(got: dict[str, np.ndarray]) -> bool:
        return all(got[k].shape == eager[k].shape and np.allclose(got[k], eager[k], atol=1e-4) for k in eager)

    got, how = compiled_probs()
    assert how == "built" and same_as_eager(got)
    (package,) = (cache / "packages").glob("*.pt2")  # one file, named for what it fits
    version = (Path(tiny_model) / "version").read_text().strip()
    threads = f"-t{torch.get_num_threads()}-"  # compiled in: a package for other thread counts is another
    assert package.name.startswith(f"{version}-cpu-") and f"{threads}float32-32x3x80x60-" in package.name
    assert not (tmp_path / "not-this-one").exists()  # the kernels went to the folder asked for too
    built_at = package.stat().st_mtime_ns

    got, how = compiled_probs()  # the next actor, or the next night, loads what the first one built
    assert how == "loaded" and same_as_eager(got) and package.stat().st_mtime_ns == built_at

    package.write_bytes(package.read_bytes()[:1000])  # a torn package is rebuilt, not fatal
    got, how = compiled_probs()
    assert how == "built" and same_as_eager(got) and package.stat().st_size > 1000

    with pytest.raises(ValueError, match="without spaces"):  # not a C++ compiler error mid-run
        Predictor(tiny_model, device="cpu", compile=True, compile_cache=tmp_path / "my kernels")

    # a package that cannot be built (no C++ compiler on the node, say) leaves torch.compile, not a failure,
    # and a note that spares the node's later actors the attempt
    tries = []

    def no_compiler(*args):
        tries.append(args)
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(aot, "build", no_compiler)
    for _ in range(2):
        fallback = Predictor(
            tiny_model, device="cpu", batch_size=32, compile=True, compile_cache=tmp_path / "c2"
        )
        assert fallback.compiled_from == "jit" and same_as_eager(fallback.probs_on_device(images))
    (note,) = (tmp_path / "c2" / "packages").glob("*.failed")
    assert len(tries) == 1 and "g++: command not found" in note.read_text()
    # without a cache folder there is nowhere to keep a package: torch.compile, as before
    jit = Predictor(tiny_model, device="cpu", batch_size=32, compile=True)
    assert jit.compiled_from == "jit" and same_as_eager(jit.probs_on_device(images))


@pytest.mark.timeout(400)
def test_compiled_labelling_actors_build_the_package_once_and_the_summary_says_so(
    ray_session, odd_shards, tiny_model, tmp_path
):
    eager = label_shards(
        str(odd_shards), str(tiny_model), str(tmp_path / "l"), "2026-01-01", LabelConfig(actors=1)
    )
    assert eager["compiled"] == ""
    cfg = LabelConfig(actors=1, compile=True, compile_cache=str(tmp_path / "cache"))
    for date, how in (("2026-01-02", "AOT package built"), ("2026-01-03", "AOT package loaded")):
        s = label_shards(str(odd_shards), str(tiny_model), str(tmp_path / "l"), date, cfg)
        assert (s["labelled"], s["errored"], s["compiled"]) == (299, 1, how)
    assert len(list((tmp_path / "cache" / "packages").glob("*.pt2"))) == 1
    agree = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), sum((a.articleType = b.articleType)::INT) "
            f"FROM '{tmp_path}/l/history/run_date=2026-01-01/*.parquet' a "
            f"JOIN '{tmp_path}/l/history/run_date=2026-01-03/*.parquet' b USING (product_id) "
            f"WHERE a.error IS NULL"
        )
        .fetchall()
    )
    assert agree[0][0] == 299 and agree[0][1] >= 296  # compiled kernels round differently, rarely a label


def test_a_model_replaced_while_a_run_labels_with_it_fails_the_run_by_name(
    ray_session, odd_shards, tiny_model, tmp_path, monkeypatch
):
    """The model folder replaced after the run checked it and before its actors loaded it (``calibrate``
    or ``train --overwrite`` into the folder a label job uses): the actors labelled with the new model,
    and the run's parts, footers and ``_SUCCESS`` named the old version over rows of the new one."""
    from fashionlabel.label.writer import ModelChangedError
    from fashionlabel.train import export

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    old = (model / "version").read_text().strip()
    checked = export.artifact_spec

    def checked_then_replaced(path):
        spec = checked(path)
        resave_artifact(model, model, "retrained while a run labels with it")
        return spec

    monkeypatch.setattr(export, "artifact_spec", checked_then_replaced)
    new = None
    with pytest.raises(ModelChangedError) as e:
        label_shards(
            str(odd_shards), str(model), str(tmp_path / "labels"), "2026-01-01", LabelConfig(actors=1)
        )
    new = (model / "version").read_text().strip()
    assert str(e.value).startswith(
        f"the model was replaced while {tmp_path}/labels/history/run_date=2026-01-01 was labelled with it: "
        f"the run started with version {old}, and an actor loaded version {new}."
    )
    run = tmp_path / "labels" / "history" / "run_date=2026-01-01"
    assert not (run / "_SUCCESS").exists()
    assert all(
        set(pq.read_table(p)["model_version"].to_pylist()) == {old} for p in run.glob("part-*.parquet")
    )


def test_a_batch_delivered_twice_neither_duplicates_nor_completes_a_shard_early(tmp_path):
    from fashionlabel.label.writer import PartWriter

    tax = Taxonomy.load("fashion-product-images")
    schema = labels_schema(tax)

    def batch(ids: list[str]) -> pa.Table:
        n = len(ids)
        cols = {f.name: pa.nulls(n, f.type) for f in schema}
        cols |= {
            "product_id": pa.array(ids),
            "model_version": pa.array(["v"] * n),
            "taxonomy_version": pa.array([tax.version] * n),
            "run_id": pa.array(["r"] * n),
            "labeled_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
            "shard": pa.array(["/s/shard-000000.tar"] * n),
            "shard_rows": pa.array([4] * n),
            "shard_skipped": pa.array([0] * n),
            "marker": pa.array([False] * n),
            "shard_damage": pa.nulls(n, pa.string()),
        }
        return pa.table(cols)

    w = PartWriter(str(tmp_path), schema, "v")
    w.add(batch(["a", "b"]))
    w.add(batch(["a", "b"]))  # the same batch again: 4 rows arrived, but only 2 of the 4 products
    assert w.counts["files"] == 0 and w.incomplete == ["/s/shard-000000.tar"]
    w.add(batch(["c"]))  # 3 of 4 products: the shard waits for its last one
    assert w.counts["files"] == 0 and w.incomplete == ["/s/shard-000000.tar"]
    w.add(batch(["c", "d"]))  # a batch half new: its new product completes the shard
    assert w.counts["files"] == 1 and w.counts["labelled"] == 4 and w.incomplete == []
    w.add(batch(["c", "d"]))  # and once more after the shard was written: dropped, not an error
    assert w.counts["files"] == 1 and w.counts["labelled"] == 4 and w.incomplete == []
    assert pq.read_table(tmp_path / "part-shard-000000.parquet")["product_id"].to_pylist() == list("abcd")


def test_a_shard_set_not_on_a_labelling_node_fails_with_one_line(ray_session, small_shards, tmp_path):
    """On a cluster a local ``--shards`` is each node's own disk unless every node mounts it. An actor on
    a node without it died on the missing tar, and the command printed Ray Data's traceback as its error
    (the cause crosses to the driver as text only). The reader names the folder and the node, and the
    label pipeline turns what the driver gets back into that one line."""
    import ray

    from fashionlabel import storage

    elsewhere = tmp_path / "shards"  # a shard set the driver lists, on a node where it is not
    uris = [u.replace(str(small_shards), str(elsewhere)) for u in list_shards(str(small_shards))[:1]]
    ds = ray.data.from_items([{"shard": u} for u in uris]).map_batches(
        read_shards, fn_kwargs={"decode_on": "cpu", "size": (80, 60)}, batch_size=1
    )
    with pytest.raises(Exception) as got:
        ds.take_all()
    err = storage.task_error(got.value)
    assert isinstance(err, storage.NotOnThisNodeError)
    assert str(err) == (
        f"shard set {elsewhere} is not on node {ray.util.get_node_ip_address()}, where a Ray task runs "
        "(index.parquet missing there): on a cluster a local folder must be one every node mounts; use an "
        "s3:// location"
    )
    # any other error is left as it is
    assert storage.task_error(ValueError("x")).args == ("x",)


def test_actors_reading_whole_shards_are_no_more_than_the_shards_to_label(
    ray_session, small_shards, tiny_model, tmp_path
):
    """On CPU each actor reads whole shards, one per call: a pool sized from the cluster's CPUs (2 here)
    started an actor that loaded the model and never got a call when fewer shards were left (one here; a
    re-run with a shard or two left, a night of a few new products), and Ray Data warned in the job's log
    that the pool's minimum of 2 could not be used."""
    one = tmp_path / "one-shard"
    one.mkdir()
    shutil.copy(list_shards(str(small_shards))[0], one / "shard-000000.tar")
    s = label_shards(str(one), str(tiny_model), str(tmp_path / "labels"), "2026-01-01")
    assert s["actors"] == 1 and s["labelled"] == 150 and s["read"] == "actors"
    success = json.loads((tmp_path / "labels" / "history" / "run_date=2026-01-01" / "_SUCCESS").read_text())
    assert success["plan"]["actors"] == 1
    # read tasks batch rows across shards, so every actor of the plan can get work: the pool is kept
    s = label_shards(
        str(one), str(tiny_model), str(tmp_path / "tasks"), "2026-01-01", LabelConfig(read="tasks")
    )
    assert s["actors"] == 2 and s["labelled"] == 150


def test_a_cpu_actor_never_asks_for_more_cpus_than_a_node_has():
    """Actors hold half of the cluster's CPUs between them, and half of a cluster of several nodes can be
    more than any node has: ``label --actors 1`` on nodes of 2, 2 and 1 CPUs asked 2.5 CPUs for its actor,
    which no node could place, and the job waited for ever ("No available node types can fulfill resource
    request {'CPU': 2.5}"); on 16 nodes of 32 CPUs the 8 default actors asked 32.25 each."""
    one = plan_resources(LabelConfig(actors=1), 5, 0, node_cpus=[2.0, 2.0, 1.0])
    assert one.actors == 1 and one.actor_cpus <= 2.0
    big = plan_resources(LabelConfig(), 4 + 16 * 32, 0, node_cpus=[4.0] + [32.0] * 16)
    assert big.actors == 8 and big.actor_cpus <= 32.0
    for cpus in (1, 2, 8, 64):  # one node: as before
        assert plan_resources(LabelConfig(), cpus, 0, [float(cpus)]) == plan_resources(LabelConfig(), cpus, 0)


def test_a_second_label_job_on_the_same_run_folder_is_refused_and_a_killed_ones_temporaries_go(
    ray_session, small_shards, tiny_model, tmp_path
):
    """Two `label` jobs for the same --out and --run-date at once both labelled every shard, and the one
    that finished last replaced the other's parts: both printed 7933 labelled, and no row carried the
    first run's id (with two models, the folder held one model's parts under the other's _SUCCESS). The
    run folder is leased: the second is refused by name and writes nothing. A run that holds the lease
    also removes the temporary file a `kill -9` mid-write left in the folder."""
    from fashionlabel.lease import Lease, LeaseHeld

    out = tmp_path / "labels"
    run = out / "history" / "run_date=2026-04-01"
    with Lease(str(run / "_label.lease"), "the first label job", settle=0.05):
        with pytest.raises(LeaseHeld, match=r"labelling of .*run_date=2026-04-01 is being run by another"):
            label_shards(str(small_shards), str(tiny_model), str(out), "2026-04-01")
        assert sorted(p.name for p in run.iterdir()) == ["_label.lease"]  # nothing labelled twice

    stale = run / ".part-shard-000001.parquet.0badf00d.tmp"
    stale.write_bytes(b"PAR1 cut short by a kill")
    s = label_shards(str(small_shards), str(tiny_model), str(out), "2026-04-01")
    assert s["labelled"] == 600 and _count(out) == (600, 600)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("part-")) == ["_SUCCESS"]


def test_a_file_no_labelling_run_wrote_in_the_run_folder_is_named_before_labelling(
    ray_session, small_shards, tiny_model, tmp_path
):
    """A zero-byte `notes.parquet` dropped into a run folder: `label` labelled every shard, then failed
    on the run's totals with pyarrow's "Parquet file size is 0 bytes", naming no file (and a readable
    foreign Parquet was counted in _SUCCESS as a part). Readers of the folder (Athena, Spark, pandas) would
    read it as labels too: it is named, before anything is labelled."""
    run = tmp_path / "labels" / "history" / "run_date=2026-04-02"
    run.mkdir(parents=True)
    (run / "notes.parquet").write_bytes(b"")
    (run / ".DS_Store").write_bytes(b"\0")  # hidden: every reader skips it, and so does the check
    with pytest.raises(LabelError, match=r"holds 1 file\(s\) that no labelling run wrote \(notes.parquet\)"):
        label_shards(str(small_shards), str(tiny_model), str(tmp_path / "labels"), "2026-04-02")
    assert sorted(p.name for p in run.iterdir()) == [".DS_Store", "notes.parquet"]
