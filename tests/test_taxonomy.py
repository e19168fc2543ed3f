import pytest

from fashionlabel.taxonomy import BUILTINS, Taxonomy, TaxonomyError


def test_builtins_load_with_expected_heads():
    fpi = Taxonomy.load("fashion-product-images")
    assert [h.name for h in fpi.heads] == [
        "gender",
        "masterCategory",
        "subCategory",
        "articleType",
        "baseColour",
        "season",
        "usage",
        "attributes",
    ]
    assert fpi.head("articleType").num_classes == 141
    assert fpi.head("attributes").kind == "multi"
    assert sorted(fpi.head("attributes").groups) == ["fabric", "part", "shape", "texture"]
    assert len(fpi.head("attributes").values) == 33
    assert [[h.name for h in c] for c in fpi.chains()] == [["masterCategory", "subCategory", "articleType"]]
    fa = Taxonomy.load("fashionai")
    assert len(fa.heads) == 8 and all(h.values[0] == "invisible" == h.not_visible for h in fa.heads)
    df = Taxonomy.load("deepfashion")
    assert df.head("category").num_classes == 50 and df.head("attributes").values is None
    assert set(BUILTINS) == {"fashion-product-images", "deepfashion", "fashionai"}


def test_version_is_a_content_hash():
    a, b = Taxonomy.load("fashion-product-images"), Taxonomy.load("fashion-product-images")
    assert a.version == b.version and len(a.version) == 12
    d = a.to_dict()
    d["heads"][0]["weight"] = 2.0
    assert Taxonomy.from_dict(d).version != a.version
    assert Taxonomy.from_dict(a.to_dict()).version == a.version  # round trip keeps the version


def test_labels_from_row_masks_unknowns_and_mines_attributes():
    t = Taxonomy.load("fashion-product-images")
    labels = t.labels_from_row(
        {
            "gender": "Men",
            "usage": "NA",
            "season": "",
            "productDisplayName": "Nike Men Striped Polo T-shirt with Logo Print",
        }
    )
    assert labels["gender"] == "Men" and labels["usage"] is None and labels["season"] is None
    assert labels["articleType"] is None  # missing column = unknown
    assert labels["attributes"] == ["printed", "striped", "logo", "polo"]
    # word-bounded: "prints" contains "print" but is not the word
    assert t.labels_from_row({"productDisplayName": "footprints"})["attributes"] == []


def test_invalid_label_and_hierarchy_check():
    t = Taxonomy.load("fashion-product-images")
    assert t.invalid_label({"gender": "Men"}) is None
    assert "gender='Aliens'" in t.invalid_label({"gender": "Aliens"})
    d = t.to_dict()
    art = next(h for h in d["heads"] if h["name"] == "articleType")
    art["parent_map"]["Tshirts"] = "Nowhere"
    with pytest.raises(TaxonomyError, match="without a parent"):
        Taxonomy.from_dict(d)
    # a loop of parents would never end a coarse → fine chain (chains() would spin for ever)
    loop = {
        "name": "loop",
        "heads": [
            {"name": "b", "kind": "single", "values": ["y"], "parent": "c", "parent_map": {"y": "z"}},
            {"name": "c", "kind": "single", "values": ["z"], "parent": "b", "parent_map": {"z": "y"}},
        ],
    }
    with pytest.raises(TaxonomyError, match="parents loop: b -> parent c -> parent b"):
        Taxonomy.from_dict(loop)


def test_learn_values_keeps_not_visible_first():
    t = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "sleeve", "kind": "single", "values": "learn", "not_visible": "invisible"},
                {"name": "tags", "kind": "multi", "values": "learn", "groups": {"fabric": []}},
            ],
        }
    )
    learned = t.learn(
        [
            {"sleeve": "long", "tags": ["fabric:silk"]},
            {"sleeve": "invisible", "tags": None},
            {"sleeve": "cup", "tags": ["fabric:lace", "fabric:silk"]},
        ]
    )
    assert learned.head("sleeve").values == ("invisible", "cup", "long")
    assert learned.head("tags").values == ("fabric:lace", "fabric:silk")
    assert learned.head("tags").group_of() == {"fabric:lace": "fabric", "fabric:silk": "fabric"}


def test_bad_taxonomy_files(tmp_path):
    with pytest.raises(TaxonomyError, match="no taxonomy"):
        Taxonomy.load(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nheads: [{name: a, kind: ranking}]\n")
    with pytest.raises(TaxonomyError, match="kind must be"):
        Taxonomy.load(p)
