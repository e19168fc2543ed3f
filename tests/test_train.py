import json

import pytest
import torch

from fashionlabel.train.export import ArtifactError, load_artifact


def test_ddp_training_writes_a_complete_artifact(tiny_model):
    for f in ("weights.pt", "model.json", "metrics.json", "version", "curves.json", "curves.png"):
        assert (tiny_model / f).is_file(), f
    spec = json.loads((tiny_model / "model.json").read_text())
    assert spec["architecture"] == "fl_tiny" and spec["preprocessing"]["size"] == [80, 60]
    assert spec["training"]["config"]["workers"] == 2 and spec["training"]["config"]["cutmix"] == 0.5
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
    # strict JSON (no bare NaN, which jq and JavaScript refuse), the evaluation files too
    for f in ("metrics.json", "curves.json", "evaluation-val.json", "evaluation-test.json"):
        bare = []
        json.loads((tiny_model / f).read_text(), parse_constant=bare.append)
        assert not bare, f"{f} holds {bare}"
    metrics = json.loads((tiny_model / "metrics.json").read_text())
    test = metrics["test"]["heads"]
    assert test["articleType"]["n"] > 30 and 0.0 <= test["articleType"]["top1"] <= 1.0
    # masterCategory has 7 classes and a dominant one: even 2 tiny epochs beat uniform guessing
    assert test["masterCategory"]["top1"] > 1 / 7
    model, spec = load_artifact(tiny_model)
    assert spec["version"] == (tiny_model / "version").read_text().strip()
    assert not model.training


def test_the_confusion_image_is_of_the_labels_as_written(tiny_model, small_shards, tmp_path):
    """``evaluate``'s confusion image shows the labels labelling writes (the hierarchy-consistent choice,
    as ``top1_consistent`` counts them), not the fine head's top score: for articleType, under three
    coarser heads, those differ, and the image showed errors the labels do not have and hid those they do."""
    import numpy as np

    from fashionlabel.data import load_samples
    from fashionlabel.label.postprocess import consistent_choice, scores
    from fashionlabel.label.predictor import Predictor
    from fashionlabel.shards import list_shards
    from fashionlabel.train.metrics import confusion
    from fashionlabel.train.run import _plot_confusion, evaluate

    evaluate(str(tiny_model), str(small_shards), "test", write_to=str(tmp_path / "eval"))
    pred = Predictor(str(tiny_model), device="cpu")
    tax, head = pred.taxonomy, pred.taxonomy.head("articleType")
    test = load_samples(list_shards(str(small_shards)), tax, pred.size, split="test")
    probs = scores(tax, pred.logits(test.images), pred.calibration)
    y = test.targets["articleType"]
    as_written = confusion(consistent_choice(tax, probs)["articleType"], y, head.num_classes)
    top_score = confusion(probs["articleType"].argmax(1), y, head.num_classes)
    assert not np.array_equal(as_written, top_score)  # the hierarchy changed some labels
    for name, m in (("as_written", as_written), ("top_score", top_score)):
        _plot_confusion(m, head, tmp_path / f"{name}.png")
    image = (tmp_path / "eval" / "confusion-articleType-test.png").read_bytes()
    assert image == (tmp_path / "as_written.png").read_bytes()


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
    from fashionlabel.train.export import content_version

    # with a version that matches, so that the weights are unpickled at all: never arbitrary objects
    (bad / "version").write_text(
        content_version((bad / "weights.pt").read_bytes(), (bad / "model.json").read_bytes())
    )
    with pytest.raises(ArtifactError, match="cannot be loaded safely"):
        load_artifact(bad)
    import shutil

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    version = (copy / "version").read_text().strip()
    (copy / "version").write_text(version[:8] + "\n")  # a prefix: two versions for one set of weights
    with pytest.raises(ArtifactError, match="do not match its version"):
        load_artifact(copy)
    (copy / "version").write_text(version + "\n")
    # a value renamed in model.json's taxonomy by hand: named as the edit it is, not as torch's size mismatch
    spec = json.loads((copy / "model.json").read_text())
    edited = json.loads(json.dumps(spec))
    edited["taxonomy"]["heads"][0]["values"].append("Robots")
    (copy / "model.json").write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="do not match its version .*files replaced by hand"):
        load_artifact(copy)
    (copy / "model.json").write_text(json.dumps(spec | {"format": 2}))
    with pytest.raises(ArtifactError, match="has format 2; this fashionlabel reads format 1 and earlier"):
        load_artifact(copy)
    # fields of the wrong type or range, in a model.json its version matches: named when the artifact is
    # read, not found later as "math domain error", or (a temperature of 0) as NaN scores and wrong labels

    weights = (copy / "weights.pt").read_bytes()
    for edit, named in (
        (
            lambda s: s["calibration"]["temperature"].update(gender=0),
            r"calibration.temperature.gender is 0, not",
        ),
        (
            lambda s: s["calibration"]["thresholds"].update(season="high"),
            r"calibration.thresholds.season is 'high', not a",
        ),
        (lambda s: s["preprocessing"].update(size=[-80, 60]), r"preprocessing.size is \[-80, 60\], not"),
        (lambda s: s["preprocessing"].update(size="80x60"), r"preprocessing.size is '80x60', not"),
        (
            lambda s: s["preprocessing"].update(std=[0.2, 0, 0.2]),
            r"preprocessing.std is \[0.2, 0, 0.2\], not",
        ),
        (lambda s: s.update(format="1"), r"format is '1', not a whole number"),
    ):
        bad_spec = json.loads(json.dumps(spec))
        edit(bad_spec)
        text = json.dumps(bad_spec).encode()
        (copy / "model.json").write_bytes(text)
        (copy / "version").write_text(content_version(weights, text) + "\n")
        with pytest.raises(ArtifactError, match=r"model.json is malformed: " + named):
            load_artifact(copy)


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


