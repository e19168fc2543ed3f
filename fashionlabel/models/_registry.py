"""Model registry: every architecture is created by name, never by an if/elif chain over names.

Each family file registers small constructors with ``@register_model``; a constructor takes the resolved
taxonomy (to size the heads) and keyword options, and returns an ``nn.Module`` whose ``forward(x)`` gives
``{head_name: logits}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from fashionlabel.taxonomy import Taxonomy

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` as a model under its function name (ValueError if it is taken)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def create_model(name: str, taxonomy: Taxonomy, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with heads sized by ``taxonomy``; ``kwargs`` go to its constructor."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _MODELS[name](taxonomy, **kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)  # what an artifact needs to rebuild this exact structure
    return model
