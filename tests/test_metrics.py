import json

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support, top_k_accuracy_score

from fashionlabel.train.metrics import macro_f1, macro_prf, thresholded_prf, topk_accuracy, topk_recall


def test_topk_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random((200, 7))
    y = rng.integers(0, 7, 200)
    for k in (1, 3, 5):
        assert np.isclose(topk_accuracy(p, y, k), top_k_accuracy_score(y, p, k=k, labels=range(7)))
    y2 = y.copy()
    y2[:50] = -1  # unknown labels are masked
    assert np.isclose(topk_accuracy(p, y2, 1), top_k_accuracy_score(y[50:], p[50:], k=1, labels=range(7)))


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert np.isclose(macro_f1(pred, y), f1_score(y, pred, average="macro"))


def test_macro_precision_recall_f1_match_sklearn():
    rng = np.random.default_rng(4)
    y, pred = rng.integers(-1, 6, 300), rng.integers(0, 5, 300)  # class 5 is never predicted; -1 unknown
    known = y >= 0
    want = precision_recall_fscore_support(y[known], pred[known], average="macro", zero_division=0)[:3]
    assert np.allclose(macro_prf(pred, y), want)


def test_thresholded_lists_match_sklearn_micro_and_macro():
    rng = np.random.default_rng(5)
    n, c = 400, 12
    probs = rng.random((n, c))
    y = (rng.random((n, c)) < 0.15).astype(np.float32)
    y[:, 11] = 0  # a value no product has and none is given at 0.6 below: outside the macro average
    probs[:, 11] = 0.0
    y[:40] = np.nan  # unknown rows are left out
    m = thresholded_prf(probs, y, 0.6)
    t, p = y[40:] > 0.5, probs[40:] >= 0.6
    for avg in ("micro", "macro"):
        cols = slice(None) if avg == "micro" else slice(0, 11)
        want = precision_recall_fscore_support(t[:, cols], p[:, cols], average=avg, zero_division=0)[:3]
        assert np.allclose([m[f"{avg}_{k}"] for k in ("precision", "recall", "f1")], want), avg
    assert m["n"] == 360 and m["threshold"] == 0.6
    # hand-computed: one product gets {0}, one gets nothing: half the products get no value
    two = thresholded_prf(np.array([[0.9, 0.2], [0.1, 0.3]]), np.array([[1, 1], [0, 1]], np.float32), 0.5)
    assert (two["micro_precision"], two["micro_recall"], two["empty"]) == (1.0, 1 / 3, 0.5)


def test_topk_recall_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    y = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    # product 0: top-2 = {0, 1} holds 1 of its 2 → 0.5; product 1: top-2 = {3, 2} holds 0 of 2 → 0;
    # product 2 has no true attribute and is excluded
    assert np.isclose(topk_recall(scores, y, 2), 0.25)
    assert np.isclose(topk_recall(scores, y, 4), 1.0)
    # a group of columns {2, 3}: product 0's true group attribute (2) is outside the overall top-2 {0, 1}
    # → 0; product 1's has none in the group and is excluded. Within the group alone it would rank first.
    assert np.isclose(topk_recall(scores, y, 2, np.array([2, 3])), 0.0)
    assert np.isclose(topk_recall(scores, y, 3, np.array([0, 1])), (1 + 1 / 2) / 2)  # top-3: {0,1,3}, {3,2,1}


def _recall_by_loop(scores, y, k, group=None):
    """DeepFashion top-k recall written out product by product (the protocol, literally): all attributes
    ranked; with ``group``, only that group's true attributes counted, over products that have one."""
    vals = []
    for s, t in zip(scores, y, strict=True):
        if np.isnan(t).any():
            continue
        mine = [i for i in range(len(t)) if t[i] and (group is None or i in group)]
        if not mine:
            continue
        top = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        vals.append(sum(i in top for i in mine) / len(mine))
    return float(np.mean(vals))


