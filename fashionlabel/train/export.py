"""The model artifact: a folder with everything needed to label, nothing looked up elsewhere.

    MODEL/weights.pt     state_dict, loadable with torch.load(..., weights_only=True) (no pickled objects)
    MODEL/model.json     architecture, taxonomy with values, preprocessing, calibration
    MODEL/metrics.json   validation/test metrics
    MODEL/version        content hash of weights + model.json

The folder is written under a temporary name and swapped into place in one step, so a reader sees the
previous artifact or the new one, never half of one and never none: files that need the finished artifact
(evaluation, curves) are written by ``finalize`` before the swap.

MODEL may also be an ``s3://`` prefix, so a cluster's nodes take the model from the object store instead of
from their image. It is staged locally and uploaded with ``version`` last; a reader downloads it once per
version into a local cache (``$FASHIONLABEL_CACHE``, default ``~/.cache/fashionlabel``). Every load checks
the content hash, so an upload in progress or a half-overwritten folder is refused, never half-used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fashionlabel import storage
from fashionlabel.lease import alive
from fashionlabel.models import create_model, list_models
from fashionlabel.taxonomy import Taxonomy, TaxonomyError
from fashionlabel.train.metrics import metrics_json

log = logging.getLogger(__name__)

FORMAT = 1
REQUIRED = ("weights.pt", "model.json", "version")
DOWNLOADED = (*REQUIRED, "metrics.json")  # what a reader fetches from S3: the rest is for people


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
    check_replaceable(out)
    remote, remote_out = storage.is_s3(out), out
    out = Path(tempfile.mkdtemp(prefix="fashionlabel-artifact-")) / "model" if remote else _target(out)
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
    version = content_version(weights, spec_bytes)
    _drop_dead_staging(out)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{_HOST}-{os.getpid()}.tmp"
    tmp.mkdir(parents=True)
    # A full disk or an interrupt while staging leaves nothing beside the output: a staged model was left
    # there (its weights cut short), holding the space that was short until the next export removed it.
    try:
        where = f"{out.parent} (staged there for {remote_out})" if remote else str(out)
        _stage(tmp, where, weights, spec_bytes, metrics_json(metrics or {}), version)
        if finalize is not None:
            finalize(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if remote:
        try:
            _upload(tmp, str(remote_out))
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        return version
    try:
        _publish(tmp, out)
    finally:  # published (renamed away) or failed: nothing of this export stays behind under its name
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def _stage(tmp: Path, where: str, weights: bytes, spec_bytes: bytes, metrics: str, version: str) -> None:
    """The artifact's files into the staging folder ``tmp``; a write that fails names ``where`` the model
    was going (a full disk said only "[Errno 28] No space left on device")."""
    try:
        (tmp / "weights.pt").write_bytes(weights)
        (tmp / "model.json").write_bytes(spec_bytes)
        (tmp / "metrics.json").write_text(metrics)
        (tmp / "version").write_text(version + "\n")
    except OSError as e:
        raise OSError(e.errno, f"cannot write the model to {where}: {e.strerror or e}") from e


def _target(out: str | Path) -> Path:
    """The folder an export replaces: where a symlinked ``--out`` points (a model kept on another disk).
    The link itself was swapped for the new folder, which left the link's target holding the old model,
    ``--out`` no longer a link, and the link beside it under a staging name that nothing removes."""
    out = Path(out)
    return out.resolve() if out.is_symlink() else out


def _publish(tmp: Path, out: Path) -> None:
    """Put the staged folder at ``out`` so that ``out`` always holds a whole artifact, old or new."""
    _restore_interrupted(out)
    if not out.exists():
        tmp.rename(out)
    # One step where the filesystem swaps (the previous artifact is then at tmp, which the caller removes);
    # else two renames, undone by the next export if killed between them.
    elif not storage.exchange(tmp, out):
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


# This host in the names of staging folders: a folder on a filesystem that other nodes mount is another
# host's to clean, since only its own host can tell whether the process that writes it is alive.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _drop_dead_staging(out: Path) -> None:
    """Remove the staging folders of ``out`` whose export was killed before it published (a whole model
    each, left beside the artifact): those of a process of this host that is gone. A live export's, another
    host's, and those of exports that named no process (before names carried it) are left alone."""
    for d in out.parent.glob(f".{out.name}.*.{_HOST}-*.tmp"):
        pid = d.name.removesuffix(".tmp").rsplit("-", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            log.info("removing %s, left by an export that was killed", d)
            shutil.rmtree(d, ignore_errors=True)


def _restore_interrupted(out: Path) -> None:
    """An export killed between its two renames left the previous artifact at ``.<name>.*.old``: put it back."""
    if not out.exists():
        olds = sorted(out.parent.glob(f".{out.name}.*.old"), key=lambda p: p.stat().st_mtime)
        if olds:
            olds[-1].rename(out)


def check_replaceable(out: str | Path) -> None:
    """Refuse an ``out`` whose contents an export would destroy: a local path that exists and is not a
    folder, or a folder that holds files and is not a model artifact (an export replaces the whole folder).
    An ``s3://`` prefix is only added to, never cleared."""
    if storage.is_s3(out):
        return
    o = Path(out)
    if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / "model.json").is_file())):
        held = sorted(p.name for p in o.iterdir())[:3] if o.is_dir() else []
        raise ArtifactError(
            f"{out} exists and is not a model artifact"
            + (f" (it holds {', '.join(held)})" if held else "")
            + ": a model replaces the whole folder, so give a new one"
        )


