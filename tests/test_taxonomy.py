import unicodedata

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


def test_version_survives_json_with_sorted_keys(tmp_path):
    """A shard set records its taxonomy in stats.json and a model in model.json, both written with sorted
    keys (which reorders a mined head's patterns): read back, every built-in keeps its values' order and the
    version it was written with, so the shards, the model and the labels name one taxonomy by one version."""
    from fashionlabel import storage

    for name in BUILTINS:
        t = Taxonomy.load(name)
        storage.write_json(
            tmp_path / f"{name}.json", {"taxonomy": t.to_dict(), "taxonomy_version": t.version}
        )
        saved = storage.read_json(tmp_path / f"{name}.json")
        back = Taxonomy.from_dict(saved["taxonomy"])
        assert back.version == saved["taxonomy_version"] == t.version, name
        assert [(h.values, dict(h.groups)) for h in back.heads] == [
            (h.values, dict(h.groups)) for h in t.heads
        ]
        row = {"productDisplayName": "Nike Men Striped Polo T-shirt with Logo Print"}
        assert back.labels_from_row(row) == t.labels_from_row(row), name


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


def test_a_list_cell_of_a_single_head_is_one_value_or_refused_never_a_class_of_its_own():
    """A JSON Lines or Parquet catalog may hold a list where a single head reads one value: ["Men"] is Men
    (it was refused as "['Men']"), and ["Black", "White"] is refused by name, also for a head that learns
    its values (which learned "['Black', 'White']" as one more colour)."""
    from fashionlabel.catalog import CatalogRow, Rejected, check_labels

    t = Taxonomy.from_dict(
        {
            "name": "x",
            "heads": [{"name": "colour", "values": "learn"}, {"name": "g", "values": ["Men", "Women"]}],
        }
    )
    assert t.labels_from_row({"colour": ["Black", "NA"], "g": ["Men"]}) == {"colour": "Black", "g": "Men"}
    two = t.labels_from_row({"colour": ["Black", "White"], "g": "Men"})
    assert t.invalid_label(two) == (
        "colour holds 2 values ['Black', 'White']: a single head takes one (write one value, or declare "
        "the head kind: multi)"
    )
    row = CatalogRow("p1", "p1", "a.jpg", {"colour": ["Black", "White"], "g": "Men"})
    assert isinstance(check_labels(row, t), Rejected)
    kept = check_labels(row, t, keep_outside=True)  # a night labels it, that head without its label
    assert kept.labels == {"colour": None, "g": "Men"} and kept.blanked == ("colour",)
    assert t.learn([t.labels_from_row({"colour": "Black"}), kept.labels]).head("colour").values == ("Black",)


def test_a_mined_pattern_written_with_capitals_still_matches():
    """The text is matched lower-cased: a pattern spelt as product names spell it (``T-Shirt``) matched
    nothing, and its value had no positive label in the whole catalog, without a word."""
    t = Taxonomy.from_dict(
        {
            "name": "x",
            "heads": [
                {
                    "name": "tags",
                    "kind": "multi",
                    "column": "title",
                    "patterns": {"t": {"tee": "T-Shirt|Tee"}},
                }
            ],
        }
    )
    assert t.labels_from_row({"title": "Blue T-SHIRT"})["tags"] == ["tee"]
    assert t.labels_from_row({"title": "Teeshirt"})["tags"] == []  # still word-bounded


def test_invalid_label_and_hierarchy_check():
    t = Taxonomy.load("fashion-product-images")
    assert t.invalid_label({"gender": "Men"}) is None
    assert "gender='Aliens'" in t.invalid_label({"gender": "Aliens"})
    d = t.to_dict()
    art = next(h for h in d["heads"] if h["name"] == "articleType")
    art["parent_map"]["Tshirts"] = "Nowhere"
    with pytest.raises(
        TaxonomyError, match="parent_map maps 'Tshirts' to 'Nowhere', which is not a value of"
    ):
        Taxonomy.from_dict(d)


