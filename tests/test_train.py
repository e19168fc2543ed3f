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
    assert set(spec["calibration"]["temperature"]) == {"gender", "masterCategory", "subCategory",
                                                       "articleType", "baseColour", "season", "usage"}
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
