import json

import numpy as np
import pytest
import torch

from fashionlabel.cli import run
from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
from fashionlabel.models import create_model
from fashionlabel.models.profile import count_flops, count_params
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.calibrate import review_settings
from fashionlabel.train.export import load_artifact, save_artifact
from fashionlabel.train.prune import lasso_select, prune_xception

TAX = Taxonomy.load("fashion-product-images")


def _branch(model, x, block=1):
    """The residual branch of a middle module, on the original model's input to it."""
    t = model.trunk
    inp = t.middle[:block](t.entry(t.stem(x)))
    return t.middle[block].convs(inp)


def test_lasso_selection_keeps_the_channels_that_explain_the_output():
    # 6 channels; the output is made of channels 1 and 4 only: they are the ones LASSO keeps
    rng = np.random.default_rng(0)
    d = rng.normal(size=(400, 6))
    w = np.ones((3, 6))
    y = d[:, [1]] * w[:, 1] + 2 * d[:, [4]] * w[:, 4]
    gram = (d.T @ d) * (w.T @ w)
    lin = ((d.T @ y) * w.T).sum(axis=1)
    assert list(lasso_select(gram, lin, 2)) == [1, 4]
    assert list(lasso_select(gram, lin, 6)) == list(range(6))


def _make_redundant(block, half: int) -> None:
    """Inner channels c + half := 0.5 × channel c, read with the same weights: half the channels carry
    nothing of their own, and the larger copies are the ones worth keeping."""
    with torch.no_grad():
        for j in range(2):
            a, b = block.convs[j], block.convs[j + 1]
            a.pw.weight[half:] = 0.5 * a.pw.weight[:half]
            b.dw.weight[half:] = b.dw.weight[:half]
            b.pw.weight[:, half:] = b.pw.weight[:, :half]


def test_pruning_selects_redundant_channels_and_reconstructs():
    torch.manual_seed(0)
    model = create_model("xception_se_s", TAX).eval()
    _make_redundant(model.trunk.middle[1], 92)
    calib, x = torch.randn(24, 3, 80, 60), torch.randn(6, 3, 80, 60)
    pruned = prune_xception(model, calib, blocks=[1], keep=0.5, positions=20)
    assert pruned.model_kwargs["mid_channels"] == {"1": [92, 92]}
    assert pruned.trunk.middle[1].convs[1].dw.weight.shape[0] == 92
    assert count_params(pruned) < count_params(model)
    assert count_flops(pruned, (80, 60)) < count_flops(model, (80, 60))
    # the naive alternative: drop the last half of the channels without reconstructing
    naive = prune_xception(model, calib, blocks=[], keep=0.5)
    with torch.no_grad():
        for j in range(2):
            bn = naive.trunk.middle[1].convs[j].bn
            bn.weight[92:] = 0
            bn.bias[92:] = 0
            bn.running_mean[92:] = 0
        ref, got, bad = _branch(model, x), _branch(pruned, x), _branch(naive, x)
    err = float((ref - got).norm() / ref.norm())
    naive_err = float((ref - bad).norm() / ref.norm())
    assert err < 0.1 * naive_err, (err, naive_err)
    rebuilt = create_model("xception_se_s", TAX, **pruned.model_kwargs)
    rebuilt.load_state_dict(pruned.state_dict())
    with pytest.raises(ValueError, match="SE-Xception"):
        prune_xception(create_model("fl_tiny", TAX), calib, [0])
    with pytest.raises(ValueError, match="do not exist"):
        prune_xception(model, calib, [9])