def check_derived_out(out: str | Path, source_version: str, key: str) -> None:
    """Refuse an ``out`` (a folder or ``s3://`` prefix) that holds another model than one made from the
    same source by the same command (``training[key]`` = ``source_version``: a re-run, replaced as it
    should be). ``calibrate`` and ``prune`` write a new model: given an existing one's folder by mistake,
    they replaced it, and the next night relabelled the catalog with the wrong model."""
    spec = storage.join(str(out), "model.json")
    if not storage.exists(spec):
        return
    try:
        held = storage.read_json(spec)
        made_from = (held.get("training") or {}).get(key)
        version = storage.read_bytes(storage.join(str(out), "version")).decode().strip()
        what = f"{held.get('architecture')}, version {version}"
    except (OSError, ValueError, AttributeError, storage.StorageError):  # unreadable: not ours to replace
        made_from, what = None, "unreadable"
    if made_from != source_version:
        raise ArtifactError(
            f"--out {out} holds another model ({what}): give a new folder (the model is replaced only "
            f"when it was made from this same model, version {source_version}, by this same command)"
        )


def content_version(weights: bytes, spec_bytes: bytes) -> str:
    """An artifact's version: the content hash of its weights file and model.json."""
    return hashlib.sha256(weights + spec_bytes).hexdigest()[:16]


def _upload(staged: Path, uri: str) -> None:
    """Every file of the staged artifact to ``uri``, ``version`` last: until it lands, a reader sees the
    previous version (whose hash the new files fail) or no artifact at all."""
    names = sorted(p.name for p in staged.iterdir() if p.is_file() and p.name != "version")
    for name in [*names, "version"]:
        storage.write_bytes(storage.join(uri, name), (staged / name).read_bytes())


def cache_root() -> Path:
    """The local cache folder: ``$FASHIONLABEL_CACHE``, default ``~/.cache/fashionlabel``."""
    return Path(os.environ.get("FASHIONLABEL_CACHE") or Path.home() / ".cache" / "fashionlabel")


