import threading

import numpy as np
import pytest
import torch

from fashionlabel.data import BatchPrefetcher


def _data(n=50):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 6, 3), dtype=np.uint8)
    targets = {"gender": torch.arange(n), "attributes": torch.as_tensor(rng.random((n, 4)) < 0.5).float()}
    return images, targets


def test_prefetcher_yields_every_batch_in_order_with_its_targets():
    images, targets = _data()
    rng = np.random.default_rng(1)
    batches = [rng.choice(50, 7, replace=False) for _ in range(9)] + [np.array([3, 3, 49])]
    got = list(BatchPrefetcher(images, targets, iter(batches), "cpu", depth=3))
    assert len(got) == len(batches)
    for idx, (x, y) in zip(batches, got, strict=True):
        assert x.dtype == torch.uint8 and x.shape == (len(idx), 8, 6, 3)
        assert np.array_equal(x.numpy(), images[idx])
        assert y["gender"].tolist() == idx.tolist()
        assert torch.equal(y["attributes"], targets["attributes"][torch.as_tensor(idx)])


def test_prefetcher_prepares_the_next_batch_while_the_current_one_is_used():
    images, targets = _data()
    seen: list[str] = []
    release = threading.Event()

    class Watched(BatchPrefetcher):
        def _load(self, idx):
            seen.append(f"load {idx[0]}")
            if idx[0] == 1:
                release.set()
            return super()._load(idx)

    it = iter(Watched(images, targets, (np.array([i]) for i in range(3)), "cpu", depth=1))
    x, _ = next(it)
    assert int(x.shape[0]) == 1
    # Batch 1 is loaded on the background thread before batch 0's consumer asks for it.
    assert release.wait(5)
    assert seen[:2] == ["load 0", "load 1"]
    assert [int(b[1]["gender"][0]) for b in it] == [1, 2]


def test_prefetcher_passes_a_loading_error_on():
    images, targets = _data()
    with pytest.raises(IndexError):
        list(BatchPrefetcher(images, targets, [np.array([0]), np.array([99])], "cpu"))