def test_topk_recall_matches_the_protocol_per_group():
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.metrics import head_metrics

    head = Taxonomy.load("fashion-product-images").head("attributes")
    rng = np.random.default_rng(2)
    n, c = 300, head.num_classes
    scores = rng.random((n, c))
    y = (rng.random((n, c)) < 0.08).astype(np.float32)
    y[:20] = np.nan  # unknown attribute sets are masked
    m = head_metrics(head, scores, y)
    group = head.group_of()
    for k in (3, 5):
        assert np.isclose(m[f"recall@{k}"], _recall_by_loop(scores, y, k))
        for g in ("texture", "fabric", "shape", "part"):
            cols = [i for i, v in enumerate(head.values) if group[v] == g]
            assert np.isclose(m[f"{g}_recall@{k}"], _recall_by_loop(scores, y, k, set(cols))), g
            assert m[f"{g}_n"] == int((y[20:, cols].sum(axis=1) > 0).sum()) > 0, g
    assert m["n"] == int((y[20:].sum(axis=1) > 0).sum())


def test_single_head_metrics_and_confusion_match_sklearn():
    from sklearn.metrics import confusion_matrix

    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.metrics import confusion, head_metrics

    head = Taxonomy.load("fashion-product-images").head("usage")
    rng = np.random.default_rng(3)
    p = rng.random((250, head.num_classes))
    y = rng.integers(-1, head.num_classes, 250)  # -1: unknown, masked
    m = head_metrics(head, p, y)
    known = y >= 0
    assert m["n"] == known.sum() and m["classes"] == head.num_classes
    for k in (1, 3, 5):
        assert np.isclose(
            m[f"top{k}"], top_k_accuracy_score(y[known], p[known], k=k, labels=range(head.num_classes))
        )
    assert np.isclose(m["macro_f1"], f1_score(y[known], p[known].argmax(1), average="macro"))
    want = precision_recall_fscore_support(y[known], p[known].argmax(1), average="macro", zero_division=0)
    assert np.allclose([m["macro_precision"], m["macro_recall"]], want[:2])
    assert (
        confusion(p.argmax(1), y, head.num_classes)
        == confusion_matrix(y[known], p[known].argmax(1), labels=range(head.num_classes))
    ).all()


def test_hierarchy_consistency_hand_computed_and_after_consistent_choice():
    from fashionlabel.label.postprocess import consistent_choice
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.metrics import hierarchy_consistency

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "coarse", "kind": "single", "values": ["upper", "lower"]},
                {
                    "name": "fine",
                    "kind": "single",
                    "values": ["tee", "jeans", "skirt"],
                    "parent": "coarse",
                    "parent_map": {"tee": "upper", "jeans": "lower", "skirt": "lower"},
                },
            ],
        }
    )
    probs = {
        "coarse": np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
        "fine": np.array([[0.8, 0.1, 0.1], [0.1, 0.5, 0.4], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]]),
    }
    # argmax pairs: (upper, tee) ok, (upper, jeans) no, (lower, skirt) ok, (upper, skirt) no → 2 of 4
    assert hierarchy_consistency(tax, probs) == {"coarse->fine": 0.5}
    chosen = consistent_choice(tax, probs)
    onehot = {h: np.eye(probs[h].shape[1])[chosen[h]] for h in probs}
    assert hierarchy_consistency(tax, onehot) == {"coarse->fine": 1.0}
    # product 1: 0.8·0.5 (upper·jeans is inconsistent) → best consistent pair is lower/jeans (0.2·0.5=0.10)
    # vs upper/tee (0.8·0.1=0.08): the fine head's confidence wins; product 3: upper/tee 0.06 vs lower/skirt 0.28
    assert chosen["fine"].tolist() == [0, 1, 2, 2] and chosen["coarse"].tolist() == [0, 1, 1, 1]


