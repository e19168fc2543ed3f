"""The predictor: loads a model artifact once, turns decoded images into label rows.

Used by ``fashionlabel evaluate`` and by the labelling actors alike, so the labels a night writes are
exactly those that evaluation measured for the same model and images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionlabel.data import to_input
from fashionlabel.label.postprocess import scores, to_rows
from fashionlabel.train.export import load_artifact


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Args:
        model_dir: the artifact folder.
        device: "cuda" / "cpu"; default: a GPU when one is visible.
        batch_size: images per forward pass.
        compile: wrap the model in ``torch.compile`` (GPU: worth it for long runs).
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 256,
                 compile: bool = False):
        self.device = pick_device(device)
        model, self.spec = load_artifact(model_dir, self.device)
        self.taxonomy = self.spec["taxonomy_obj"]
        self.version = self.spec["version"]
        pre = self.spec["preprocessing"]
        self.size, self.mean, self.std = tuple(pre["size"]), pre["mean"], pre["std"]
        self.calibration = self.spec.get("calibration", {})
        self.batch_size = batch_size
        # bf16 on GPU halves memory traffic; CPU stays fp32 (bf16 convs are slow without AMX).
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads()))

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """N×H×W×3 uint8 (already at the model's size) → logits per head (float32, on CPU)."""
        outs: list[dict[str, torch.Tensor]] = []
        for s in range(0, len(images), self.batch_size):
            x = to_input(images[s : s + self.batch_size], self.mean, self.std, self.device, torch.float32)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self.model(x)
            outs.append({k: v.float().cpu() for k, v in out.items()})
        if not outs:
            return {h.name: torch.zeros((0, h.num_classes)) for h in self.taxonomy.heads}
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def probs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return scores(self.taxonomy, self.logits(images), self.calibration)

    def label_rows(self, images: np.ndarray) -> list[dict[str, Any]]:
        return to_rows(self.taxonomy, self.probs(images), self.calibration)