def test_a_parent_map_that_misses_a_value_or_names_no_parent_value_says_which():
    """A typo on the right of a parent_map (`kurta: TopWear`) was reported as "values without a parent":
    the value has one, misspelled. The error now tells the two apart, names the parent's values and the
    near one."""
    shop = {
        "name": "shop",
        "heads": [
            {"name": "family", "values": ["Topwear", "Shoes"]},
            {
                "name": "item_type",
                "values": ["tee", "kurta", "heel"],
                "parent": "family",
                "parent_map": {"tee": "Topwear", "kurta": "TopWear", "heel": "Shoes"},
            },
        ],
    }
    with pytest.raises(
        TaxonomyError,
        match=r"^head 'item_type': parent_map maps 'kurta' to 'TopWear', which is not a value of 'family' "
        r"\(did you mean 'Topwear'\? its values: Topwear, Shoes\)$",
    ):
        Taxonomy.from_dict(shop)
    del shop["heads"][1]["parent_map"]["kurta"]
    with pytest.raises(
        TaxonomyError,
        match=r"^head 'item_type': parent_map names no value of 'family' for \['kurta'\]: add 'kurta: <its "
        r"family>' for each$",
    ):
        Taxonomy.from_dict(shop)
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


def test_a_label_outside_the_taxonomy_names_its_column_and_what_it_may_have_meant():
    """The quarantine detail of a label outside the taxonomy names the catalog column it was read from
    (a head may read a column of another name) and the near miss: the same value in another case or
    spacing, or a multi-label cell split on another separator than '|'."""
    t = Taxonomy.from_dict(
        {
            "name": "shop",
            "heads": [
                {"name": "department", "column": "Dept", "values": ["shoes", "bags"]},
                {"name": "product_type", "column": "Product Type", "values": ["dress shoe", "tote"]},
                {"name": "tags", "kind": "multi", "column": "Tags", "values": ["leather", "canvas"]},
            ],
        }
    )
    why = t.invalid_label(t.labels_from_row({"Dept": "Shoes"}))
    assert why.startswith("department='Shoes' (column 'Dept') is not one of the 2 values of the taxonomy")
    assert "the taxonomy has 'shoes'" in why
    why = t.invalid_label(t.labels_from_row({"Product Type": "Dress  Shoe"}))
    assert "(column 'Product Type')" in why and "the taxonomy has 'dress shoe'" in why
    why = t.invalid_label(t.labels_from_row({"Tags": "leather, canvas"}))
    assert "tags='leather, canvas'" in why and "separates its values with '|', not ','" in why
    why = t.invalid_label(t.labels_from_row({"Dept": "hats"}))
    assert why == "department='hats' (column 'Dept') is not one of the 2 values of the taxonomy"
    assert t.invalid_label(t.labels_from_row({"Dept": "shoes", "Tags": "leather|canvas"})) is None


def test_a_label_that_only_looks_like_a_value_of_the_taxonomy_says_how_it_differs():
    """'Café' exported in decomposed form (e + a combining accent, as macOS writes it) or 'tee' typed with a
    Cyrillic 'е' prints exactly like the taxonomy's value: the quarantine detail said only that it is not one
    of the values. It now names the value it looks like and spells out the characters that differ."""
    t = Taxonomy.from_dict(
        {
            "name": "shop",
            "heads": [{"name": "style", "column": "Style", "values": ["Café", "tee", "Navy Blue"]}],
        }
    )
    why = t.invalid_label(t.labels_from_row({"Style": unicodedata.normalize("NFD", "Café")}))
    assert "the taxonomy has 'Café'" in why and "'Cafe\\u0301'" in why and "Unicode" in why
    why = t.invalid_label(t.labels_from_row({"Style": "te\u0435"}))  # Cyrillic е
    assert "'te\\u0435'" in why and "looks like the taxonomy's 'tee'" in why
    why = t.invalid_label(t.labels_from_row({"Style": "Navy\u00a0Blue"}))  # a no-break space inside
    assert "the taxonomy has 'Navy Blue'" in why and "its characters are 'Navy\\xa0Blue'" in why
    why = t.invalid_label(t.labels_from_row({"Style": "hoodie"}))
    assert why == "style='hoodie' (column 'Style') is not one of the 3 values of the taxonomy"


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