def fetch_artifact(uri: str) -> Path:
    """The local copy of the artifact at an ``s3://`` prefix: downloaded once per version, checked."""
    try:
        version = storage.read_bytes(storage.join(uri, "version")).decode().strip()
    except (OSError, storage.StorageError) as e:
        raise ArtifactError(f"model artifact {uri}: cannot read its version file ({str(e)[:200]})") from e
    if not version.isalnum():
        raise ArtifactError(f"model artifact {uri}: malformed version file")
    where = hashlib.sha256(uri.encode()).hexdigest()[:8]
    local = cache_root() / "models" / f"{version}-{where}"
    if (local / "version").is_file():
        if _cached_intact(local):
            return local
        # A damaged copy (a disk that filled, a file edited or removed) would be refused on every run
        # while the artifact on S3 is sound: it is moved aside and downloaded again.
        log.warning("model cache %s is damaged: downloading %s again", local, uri)
        aside = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.damaged"
        with contextlib.suppress(OSError):  # another process on this node may have moved it first
            local.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        for name in DOWNLOADED:
            if name == "metrics.json" and not storage.exists(storage.join(uri, name)):
                continue
            try:
                (tmp / name).write_bytes(storage.read_bytes(storage.join(uri, name)))
            except (OSError, storage.StorageError) as e:
                raise ArtifactError(f"model artifact {uri} is incomplete: cannot read {name}") from e
        _check_version((tmp / "weights.pt").read_bytes(), (tmp / "model.json").read_bytes(), tmp, uri)
        try:
            tmp.rename(local)
        except OSError:  # another process on this node cached the same version first
            if not (local / "version").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _cached_intact(local: Path) -> bool:
    """Whether a cached copy still has every file it was downloaded with, hashing to its version."""
    try:
        if any(not (local / f).is_file() for f in REQUIRED):
            return False
        _check_version((local / "weights.pt").read_bytes(), (local / "model.json").read_bytes(), local, local)
    except (OSError, ArtifactError):
        return False
    return True


def _check_version(weights: bytes, spec_bytes: bytes, path: Path, name: str | Path) -> str:
    """The version in ``path/version``, if the weights and model.json bytes hash to it."""
    want = (path / "version").read_text().strip()
    if want != content_version(weights, spec_bytes):  # the whole hash: one set of weights, one version
        raise ArtifactError(
            f"model artifact {name}: weights.pt and model.json do not match its version {want!r} "
            "(an export still being written, or files replaced by hand)"
        )
    return want


