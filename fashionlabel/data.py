"""Shards → training and evaluation tensors: split by product, decode, encode targets, per-rank shares.

The split is a pure function of ``product_id`` (a hash bucket), so train/val/test never share a product,
whatever the shard layout, and a product keeps its split across re-shards and nights.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fashionlabel.images import MISSING_IMAGE, decode
from fashionlabel.shards import iter_shard
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def split_of(product_id: str, val: float = 0.1, test: float = 0.1) -> str:
    """'train' | 'val' | 'test' from a stable hash of the product id."""
    b = int.from_bytes(hashlib.sha1(product_id.encode()).digest()[:4], "big") / 2**32
    return "test" if b < test else "val" if b < test + val else "train"


def encode_targets(
    labels: Sequence[dict[str, Any]], taxonomy: Taxonomy, mask_conflicts: bool = False
) -> dict[str, np.ndarray]:
    """Labels → arrays: single heads int64 (-1 = unknown, masked); multi heads float32 multi-hot with NaN
    rows for unknown (masked). ``mask_conflicts`` (training data) also masks a fine/coarse pair that
    contradicts the taxonomy's hierarchy; evaluation keeps the labels as written."""
    out: dict[str, np.ndarray] = {}
    for h in taxonomy.heads:
        if h.kind == "single":
            out[h.name] = np.array(
                [h.index.get(lab.get(h.name), -1) if lab.get(h.name) is not None else -1 for lab in labels],
                dtype=np.int64,
            )
        else:
            y = np.zeros((len(labels), h.num_classes), dtype=np.float32)
            for i, lab in enumerate(labels):
                vals = lab.get(h.name)
                if vals is None:
                    y[i] = np.nan
                else:
                    for v in vals:
                        if v in h.index:
                            y[i, h.index[v]] = 1.0
            out[h.name] = y
    if mask_conflicts:
        _mask_hierarchy_conflicts(out, taxonomy)
    return out


def _mask_hierarchy_conflicts(targets: dict[str, np.ndarray], taxonomy: Taxonomy) -> None:
    """Mask both labels of a fine/coarse pair that contradicts the taxonomy's ``parent_map`` (a catalog's
    ``Shorts`` filed under ``Loungewear and Nightwear`` where the taxonomy puts Shorts under ``Bottomwear``).

    Which of the two is wrong cannot be told, and the model's answers are made hierarchy-consistent anyway:
    trained on both, it would be pushed towards a pair it never outputs. So the pair is masked (the
    product's other heads still train), and the products are counted in the log. Evaluation does not mask:
    a product scored against the labels its catalog gives cannot flatter a model. Conflicts are found on the labels as written, before any masking, so a
    product's middle level is masked for a conflict with either neighbour."""
    found: list[tuple[str, str, np.ndarray]] = []
    for h in taxonomy.heads:
        if h.parent is None or h.kind != "single":
            continue
        parent = taxonomy.head(h.parent)
        # fine index → its coarse index per the map; -2 where the map has no entry (a learned value), so it
        # never conflicts
        up = np.array([parent.index.get(h.parent_map.get(v, ""), -2) for v in h.values or ()], dtype=np.int64)
        fine, coarse = targets[h.name], targets[parent.name]
        known = (fine >= 0) & (coarse >= 0)
        wrong = np.zeros_like(known)
        wrong[known] = (up[fine[known]] != coarse[known]) & (up[fine[known]] != -2)
        if wrong.any():
            found.append((h.name, parent.name, wrong))
    for fine_name, coarse_name, wrong in found:
        targets[fine_name][wrong] = -1
        targets[coarse_name][wrong] = -1
        log.warning(
            "%d of %d training products have a %s and a %s that contradict the taxonomy's parent_map: "
            "both labels are left out of training for them",
            int(wrong.sum()),
            len(wrong),
            coarse_name,
            fine_name,
        )


@dataclass
class Samples:
    """Decoded samples held in memory as uint8 (compact: 60×80 images are 14 KB each)."""

    images: np.ndarray  # N×H×W×3 uint8
    targets: dict[str, np.ndarray]
    product_ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # product_id -> why its image did not decode

    def __len__(self) -> int:
        return len(self.product_ids)


def load_samples(
    shard_uris: Sequence[str],
    taxonomy: Taxonomy,
    size: tuple[int, int],
    split: str | None = None,
    rank: int = 0,
    world: int = 1,
) -> Samples:
    """Decode the samples of ``shard_uris`` (of one split, optionally every ``world``-th for ``rank``)."""
    images, labels, pids, shas, errors = [], [], [], [], {}
    i = 0
    t0 = last = time.time()
    for n, uri in enumerate(shard_uris, 1):
        if time.time() - last > 5:  # a large set takes minutes to decode: say how far it is
            last = time.time()
            log.info(
                "read %d/%d shards, %d samples decoded (%.0f/s)",
                n - 1,
                len(shard_uris),
                len(images),
                len(images) / (last - t0),
            )
        for s in iter_shard(uri):
            meta = s.get("json", {})
            pid = meta.get("product_id", s["__key__"])
            if split is not None and split_of(pid) != split:
                continue
            i += 1
            if (i - 1) % world != rank:
                continue
            if "jpg" not in s:  # said as labelling says it (label/reader.py), not as a KeyError: 'jpg'
                errors[pid] = MISSING_IMAGE
                continue
            try:
                images.append(decode(s["jpg"], size))
            except Exception as e:  # noqa: BLE001 - a corrupt sample is reported, not fatal
                errors[pid] = f"undecodable image: {str(e)[:120]}"
                continue
            labels.append(meta.get("labels", {}))
            pids.append(pid)
            shas.append(meta.get("sha256", ""))
    arr = np.stack(images) if images else np.zeros((0, size[0], size[1], 3), np.uint8)
    # training products only: a model is scored against the labels as its catalog writes them
    targets = encode_targets(labels, taxonomy, mask_conflicts=split == "train")
    return Samples(arr, targets, pids, shas, errors)


