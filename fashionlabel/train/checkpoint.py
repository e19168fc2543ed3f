"""Training checkpoints: written by rank 0 only, from the unwrapped model, published atomically.

A checkpoint carries model, optimiser, scheduler, epoch, config, taxonomy version and the history, so a
killed run restarted with the same command resumes at the next epoch (torchvision's reference recipe).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from fashionlabel import storage

LAST = "last.pt"
BEST = "best.pt"


def save(ckpt_dir: str, name: str, state: dict[str, Any]) -> None:
    """Publish ``state`` as ``ckpt_dir/name`` (``torch.save`` format), atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(ckpt_dir, name), buf.getvalue())


def load(ckpt_dir: str, name: str = LAST) -> dict[str, Any] | None:
    """The checkpoint ``ckpt_dir/name`` loaded onto the CPU, or None when there is none."""
    uri = storage.join(ckpt_dir, name)
    if not storage.exists(uri):
        return None
    # Plain tensors, numbers, strings and dicts only: weights_only refuses anything executable.
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (its ``module``), or ``model`` itself."""
    return model.module if hasattr(model, "module") else model


def local_dir(path: str | Path) -> str:
    """``path`` as every Ray worker can use it: an ``s3://`` URI as given, a local path made absolute."""
    return str(path) if storage.is_s3(path) else str(Path(path).absolute())
