import numpy as np
from sklearn.metrics import f1_score, top_k_accuracy_score

from fashionlabel.train.metrics import macro_f1, topk_accuracy, topk_recall


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
    assert np.isclose(macro_f1(pred, y, 5), f1_score(y, pred, average="macro"))


def test_topk_recall_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    y = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    # product 0: top-2 = {0, 1} holds 1 of its 2 → 0.5; product 1: top-2 = {3, 2} holds 0 of 2 → 0;
    # product 2 has no true attribute and is excluded
    assert np.isclose(topk_recall(scores, y, 2), 0.25)
    assert np.isclose(topk_recall(scores, y, 4), 1.0)