def _read(path: str | Path) -> tuple[Path, dict[str, Any], bytes, bytes]:
    """(local folder, parsed model.json with ``taxonomy_obj``, its bytes, the weights' bytes) of an
    artifact, or ArtifactError for a missing folder or file or a malformed model.json."""
    path = fetch_artifact(str(path)) if storage.is_s3(path) else Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model artifact {path} is not a folder")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"model artifact {path} is incomplete: missing {', '.join(missing)}")
    # Each file is read once: the same bytes are parsed and hashed.
    spec_bytes, weights = (path / "model.json").read_bytes(), (path / "weights.pt").read_bytes()
    try:
        spec = json.loads(spec_bytes)
        spec["taxonomy_obj"] = Taxonomy.from_dict(spec["taxonomy"])
        pre = spec["preprocessing"]
        _ = spec["architecture"], pre["size"], pre["mean"], pre["std"]
        _check_fields(spec)
    except (json.JSONDecodeError, KeyError, TypeError, TaxonomyError) as e:
        raise ArtifactError(f"model artifact {path}: model.json is malformed ({e!r})") from e
    except ValueError as e:  # a field of the wrong type or range, named by _check_fields
        raise ArtifactError(f"model artifact {path}: model.json is malformed: {e}") from e
    if not isinstance(spec.get("format"), int) or spec["format"] > FORMAT:
        raise ArtifactError(
            f"model artifact {path} has format {spec.get('format')!r}; this fashionlabel reads format "
            f"{FORMAT} and earlier: upgrade fashionlabel to label with it"
        )
    return path, spec, spec_bytes, weights


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_fields(spec: dict[str, Any]) -> None:
    """The fields labelling computes with, checked when the artifact is read: a size, normalisation or
    calibration of the wrong type or range failed later as arithmetic ("math domain error") or, for a
    temperature of 0, gave NaN scores and wrong labels without a word."""
    pre, cal = spec["preprocessing"], spec.get("calibration") or {}
    checks = {
        "format": (
            "a whole number",
            isinstance(spec.get("format"), int) and not isinstance(spec.get("format"), bool),
        ),
        "preprocessing.size": (
            "[height, width] in pixels",
            isinstance(pre["size"], list)
            and len(pre["size"]) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pre["size"]),
        ),
        "preprocessing.mean": (
            "3 numbers (R, G, B)",
            isinstance(pre["mean"], list) and len(pre["mean"]) == 3 and all(map(_number, pre["mean"])),
        ),
        "preprocessing.std": (
            "3 numbers > 0 (R, G, B)",
            isinstance(pre["std"], list)
            and len(pre["std"]) == 3
            and all(_number(v) and v > 0 for v in pre["std"]),
        ),
        "model_kwargs": ("an object", isinstance(spec.get("model_kwargs", {}), dict)),
        "calibration": (
            "an object of temperature and thresholds objects",
            isinstance(cal, dict)
            and isinstance(cal.get("temperature", {}), dict)
            and isinstance(cal.get("thresholds", {}), dict),
        ),
    }
    for key, (what, ok) in checks.items():
        if not ok:
            raise ValueError(f"{key} is {_field(spec, key)!r:.80}, not {what}")
    # checked here, where a driver reads the artifact (``artifact_spec``): otherwise only building the
    # model found it, in every labelling actor, after the run folder and its lease were made
    if spec["architecture"] not in list_models():
        raise ValueError(
            f"architecture {spec['architecture']!r:.80} is not a model of this fashionlabel (it has "
            f"{', '.join(list_models())}): label with the fashionlabel version that trained it, or a newer one"
        )
    for head, t in cal.get("temperature", {}).items():
        if not (_number(t) and t > 0):
            raise ValueError(f"calibration.temperature.{head} is {t!r:.40}, not a number > 0")
    for head, t in cal.get("thresholds", {}).items():
        if t is not None and not (_number(t) and 0 <= t <= 1):
            raise ValueError(f"calibration.thresholds.{head} is {t!r:.40}, not a score in [0, 1]")


def _field(spec: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        spec = spec.get(part) if isinstance(spec, dict) else None
    return spec


def artifact_spec(path: str | Path) -> dict[str, Any]:
    """The spec of :func:`load_artifact` (``version`` and ``taxonomy_obj`` included), checked as far as a
    driver needs without building the model: files present, model.json well formed, content hash."""
    local, spec, spec_bytes, weights = _read(path)
    spec["version"] = _check_version(weights, spec_bytes, local, local)
    return spec


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Return (model in eval mode, spec incl. ``version``, ``taxonomy_obj`` and ``local_path``) or raise
    ArtifactError. ``path``: a folder or an ``s3://`` prefix."""
    path, spec, spec_bytes, weights = _read(path)
    # the content hash first: a model.json edited by hand (a value renamed in its taxonomy) was refused
    # only as torch's "weights do not fit ... size mismatch", which names no edit
    spec["version"] = _check_version(weights, spec_bytes, path, path)
    taxonomy, arch = spec["taxonomy_obj"], spec["architecture"]
    try:
        # weights_only: a tampered file cannot run code on load (no arbitrary unpickling).
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(
            f"model artifact {path}: weights.pt cannot be loaded safely ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    try:
        model = create_model(arch, taxonomy, **spec.get("model_kwargs", {}))
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, TypeError) as e:
        raise ArtifactError(f"model artifact {path}: weights do not fit {arch!r} ({str(e)[:300]})") from e
    spec["local_path"] = str(path)
    return model.to(device).eval(), spec
