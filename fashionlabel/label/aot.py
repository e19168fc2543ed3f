"""Ahead-of-time compiled models, kept in a node's compile cache folder and loaded in milliseconds.

``torch.compile`` compiles in every process that uses it: each labelling actor of every night pays code
generation again (``fl_small`` on one CPU core: 11.6 s from an empty kernel cache, 2.7 s from a warm one),
and on a GPU that start-up is tens of seconds per actor. An AOTInductor package is the compiled model as one
file: the first actor that needs it exports and compiles the model once and saves the package; every later
actor (the next batch of actors, the next night) loads it and runs at once (fl_small: a 5 ms load and a
0.13 s first batch).

A package fits one model version, device (CPU instruction set and thread count, or CUDA compute
capability), dtype, input shape and torch build, and all of that is in its file name, so a new model, a
new GPU type or an upgraded torch builds a package of its own instead of loading a wrong one. A package
that cannot be loaded (torn by a killed writer of an older version, a disk error) is logged and rebuilt,
never fatal; one that cannot be built leaves a ``.failed`` note beside its name, and the predictor compiles
with ``torch.compile`` instead. Packages of old model versions can be deleted at any time: a loaded one
is no longer read.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def target(device: torch.device) -> str:
    """What the generated code is specific to: the GPU architecture, or the CPU's vector instructions and
    the number of threads it runs on."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    # ATen's dispatch level (avx2, avx512, …): what inductor vectorises for too, known without importing it.
    # The thread count is compiled in: a package built by a 1-thread actor has no parallel loops at all.
    return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}-t{torch.get_num_threads()}"


def package_name(version: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """The package's file name: model version, :func:`target`, dtype, input shape and torch build, so a
    package is only ever loaded where it fits."""
    torch_build = torch.__version__.replace("+", "-")
    dims = "x".join(str(d) for d in shape)
    return f"{version}-{target(device)}-{str(dtype).removeprefix('torch.')}-{dims}-torch{torch_build}.pt2"


class Package:
    """A loaded package, called like the model. It goes straight to torch's C++ loader: the Python one
    (``torch._inductor.aoti_load_package``) imports inductor and dynamo first, 1.2 s of a 1.5 s load."""

    def __init__(self, path: Path, device: torch.device):
        index = device.index if device.index is not None else (-1 if device.type == "cpu" else 0)
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        self.outputs = pytree.treespec_loads(self.loader.get_call_spec()[1])

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return pytree.tree_unflatten(self.loader.boxed_run([x]), self.outputs)


def build(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``model`` at ``example``'s shape, compile it and publish the package at ``path`` atomically:
    actors building the same package at once each write their own temporary file, and a rename is atomic."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.pt2")
    import torch._inductor  # imports dynamo: only a process that compiles pays for it

    try:
        with torch.no_grad():
            exported = torch.export.export(model, (example,))
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_build(model: nn.Module, example: torch.Tensor, folder: Path, name: str) -> tuple[Runner, str]:
    """The compiled runner for ``model`` at ``example``'s shape, and how it was had ("loaded"/"built")."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.is_file():
        try:
            t = time.monotonic()
            runner = Package(path, example.device)
            log.info("compiled model loaded from %s in %.2f s", path, time.monotonic() - t)
            return runner, "loaded"
        except Exception as e:  # a damaged package is a cache miss, not a failed night
            log.warning("compiled model %s cannot be loaded (%s); building it again", path, str(e)[:200])
    # A build that failed here once (no C++ compiler or CUDA headers on the node, a graph export refuses)
    # fails again: its note saves every later actor the attempt. Delete the note to try again.
    failed = path.with_suffix(".failed")
    if failed.is_file():
        raise RuntimeError(f"building it failed before, see {failed}")
    t = time.monotonic()
    try:
        build(model, example, path)
    except Exception as e:
        note = failed.with_name(f".{failed.name}.{uuid.uuid4().hex}")
        note.write_text(f"{type(e).__name__}: {e}\n")
        os.replace(note, failed)
        raise
    log.info("compiled model built in %.1f s and saved as %s", time.monotonic() - t, path)
    return Package(path, example.device), "built"
