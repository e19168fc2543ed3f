"""The predictor: loads a model artifact once, turns decoded images into label rows.

Used by ``fashionlabel evaluate`` and by the labelling actors alike: the same weights, calibration and
post-processing, so a night's labels are those evaluation measured for the same decoded pixels. (With
``--decode gpu`` the actors decode and resize with nvJPEG on the device instead of PIL: where a shard's
images need resizing to the model's input, pixels and so a few borderline labels may differ.)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionlabel.data import to_input
from fashionlabel.label import aot
from fashionlabel.label.postprocess import scores, to_rows
from fashionlabel.train.export import load_artifact

# CPU forward passes run in pieces of about this many input pixels: a piece's activations then stay in the
# core's caches between layers. bench/cpu_pieces.py, one core, medians of 5 interleaved rounds: pieces of 64
# label 1.31x the images per CPU-second of one 256-image pass for fl_small at 80×60 and 1.16x for a
# ResNet-50; at 224 px pieces of 8 do 1.23x (fl_small, batch 64).
CPU_PIECE_PIXELS = 300_000

log = logging.getLogger(__name__)


def cpu_piece(size: tuple[int, int], batch_size: int) -> int:
    """Images per CPU forward piece for inputs of ``size``: the nearest power of two, at most ``batch_size``."""
    n = 1 << max(0, round(math.log2(CPU_PIECE_PIXELS / (size[0] * size[1]))))
    return max(1, min(batch_size, n))


def pick_device(requested: str | None = None) -> torch.device:
    """The ``requested`` device, or a GPU when one is visible and the CPU otherwise."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Args:
    model_dir: the artifact folder.
    device: "cuda" / "cpu"; default: a GPU when one is visible.
    batch_size: images per forward pass.
    compile: run the model compiled by inductor for one fixed batch shape (GPU: worth it for long runs).
    compile_cache: with ``compile``, a folder (on a persistent disk: it keeps a node's next night warm)
        for the compiled model as an AOT package (:mod:`fashionlabel.label.aot`) and for the kernels of
        compiling it. The first predictor builds the package (``fl_small``, one CPU core: ~25 s); every later
        one loads it in milliseconds. Without it, ``torch.compile`` compiles in every process (11.6 s
        from torch's empty default cache, 2.7 s from a warm one).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        batch_size: int = 256,
        compile: bool = False,
        compile_cache: str | Path | None = None,
    ):
        self.device = pick_device(device)
        model, self.spec = load_artifact(model_dir, self.device)
        self.taxonomy = self.spec["taxonomy_obj"]
        self.version = self.spec["version"]
        pre = self.spec["preprocessing"]
        self.size, self.mean, self.std = tuple(pre["size"]), pre["mean"], pre["std"]
        self.calibration = self.spec.get("calibration", {})
        self.batch_size = batch_size
        # bf16 on GPU halves memory traffic; the weights are cast once here, not per call as autocast
        # would. CPU stays fp32 (bf16 convs are slow without AMX).
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        self.model = model.to(dtype=self.dtype, memory_format=torch.channels_last)
        self.compiled = compile
        self.compiled_from = ""  # how the compiled model was had: "jit", "built" or "loaded" (AOT package)
        # CPU passes run in cache-sized pieces, compiled or not; a compiled model is built for one piece
        self.piece = cpu_piece(self.size, batch_size) if self.device.type == "cpu" else 0
        if compile:
            self.model = self._compiled(compile_cache)

    def _compiled(self, compile_cache: str | Path | None):
        """The model compiled for one fixed batch shape. With a cache folder: the AOT package kept there
        (loaded if an earlier actor built it, else built and saved for the next); without: ``torch.compile``.
        A model that cannot be exported falls back to ``torch.compile``, with a warning."""
        if not compile_cache:
            self.compiled_from = "jit"
            return torch.compile(self.model, dynamic=False)
        folder = Path(compile_cache).expanduser().resolve()
        if any(c.isspace() for c in str(folder)):  # inductor hands it to the C++ compiler unquoted
            raise ValueError(f"compile cache folder {str(folder)!r}: a path without spaces is needed")
        # Inductor reads its kernel cache folder (and Triton's, beneath it) from the environment when it
        # first compiles, so it is set before then; the process keeps it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        h, w = self.size
        example = torch.zeros((self.piece or self.batch_size, 3, h, w), dtype=self.dtype, device=self.device)
        example = example.contiguous(memory_format=torch.channels_last)
        name = aot.package_name(self.version, self.device, self.dtype, tuple(example.shape))
        try:
            runner, self.compiled_from = aot.load_or_build(self.model, example, folder / "packages", name)
            return runner
        except Exception as e:  # export refuses some graphs; labelling goes on, compiled the usual way
            log.warning("no AOT package for this model (%s); using torch.compile", str(e)[:300])
            self.compiled_from = "jit"
            return torch.compile(self.model, dynamic=False)

    @torch.inference_mode()
    def logits(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """N×H×W×3 uint8 (already at the model's size) → logits per head (float32, on CPU)."""
        outs: list[dict[str, torch.Tensor]] = []
        for s in range(0, len(images), self.batch_size):
            x = to_input(images[s : s + self.batch_size], self.mean, self.std, self.device).to(self.dtype)
            outs.append({k: v.float().cpu() for k, v in self.forward(x).items()})
        if not outs:
            return {h.name: torch.zeros((0, h.num_classes)) for h in self.taxonomy.heads}
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One normalised N×3×H×W batch → logits on the device. On CPU the batch runs in cache-sized pieces
        (:func:`cpu_piece`). A compiled model sees one fixed shape (a piece on CPU, the batch on a GPU; a
        short one is padded), so it compiles once and never again mid-run."""
        n = len(x)
        step = self.piece or self.batch_size
        if n <= step:
            return self._run(x)
        pieces = [self._run(x[s : s + step]) for s in range(0, n, step)]
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, want = len(x), self.piece or self.batch_size
        if self.compiled and n < want:
            x = torch.cat([x, x.new_zeros((want - n, *x.shape[1:]))])
        out = self.model(x.contiguous(memory_format=torch.channels_last))
        return {k: v[:n].float() for k, v in out.items()}

    @torch.inference_mode()
    def decode_on_device(
        self, jpgs: Sequence[bytes], pixels: Sequence[bytes] | None = None
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """JPEG bytes → N×H×W×3 uint8 at the model's size, decoded on this predictor's device (nvJPEG in
        one batched call on a GPU, libjpeg-turbo on CPU). ``pixels``: per input, its H×W×3 uint8 bytes when
        a read task decoded it already (those are only copied to the device), else empty. Returns the images
        of the decodable inputs, in input order, and {index: reason} for the others (dropped from the
        tensor)."""
        h, w = self.size
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        given = [i for i in range(len(jpgs)) if pixels is not None and len(pixels[i])]
        raw = sorted(set(range(len(jpgs))) - set(given))
        decoded, bad = self._decode_jpegs([jpgs[i] for i in raw], dev)
        errors = {raw[j]: reason for j, reason in bad.items()}
        raw = [i for j, i in enumerate(raw) if j not in bad]
        at = {i: k for k, i in enumerate(sorted(raw + given))}  # each decodable input's output row
        out = torch.empty((len(at), h, w, 3), dtype=torch.uint8, device=dev)
        if raw:
            out[[at[i] for i in raw]] = decoded
        if given:
            host = np.stack([np.frombuffer(pixels[i], np.uint8) for i in given]).reshape(-1, h, w, 3)
            out[[at[i] for i in given]] = torch.from_numpy(host).to(dev)
        return out, errors

    def _decode_jpegs(self, jpgs: Sequence[bytes], dev: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2.functional import resize

        h, w = self.size
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpgs]
        errors: dict[int, str] = {}
        if not data:
            return torch.zeros((0, h, w, 3), dtype=torch.uint8, device=dev), errors
        try:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:  # one bad image fails the batched call: find it one image at a time
            imgs = []
            for i, d in enumerate(data):
                try:
                    imgs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
                except RuntimeError as e:
                    errors[i] = f"undecodable image: {str(e)[:160]}"
        out = [im if im.shape[1:] == (h, w) else resize(im, [h, w], antialias=True) for im in imgs]
        if not out:
            return torch.zeros((0, h, w, 3), dtype=torch.uint8, device=dev), errors
        return torch.stack(out).permute(0, 2, 3, 1), errors

    @torch.inference_mode()
    def probs_on_device(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Like :meth:`probs` but softmax/sigmoid run on the device and one transfer per head comes back."""
        if len(images) == 0:
            return scores(self.taxonomy, self.logits(images), self.calibration)
        parts = [
            self.forward(
                to_input(images[s : s + self.batch_size], self.mean, self.std, self.device).to(self.dtype)
            )
            for s in range(0, len(images), self.batch_size)
        ]
        logits = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return scores(self.taxonomy, logits, self.calibration)

    def probs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return scores(self.taxonomy, self.logits(images), self.calibration)

    def label_rows(self, images: np.ndarray) -> list[dict[str, Any]]:
        return to_rows(self.taxonomy, self.probs(images), self.calibration)