def test_a_coarse_head_with_two_fine_heads_gets_one_consistent_choice():
    """A tree hierarchy (body type over both category and length): every fine label implies the one chosen
    coarse label, and the choice is the consistent assignment with the largest summed log-probability."""
    import itertools

    from fashionlabel.label.postprocess import consistent_choice
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.metrics import hierarchy_consistency

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "body", "kind": "single", "values": ["upper", "lower", "full"]},
                {
                    "name": "cat",
                    "kind": "single",
                    "values": ["tee", "jeans", "skirt", "dress"],
                    "parent": "body",
                    "parent_map": {"tee": "upper", "jeans": "lower", "skirt": "lower", "dress": "full"},
                },
                {
                    "name": "len",
                    "kind": "single",
                    "values": ["cropped", "ankle", "midi"],
                    "parent": "body",
                    # "full" has no length value: it can never be chosen
                    "parent_map": {"cropped": "upper", "ankle": "lower", "midi": "lower"},
                },
                {"name": "colour", "kind": "single", "values": ["red", "blue"]},
            ],
        }
    )
    # the case chain-by-chain got wrong: both coarse values equally likely, the fine heads disagree
    probs = {
        "body": np.array([[0.5, 0.49, 0.01]]),
        "cat": np.array([[0.9, 0.04, 0.03, 0.03]]),
        "len": np.array([[0.05, 0.9, 0.05]]),
        "colour": np.array([[0.3, 0.7]]),
    }
    chosen = consistent_choice(tax, probs)
    # upper/tee/cropped: .5·.9·.05 = .0225; lower/jeans/ankle: .49·.04·.9 = .0176
    assert {h: int(v[0]) for h, v in chosen.items()} == {"body": 0, "cat": 0, "len": 0, "colour": 1}

    rng = np.random.default_rng(4)
    probs = {h.name: rng.dirichlet(np.ones(h.num_classes) * 0.5, 300) for h in tax.heads}
    chosen = consistent_choice(tax, probs)
    onehot = {h: np.eye(probs[h].shape[1])[chosen[h]] for h in probs}
    assert hierarchy_consistency(tax, onehot) == {"body->cat": 1.0, "body->len": 1.0}
    assert (chosen["colour"] == probs["colour"].argmax(1)).all()
    body, cat, length = (tax.head(n) for n in ("body", "cat", "len"))
    for i in range(300):
        best = max(
            (
                np.log(probs["body"][i, b]) + np.log(probs["cat"][i, c]) + np.log(probs["len"][i, le]),
                (b, c, le),
            )
            for b, c, le in itertools.product(range(3), range(4), range(3))
            if body.index[cat.parent_map[cat.values[c]]]
            == b
            == body.index[length.parent_map[length.values[le]]]
        )[1]
        assert (chosen["body"][i], chosen["cat"][i], chosen["len"][i]) == best, i


def test_a_three_level_chain_takes_the_best_consistent_triple():
    """master → sub → article, as the built-in taxonomy has it: the middle head's choice under the chosen
    master must weigh the article scores beneath it too (its subtree), not its own score alone."""
    import itertools

    from fashionlabel.label.postprocess import consistent_choice
    from fashionlabel.taxonomy import Taxonomy

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "master", "values": ["apparel", "footwear"]},
                {
                    "name": "sub",
                    "values": ["topwear", "bottomwear", "shoes"],
                    "parent": "master",
                    "parent_map": {"topwear": "apparel", "bottomwear": "apparel", "shoes": "footwear"},
                },
                {
                    "name": "article",
                    "values": ["tshirt", "shirt", "jeans", "sneakers", "boots"],
                    "parent": "sub",
                    "parent_map": {
                        "tshirt": "topwear",
                        "shirt": "topwear",
                        "jeans": "bottomwear",
                        "sneakers": "shoes",
                        "boots": "shoes",
                    },
                },
            ],
        }
    )
    # apparel is sure; sub leans topwear (.55 vs .4) but the article head is sure of jeans: bottomwear/jeans
    # (.4·.9) beats topwear/shirt (.55·.05)
    probs = {
        "master": np.array([[0.9, 0.1]]),
        "sub": np.array([[0.55, 0.4, 0.05]]),
        "article": np.array([[0.03, 0.05, 0.9, 0.01, 0.01]]),
    }
    chosen = consistent_choice(tax, probs)
    assert {h: int(v[0]) for h, v in chosen.items()} == {"master": 0, "sub": 1, "article": 2}

    rng = np.random.default_rng(11)
    probs = {h.name: rng.dirichlet(np.ones(h.num_classes) * 0.5, 300) for h in tax.heads}
    chosen = consistent_choice(tax, probs)
    master, sub, article = (tax.head(n) for n in ("master", "sub", "article"))
    for i in range(300):
        best = max(
            (
                np.log(probs["master"][i, m]) + np.log(probs["sub"][i, s]) + np.log(probs["article"][i, a]),
                (m, s, a),
            )
            for m, s, a in itertools.product(range(2), range(3), range(5))
            if sub.index[article.parent_map[article.values[a]]] == s
            and master.index[sub.parent_map[sub.values[s]]] == m
        )[1]
        assert (chosen["master"][i], chosen["sub"][i], chosen["article"][i]) == best, i


