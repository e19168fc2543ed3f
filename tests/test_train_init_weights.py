"""``--init-weights`` from a model of another taxonomy: head rows follow their value names, not positions."""

import logging

import pytest
import torch

from fashionlabel.models import create_model
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.export import load_artifact

HEAD = "head.heads.{}.{}"


def _reordered(tax: Taxonomy) -> Taxonomy:
    """``tax`` with baseColour's values in reverse order (same count) and usage's 'Travel' renamed."""
    d = tax.to_dict() | {"name": "reordered"}
    for h in d["heads"]:
        if h["name"] == "baseColour":
            h["values"] = h["values"][::-1]
        if h["name"] == "usage":
            h["values"] = ["Outdoor" if v == "Travel" else v for v in h["values"]]
    return Taxonomy.from_dict(d)


def _rows(model_state, tax: Taxonomy, head: str) -> dict[str, torch.Tensor]:
    """value → (its weight row, its bias) of one head, as one tensor."""
    w, b = model_state[HEAD.format(head, "weight")], model_state[HEAD.format(head, "bias")]
    return {v: torch.cat([w[i], b[i : i + 1]]) for i, v in enumerate(tax.head(head).values)}


@pytest.mark.timeout(300)
def test_fine_tuning_on_another_taxonomy_keeps_each_value_its_own_rows(
    ray_session, small_catalog, tiny_model, tmp_path, caplog
):
    """Same-shaped heads whose values come in another order, or under another name, were loaded by
    position: the fine-tuned model started with Black's row scoring Blue. Trained end to end (the workers
    load the weights) at a learning rate too small to move them: every shared value keeps its row, the
    renamed one starts fresh, and the driver logs what each head carried over."""
    from fashionlabel.shards import ShardConfig, shard_catalog
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    src_model, spec = load_artifact(tiny_model)
    src_tax = spec["taxonomy_obj"]
    tax = _reordered(src_tax)
    shards = tmp_path / "shards"
    shard_catalog(str(small_catalog), str(shards), tax, ShardConfig(samples_per_shard=300))
    cfg = TrainConfig(
        model="fl_tiny", epochs=1, workers=1, lr=1e-9, warmup_epochs=0, init_weights=str(tiny_model)
    )
    with caplog.at_level(logging.INFO, logger="fashionlabel.train.run"):
        train(str(shards), str(tmp_path / "m"), cfg, 2)
    tuned, _ = load_artifact(tmp_path / "m")
    for head in ("baseColour", "usage", "articleType"):
        was, now = _rows(src_model.state_dict(), src_tax, head), _rows(tuned.state_dict(), tax, head)
        for value, row in now.items():
            if value in was:
                torch.testing.assert_close(row, was[value], atol=1e-5, rtol=0, msg=f"{head} {value}")
    was, now = _rows(src_model.state_dict(), src_tax, "usage"), _rows(tuned.state_dict(), tax, "usage")
    assert not torch.allclose(now["Outdoor"], was["Travel"], atol=1e-3)  # a new value: not Travel's row
    assert "baseColour 46/46" in caplog.text and "usage 7/8 (new: Outdoor)" in caplog.text


def test_init_weights_without_value_names_carry_the_trunk_and_start_the_heads_fresh(
    tiny_model, tmp_path, caplog
):
    """A bare state_dict says nothing of what its head rows mean: the trunk is used, every head starts
    fresh, and the log says why and what to give instead. A checkpoint written before checkpoints kept
    their taxonomy names it by version: the same taxonomy maps as it is, another one starts the heads fresh."""
    from fashionlabel.train.init_weights import apply_init
    from fashionlabel.train.run import check_init_weights

    src_model, spec = load_artifact(tiny_model)
    src_tax, tax = spec["taxonomy_obj"], _reordered(spec["taxonomy_obj"])
    bare = tmp_path / "bare.pt"
    torch.save(src_model.state_dict(), bare)
    with caplog.at_level(logging.INFO, logger="fashionlabel.train.run"):
        assert check_init_weights(str(bare), "fl_tiny", tax) == str(bare)
    assert (
        "value names of its heads are unknown (a bare state_dict), so every head starts fresh" in caplog.text
    )

    # another file beside a model's model.json is not that model's weights: its rows are not named by it
    import shutil

    beside = shutil.copytree(tiny_model, tmp_path / "model") / "copy-of-weights.pt"
    torch.save(src_model.state_dict(), beside)
    assert apply_init(create_model("fl_tiny", tax), tax, str(beside))["source"] is None

    fresh = create_model("fl_tiny", tax)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    done = apply_init(fresh, tax, str(bare))
    assert all(n == 0 for n, _ in done["heads"].values())
    after = fresh.state_dict()
    for k, v in after.items():
        same = torch.equal(v, before[k])
        assert same if k.startswith("head.heads.") else torch.equal(v, src_model.state_dict()[k]), k

    # a checkpoint from before: no taxonomy of its own, only the version of the one it was trained on
    best = torch.load(tiny_model.parent / "model.train" / "checkpoints" / "best.pt", weights_only=True)
    assert best["taxonomy"] == src_tax.to_dict()  # written now: the names travel with the checkpoint
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in best.items() if k != "taxonomy"}, old)
    assert apply_init(create_model("fl_tiny", src_tax), src_tax, str(old))["heads"]["baseColour"] == (46, 46)
    assert apply_init(create_model("fl_tiny", tax), tax, str(old))["heads"]["baseColour"] == (0, 46)