def to_input(
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N×H×W×3 uint8 → normalised N×3×H×W float in channels_last (faster convs on CPU and GPU)."""
    x = torch.as_tensor(images).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    m, s = _moments(tuple(mean), tuple(std), str(x.device), dtype)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


@functools.cache
def _moments(
    mean: tuple[float, ...], std: tuple[float, ...], device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as 1×3×1×1 tensors on ``device``, made once: building them from Python lists at every
    batch would copy host memory to the GPU, which waits for the GPU to finish its queued work each step."""
    m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1).to(device)
    s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1).to(device)
    return m, s


class BatchPrefetcher:
    """Training batches gathered and copied to the device one step ahead, on a background thread.

    A training step on a GPU leaves the host idle while the device computes; gathering the next batch from
    host memory (a fancy-index copy of N×H×W×3 uint8) and copying it to the device are done in that time
    instead of before the step. On CUDA the gathered batch is pinned and copied on a side stream; the
    consumer's stream waits on an event, so the copy overlaps the previous step's kernels. Yields
    (images N×H×W×3 uint8 on ``device``, {head: targets on ``device``}) in the order of ``batches``.

    Args:
        images: N×H×W×3 uint8 held in host memory.
        targets: head → tensor of N rows (host memory).
        batches: index arrays, one per step.
        depth: batches prepared ahead (2: one being copied while the previous one trains).
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: dict[str, torch.Tensor],
        batches: Iterable[np.ndarray],
        device: torch.device | str,
        depth: int = 2,
    ):
        self.images, self.targets, self.batches = images, targets, batches
        self.device, self.depth = torch.device(device), max(1, depth)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _load(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        # numpy's gather releases the GIL for plain dtypes, so it runs beside the training thread.
        x = torch.from_numpy(self.images[idx])  # fancy indexing returns a fresh contiguous copy
        index = torch.as_tensor(idx)
        y = {k: v.index_select(0, index) for k, v in self.targets.items()}
        if not self.cuda:
            return x, y, None
        with torch.cuda.stream(self.stream):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in y.items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        return x, y, done

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        batches = iter(self.batches)
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            ahead = deque(pool.submit(self._load, b) for b in itertools.islice(batches, self.depth))
            while ahead:
                x, y, done = ahead.popleft().result()
                nxt = next(batches, None)
                if nxt is not None:
                    ahead.append(pool.submit(self._load, nxt))
                if done is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(done)
                    # Allocated on the side stream, used on this one: keep the caching allocator from
                    # handing the memory out again before this stream is done with it.
                    for t in (x, *y.values()):
                        t.record_stream(stream)
                yield x, y


def cutmix(
    x: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): each image gets one box, the same for the batch, cut from another image
    of the batch. Returns the mixed batch, the permutation that says where each box came from, and the
    share of each image that is still its own (the weight of its own labels in the loss).

    The box is drawn on the host (its bounds are slice ends) and the permutation on the batch's device,
    so nothing waits for the GPU. Area share 1 − λ with λ ~ U(0, 1) (Beta(1, 1), the paper's choice),
    centred anywhere and clipped at the border, so the returned share is the area actually kept.
    """
    n, _, h, w = x.shape
    g = generator or torch.default_generator
    lam, cy, cx = torch.rand(3, generator=g).tolist()
    bh, bw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
    y0, y1 = max(0, round(cy * h - bh / 2)), min(h, round(cy * h + bh / 2))
    x0, x1 = max(0, round(cx * w - bw / 2)), min(w, round(cx * w + bw / 2))
    perm = (
        torch.randperm(n, generator=generator).to(x.device)
        if generator
        else torch.randperm(n, device=x.device)
    )
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def augment(
    x: torch.Tensor, pad: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random horizontal flips and random crops (pad by replication, crop back), drawn per image.

    Args:
        pad: the largest shift in pixels; default 5% of the height (at least 4), so that the shift is the
            same share of the image at 80×60 as at 160×120.
        generator: a CPU generator for reproducible draws; without one they are drawn on the batch's
            device (a host-to-GPU copy of the draws would wait for the GPU's queue at every step).
    """
    n, c, h, w = x.shape
    pad = max(4, round(0.05 * h)) if pad is None else pad
    dev = x.device

    def draw(fn, *args, **kw):
        return fn(*args, generator=generator, **kw).to(dev) if generator else fn(*args, device=dev, **kw)

    flip = draw(torch.rand, n) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if pad == 0:
        return x.contiguous(memory_format=torch.channels_last)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = draw(torch.randint, 0, 2 * pad + 1, (2, n))
    # one gather for the whole batch: image i is read from rows dy[i]…dy[i]+h and columns dx[i]…dx[i]+w
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    return xp[idx_n, idx_c, rows, cols].contiguous(memory_format=torch.channels_last)