def test_prune_command_writes_a_loadable_smaller_artifact(small_shards, tmp_path, capsys):
    model = create_model("xception_se_s", TAX)
    src, out = tmp_path / "xception", tmp_path / "pruned"
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_artifact(src, model, architecture="xception_se_s", taxonomy=TAX, preprocessing=pre)
    assert (
        run(
            [
                "prune",
                "--model",
                str(src),
                "--shards",
                str(small_shards),
                "--out",
                str(out),
                "--blocks",
                "0,3",
                "--keep",
                "0.25",
                "--calib-images",
                "32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "params" in printed and "FLOPs / image" in printed and "val articleType top1" in printed
    pruned, spec = load_artifact(out)
    assert spec["model_kwargs"]["mid_channels"] == {"0": [46, 46], "3": [46, 46]}
    metrics = json.loads((out / "metrics.json").read_text())
    pruning = metrics.pop("pruning")
    assert pruning["after"]["params"] < pruning["before"]["params"]
    assert pruning["after"]["flops"] < pruning["before"]["flops"]
    # the rest has a trained artifact's shape: the calibrated pruned model evaluated on val and test
    assert set(metrics) == {"val", "test"}
    assert metrics == {s: json.loads((out / f"evaluation-{s}.json").read_text()) for s in ("val", "test")}
    assert metrics["test"]["n_products"] > 0 and "articleType" in metrics["test"]["heads"]
    assert "test (pruned) articleType" in printed
    assert set(spec["calibration"]["temperature"]) == {h.name for h in TAX.single_heads}
    assert (
        run(
            [
                "prune",
                "--model",
                str(src),
                "--shards",
                str(small_shards),
                "--out",
                str(tmp_path / "x"),
                "--blocks",
                "12",
            ]
        )
        == 1
    )


def test_prune_refuses_a_module_named_twice_a_model_it_cannot_prune_or_another_models_folder_at_once(
    tmp_path, capsys
):
    """``--blocks 1,1`` failed deep in the regression with numpy's 'operands could not be broadcast';
    a model that is not an SE-Xception was refused only after every training and validation image was
    decoded. Both are refused by name at once (here the shards do not even exist)."""
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for arch in ("xception_se_s", "fl_tiny"):
        save_artifact(
            tmp_path / arch, create_model(arch, TAX), architecture=arch, taxonomy=TAX, preprocessing=pre
        )
    shards = str(tmp_path / "no-shards")
    base = ["prune", "--shards", shards, "--calib-images", "8"]
    assert (
        run(
            [
                *base,
                "--model",
                str(tmp_path / "xception_se_s"),
                "--out",
                str(tmp_path / "p"),
                "--blocks",
                "1,1",
            ]
        )
        == 1
    )
    assert "middle modules [1] are named more than once" in capsys.readouterr().err
    assert (
        run([*base, "--model", str(tmp_path / "fl_tiny"), "--out", str(tmp_path / "q"), "--blocks", "1"]) == 1
    )
    assert "channel pruning needs an SE-Xception model" in capsys.readouterr().err
    # an existing model's folder as --out: refused, the model left as it was
    version = (tmp_path / "fl_tiny" / "version").read_text()
    xc = ["--model", str(tmp_path / "xception_se_s"), "--blocks", "1"]
    assert run([*base, *xc, "--out", str(tmp_path / "fl_tiny")]) == 1
    assert "holds another model (fl_tiny, version" in capsys.readouterr().err
    assert (tmp_path / "fl_tiny" / "version").read_text() == version
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_pruned_model_keeps_the_review_queue_its_source_was_calibrated_for(small_shards, tmp_path):
    """A model recalibrated to flag at most 30% of the products (``fashionlabel calibrate --review-share``)
    was pruned into one refitted at the default error cut: its calibration lost the target and it sent
    every validation product to review. The pruned model is refitted to its source's target."""
    src, calibrated, out = tmp_path / "xception", tmp_path / "xception-30", tmp_path / "pruned"
    torch.manual_seed(0)
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    model = create_model("xception_se_s", TAX)
    save_artifact(src, model, architecture="xception_se_s", taxonomy=TAX, preprocessing=pre)
    shards = ["--shards", str(small_shards)]
    assert (
        run(["calibrate", "--model", str(src), *shards, "--out", str(calibrated), "--review-share", "0.3"])
        == 0
    )
    assert run(["prune", "--model", str(calibrated), *shards, "--out", str(out), "--blocks", "1"]) == 0
    _, spec = load_artifact(out)
    assert spec["calibration"]["review_share"] == 0.3
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert val["needs_review"] <= 0.3 + 1e-9
    # a source fitted to an error cut keeps that cut
    assert review_settings({"error_cut": 0.9, "thresholds": {}}) == {"error_cut": 0.9}
    assert review_settings({}) == {"error_cut": 0.5}
