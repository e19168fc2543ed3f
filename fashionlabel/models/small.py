"""``fl_small``: the small, fast default for the demo and CPU labelling, and its variants.

A plain VGG-style residual-free CNN: a stride-2 stem then three conv-conv stages with 2×2 pooling between
them. Sized so that a 2-core laptop trains it on a few thousand 60×80 product photos in minutes; adaptive
pooling lets the same weights run on 224-px images. ``fl_small_hier`` puts the hierarchical coarse/fine
attention heads (research §3) on the same trunk.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fashionlabel.models._registry import register_model
from fashionlabel.models.heads import TrunkWithHeads
from fashionlabel.models.layers import conv_bn
from fashionlabel.taxonomy import Taxonomy


def _create_small(
    taxonomy: Taxonomy, widths: tuple[int, ...], dropout: float = 0.2, hierarchical: bool = False
) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, widths[0], stride=2)]
    cin = widths[0]
    for i, w in enumerate(widths[1:]):
        if i:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [conv_bn(cin, w), conv_bn(w, w)]
        cin = w
    return TrunkWithHeads(nn.Sequential(*layers), cin, taxonomy, dropout, hierarchical)


@register_model
def fl_small(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """The default model: a 24-wide stem, three conv-conv stages (48/96/192 wide) and taxonomy heads."""
    return _create_small(taxonomy, (24, 48, 96, 192), **kw)


@register_model
def fl_small_hier(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """fl_small's trunk with hierarchical coarse/fine attention heads."""
    return _create_small(taxonomy, (24, 48, 96, 192), hierarchical=True, **kw)


@register_model
def fl_tiny(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """Smaller still: for tests and very small machines."""
    return _create_small(taxonomy, (8, 16, 32, 64), **kw)