def test_an_artifact_of_an_architecture_this_version_lacks_is_refused_on_the_driver(tmp_path):
    """A model trained by a newer fashionlabel, with an architecture this one lacks, passed the driver's
    check (``artifact_spec``, which ``label`` and ``nightly`` run before they make a run folder) and failed
    only when every labelling actor built it, as "weights do not fit"."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import artifact_spec, content_version, save_artifact

    tax = Taxonomy.load("fashion-product-images")
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    out = tmp_path / "m"
    save_artifact(out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre)
    spec = json.loads((out / "model.json").read_text()) | {"architecture": "fl_future"}
    text = json.dumps(spec).encode()
    (out / "model.json").write_bytes(text)
    (out / "version").write_text(content_version((out / "weights.pt").read_bytes(), text) + "\n")
    named = r"model.json is malformed: architecture 'fl_future' is not a model of this fashionlabel \(it has .*fl_tiny"
    with pytest.raises(ArtifactError, match=named):
        artifact_spec(out)
    with pytest.raises(ArtifactError, match=named):
        load_artifact(out)


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


def test_an_artifact_into_a_symlinked_folder_lands_where_the_link_points(tmp_path):
    """``--out`` a link to a folder on another disk: the export replaced the link itself with the new
    folder, so the disk the link named stayed empty (or kept the old model) and the link was left beside
    the model under a staging name."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    tax = Taxonomy.load("fashion-product-images")
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    disk, here = tmp_path / "big disk", tmp_path / "models"
    (disk / "m").mkdir(parents=True)
    here.mkdir()
    link = here / "m"
    link.symlink_to(disk / "m")
    torch.manual_seed(0)
    for note in ("first", "second"):  # into the empty folder, then replacing the model there
        v = save_artifact(
            link,
            create_model("fl_tiny", tax),
            architecture="fl_tiny",
            taxonomy=tax,
            preprocessing=pre,
            training={"note": note},
        )
        assert link.is_symlink() and link.resolve() == disk / "m"
        assert (disk / "m" / "version").read_text().strip() == v
        assert load_artifact(link)[1]["training"]["note"] == note
        assert sorted(p.name for p in here.iterdir()) == ["m"]  # no staged folder or link left
        assert sorted(p.name for p in disk.iterdir()) == ["m"]


