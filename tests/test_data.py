import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import torch
from conftest import sample_rows

from fashionlabel.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    cutmix,
    encode_targets,
    load_samples,
    split_of,
    to_input,
)
from fashionlabel.taxonomy import Taxonomy

# sample products whose catalog labels contradict the taxonomy's hierarchy: the taxonomy files Shorts under
# Bottomwear (27424 is Loungewear and Nightwear) and Socks under Accessories (37549's masterCategory is Apparel)
CONFLICTS = {"27424": ("subCategory", "articleType"), "37549": ("masterCategory", "subCategory")}


def test_to_input_normalises_per_channel_in_channels_last():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    x = to_input(images, IMAGENET_MEAN, IMAGENET_STD)
    want = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert x.shape == (3, 3, 8, 6) and x.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), want, atol=1e-6)
    again = to_input(images, IMAGENET_MEAN, IMAGENET_STD)  # the cached moments are not modified by use
    assert torch.equal(x, again)


def test_augment_flips_or_keeps_each_image_and_crops_within_the_padding():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = augment(x, pad=0, generator=torch.Generator().manual_seed(1))
    for i in range(2):  # no padding: each image is itself or its mirror
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    seen = {tuple(augment(x, pad=0)[0].flatten().tolist()) for _ in range(40)}
    assert len(seen) == 2  # device-side draws give both outcomes
    a = augment(x, generator=torch.Generator().manual_seed(7))
    b = augment(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == x.shape


def test_each_image_gets_its_own_crop_of_its_padded_self():
    x = torch.rand(1, 3, 10, 8).expand(16, 3, 10, 8).contiguous()  # 16 copies of one image
    out = augment(x, pad=2, generator=torch.Generator().manual_seed(3))
    xp = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="replicate")[0]
    crops = {}
    for dy in range(5):
        for dx in range(5):
            c = xp[:, dy : dy + 10, dx : dx + 8]
            crops[(dy, dx, False)], crops[(dy, dx, True)] = c, c.flip(2)
    found = [next(k for k, c in crops.items() if torch.equal(out[i], c)) for i in range(16)]
    assert len({(dy, dx) for dy, dx, _ in found}) > 4  # shifts drawn per image, not one per batch
    assert augment(torch.zeros(2, 3, 80, 60)).shape == (2, 3, 80, 60)  # default pad: 5% of the height


def test_cutmix_pastes_one_box_from_another_image_and_returns_the_share_kept():
    n, h, w = 6, 20, 15
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()  # image i is i
    shares = []
    for seed in range(30):
        out, perm, own = cutmix(x, generator=torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        for i in range(n):
            mine, theirs = out[i] == i, out[i] == perm[i]
            assert torch.all(mine | theirs)  # every pixel is the image's own or its partner's
            if perm[i] != i:  # the share of its own pixels is the weight of its own labels
                assert abs(mine.float().mean().item() - own) < 1e-6
            box = (~mine[0]).nonzero()
            if len(box):  # what was replaced is one rectangle, the same for every image
                (y0, x0), (y1, x1) = box.min(0).values.tolist(), box.max(0).values.tolist()
                assert (~mine[0])[y0 : y1 + 1, x0 : x1 + 1].all()
        shares.append(own)
    assert torch.equal(
        x, torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w)
    )  # input kept
    assert min(shares) < 0.5 < max(shares) <= 1.0  # area drawn over the whole range


def _tax_and_labels():
    tax = Taxonomy.load("fashion-product-images")
    rows = {r["product_id"]: r for r in sample_rows()}
    ids = [*CONFLICTS, sample_rows(1)[0]["product_id"]]  # and a consistent product
    return tax, ids, [tax.labels_from_row(rows[i]) for i in ids]


def test_training_targets_mask_both_labels_of_a_pair_the_hierarchy_contradicts(caplog):
    tax, ids, labels = _tax_and_labels()
    for pid, lab in zip(ids, labels, strict=True):  # the premise, checked independently of the code
        for coarse, fine in [CONFLICTS[pid]] if pid in CONFLICTS else []:
            assert tax.head(fine).parent_map[lab[fine]] != lab[coarse]
    as_written = encode_targets(labels, tax)
    with caplog.at_level(logging.WARNING, logger="fashionlabel.data"):
        masked = encode_targets(labels, tax, mask_conflicts=True)
    for i, pid in enumerate(ids):
        for h in tax.single_heads:
            assert as_written[h.name][i] >= 0 or labels[i][h.name] is None  # evaluation keeps them all
            conflicted = pid in CONFLICTS and h.name in CONFLICTS[pid]
            assert masked[h.name][i] == (-1 if conflicted else as_written[h.name][i]), (pid, h.name)
    assert np.array_equal(masked["attributes"], as_written["attributes"], equal_nan=True)
    said = caplog.text
    assert "1 of 3 training products have a subCategory and a articleType that contradict" in said
    assert "1 of 3 training products have a masterCategory and a subCategory that contradict" in said