def test_needs_review_is_any_single_heads_written_label_below_its_threshold():
    """A product goes to review when one single head, any of them, gives the label it writes (the
    hierarchy-consistent one) a score under that head's threshold; the scores are the logits softmaxed at
    the head's temperature (z / T)."""
    import torch

    from fashionlabel.label.postprocess import needs_review, scores, to_rows
    from fashionlabel.taxonomy import Taxonomy

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "coarse", "values": ["upper", "lower"]},
                {
                    "name": "fine",
                    "values": ["tee", "jeans", "skirt"],
                    "parent": "coarse",
                    "parent_map": {"tee": "upper", "jeans": "lower", "skirt": "lower"},
                },
                {"name": "colour", "values": ["red", "blue"]},
                {"name": "tags", "kind": "multi", "values": ["a", "b"]},
            ],
        }
    )
    probs = {
        # 0: every head sure; 1: colour unsure (the first head in the list, not the last);
        # 2: fine's own best (tee .7) is overruled by a sure coarse head: it writes jeans at .2;
        # 3: coarse unsure only
        "coarse": np.array([[0.9, 0.1], [0.9, 0.1], [0.05, 0.95], [0.55, 0.45]]),
        "fine": np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05]]),
        "colour": np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.9, 0.1]]),
        "tags": np.array([[0.1, 0.1]] * 4),  # multi heads never send a product to review
    }
    cal = {"thresholds": {"coarse": 0.6, "fine": 0.5, "colour": 0.7}}
    want = [False, True, True, True]
    assert needs_review(tax, probs, cal).tolist() == want
    rows = to_rows(tax, probs, cal)
    assert [r["needs_review"] for r in rows] == want
    assert (rows[2]["coarse"], rows[2]["fine"], rows[2]["fine_score"]) == ("lower", "jeans", np.float32(0.2))

    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.0, 0.0]])
    logits = {h.name: z[:, : h.num_classes] for h in tax.heads}
    got = scores(tax, logits, {"temperature": {"fine": 2.0}})
    assert np.allclose(got["fine"], torch.softmax(z / 2.0, dim=1).numpy())
    assert np.allclose(got["coarse"], torch.softmax(z[:, :2], dim=1).numpy())  # no temperature: 1
    assert np.allclose(got["tags"], torch.sigmoid(z[:, :2]).numpy())


def test_declared_thresholds_decide_labels_and_review_zero_included():
    """A taxonomy's threshold is used as declared, 0.0 too; calibration, when fitted, takes precedence."""
    from fashionlabel.label.postprocess import to_rows
    from fashionlabel.taxonomy import Taxonomy

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {
                    "name": "colour",
                    "kind": "single",
                    "column": "c",
                    "values": ["red", "blue"],
                    "threshold": 0.0,
                },
                {"name": "tags", "kind": "multi", "column": "t", "values": ["a", "b", "c"], "threshold": 0.0},
            ],
        }
    )
    probs = {
        "colour": np.array([[0.55, 0.45], [0.9, 0.1]]),
        "tags": np.array([[0.01, 0.2, 0.0], [0.9, 0.0, 0.3]]),
    }
    rows = to_rows(tax, probs, {})
    assert [r["needs_review"] for r in rows] == [False, False]  # nothing scores below 0.0
    assert [r["tags"] for r in rows] == [["a", "b", "c"], ["a", "b", "c"]]  # every value is >= 0.0
    calibrated = {"thresholds": {"colour": 0.6, "tags": 0.25}}
    rows = to_rows(tax, probs, calibrated)
    assert [r["needs_review"] for r in rows] == [True, False]
    assert [r["tags"] for r in rows] == [[], ["a", "c"]]
    assert [[s["label"] for s in r["tags_scores"]] for r in rows] == [["b", "a", "c"], ["a", "c", "b"]]