@pytest.mark.parametrize(
    "heads, error",
    [
        ("[{name: s, values: [short, long, short]}]", r"head 's': duplicate values \['short'\]"),
        ("[{name: t, kind: multi, values: [red, blue, red]}]", r"head 't': duplicate values \['red'\]"),
        ("[{name: s, values: []}]", r"head 's' has no values .*catalog column 's'"),
        ("[{name: s, values: short}]", r"head 's': values must be a list or 'learn', not 'short'"),
        ("[{name: s, values: [a, b], weight: 0}]", r"head 's': weight must be > 0, not 0.0"),
        ("[{name: s, values: [a, b], weight: -1}]", r"head 's': weight must be > 0, not -1.0"),
        ("[{name: t, kind: multi, values: [a], w_pos: -1}]", r"head 't': w_pos must be > 0"),
        ("[{name: t, kind: multi, values: [a], w_neg: -0.1}]", r"head 't': w_neg must be ≥ 0"),
        ("[{name: t, kind: multi, values: [a], threshold: 7}]", r"threshold must be a probability"),
        ("[{name: s, values: [a, b], not_visible: hidden}]", r"not_visible value 'hidden' is not one of"),
        (
            "[{name: t, kind: multi, values: [red, blue], groups: {colour: [red, green]}}]",
            r"head 't': groups name values it does not have: \['green'\]",
        ),
        (
            "[{name: t, kind: multi, values: [red], groups: {a: [red], b: [red]}}]",
            r"value 'red' is in two groups, 'a' and 'b'",
        ),
        (
            "[{name: sub, values: [Topwear], parent: nosuch, parent_map: {Topwear: Apparel}}]",
            r"head 'sub': parent 'nosuch' is not a head of taxonomy 'x' \(its heads: sub\)",
        ),
        ("[{name: a, values: [x]}, {name: a, values: [y]}]", r"duplicate head names \['a'\]"),
        ("[{kind: single, values: [x]}]", r"every head needs a 'name'"),
        ("{a: {values: [x]}}", r"'heads' must be a non-empty list"),
        # a value of the wrong YAML shape is named with its head and key, not in Python's own words
        (
            "[{name: tags, kind: multi, column: title, patterns: {texture: printed}}]",
            r"head 'tags': patterns 'texture' must be a mapping of value: regex, not 'printed'",
        ),
        (
            "[{name: t, kind: multi, values: [r, e, d], groups: {colour: red}}]",
            r"head 't': groups 'colour' must be a list of values, not 'red'",
        ),
        ("[{name: s, values: [a], parent_map: [a]}]", r"head 's': parent_map must be a mapping, not \['a'\]"),
        ("[{name: s, values: [a], weight: heavy}]", r"head 's': weight must be a number, not 'heavy'"),
        # a pattern that is no regex: refused at load, not as a bare re.error in the first task to mine a row
        (
            "[{name: tags, kind: multi, column: title, patterns: {fabric: {leather: 'leather('}}}]",
            r"head 'tags': pattern of fabric:leather is no regular expression .*'leather\('",
        ),
        # a head named like a column the tables have already: a shoe's width (the index's image width)
        (
            "[{name: width, column: Width, values: [narrow, wide]}]",
            r"head 'width': its labels would go to column 'width', one of the shard index's own columns \(key,",
        ),
        ("[{name: active, values: [a, b]}]", r"column 'active', one of the labels tables' own columns"),
        (
            "[{name: colour, values: [a]}, {name: colour_score, values: [b]}]",
            r"head 'colour_score': its labels would go to column 'colour_score', a column of head 'colour' too",
        ),
        # YAML reads unquoted yes/no as booleans: the head would declare 'True' and 'False'
        (
            "[{name: waterproof, values: [yes, no]}]",
            r"head 'waterproof': True is how YAML reads an unquoted yes",
        ),
        ("[{name: logo, values: ['n/v', 'on', 'off'], not_visible: off}]", r"head 'logo': False is how YAML"),
        (
            "[{name: a, values: [x]}, {name: b, values: ['yes'], parent: a, parent_map: {yes: x}}]",
            r"head 'b': True is how YAML reads",
        ),
    ],
)
def test_taxonomy_mistakes_are_named(tmp_path, heads, error):
    """Each mistake is refused by name when the file is loaded: none trains silently wrong (a duplicate
    value is a class no label reaches, a weight ≤ 0 trains a head away from its labels)."""
    p = tmp_path / "t.yaml"
    p.write_text(f"name: x\nheads: {heads}\n")
    with pytest.raises(TaxonomyError, match=error):
        Taxonomy.load(p)


