import json

import pytest
import torch

from fashionlabel.train.export import ArtifactError, load_artifact


def test_ddp_training_writes_a_complete_artifact(tiny_model):
    for f in ("weights.pt", "model.json", "metrics.json", "version", "curves.json", "curves.png"):
        assert (tiny_model / f).is_file(), f
    spec = json.loads((tiny_model / "model.json").read_text())
    assert spec["architecture"] == "fl_tiny" and spec["preprocessing"]["size"] == [80, 60]
    assert spec["training"]["config"]["workers"] == 2
    assert set(spec["calibration"]["temperature"]) == {
        "gender",
        "masterCategory",
        "subCategory",
        "articleType",
        "baseColour",
        "season",
        "usage",
    }
    assert spec["training"]["starts"] == [0]
    assert (tiny_model / "confusion-articleType-test.png").is_file()
    curves = json.loads((tiny_model / "curves.json").read_text())
    assert [c["epoch"] for c in curves] == [0, 1]
    metrics = json.loads((tiny_model / "metrics.json").read_text())
    test = metrics["test"]["heads"]
    assert test["articleType"]["n"] > 30 and 0.0 <= test["articleType"]["top1"] <= 1.0
    # masterCategory has 7 classes and a dominant one: even 2 tiny epochs beat uniform guessing
    assert test["masterCategory"]["top1"] > 1 / 7
    model, spec = load_artifact(tiny_model)
    assert spec["version"] == (tiny_model / "version").read_text().strip()
    assert not model.training


def test_malformed_artifacts_are_rejected(tiny_model, tmp_path):
    with pytest.raises(ArtifactError, match="not a folder"):
        load_artifact(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{}")
    with pytest.raises(ArtifactError, match="incomplete"):
        load_artifact(bad)
    (bad / "weights.pt").write_bytes((tiny_model / "weights.pt").read_bytes())
    (bad / "version").write_text("x")
    with pytest.raises(ArtifactError, match="malformed"):
        load_artifact(bad)
    (bad / "model.json").write_text((tiny_model / "model.json").read_text())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, bad / "weights.pt")
    with pytest.raises(ArtifactError, match="cannot be loaded safely"):
        load_artifact(bad)


def test_deploy_artifact_holds_reparameterized_weights(tmp_path):
    """RepVGG exports in its fused form; loading rebuilds that form and gives the training form's outputs."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model, reparameterize_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    tax = Taxonomy.load("fashion-product-images")
    torch.manual_seed(0)
    model = create_model("repvgg_a0", tax)
    model.train()
    with torch.no_grad():  # a few batches give the BN layers non-trivial running statistics
        for _ in range(3):
            model(torch.randn(4, 3, 80, 60) * 2 + 0.5)
    model.eval()
    deploy = reparameterize_model(model)
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_artifact(
        tmp_path / "m",
        deploy,
        architecture="repvgg_a0",
        taxonomy=tax,
        preprocessing=pre,
        model_kwargs=deploy.model_kwargs,
    )
    loaded, spec = load_artifact(tmp_path / "m")
    assert spec["model_kwargs"] == {"deploy": True}
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert not any("dense" in k or "identity" in k for k in state)
    x = torch.randn(2, 3, 80, 60)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_an_artifact_appears_only_with_its_metrics(tmp_path):
    """Files that need the finished model (evaluation, curves) are written before the folder is published:
    a failure while writing them leaves the previous artifact in place and nothing half-made beside it."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    tax = Taxonomy.load("fashion-product-images")
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    torch.manual_seed(0)
    out = tmp_path / "m"
    v1 = save_artifact(
        out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
    )
    seen = []

    def evaluate_then_crash(staged):
        _, spec = load_artifact(staged)  # complete and loadable before publication
        seen.append(spec["version"])
        (staged / "metrics.json").write_text('{"test": {}}')
        raise RuntimeError("killed while evaluating")

    with pytest.raises(RuntimeError, match="killed while evaluating"):
        save_artifact(
            out,
            create_model("fl_tiny", tax),
            architecture="fl_tiny",
            taxonomy=tax,
            preprocessing=pre,
            finalize=evaluate_then_crash,
        )
    assert seen and seen[0] != v1
    assert (out / "version").read_text().strip() == v1 and json.loads(
        (out / "metrics.json").read_text()
    ) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the staged folder is gone

    v3 = save_artifact(
        out,
        create_model("fl_tiny", tax),
        architecture="fl_tiny",
        taxonomy=tax,
        preprocessing=pre,
        finalize=lambda staged: (staged / "metrics.json").write_text('{"test": {"n": 1}}'),
    )
    assert (out / "version").read_text().strip() == v3 != v1
    assert json.loads((out / "metrics.json").read_text()) == {"test": {"n": 1}}
