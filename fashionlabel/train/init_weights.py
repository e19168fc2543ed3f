"""``--init-weights``: start a run from another model's weights, its heads' rows matched by value name.

A head's linear layer holds one row per value, in the order of its taxonomy's ``values``. Two taxonomies
may give a head the same number of values in another order (a value list sorted differently, or learned
from another catalog) or other values under the same count (one renamed). Loaded by position, such a row
would start the fine-tuned model with another value's weights: every ``Black`` scored as ``Blue``. So
head rows are copied by value name: a value both taxonomies have takes its row (weight and bias), a new
value keeps its fresh initialisation, and a value the model no longer has is dropped. Everything else
(trunk, hierarchical attention) is taken where name and shape fit.

The value names come with the weights: a model artifact's ``model.json`` (beside its ``weights.pt``,
checked against its version), or a training checkpoint's ``taxonomy`` (older checkpoints carry only its
version, which names the taxonomy exactly when it is the one trained now). A bare state_dict has none:
its trunk is used and every head starts fresh, since rows of unknown meaning cannot be placed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from fashionlabel import storage
from fashionlabel.models.heads import MultiTaskHeads, module_key
from fashionlabel.taxonomy import Taxonomy


def load_init(path: str, taxonomy: Taxonomy) -> tuple[dict[str, torch.Tensor], Taxonomy | None]:
    """(state_dict, the taxonomy it was trained on or None when unknown) of an ``--init-weights`` file: a
    saved state_dict, a model artifact's ``weights.pt`` or a training checkpoint. ``taxonomy``: the one
    trained now (an older checkpoint of that same version needs no names of its own)."""
    # an s3:// file is read whole: the ranks of a cluster's other nodes cannot see the driver's disk
    remote = storage.is_s3(path)
    obj = torch.load(
        io.BytesIO(storage.read_bytes(path)) if remote else path, map_location="cpu", weights_only=True
    )
    folder = path.rsplit("/", 1)[0] if remote else str(Path(path).parent)
    source: Taxonomy | None = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a training checkpoint
        if isinstance(obj.get("taxonomy"), dict):
            source = Taxonomy.from_dict(obj["taxonomy"])
        elif obj.get("taxonomy_version") == taxonomy.version:
            source = taxonomy
        # the weights its epoch was chosen for, as the run exported them: the moving average where it won
        ema = obj.get("ema")
        obj = ema["model"] if obj.get("weights") == "ema" and isinstance(ema, dict) else obj["model"]
    elif path.rsplit("/", 1)[-1] == "weights.pt" and storage.exists(storage.join(folder, "model.json")):
        # a model artifact's weights (the version check hashes this very file with the model.json)
        from fashionlabel.train.export import artifact_spec

        source = artifact_spec(folder)["taxonomy_obj"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TypeError("not a state_dict")
    return obj, source


def _heads_prefix(model: torch.nn.Module) -> str | None:
    """The state_dict prefix of the model's head layers (``head.heads.``), or None if it has none."""
    for name, m in model.named_modules():
        if isinstance(m, MultiTaskHeads):
            return f"{name}.heads." if name else "heads."
    return None


def map_init_state(
    model: torch.nn.Module, taxonomy: Taxonomy, state: dict[str, torch.Tensor], source: Taxonomy | None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], int]:
    """What of ``state`` (trained on ``source``; None: unknown) to load into ``model`` (of ``taxonomy``).

    Returns (a state_dict to load with ``strict=False``, per head of ``taxonomy`` (values carried over,
    its values), the number of weights carried over)."""
    own = model.state_dict()
    prefix = _heads_prefix(model)
    layers = {f"{prefix}{module_key(h.name)}.{p}" for h in taxonomy.heads for p in ("weight", "bias")}
    keep = {
        k: v
        for k, v in state.items()
        if k in own and own[k].shape == v.shape and not (prefix and k in layers)
    }
    carried = sum(v.numel() for v in keep.values())
    counts: dict[str, tuple[int, int]] = {}
    old = {h.name: h for h in source.heads} if source is not None else {}
    for h in taxonomy.heads:
        counts[h.name] = (0, h.num_classes)
        was = old.get(h.name)
        if prefix is None or was is None or was.kind != h.kind:
            continue
        key = f"{prefix}{module_key(h.name)}."
        w, b = state.get(key + "weight"), state.get(key + "bias")
        if w is None or b is None or w.shape[1:] != own[key + "weight"].shape[1:]:
            continue
        pairs = [(i, was.index[v]) for i, v in enumerate(h.values) if v in was.index]
        if not pairs or max(j for _, j in pairs) >= len(w):
            continue
        to, frm = (torch.tensor(x) for x in zip(*pairs, strict=True))
        weight, bias = own[key + "weight"].clone(), own[key + "bias"].clone()  # new values: fresh rows
        weight[to], bias[to] = w[frm].to(weight.dtype), b[frm].to(bias.dtype)
        keep[key + "weight"], keep[key + "bias"] = weight, bias
        counts[h.name] = (len(pairs), h.num_classes)
        carried += len(pairs) * (w.shape[1] + 1)
    return keep, counts, carried


def describe(counts: dict[str, tuple[int, int]], source: Taxonomy | None, taxonomy: Taxonomy) -> str:
    """One line for the log: per head, how many of its values were carried over, and what is new."""
    if source is None:
        return (
            "the value names of its heads are unknown (a bare state_dict), so every head starts fresh: "
            "give the model's folder or its run's checkpoint to carry them over"
        )
    parts = []
    for h in taxonomy.heads:
        n, total = counts[h.name]
        was = next((s for s in source.heads if s.name == h.name), None)
        new = [v for v in h.values if was is None or v not in was.index]
        note = f" (new: {', '.join(new[:3])}{', …' if len(new) > 3 else ''})" if 0 < len(new) < total else ""
        parts.append(f"{h.name} {n}/{total}{note}")
    return "values carried over by name: " + ", ".join(parts)


def apply_init(model: torch.nn.Module, taxonomy: Taxonomy, path: str) -> dict[str, Any]:
    """Load ``path`` into ``model`` (heads by value name); return what was carried (see ``map_init_state``)."""
    state, source = load_init(path, taxonomy)
    keep, counts, carried = map_init_state(model, taxonomy, state, source)
    model.load_state_dict(keep, strict=False)
    return {"tensors": len(keep), "carried": carried, "heads": counts, "source": source}