def test_a_head_validation_cannot_fit_keeps_its_own_threshold():
    """Calibration fits a threshold only where validation has the labels to: with fewer than 10, the
    taxonomy's declared threshold stays in force (not a fixed 0.5 recorded as fitted), and a multi head
    whose validation rows hold no true value keeps its default, not 0.05, the lowest threshold tried,
    where every threshold ties at F1 = 0 and labelling would write every value scoring 5% or more."""
    import torch

    from fashionlabel.label.postprocess import threshold, to_rows
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.calibrate import calibrate

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "colour", "values": ["red", "blue", "green"], "threshold": 0.3},
                {"name": "tags", "kind": "multi", "values": ["a", "b", "c"], "threshold": 0.3},
                {"name": "style", "kind": "multi", "values": ["x", "y"]},
            ],
        }
    )
    n, rng = 40, np.random.default_rng(0)
    logits = {
        h.name: torch.tensor(rng.normal(0, 2, (n, h.num_classes)), dtype=torch.float32) for h in tax.heads
    }
    colour = np.full(n, -1)
    colour[:5] = [0, 1, 2, 0, 1]  # 5 known colours: too few to fit a threshold on
    tags = np.full((n, 3), np.nan, np.float32)
    tags[:4] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]  # 4 known rows
    style = np.zeros((n, 2), np.float32)  # 40 known rows, not one true value
    for kw in ({}, {"review_share": 0.3}):
        cal = calibrate(tax, logits, {"colour": colour, "tags": tags, "style": style}, **kw)
        assert cal["thresholds"] == {"colour": 0.3, "tags": 0.3, "style": 0.5}
        assert {h.name: threshold(h, cal) for h in tax.heads} == cal["thresholds"]
    # as labelling writes them: the values scoring at least the head's own threshold
    probs = {"style": np.array([[0.06, 0.2], [0.7, 0.04]])}
    one = Taxonomy.from_dict(
        {"name": "s", "heads": [{"name": "style", "kind": "multi", "values": ["x", "y"]}]}
    )
    assert [r["style"] for r in to_rows(one, probs, cal)] == [[], ["x"]]


def test_temperature_minimises_validation_nll_and_stays_1_where_nll_has_no_minimum():
    """The fitted temperature is the NLL minimiser (scipy's, over the same range, to the grid's step),
    unknown labels left out and a class absent from validation no matter; where every known label is the
    top score the NLL has no minimum (it falls as T shrinks) and the scores stay as the model gives them,
    not sharpened by the smallest temperature tried."""
    import torch
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    from fashionlabel.train.calibrate import TEMPS, fit_temperature

    def nll(z, y, t):
        return -log_softmax(z / t, axis=1)[np.arange(len(y)), y].mean()

    rng = np.random.default_rng(3)
    step = np.log(TEMPS[1] / TEMPS[0])
    for scale in (0.4, 1.0, 2.5):
        y = rng.integers(0, 5, 300)  # class 5 of 6 is never a validation label
        z = rng.normal(0, 1, (300, 6))
        z[np.arange(300), y] += 1.0
        z *= scale
        y[:30] = -1
        k = y >= 0
        t = fit_temperature(torch.tensor(z, dtype=torch.float32), y)
        zk, yk = z[k], y[k]
        best = minimize_scalar(
            lambda lt, zk=zk, yk=yk: nll(zk, yk, np.exp(lt)), bounds=np.log(TEMPS[[0, -1]]), method="bounded"
        )
        assert abs(np.log(t) - best.x) <= step
        assert nll(zk, yk, t) <= best.fun + 1e-3
    # 20 known labels, every one the top score (margins of 0.2 to 1): no minimum, temperature 1
    y = np.repeat(np.arange(5), 4)
    z = rng.normal(0, 1, (20, 5))
    z[np.arange(20), y] = z.max(axis=1) + rng.uniform(0.2, 1.0, 20)
    assert nll(z, y, 0.25) < nll(z, y, 0.5) < nll(z, y, 1.0)  # falling as T shrinks
    assert fit_temperature(torch.tensor(z, dtype=torch.float32), y) == 1.0
    # one of them wrong: the NLL has its minimum again, and the fit finds it
    z[0, [0, 1]] = z[0, [1, 0]]
    best = minimize_scalar(lambda lt: nll(z, y, np.exp(lt)), bounds=np.log(TEMPS[[0, -1]]), method="bounded")
    assert abs(np.log(fit_temperature(torch.tensor(z, dtype=torch.float32), y)) - best.x) <= step