def test_an_export_onto_a_full_disk_leaves_the_old_model_and_nothing_beside_it(tmp_path):
    """A disk that fills while the model is staged (here a file-size limit, ``ulimit -f``, which fails the
    write as a full disk does): the staged folder, its weights cut short, was left beside the model, and
    the error named no path."""
    import resource

    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    tax = Taxonomy.load("fashion-product-images")
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    out = tmp_path / "m"
    torch.manual_seed(0)
    v1 = save_artifact(
        out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
    )
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))  # fl_tiny's weights are ~400 KB
    try:
        with pytest.raises(OSError, match=rf"cannot write the model to {out}: File too large"):
            save_artifact(
                out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_artifact(out)[1]["version"] == v1


def test_train_refuses_an_out_it_would_destroy_and_settings_it_cannot_run(
    ray_session, small_shards, tiny_model, tmp_path
):
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    cfg = TrainConfig(model="fl_tiny", epochs=2, workers=2)
    notes = tmp_path / "mine"
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("important")
    with pytest.raises(
        ArtifactError, match=r"mine exists and is not a model artifact \(it holds notes.txt, sub\)"
    ):
        train(str(small_shards), str(notes), cfg, 2)
    assert (notes / "notes.txt").read_text() == "important"  # nothing touched
    with pytest.raises(ValueError, match="is the shard set, inside it, or holds it"):
        train(str(small_shards), str(small_shards), cfg, 2)
    # checkpoints inside the model's folder: the export, which replaces that folder, would refuse it
    # after the last epoch, and a killed run could not resume
    for inside in ("m", "m/ckpt"):
        with pytest.raises(ValueError, match=rf"--storage .*{inside} is inside --out .*m, whose folder"):
            train(str(small_shards), str(tmp_path / "m"), cfg, 2, checkpoints=str(tmp_path / inside))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()
    # another model's artifact, and its checkpoints: named, not silently replaced
    before = (tiny_model / "version").read_text()
    with pytest.raises(
        ValueError, match=r"holds a model trained with other settings \(epochs 2 → 3\).*--overwrite"
    ):
        train(
            str(small_shards),
            str(tiny_model),
            TrainConfig(model="fl_tiny", epochs=3, workers=2, cutmix=0.5),
            2,
        )
    assert (tiny_model / "version").read_text() == before
    with pytest.raises(ValueError, match=r"--gpu with --workers 2 needs 2 GPU\(s\); the Ray cluster has 0"):
        train(str(small_shards), str(tmp_path / "g"), TrainConfig(model="fl_tiny", gpu=True), 2)
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.train").exists()
    # on several nodes a default local checkpoint folder is a different folder on each node
    from fashionlabel.train.run import _check_checkpoint_reach

    _check_checkpoint_reach(str(tmp_path / "m"), None)  # a local Ray of one node, started for the tests
    with pytest.raises(
        ValueError, match=r"other nodes, where --out .*m's checkpoint folder .*--storage s3://"
    ):
        _check_checkpoint_reach(str(tmp_path / "m"), None, spans=True)
    _check_checkpoint_reach(str(tmp_path / "m"), "/mnt/shared/ckpt", spans=True)
    _check_checkpoint_reach("s3://bucket/m", None, spans=True)


def test_init_weights_are_checked_before_training(tiny_model, tmp_path):
    from fashionlabel.models import create_model
    from fashionlabel.train.run import check_init_weights

    tax = load_artifact(tiny_model)[1]["taxonomy_obj"]
    with pytest.raises(ValueError, match="no such file"):
        check_init_weights(str(tmp_path / "none.pt"), "fl_tiny", tax)
    with pytest.raises(ValueError, match="is not a weights file torch loads safely"):
        check_init_weights(str(tiny_model / "model.json"), "fl_tiny", tax)
    other = tmp_path / "other.pt"
    torch.save(create_model("xception_se_s", tax).state_dict(), other)
    with pytest.raises(
        ValueError,
        match=r"fits \d+% of fl_tiny's parameters \(only \d+ of its \d+ tensors, by name and shape\): weights of",
    ):
        check_init_weights(str(other), "fl_tiny", tax)
    # a model's weights and a run's checkpoint both fit; a relative path comes back absolute (workers run
    # in other folders)
    assert check_init_weights(str(tiny_model / "weights.pt"), "fl_tiny", tax) == str(
        tiny_model / "weights.pt"
    )
    best = tiny_model.parent / "model.train" / "checkpoints" / "best.pt"
    assert check_init_weights(str(best), "fl_tiny", tax) == str(best)
    # the model's folder, as `train --out` named it, stands for its weights; another folder is named
    assert check_init_weights(str(tiny_model), "fl_tiny", tax) == str(tiny_model / "weights.pt")
    with pytest.raises(
        ValueError, match=r"is a folder, not a model's: name a model \(its folder or weights.pt\)"
    ):
        check_init_weights(str(tmp_path), "fl_tiny", tax)
    # a model folder whose weights.pt is gone is named as that, not as a folder that is no model's
    gone = tmp_path / "no-weights"
    gone.mkdir()
    (gone / "model.json").write_text((tiny_model / "model.json").read_text())
    with pytest.raises(ValueError, match="is a model folder without its weights.pt"):
        check_init_weights(str(gone), "fl_tiny", tax)


def test_lr_schedule_warms_up_to_the_peak_then_decays():
    from fashionlabel.train.loop import lr_schedule

    steps = 10  # one epoch of 10 steps, a 1-epoch warm-up, 3 epochs
    share = lr_schedule(total=30, warm=10)
    assert [round(share(s), 2) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # the peak is --lr itself
    after = [share(s) for s in range(steps, 30)]
    assert after[0] == 1.0 and all(a > b for a, b in zip(after, after[1:], strict=False)) and after[-1] < 0.01


def test_an_epoch_says_how_far_it_is_while_it_runs():
    """One epoch over a whole catalog on CPU runs for many minutes: rank 0 logs its step, rate and time
    left every 30 s, not only a line at the epoch's end (the clock is given, so the lines are exact)."""
    from fashionlabel.train.loop import EpochProgress

    times = iter([0.0, 10.0, 31.0, 45.0, 62.0, 100.0])
    p = EpochProgress(2, steps=100, images_per_step=64, clock=lambda: next(times))
    assert p.at(10) is None  # 10 s in: too soon
    assert p.at(31) == "epoch 2: step 31/100, 64 img/s, 69 s left in the epoch"
    assert p.at(40) is None  # 14 s after the last line
    assert p.at(62) == "epoch 2: step 62/100, 64 img/s, 38 s left in the epoch"
    assert p.at(100) is None  # the last step: the epoch's own line follows it


def test_the_same_weights_export_to_the_same_version_whatever_the_speed(small_shards, tiny_model, tmp_path):
    from fashionlabel.train import checkpoint as ckpt
    from fashionlabel.train.run import export_state, training_taxonomy

    checkpoints = tiny_model.parent / "model.train" / "checkpoints"
    tax = training_taxonomy(str(small_shards))
    versions = []
    for speed in (100.0, 250.0):  # two runs of the same training on a busy and on an idle machine
        best, last = ckpt.load(str(checkpoints), ckpt.BEST), ckpt.load(str(checkpoints), ckpt.LAST)
        best["history"] = [h | {"train_img_per_s": speed} for h in last["history"]]
        r = export_state(str(small_shards), str(tmp_path / f"m{speed:.0f}"), best, tax)
        assert r["training"]["train_img_per_s_median"] == speed  # still in the summary and curves.json
        versions.append(r["version"])
    assert versions[0] == versions[1]


def test_ranks_take_whole_shards_only_while_that_keeps_them_balanced():
    from fashionlabel.train.shares import shares_of as _shares

    # the bundled sample's shards: 2 ranks on whole shards would hold 1,500 and 1,000 products, and the
    # smaller share would be cycled 1.5 times an epoch: every rank takes every 2nd product instead
    assert _shares({"a": 1000, "b": 1000, "c": 500}, 2) is None
    assert _shares({"a": 10, "b": 10}, 3) is None  # fewer shards than ranks
    many = {f"s{i:02d}": 2000 for i in range(16)} | {"tail": 500}  # a full catalog: 16,500 / 16,000
    shares = _shares(many, 2)
    assert shares is not None and sorted(sum(shares, [])) == sorted(many)
    assert {len(s) for s in shares} == {8, 9}


def test_replacing_an_artifact_never_leaves_the_folder_empty(tmp_path, monkeypatch):
    """The new artifact is swapped in with one rename-exchange: at no moment is there no model at ``out``.
    Where the filesystem cannot swap, a kill between the two renames is undone by the next export."""
    import shutil
    from pathlib import Path

    from fashionlabel import storage
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    tax = Taxonomy.load("fashion-product-images")
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    out = tmp_path / "m"

    def save(seed: int) -> str:
        torch.manual_seed(seed)
        model = create_model("fl_tiny", tax)
        return save_artifact(out, model, architecture="fl_tiny", taxonomy=tax, preprocessing=pre)

    v1 = save(1)
    real_rename = Path.rename
    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if storage.exchange(probe / "a", probe / "b"):  # this filesystem swaps (ext4, xfs, tmpfs, …)
        with monkeypatch.context() as m:  # any rename of the published folder would now kill the export
            m.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(AssertionError("rename")))
            v2 = save(2)
        assert (out / "version").read_text().strip() == v2 != v1
    shutil.rmtree(probe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the previous artifact is gone too

    calls = []

    def die_on_second_rename(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(storage, "exchange", lambda a, b: False)
        m.setattr(Path, "rename", die_on_second_rename)
        with pytest.raises(KeyboardInterrupt):
            save(3)
    assert not out.exists()  # the window the exchange closes
    assert not list(tmp_path.glob(".m.*.tmp"))  # the staged folder of the killed export is gone
    v4 = save(4)  # the next export puts the previous artifact back first, then replaces it
    assert (out / "version").read_text().strip() == v4
    assert not list(tmp_path.glob(".m.*.old"))


_EXPORT_THEN_HANG = """
import sys, time
from pathlib import Path
import torch
from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
from fashionlabel.models import create_model
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.export import save_artifact

tax = Taxonomy.load("fashion-product-images")
pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

def hang(staged):  # the export's evaluation, where a long export spends its time
    Path(sys.argv[2]).write_text(str(staged))
    time.sleep(120)

save_artifact(sys.argv[1], create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax,
              preprocessing=pre, finalize=hang)
"""


def test_an_export_killed_before_it_published_leaves_no_model_copy_behind(tmp_path):
    """SIGKILL during an export's evaluation left its staged folder, a whole model, beside the artifact,
    and every later kill another. The next export removes those whose process is gone, and leaves alone
    the staging of an export still running."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "m"

    def start(tag: str) -> tuple[subprocess.Popen, Path]:
        marker = tmp_path / f"staged-{tag}"
        p = subprocess.Popen([sys.executable, "-c", _EXPORT_THEN_HANG, str(out), str(marker)], env=env)
        deadline = time.time() + 120
        while not marker.exists():
            assert p.poll() is None and time.time() < deadline, "the export did not reach its evaluation"
            time.sleep(0.1)
        return p, Path(marker.read_text())

    killed, dead_staging = start("killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert dead_staging.is_dir() and (dead_staging / "weights.pt").is_file()  # what a kill leaves
    running, live_staging = start("running")
    try:
        tax = Taxonomy.load("fashion-product-images")
        pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        version = save_artifact(
            out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
        )
        assert (out / "version").read_text().strip() == version
        assert not dead_staging.exists()  # the killed export's copy is gone
        assert live_staging.is_dir()  # the running export's is its own
    finally:
        running.kill()
        running.wait(timeout=30)


def test_calibrate_stopped_by_sigterm_says_so_and_leaves_no_model_copy(tiny_model, small_shards, tmp_path):
    """A SIGTERM (``kill``, ``timeout``, a scheduler) to a command that runs no Ray (``calibrate``, ``prune``,
    ``evaluate``, ``report``) killed it with no line, exit 143; stopped while its model was staged, the
    staged copy stayed beside ``--out``. It now ends as Ctrl-C does, and the same command re-run completes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fashionlabel.cli import run

    out = tmp_path / "calibrated"
    argv = ["calibrate", "--model", str(tiny_model), "--shards", str(small_shards), "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(
        [sys.executable, "-m", "fashionlabel", *argv], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob(".calibrated.*.tmp")):  # the model staged: its evaluation is running
        assert p.poll() is None and time.time() < deadline, "calibrate did not reach its export"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fashionlabel: interrupted"
    assert sorted(x.name for x in tmp_path.iterdir()) == []  # no staged copy, no model
    assert run(argv) == 0
    assert (
        load_artifact(out)[1]["training"]["calibrated_from"] == (tiny_model / "version").read_text().strip()
    )


def test_a_taxonomy_of_multi_label_heads_only_evaluates(small_shards, tmp_path):
    """No single head: no confusion matrix to draw, but every metric of the multi head is there."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact
    from fashionlabel.train.run import evaluate

    full = Taxonomy.load("fashion-product-images").to_dict()
    tax = Taxonomy.from_dict(full | {"heads": [h for h in full["heads"] if h["kind"] == "multi"]})
    assert not tax.single_heads
    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_artifact(
        tmp_path / "m", create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
    )
    r = evaluate(str(tmp_path / "m"), str(small_shards), "test")
    assert set(r["metrics"]["heads"]) == {"attributes"} and r["metrics"]["heads"]["attributes"]["n"] > 0
    assert not list((tmp_path / "m").glob("confusion-*.png"))


def test_a_model_or_checkpoints_of_other_shards_are_refused_not_resumed(
    ray_session, small_catalog, small_shards, tiny_model, tmp_path
):
    """The same settings on another shard set would resume the finished (or killed) run's checkpoints and
    export them calibrated and measured on the new shards, as if trained on them: refused by name."""
    import csv
    import shutil

    from conftest import write_catalog

    from fashionlabel.shards import ShardConfig, shard_catalog
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train import checkpoint as ckpt
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    with open(small_catalog, newline="") as f:
        rows = list(csv.DictReader(f))[:400]  # another catalog: a part of the first one
    other = tmp_path / "other-shards"
    tax = Taxonomy.load("fashion-product-images")
    shard_catalog(str(write_catalog(tmp_path / "c.csv", rows)), str(other), tax, ShardConfig())
    cfg = TrainConfig(model="fl_tiny", epochs=2, workers=2, cutmix=0.5)  # tiny_model's settings
    before = (tiny_model / "version").read_text()
    with pytest.raises(ValueError, match=r"holds a model trained on other shards than .*--overwrite"):
        train(str(other), str(tiny_model), cfg, 2)
    assert (tiny_model / "version").read_text() == before
    assert json.loads((tiny_model / "model.json").read_text())["training"]["shards_fingerprint"]
    # a killed run's checkpoints (no model yet), re-run on other shards
    killed = tmp_path / "killed"
    shutil.copytree(
        tiny_model.parent / "model.train" / "checkpoints", tmp_path / "killed.train" / "checkpoints"
    )
    with pytest.raises(
        ValueError, match=r"checkpoints of a run on other shards than .*resume it on the shards"
    ):
        train(str(other), str(killed), cfg, 2)
    assert not killed.exists()
    assert ckpt.load(str(tmp_path / "killed.train" / "checkpoints"))["epoch"] == 1  # untouched

    from fashionlabel.train.run import shards_fingerprint, training_taxonomy

    assert shards_fingerprint(str(other), training_taxonomy(str(other))) != shards_fingerprint(
        str(small_shards), training_taxonomy(str(small_shards))
    )
    # the same shard set elsewhere is the same data: its run would resume
    moved = tmp_path / "moved"
    shutil.copytree(small_shards, moved)
    assert shards_fingerprint(str(moved), training_taxonomy(str(moved))) == shards_fingerprint(
        str(small_shards), training_taxonomy(str(small_shards))
    )


def _index_rows(shards, split=None):
    import pyarrow.parquet as pq

    from fashionlabel.data import split_of

    rows = pq.read_table(shards / "index.parquet").to_pylist()
    return [r for r in rows if split is None or split_of(r["product_id"]) == split]


def test_evaluate_refuses_shards_whose_labels_the_model_cannot_be_measured_on(small_shards, tmp_path):
    """Shards of another taxonomy gave NaN metrics (written over the model's evaluation): refused before
    anything is written. Labels outside a head's values (unseen products may carry one) are counted in
    the evaluation instead of quietly left out."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.export import save_artifact
    from fashionlabel.train.run import evaluate

    pre = {"size": [80, 60], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    full = Taxonomy.load("fashion-product-images").to_dict()

    def model_of(name: str, heads: list[dict]) -> str:
        tax = Taxonomy.from_dict({"name": name, "heads": heads})
        out = tmp_path / name
        save_artifact(
            out, create_model("fl_tiny", tax), architecture="fl_tiny", taxonomy=tax, preprocessing=pre
        )
        return str(out)

    other = model_of("sleeves", [{"name": "sleeveLength", "values": ["not visible", "short", "long"]}])
    with pytest.raises(
        ValueError, match=r"none of the model's heads \(sleeveLength\) is labelled in .*gender"
    ):
        evaluate(other, str(small_shards), "test")
    assert not list((tmp_path / "sleeves").glob("evaluation-*"))
    # labels no training product had (unseen data may have them): measured on the rest, and counted
    fewer = model_of("two-genders", [{"name": "gender", "values": ["Men", "Women"]}])
    r = evaluate(fewer, str(small_shards), "test")
    unisex = r["metrics"]["labels_outside_model"]["gender"]["Unisex"]
    assert unisex == sum(row["gender"] == "Unisex" for row in _index_rows(small_shards))
    assert r["metrics"]["heads"]["gender"]["n"] == sum(
        row["gender"] in ("Men", "Women") for row in _index_rows(small_shards, split="test")
    )
    attrs = next(h for h in full["heads"] if h["name"] == "attributes")
    few_attrs = {"name": "attributes", "kind": "multi", "values": attrs["values"][:3]}
    r = evaluate(model_of("few-attributes", [few_attrs]), str(small_shards), "test")
    assert set(r["metrics"]["labels_outside_model"]["attributes"]) == set(attrs["values"][3:]) & {
        v for row in _index_rows(small_shards) for v in row["attributes"] or []
    }
    kind = model_of("kind", [{"name": "gender", "kind": "multi", "values": ["Men", "Women", "Unisex"]}])
    with pytest.raises(ValueError, match=r"head 'gender' is a multi head in the model and a single one"):
        evaluate(kind, str(small_shards), "test")
    # a subset of the shards' heads with all their values measures as before
    r = evaluate(
        model_of("subset", [h for h in full["heads"] if h["name"] == "usage"]), str(small_shards), "test"
    )
    assert r["metrics"]["heads"]["usage"]["n"] > 0


def test_train_refuses_a_head_no_training_product_is_labelled_for(ray_session, small_catalog, tmp_path):
    """A taxonomy head whose column the catalog lacks trained on nothing, and the model then labelled
    every product with the untrained head's guesses: refused by name before any worker starts."""
    from fashionlabel.shards import ShardConfig, shard_catalog
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    tax = Taxonomy.from_dict(
        {
            "name": "sleeves",
            "heads": [
                {
                    "name": "sleeveLength",
                    "values": ["not visible", "short", "long"],
                    "not_visible": "not visible",
                },
                {"name": "gender"},
            ],
        }
    )
    shards = tmp_path / "shards"
    shard_catalog(str(small_catalog), str(shards), tax, ShardConfig())
    with pytest.raises(
        ValueError,
        match=r"head 'sleeveLength' \(column 'sleeveLength'\) of taxonomy 'sleeves': no training product "
        r"in .* has a label.*missing from the catalog",
    ):
        train(str(shards), str(tmp_path / "m"), TrainConfig(model="fl_tiny", epochs=1, workers=1), 2)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()


def test_train_refuses_a_local_out_it_cannot_write_before_any_worker_starts(
    ray_session, small_shards, tmp_path
):
    """A local ``--out`` (or ``--storage``) it cannot create was found by Ray Train's controller, which
    died with a traceback through Ray (``PermissionError: Cannot create directory '….train'``): now it is
    refused by name, as an ``s3://`` one is, before any worker starts."""
    import os

    from fashionlabel.storage import StorageError
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    cfg = TrainConfig(model="fl_tiny", epochs=1, workers=1)
    blocker = tmp_path / "a-file"  # a file where the folder would go: no user can create under it
    blocker.write_text("")
    # on a cluster the checkpoints go elsewhere (--storage), and the run's own folder beside --out
    with pytest.raises(StorageError, match=r"a-file/m is not writable: "):
        train(str(small_shards), str(blocker / "m"), cfg, 2, checkpoints=str(tmp_path / "c"))
    with pytest.raises(StorageError, match=r"a-file/c is not writable"):
        train(str(small_shards), str(tmp_path / "m"), cfg, 2, checkpoints=str(blocker / "c"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.train").exists()
    if os.geteuid() != 0:  # a read-only folder (root may write into one)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(StorageError, match=r"ro/m is not writable: "):
            train(str(small_shards), str(ro / "m"), cfg, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ro"][: 1 + (os.geteuid() != 0)]


def test_calibrate_refits_thresholds_for_a_review_share_into_a_new_artifact(
    tiny_model, small_shards, tmp_path, capsys
):
    """`fashionlabel calibrate` keeps the weights, refits the thresholds on the validation split so that at
    most the asked share of products needs review, and publishes it as a new version with its metrics."""
    from fashionlabel.cli import run
    from fashionlabel.train.run import evaluate

    out = tmp_path / "calibrated"
    argv = ["calibrate", "--model", str(tiny_model), "--shards", str(small_shards), "--out", str(out)]
    assert run([*argv, "--review-share", "0.25"]) == 0
    printed = capsys.readouterr().out
    old, old_spec = load_artifact(tiny_model)
    new, spec = load_artifact(out)
    cal = spec["calibration"]
    assert (
        spec["version"] != old_spec["version"] and spec["training"]["calibrated_from"] == old_spec["version"]
    )
    assert all(
        torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True)
    )
    assert cal["review_share"] == 0.25 and cal["val_needs_review"] <= 0.25
    assert (
        f"val needs review             {100 * cal['val_needs_review']:.1f}% (asked: at most 25%)" in printed
    )
    # what labelling will flag on the validation products is what the fit measured there
    assert evaluate(str(out), str(small_shards), "val")["metrics"]["needs_review"] == cal["val_needs_review"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"} and metrics["val"]["needs_review"] == cal["val_needs_review"]
    # the same command again publishes the same version; the model's own folder is refused
    assert run([*argv, "--review-share", "0.25"]) == 0
    assert (out / "version").read_text().strip() == spec["version"]
    assert run([*argv[:-1], str(tiny_model), "--review-share", "0.25"]) == 1
    assert run([*argv[:-1], str(tmp_path / "x"), "--review-share", "1.5"]) == 1
    err = capsys.readouterr().err
    assert (
        "is the model being calibrated" in err
        and "--review-share 1.5" in err
        and not (tmp_path / "x").exists()
    )
    # another model's folder given as --out by mistake: refused, not replaced by this model recalibrated
    import shutil

    other = shutil.copytree(tiny_model, tmp_path / "other")
    before = (other / "version").read_text()
    assert run([*argv[:-1], str(other)]) == 1
    assert "holds another model (fl_tiny, version" in capsys.readouterr().err
    assert (other / "version").read_text() == before


def test_training_with_a_review_share_exports_thresholds_fit_to_it(tiny_model, small_shards, tmp_path):
    """``train --review-share`` fits the exported model's thresholds as ``calibrate`` does."""
    from fashionlabel.train import checkpoint as ckpt
    from fashionlabel.train.run import export_state, training_taxonomy

    best = ckpt.load(str(tiny_model.parent / "model.train" / "checkpoints"), ckpt.BEST)
    best["config"] = best["config"] | {"review_share": 0.1}
    export_state(str(small_shards), str(tmp_path / "m"), best, training_taxonomy(str(small_shards)))
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["training"]["config"]["review_share"] == 0.1
    cal = spec["calibration"]
    assert cal["review_share"] == 0.1 and cal["val_needs_review"] <= 0.1
    assert (
        json.loads((tmp_path / "m" / "metrics.json").read_text())["val"]["needs_review"]
        == cal["val_needs_review"]
    )


def test_a_shard_cut_between_two_members_fails_training_and_evaluation_by_name(
    ray_session, small_shards, tiny_model, tmp_path
):
    """A tar cut exactly between two members read as a shorter shard: training went on with part of it and
    evaluation scored fewer products, both without a word (another cut failed with `unexpected end of
    data`, naming no shard). Both fail with one line naming the shard and how to mend it."""
    import shutil
    import tarfile

    from fashionlabel.shards import ShardDamaged
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import evaluate, train

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    tar = shards / "shard-000001.tar"
    with tarfile.open(tar) as t:
        between = [m.offset for m in t][40]  # the header of sample 20's first member
    tar.write_bytes(tar.read_bytes()[:between])
    named = r"shard .*shard-000001.tar is damaged \(truncated tar: no end-of-archive marker.*re-run `fashionlabel shard`"
    with pytest.raises(ShardDamaged, match=named):
        evaluate(str(tiny_model), str(shards), write_to=str(tmp_path / "eval"))
    with pytest.raises(ShardDamaged, match=named):
        train(str(shards), str(tmp_path / "m"), TrainConfig(model="fl_tiny", epochs=1, workers=1), 2)
