"""Training throughput reading real shards vs the same model fed synthetic in-memory tensors.

    PYTHONPATH=. python bench/train_throughput.py --shards SHARDS [--model cloth_resnet_a] [--size 224 224]
        [--batch 128] [--steps 30] [--device cuda]

Both paths run the training step of ``fashionlabel.train.loop`` (channels_last; bf16 autocast on GPU;
AdamW; the multi-task loss): the *synthetic* path reuses one normalised tensor already on the device, the
*real* path does what a training worker does every step — a random batch of decoded uint8 images held in
host memory is gathered and copied to the device one step ahead by ``BatchPrefetcher`` (background thread,
pinned memory, side stream), then normalised, flipped and cropped on the device. A third line, *serial*,
does the same input work in front of each step (what a plain loop does), to show what the prefetch buys.
The one-off decode of the shards into memory is timed separately and amortised over ``--epochs``. Prints
the throughputs and their ratios (the bar: real ≥ 80% of synthetic for ResNet-50 on one H100).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD, BatchPrefetcher, augment, load_samples, to_input
from fashionlabel.models import create_model
from fashionlabel.shards import list_shards
from fashionlabel.train.losses import MultiTaskLoss
from fashionlabel.train.run import training_taxonomy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--model", default="cloth_resnet_a")
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per path (after 5 warm-up steps)")
    p.add_argument("--epochs", type=int, default=30, help="epochs the one-off decode is amortised over")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    tax = training_taxonomy(a.shards)
    t0 = time.perf_counter()
    data = load_samples(list_shards(a.shards), tax, tuple(a.size), split="train")
    decode_s = time.perf_counter() - t0
    if len(data) < a.batch:
        raise SystemExit(f"only {len(data)} training samples in {a.shards}; need at least --batch {a.batch}")
    targets = {k: torch.as_tensor(v) for k, v in data.targets.items()}

    model = create_model(a.model, tax).to(device).to(memory_format=torch.channels_last)
    loss_fn = MultiTaskLoss(tax).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = device.type == "cuda"

    def step(x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss, _ = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rng = np.random.default_rng(0)
    fixed = rng.choice(len(data), a.batch, replace=False)
    x_syn = to_input(data.images[fixed], IMAGENET_MEAN, IMAGENET_STD, device)
    y_syn = {k: v[fixed].to(device) for k, v in targets.items()}

    def synthetic() -> None:
        step(x_syn, y_syn)

    def serial() -> None:  # the input path before the step, as a plain loop does it
        idx = rng.choice(len(data), a.batch, replace=False)
        x = augment(to_input(data.images[idx], IMAGENET_MEAN, IMAGENET_STD, device))
        step(x, {k: v[idx].to(device, non_blocking=True) for k, v in targets.items()})

    # What the training loop does: the next batch is gathered and copied while this one trains.
    def random_batches():
        while True:
            yield rng.choice(len(data), a.batch, replace=False)

    prefetched = iter(BatchPrefetcher(data.images, targets, random_batches(), device))

    def real() -> None:
        images, y = next(prefetched)
        step(augment(to_input(images, IMAGENET_MEAN, IMAGENET_STD, device)), y)

    results = {}
    rounds = (("synthetic", synthetic), ("real", real), ("serial", serial)) * 2
    for name, fn in rounds:
        for _ in range(5):
            fn()
        _sync(device)
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        results.setdefault(name, []).append(a.batch / statistics.median(times))
    # best of two interleaved rounds each
    syn, rea, ser = (max(results[k]) for k in ("synthetic", "real", "serial"))
    per_epoch = len(data) / rea
    amortised = len(data) / (per_epoch + decode_s / a.epochs)
    print(
        f"model {a.model}, {a.size[0]}x{a.size[1]}, batch {a.batch}, device {device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
        f"{len(data)} training images"
    )
    print(f"synthetic in-memory tensors : {syn:10.1f} img/s (median step)")
    print(f"real shards (steady state)  : {rea:10.1f} img/s (median step)   ratio {rea / syn:.3f}")
    print(f"  same, input not prefetched: {ser:10.1f} img/s (median step)   ratio {ser / syn:.3f}")
    print(f"one-off shard decode        : {len(data) / decode_s:10.1f} img/s ({decode_s:.1f} s)")
    print(
        f"real incl. decode / {a.epochs} ep  : {amortised:10.1f} img/s                ratio {amortised / syn:.3f}"
    )


if __name__ == "__main__":
    main()