def test_names_yaml_reads_as_numbers_are_read_as_the_text_of_catalog_cells(tmp_path):
    """YAML reads an unquoted 2011 or 42 as a number, catalog cells are text: a parent_map keyed 2011 was
    refused as naming no value of its head ("add '2011: <its decade>'", though it was there), and a mined
    value 42 failed every packing task with a KeyError on its pattern."""
    p = tmp_path / "t.yaml"
    p.write_text(
        "name: x\nheads:\n"
        "  - {name: decade, values: [2010s]}\n"
        "  - {name: year, values: [2011, 2012], parent: decade, parent_map: {2011: 2010s, 2012: 2010s}}\n"
        "  - {name: tags, kind: multi, column: title, patterns: {size: {42: '42', 44: '44'}}, groups: {size: [44, 42]}}\n"
    )
    t = Taxonomy.load(p)
    assert t.head("year").parent_map == {"2011": "2010s", "2012": "2010s"}
    assert t.labels_from_row({"year": 2011, "title": "Shoe, size 42"}) == {
        "decade": None,
        "year": "2011",
        "tags": ["42"],
    }
    assert t.head("tags").groups == {"size": ("44", "42")}
    assert Taxonomy.from_dict(t.to_dict()).version == t.version
    p.write_text("name: x\nheads: [{name: size, values: [0, 38, 40], not_visible: 0}]\n")
    assert Taxonomy.load(p).head("size").not_visible == "0"  # was refused as "not one of its values"


def test_unknown_values_are_a_list_of_text_markers(tmp_path):
    """``unknown_values: NA`` made every letter a marker ('N', 'A': a cell "A" meant no label), and an
    unquoted ``0`` in the list never matched a cell, which is text ("0")."""
    p = tmp_path / "t.yaml"
    p.write_text("name: x\nunknown_values: NA\nheads: [{name: g, values: [Men, Women]}]\n")
    with pytest.raises(
        TaxonomyError, match=r"taxonomy 'x': unknown_values must be a list of markers, not 'NA'"
    ):
        Taxonomy.load(p)
    p.write_text("name: x\nunknown_values: [NA, 0]\nheads: [{name: g, values: [Men, Women]}]\n")
    t = Taxonomy.load(p)
    assert t.labels_from_row({"g": "0"}) == {"g": None} and t.labels_from_row({"g": 0}) == {"g": None}
    assert Taxonomy.from_dict(t.to_dict()).version == t.version


def test_a_value_that_is_an_unknown_marker_is_refused(tmp_path):
    """A declared value that the taxonomy also lists as "no label" (the defaults hold 'None' and
    'unknown') is refused by name: every catalog cell with it was masked, so the class never trained."""
    p = tmp_path / "t.yaml"
    p.write_text("name: x\nheads: [{name: closure, values: [zip, laces, None]}]\n")
    with pytest.raises(
        TaxonomyError, match=r"head 'closure': value 'None' is also one of the taxonomy's unknown"
    ):
        Taxonomy.load(p)
    p.write_text("name: x\nunknown_values: ['', NA]\nheads: [{name: closure, values: [zip, laces, None]}]\n")
    tax = Taxonomy.load(p)  # listed without it, 'None' is a value like any other
    assert tax.labels_from_row({"closure": "None"}) == {"closure": "None"}
    p.write_text("name: x\nheads: [{name: sleeve, values: [unknown, short], not_visible: unknown}]\n")
    with pytest.raises(TaxonomyError, match=r"value 'unknown' is also one of"):
        Taxonomy.load(p)


