"""Xception (Chollet 2017) with squeeze-and-excitation in the late blocks: research §1's clothing classifier.

Depthwise-separable convs (ReLU → depthwise 3×3 → pointwise 1×1 → BN) in residual modules: an entry flow
down to 728 channels, a middle flow of 8 identical 3-conv 728-channel modules, an exit flow to 1024, then
the 1536- and 2048-channel separable convs, which carry SE blocks (Hu et al. 2018) as in the research.

Channel pruning (``fashionlabel.train.prune``) thins the two inner widths of chosen middle modules; the
thinned widths are a constructor argument (``mid_channels={"3": [c1, c2], ...}``), so a pruned artifact
rebuilds its exact structure. ``xception_se_s`` is a quarter-width, 4-middle-module variant for CPUs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fashionlabel.models._registry import register_model
from fashionlabel.models.heads import TrunkWithHeads
from fashionlabel.models.layers import SqueezeExcite
from fashionlabel.taxonomy import Taxonomy


class SeparableConv(nn.Module):
    """[ReLU] → depthwise 3×3 → pointwise 1×1 → BN [→ SE]."""

    def __init__(self, cin: int, cout: int, relu_first: bool = True, se: bool = False):
        super().__init__()
        # not in place: the block input is also the residual branch's input
        self.relu = nn.ReLU() if relu_first else nn.Identity()
        self.dw = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.bn(self.pw(self.dw(self.relu(x)))))


class XceptionBlock(nn.Module):
    """Separable convs through ``chans`` (c0 → c1 → … → cn), optional 3×3/2 max pool, residual link."""

    def __init__(self, chans: list[int], stride: int = 1, start_with_relu: bool = True):
        super().__init__()
        self.convs = nn.Sequential(
            *[
                SeparableConv(a, b, relu_first=start_with_relu or i > 0)
                for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True))
            ]
        )
        self.pool = nn.MaxPool2d(3, stride, 1) if stride != 1 else nn.Identity()
        cin, cout = chans[0], chans[-1]
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.convs(x)) + self.skip(x)


class XceptionTrunk(nn.Module):
    """Stem, entry, middle and exit flows of Xception-SE; ``features`` is its output channel count.

    Args:
        width: multiplier of every channel count (rounded to a multiple of 8, at least 8).
        middle: number of middle-flow modules.
        mid_channels: the two inner widths of pruned middle modules, by module index as a string
            (``{"3": [c1, c2]}``); other modules keep the full middle width.
    """

    def __init__(self, width: float = 1.0, middle: int = 8, mid_channels: dict[str, list[int]] | None = None):
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(round(n * width / 8)) * 8)

        mid = c(728)
        pruned = {int(k): v for k, v in (mid_channels or {}).items()}
        self.stem = nn.Sequential(
            nn.Conv2d(3, c(32), 3, 2, 1, bias=False),
            nn.BatchNorm2d(c(32)),
            nn.ReLU(inplace=True),
            nn.Conv2d(c(32), c(64), 3, 1, 1, bias=False),
            nn.BatchNorm2d(c(64)),
            nn.ReLU(inplace=True),
        )
        self.entry = nn.Sequential(
            XceptionBlock([c(64), c(128), c(128)], 2, start_with_relu=False),
            XceptionBlock([c(128), c(256), c(256)], 2),
            XceptionBlock([c(256), mid, mid], 2),
        )
        self.middle = nn.Sequential(
            *[XceptionBlock([mid, *pruned.get(i, [mid, mid]), mid]) for i in range(middle)]
        )
        self.exit = nn.Sequential(
            XceptionBlock([mid, mid, c(1024)], 2),
            SeparableConv(c(1024), c(1536), relu_first=False, se=True),
            nn.ReLU(inplace=True),
            SeparableConv(c(1536), c(2048), relu_first=False, se=True),
            nn.ReLU(inplace=True),
        )
        self.features = c(2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.middle(self.entry(self.stem(x))))


def _create_xception(
    taxonomy: Taxonomy,
    width: float,
    middle: int,
    dropout: float = 0.2,
    mid_channels: dict[str, list[int]] | None = None,
) -> nn.Module:
    trunk = XceptionTrunk(width, middle, mid_channels)
    return TrunkWithHeads(trunk, trunk.features, taxonomy, dropout)


@register_model
def xception_se(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """Full Xception (8 middle modules, 728 wide) with SE in the 1536/2048-channel separable convs."""
    return _create_xception(taxonomy, 1.0, 8, **kw)


@register_model
def xception_se_s(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """Quarter-width Xception-SE with 4 middle modules: the same structure at CPU cost."""
    return _create_xception(taxonomy, 0.25, 4, **kw)