def test_a_middle_level_is_checked_against_both_neighbours_as_written():
    """masterCategory → subCategory → articleType: a subCategory that fits its articleType but not its
    masterCategory is masked with that masterCategory, and its articleType (which fits it) still trains."""
    tax = Taxonomy.load("fashion-product-images")
    sub = tax.head("subCategory")
    art = next(a for a, s in tax.head("articleType").parent_map.items() if s == "Topwear")
    wrong_master = next(m for m in tax.head("masterCategory").values if m != sub.parent_map["Topwear"])
    lab = {"masterCategory": wrong_master, "subCategory": "Topwear", "articleType": art}
    y = encode_targets([lab], tax, mask_conflicts=True)
    assert y["masterCategory"][0] == -1 and y["subCategory"][0] == -1
    assert y["articleType"][0] == tax.head("articleType").index[art]


def _shard(path, rows):
    with tarfile.open(path, "w") as tar:
        for r in rows:
            for ext, payload in (
                ("json", json.dumps(r["meta"]).encode()),
                ("jpg", Path(r["image"]).read_bytes()),
            ):
                info = tarfile.TarInfo(f"{r['meta']['product_id']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_only_the_training_split_is_masked_when_samples_are_loaded(tmp_path):
    tax, ids, labels = _tax_and_labels()
    rows = {r["product_id"]: r for r in sample_rows()}
    pid = "27424"
    assert split_of(pid) == "train"
    _shard(
        tmp_path / "shard-000000.tar",
        [{"meta": {"product_id": pid, "labels": labels[0]}, "image": rows[pid]["image_uri"]}],
    )
    uris = [str(tmp_path / "shard-000000.tar")]
    training = load_samples(uris, tax, (80, 60), split="train")
    everyone = load_samples(uris, tax, (80, 60))  # as evaluation reads them
    assert training.product_ids == everyone.product_ids == [pid]
    assert training.targets["articleType"][0] == -1 and training.targets["subCategory"][0] == -1
    assert training.targets["masterCategory"][0] == everyone.targets["masterCategory"][0] >= 0
    assert everyone.targets["articleType"][0] == tax.head("articleType").index["Shorts"]


def test_a_sample_without_an_image_is_left_out_with_the_reason_labelling_gives(tmp_path):
    """Training and evaluation read a shard sample that has no jpg member as "undecodable image: 'jpg'" (a
    KeyError's text); labelling gives the same sample "missing image: …". Both say the latter now."""
    from fashionlabel.label.reader import read_shards

    tax, _, labels = _tax_and_labels()
    rows = sample_rows(2)
    tar = tmp_path / "shard-000000.tar"
    _shard(
        tar,
        [
            {"meta": {"product_id": r["product_id"], "labels": labels[0]}, "image": r["image_uri"]}
            for r in rows
        ],
    )
    with tarfile.open(tar) as t:  # the same shard without the second product's image
        members = [(m, t.extractfile(m).read()) for m in t if m.name != f"{rows[1]['product_id']}.jpg"]
    with tarfile.open(tar, "w") as t:
        for m, payload in members:
            t.addfile(m, io.BytesIO(payload))

    samples = load_samples([str(tar)], tax, (80, 60))
    assert samples.product_ids == [rows[0]["product_id"]]
    assert samples.errors == {rows[1]["product_id"]: "missing image: the shard has no jpg for this product"}
    labelled = read_shards({"shard": np.array([str(tar)], dtype=object)}, decode_on="cpu", size=(80, 60))
    assert list(labelled["error"]) == [None, samples.errors[rows[1]["product_id"]]]


def test_split_of_gives_each_split_its_share_of_products_and_the_same_split_every_time():
    ids = [str(i) for i in range(20_000)]
    for val, test in ((0.1, 0.1), (0.2, 0.05)):
        splits = [split_of(p, val, test) for p in ids]
        shares = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
        assert abs(shares["val"] - val) < 0.01 and abs(shares["test"] - test) < 0.01, shares
        assert abs(shares["train"] - (1 - val - test)) < 0.015, shares
    assert [split_of(p) for p in ids[:500]] == [split_of(p) for p in ids[:500]]


def test_targets_mask_what_is_unknown_and_keep_every_known_value():
    """Single heads: a value the taxonomy lacks, a missing or null label are -1 (masked), never some class;
    multi heads: a null list is a NaN row (masked), an empty list a known row of zeros, and every known
    value of a list is set. With ``mask_conflicts`` a fine label whose coarse one is unknown still trains."""
    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "coarse", "values": ["upper", "lower"]},
                {
                    "name": "fine",
                    "values": ["tee", "jeans"],
                    "parent": "coarse",
                    "parent_map": {"tee": "upper", "jeans": "lower"},
                },
                {"name": "tags", "kind": "multi", "values": ["a", "b", "c"]},
            ],
        }
    )
    labels = [
        {"coarse": "lower", "fine": "jeans", "tags": ["a", "c"]},
        {"coarse": "sideways", "fine": "tee", "tags": []},  # a coarse value the taxonomy lacks
        {"coarse": None, "fine": "tee", "tags": None},
        {"tags": ["b", "z", "a"]},  # no single labels at all; one tag the taxonomy lacks
    ]
    for mask in (False, True):
        y = encode_targets(labels, tax, mask_conflicts=mask)
        assert y["coarse"].tolist() == [1, -1, -1, -1]
        assert y["fine"].tolist() == [1, 0, 0, -1]  # a tee under an unknown coarse value is no conflict
        assert np.array_equal(
            y["tags"],
            np.array([[1, 0, 1], [0, 0, 0], [np.nan] * 3, [1, 1, 0]], dtype=np.float32),
            equal_nan=True,
        )