def test_summaries_give_top_k_only_for_heads_with_more_than_k_classes():
    from fashionlabel.commands import _accuracy_lines
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.metrics import head_metrics, metrics_json

    tax = Taxonomy.load("fashion-product-images")
    rng = np.random.default_rng(5)
    heads = {}
    for name in ("gender", "usage", "articleType"):
        head = tax.head(name)
        heads[name] = head_metrics(
            head, rng.random((40, head.num_classes)), rng.integers(0, head.num_classes, 40)
        )
    lines = _accuracy_lines({"heads": heads}, "test")
    assert tax.head("gender").num_classes == 5  # top-5 of 5 classes is always 100%
    assert "top-3" in lines["test gender"] and "top-5" not in lines["test gender"]
    assert "top-3" in lines["test usage"] and "top-5" in lines["test usage"]
    assert f"top-5 {100 * heads['articleType']['top5']:.1f}%" in lines["test articleType"]
    # a head no test product has a label for: its figures are NaN, null once read back from metrics.json
    # (which printed "top-1 nan%", or failed on None); the summary says there was nothing to measure
    none = {"season": head_metrics(tax.head("season"), rng.random((4, 4)), np.full(4, -1))}
    none["attributes"] = head_metrics(tax.head("attributes"), rng.random((4, 33)), np.full((4, 33), np.nan))
    for m in (none, json.loads(metrics_json({"heads": none}))["heads"]):
        lines = _accuracy_lines({"heads": m}, "test")
        assert lines == {
            "test season": "not measured: no test product has a known label",
            "test attributes": "not measured: no test product has a known label",
        }


def _two_head_validation(n: int = 400, seed: int = 5):
    """Logits of two single heads, right more often when confident, and their targets."""
    import torch

    from fashionlabel.taxonomy import Taxonomy

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "colour", "values": ["red", "blue", "green"]},
                {"name": "season", "values": ["summer", "winter"]},
            ],
        }
    )
    rng = np.random.default_rng(seed)
    logits, targets = {}, {}
    for h in tax.single_heads:
        y = rng.integers(0, h.num_classes, n)
        z = rng.normal(0, 1, (n, h.num_classes))
        z[np.arange(n), y] += rng.uniform(0, 3, n)  # a varying margin: some right and sure, some wrong
        y[:20] = -1  # unknown labels take no part
        logits[h.name], targets[h.name] = torch.tensor(z, dtype=torch.float32), y
    return tax, logits, targets


def test_default_calibration_is_each_heads_half_error_threshold():
    """Without a review share, nothing changes: each single head's threshold halves its validation errors."""
    from fashionlabel.label.postprocess import scores
    from fashionlabel.train.calibrate import calibrate, single_threshold

    tax, logits, targets = _two_head_validation()
    cal = calibrate(tax, logits, targets)
    probs = scores(tax, logits, cal)
    assert cal["error_cut"] == 0.5 and "review_share" not in cal
    assert cal["thresholds"] == {h: single_threshold(probs[h], targets[h], 0.5) for h in ("colour", "season")}