@pytest.mark.parametrize(
    "text, error",
    [
        (
            "name: x\nheads: [{name: dept, colum: Dept, values: [Shoes, Bags]}]\n",
            r"head 'dept' of taxonomy '.*t.yaml': unknown key 'colum' \(did you mean 'column'\?",
        ),
        (
            "name: x\nheads: [{name: a, values: [x]}, {name: b, values: [y], parnet: a, parent_map: {y: x}}]\n",
            r"head 'b' .*: unknown key 'parnet' \(did you mean 'parent'\?",
        ),
        (
            "name: x\nunknown_value: ['-']\nheads: [{name: a, values: [x]}]\n",
            r"taxonomy '.*t.yaml': unknown key 'unknown_value' \(did you mean 'unknown_values'\?",
        ),
        (
            "name: x\nheads: [{name: a, values: [x], notes: red}]\n",
            r"unknown key 'notes' \(known keys: name",
        ),
    ],
)
def test_misspelt_keys_are_refused(tmp_path, text, error):
    """A key the file format does not have is refused by name, with the nearest known key: ignored, a
    misspelt ``column`` made the head read a column named after itself (no labels at all), a misspelt
    ``parent`` dropped the hierarchy, a misspelt ``unknown_values`` made "-" a class."""
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(TaxonomyError, match=error):
        Taxonomy.load(p)


def test_learning_no_values_for_a_head_names_its_column():
    """A head that learns its values from a column the catalog lacks has none to learn: named, not a
    model with an empty head."""
    tax = Taxonomy.from_dict({"name": "x", "heads": [{"name": "sleeve", "column": "sleeveLength"}]})
    with pytest.raises(TaxonomyError, match=r"head 'sleeve' has no values .*column 'sleeveLength'"):
        tax.learn([{"sleeve": None}, {"sleeve": None}])


def test_learning_one_value_under_two_spellings_is_refused_by_name():
    """'Navy Blue' and 'Navy\\xa0Blue' (a no-break space from a spreadsheet) were learned as two values: two
    classes, and labels that print alike. Declared values quarantine such a spelling with a hint; learned
    ones are refused by name, with both spellings and how many products each has."""
    tax = Taxonomy.from_dict(
        {"name": "x", "heads": [{"name": "shade", "column": "Colour Name", "values": "learn"}]}
    )
    rows = [{"shade": "Navy Blue"}] * 3 + [{"shade": "Navy\u00a0Blue"}, {"shade": "Black"}]
    with pytest.raises(
        TaxonomyError,
        match=r"^head 'shade' would learn 'Navy Blue' \(3 product\(s\)\) and 'Navy\\xa0Blue' \(1 product\(s\)\) "
        r"as 2 values, though they differ only in case, spacing or Unicode form .*catalog column 'Colour Name'",
    ):
        tax.learn(rows)
    assert tax.learn([*rows[:3], rows[4]]).head("shade").values == ("Black", "Navy Blue")


def test_a_null_inside_a_list_cell_is_no_value_not_the_text_none():
    """A Parquet or JSON Lines list cell may hold a null among its values (``['for:men', None]``): it was
    read as the text 'None' and quarantined the product (traits='None' is not one of the values), naming a
    value no cell holds. A null element is skipped, as an empty string is; a list of nulls only is empty."""
    t = Taxonomy.from_dict(
        {
            "name": "x",
            "heads": [{"name": "traits", "kind": "multi", "column": "Traits", "values": ["for:men"]}],
        }
    )
    labels = t.labels_from_row({"Traits": ["for:men", None, " "]})
    assert labels == {"traits": ["for:men"]} and t.invalid_label(labels) is None
    assert t.labels_from_row({"Traits": [None]}) == {"traits": []}


def test_a_parent_map_without_a_parent_is_refused_naming_the_head_it_maps_to():
    """A head with ``parent_map`` but no ``parent`` loaded as a flat head: the hierarchy was ignored without
    a word (predictions never made consistent). It is refused, naming the head whose values the map names."""
    shop = {
        "name": "shop",
        "heads": [
            {"name": "family", "values": ["Topwear", "Shoes"]},
            {
                "name": "item_type",
                "values": ["tee", "heel"],
                "parent_map": {"tee": "Topwear", "heel": "Shoes"},
            },
        ],
    }
    with pytest.raises(
        TaxonomyError,
        match=r"^head 'item_type' has a parent_map but no parent, so its hierarchy would be ignored: add "
        r"'parent: family' to it, or drop its parent_map$",
    ):
        Taxonomy.from_dict(shop)
    shop["heads"][1]["parent"] = "family"
    assert Taxonomy.from_dict(shop).head("item_type").parent == "family"
