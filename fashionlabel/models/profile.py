"""Cost of a model: parameters, FLOPs per image and measured images/s, for docs/models.md and ``prune``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one image at the given size; it counts
2 FLOPs per multiply-add of convolutions and matrix products (element-wise ops are not counted).
Speeds use wall-clock time, or with ``cpu_time=True`` the process's CPU time: images per CPU-second is what
one uncontended core gives, and stays meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not; buffers excluded)."""
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


def _rate(
    step: Callable[[], object], batch: int, repeats: int, device: torch.device, cpu_time: bool
) -> float:
    """Images/s of ``step`` (one batch): the median of ``repeats`` timed calls after one untimed warm-up
    (allocator, oneDNN / cuDNN algorithm choice)."""
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for i in range(repeats + 1):
        t = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(clock() - t)
    return batch / sorted(times)[len(times) // 2]


@torch.no_grad()  # not inference_mode: moving the weights under it would leave the model untrainable
def inference_speed(
    model: nn.Module,
    size: tuple[int, int],
    batch: int = 64,
    repeats: int = 3,
    device: str = "cpu",
    cpu_time: bool = False,
) -> float:
    """Median images/s of eval-mode forward passes on random batches (channels_last; bf16 on GPU)."""
    dev = torch.device(device)
    model = model.eval().to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, *size, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        return _rate(lambda: model(x), batch, repeats, dev, cpu_time)


def train_speed(
    model: nn.Module,
    size: tuple[int, int],
    batch: int = 64,
    repeats: int = 3,
    device: str = "cpu",
    cpu_time: bool = False,
) -> float:
    """Median images/s of training steps (forward, summed loss, backward, AdamW) on random batches."""
    dev = torch.device(device)
    model = model.train().to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, *size, device=dev).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(x)
        loss = sum(v.float().logsumexp(1).mean() for v in out.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, batch, repeats, dev, cpu_time)