def test_review_share_picks_the_strictest_cut_that_flags_at_most_that_share():
    """The thresholds flag at most the asked share of validation products (any head unsure, as labelling
    decides), and the next stricter error cut would flag more: no review capacity is left unused."""
    from fashionlabel.label.postprocess import needs_review, scores
    from fashionlabel.train.calibrate import calibrate, single_threshold

    tax, logits, targets = _two_head_validation()
    shares = []
    for target in (0.05, 0.2, 0.5):
        cal = calibrate(tax, logits, targets, review_share=target)
        probs = scores(tax, logits, cal)
        flagged = needs_review(tax, probs, cal).mean()
        assert flagged == cal["val_needs_review"] <= target and cal["review_share"] == target
        assert cal["thresholds"] == {
            h: single_threshold(probs[h], targets[h], cal["error_cut"]) for h in ("colour", "season")
        }
        stricter = {
            h: single_threshold(probs[h], targets[h], cal["error_cut"] - 0.01) for h in cal["thresholds"]
        }
        assert needs_review(tax, probs, {"thresholds": stricter}).mean() > target
        shares.append(flagged)
    assert shares == sorted(shares) and shares[0] < shares[-1]
    # a tiny share is met by accepting every head's lowest score: nothing flagged
    cal = calibrate(tax, logits, targets, review_share=1e-6)
    assert cal["error_cut"] == 1.0 and cal["val_needs_review"] == 0.0


def test_thresholds_keep_their_promise_on_the_labels_as_written():
    """A single head's threshold is the lowest score above which the labels that labelling writes (the
    hierarchy-consistent choice, whose score it compares with the threshold) make ``error_cut`` of that
    head's errors. Fitted on the top score and its class instead, a fine head whose coarse head often
    overrules it was held to labels it does not write: its labels above the threshold fell short of the
    promised precision, or products it labels right were sent to review."""
    import torch

    from fashionlabel.label.postprocess import consistent_choice, scores
    from fashionlabel.taxonomy import Taxonomy
    from fashionlabel.train.calibrate import calibrate

    tax = Taxonomy.from_dict(
        {
            "name": "t",
            "heads": [
                {"name": "coarse", "values": ["upper", "lower"]},
                {
                    "name": "fine",
                    "values": ["tee", "shirt", "jeans", "skirt"],
                    "parent": "coarse",
                    "parent_map": {"tee": "upper", "shirt": "upper", "jeans": "lower", "skirt": "lower"},
                },
            ],
        }
    )
    rng = np.random.default_rng(7)
    n = 600
    fine_y = rng.integers(0, 4, n)
    coarse_y = fine_y // 2
    # a sure coarse head and a fine head that often puts its top score in the other coarse value
    zc = rng.normal(0, 0.5, (n, 2))
    zc[np.arange(n), coarse_y] += 3
    zf = rng.normal(0, 1, (n, 4))
    zf[np.arange(n), fine_y] += rng.uniform(0, 2.5, n)
    logits = {"coarse": torch.tensor(zc, dtype=torch.float32), "fine": torch.tensor(zf, dtype=torch.float32)}
    targets = {"coarse": coarse_y, "fine": fine_y}
    for cut in (0.5, 0.2):
        cal = calibrate(tax, logits, targets, error_cut=cut)
        probs = scores(tax, logits, cal)
        chosen = consistent_choice(tax, probs)["fine"]
        assert (chosen != probs["fine"].argmax(1)).mean() > 0.1  # the hierarchy changes many labels
        score, right = probs["fine"][np.arange(n), chosen], chosen == fine_y
        target = 1 - cut * (1 - right.mean())
        t = cal["thresholds"]["fine"]
        assert right[score >= t].mean() >= target - 1e-9
        # and no lower threshold keeps the promise: products labelled right are not sent to review for it
        lower = np.sort(np.unique(score[score < t]))[::-1]
        assert all(right[score >= s].mean() < target - 1e-9 for s in lower), cut


def test_metrics_files_are_strict_json_with_null_for_nothing_measured():
    import json

    from fashionlabel.train.metrics import metrics_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c}")))

    m = {
        "heads": {"a": {"top1_accepted": float("nan"), "n": 3, "r": np.float32(0.5)}},
        "l": [float("inf"), 1.0],
    }
    assert strict(metrics_json(m)) == {
        "heads": {"a": {"top1_accepted": None, "n": 3, "r": 0.5}},
        "l": [None, 1.0],
    }
