"""The model artifact (design.md): a folder with everything needed to label, nothing looked up elsewhere.

    MODEL/weights.pt     state_dict, loadable with torch.load(..., weights_only=True) (no pickled objects)
    MODEL/model.json     architecture, taxonomy with values, preprocessing, calibration
    MODEL/metrics.json   validation/test metrics
    MODEL/version        content hash of weights + model.json

The folder is written under a temporary name and renamed into place, so a reader never sees half of one:
files that need the finished artifact (evaluation, curves) are written by ``finalize`` before the rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fashionlabel.models import create_model
from fashionlabel.taxonomy import Taxonomy, TaxonomyError

FORMAT = 1
REQUIRED = ("weights.pt", "model.json", "version")


class ArtifactError(ValueError):
    """A model folder that is missing, malformed or does not match its declared architecture."""


def save_artifact(
    out: str | Path,
    model: nn.Module,
    *,
    architecture: str,
    taxonomy: Taxonomy,
    preprocessing: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    finalize: Callable[[Path], None] | None = None,
) -> str:
    """Write the artifact atomically; return its version.

    Args:
        finalize: called with the staged folder, complete and loadable, before it is published; what it
            writes there (metrics, evaluation, curves) appears together with the model. If it raises,
            nothing is published and the staged folder is removed.
    """
    out = Path(out)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    weights = buf.getvalue()
    spec = {
        "format": FORMAT,
        "architecture": architecture,
        "model_kwargs": model_kwargs or {},
        "taxonomy": taxonomy.to_dict(),
        "taxonomy_version": taxonomy.version,
        "preprocessing": preprocessing,
        "calibration": calibration or {},
        "training": training or {},
    }
    spec_bytes = json.dumps(spec, indent=2, sort_keys=True).encode()
    version = hashlib.sha256(weights + spec_bytes).hexdigest()[:16]
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "weights.pt").write_bytes(weights)
    (tmp / "model.json").write_bytes(spec_bytes)
    (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True, default=float))
    (tmp / "version").write_text(version + "\n")
    if finalize is not None:
        try:
            finalize(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return version


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Return (model in eval mode, spec incl. ``version`` and ``taxonomy_obj``) or raise ArtifactError."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model artifact {path} is not a folder")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"model artifact {path} is incomplete: missing {', '.join(missing)}")
    try:
        spec = json.loads((path / "model.json").read_text())
        taxonomy = Taxonomy.from_dict(spec["taxonomy"])
        arch, pre = spec["architecture"], spec["preprocessing"]
        _ = pre["size"], pre["mean"], pre["std"]
    except (json.JSONDecodeError, KeyError, TypeError, TaxonomyError) as e:
        raise ArtifactError(f"model artifact {path}: model.json is malformed ({e!r})") from e
    try:
        # weights_only: a tampered file cannot run code on load (no arbitrary unpickling).
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(
            f"model artifact {path}: weights.pt cannot be loaded safely ({str(e)[:200]})"
        ) from e
    try:
        model = create_model(arch, taxonomy, **spec.get("model_kwargs", {}))
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, TypeError) as e:
        raise ArtifactError(f"model artifact {path}: weights do not fit {arch!r} ({str(e)[:300]})") from e
    spec["version"] = (path / "version").read_text().strip()
    spec["taxonomy_obj"] = taxonomy
    return model.to(device).eval(), spec
