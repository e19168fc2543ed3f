"""Cost of a model: parameters, FLOPs per image and measured images/s, for docs/models.md and ``prune``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one image at the given size; it counts
2 FLOPs per multiply-add of convolutions and matrix products (element-wise ops are not counted).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs of one forward pass on a 1×3×H×W image (``size`` = (height, width))."""
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, *size))
    model.train(was)
    return int(counter.get_total_flops())


@torch.inference_mode()
def inference_speed(model: nn.Module, size: tuple[int, int], batch: int = 64, repeats: int = 3) -> float:
    """Median images/s of eval-mode forward passes on random batches (CPU, fp32, channels_last)."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    model(x)  # warm-up: allocator, oneDNN primitive cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return batch / sorted(times)[len(times) // 2]


def train_speed(model: nn.Module, size: tuple[int, int], batch: int = 64, repeats: int = 3) -> float:
    """Median images/s of training steps (forward, summed loss, backward, AdamW) on random batches."""
    model = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        loss = sum(v.float().logsumexp(1).mean() for v in model(x).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return batch / sorted(times)[len(times) // 2]