def test_init_weights_beside_a_model_json_that_is_not_theirs_are_refused(tiny_model, tmp_path):
    """The value names of a model's weights come from its model.json: one replaced by hand (the content
    hash disagrees) could name other values, so the weights are refused with the artifact's reason."""
    import shutil

    from fashionlabel.train.run import check_init_weights

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    (copy / "model.json").write_text((copy / "model.json").read_text().replace('"Black"', '"Noir"'))
    tax = load_artifact(tiny_model)[1]["taxonomy_obj"]
    with pytest.raises(
        ValueError, match=r"--init-weights .*copy: model artifact .* do not match its version"
    ):
        check_init_weights(str(copy), "fl_tiny", tax)


def test_init_weights_from_a_checkpoint_take_the_weights_its_run_chose(tiny_model, tmp_path):
    """With ``--ema-epochs`` an epoch's candidate is the moving average when it validates better, and the
    run exports that average: a run's best.pt then stands for the average, not the last step's weights."""
    from fashionlabel.train.init_weights import apply_init

    best = torch.load(tiny_model.parent / "model.train" / "checkpoints" / "best.pt", weights_only=True)
    tax = Taxonomy.from_dict(best["taxonomy"])
    average = {k: v + 1 if v.is_floating_point() else v for k, v in best["model"].items()}
    path = tmp_path / "ema.pt"
    torch.save(best | {"weights": "ema", "ema": {"model": average, "updates": 10, "decay": 0.9}}, path)
    model = create_model("fl_tiny", tax)
    apply_init(model, tax, str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, average[k]), k
    torch.save(best | {"weights": "raw"}, path)  # the live weights won: those
    apply_init(model, tax, str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k]), k


def test_init_weights_from_s3_are_read_by_name_from_the_bucket(s3, tiny_model, tmp_path, monkeypatch):
    """A cluster's ranks run on nodes that cannot see the driver's disk: ``--init-weights s3://…`` (a
    model's prefix, its weights.pt or a run's checkpoint) is read from the bucket, its head rows named by
    the model.json beside it or the checkpoint's taxonomy. It answered "no such file"."""
    from fashionlabel.train.init_weights import apply_init
    from fashionlabel.train.run import check_init_weights

    monkeypatch.setenv("FASHIONLABEL_CACHE", str(tmp_path / "cache"))
    bucket = s3.make_bucket("init")
    for f in ("weights.pt", "model.json", "version", "metrics.json"):
        s3.client().upload_file(str(tiny_model / f), bucket, f"models/m/{f}")
    best = tiny_model.parent / "model.train" / "checkpoints" / "best.pt"
    s3.client().upload_file(str(best), bucket, "runs/checkpoints/best.pt")
    src_model, spec = load_artifact(tiny_model)
    src_tax, tax = spec["taxonomy_obj"], _reordered(spec["taxonomy_obj"])

    assert (
        check_init_weights(f"s3://{bucket}/models/m/", "fl_tiny", tax) == f"s3://{bucket}/models/m/weights.pt"
    )
    for uri in (f"s3://{bucket}/models/m/weights.pt", f"s3://{bucket}/runs/checkpoints/best.pt"):
        model = create_model("fl_tiny", tax)
        done = apply_init(model, tax, uri)
        assert done["heads"]["baseColour"] == (46, 46) and done["heads"]["usage"] == (7, 8), uri
        was, now = (
            _rows(src_model.state_dict(), src_tax, "baseColour"),
            _rows(model.state_dict(), tax, "baseColour"),
        )
        for value, row in now.items():
            torch.testing.assert_close(row, was[value], atol=1e-6, rtol=0, msg=f"{uri} {value}")
    with pytest.raises(ValueError, match=r"--init-weights s3://.*/models/gone: no such object"):
        check_init_weights(f"s3://{bucket}/models/gone", "fl_tiny", tax)
