"""A lightweight trunk from ghost features and heterogeneous kernels, with ECA attention (research §5).

- stem with two paths: a stride-2 3×3 conv and a stride-2 max pool of the image, concatenated and mixed
  by a 1×1 conv;
- residual blocks "A" (repeat, stride 1) and "B" (downsample, stride 2): a ghost module makes the block's
  features, a heterogeneous-kernel conv (1/P of the kernels 3×3) mixes space, a ghost module projects;
- ECA channel attention in stages 1–3 and not in stage 4, the best placement in the paper's ablation.

Sized to the study's budget (231.9 MFLOPs, 3.0 M parameters with a 1,000-class classifier): the blocks keep
their width (the heterogeneous conv is a dense conv, so expanding its input and output 2× would cost 4×),
and a 4× last 1×1 conv gives the heads a wide feature at little cost on the 7×7 map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fashionlabel.models._registry import register_model
from fashionlabel.models.heads import TrunkWithHeads
from fashionlabel.models.layers import ECA, GhostModule, HetConv, conv_bn
from fashionlabel.taxonomy import Taxonomy


class Stem(nn.Module):
    """Two stride-2 paths of the image, a 3×3 conv (``cout - 3`` channels) and a max pool (its 3
    channels), concatenated and mixed by a 1×1 conv into ``cout`` channels."""

    def __init__(self, cout: int):
        super().__init__()
        self.conv = conv_bn(3, cout - 3, 3, stride=2)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.mix = conv_bn(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x), self.pool(x)
        return self.mix(torch.cat([a, b[:, :, : a.shape[2], : a.shape[3]]], dim=1))


class HSBlock(nn.Module):
    """Ghost expand → HetConv (stride 1 "A" or 2 "B") → Ghost project, [ECA], residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 1, eca: bool = True, p: int = 4):
        super().__init__()
        mid = cin * expand
        self.expand = GhostModule(cin, mid)
        self.mix = nn.Sequential(HetConv(mid, mid, p, stride), nn.ReLU(inplace=True))
        self.project = GhostModule(mid, cout, act=False)
        self.eca = ECA() if eca else nn.Identity()
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=False), conv_bn(cin, cout, 1, act=False)
            )
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.eca(self.project(self.mix(self.expand(x)))) + self.skip(x))


def _create_hsnet(
    taxonomy: Taxonomy, widths: tuple[int, ...], depths: tuple[int, ...], dropout: float = 0.2
) -> nn.Module:
    layers: list[nn.Module] = [Stem(widths[0])]
    cin = widths[0]
    for s, (w, d) in enumerate(zip(widths[1:], depths, strict=True)):
        for i in range(d):
            layers.append(HSBlock(cin, w, stride=2 if i == 0 else 1, eca=s < 3))
            cin = w
    layers.append(conv_bn(cin, cin * 4, 1))  # a wide last 1×1 (MobileNet's 1280): 7×7 maps, few FLOPs
    return TrunkWithHeads(nn.Sequential(*layers), cin * 4, taxonomy, dropout)


@register_model
def hsnet(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """Ghost/heterogeneous-kernel/ECA network, 4 stages (ECA in 1–3)."""
    return _create_hsnet(taxonomy, (24, 40, 80, 160, 320), (2, 3, 4, 2), **kw)
