"""RepVGG-A0 trunk (Ding et al. 2021) with taxonomy heads: "Cloth RepVGG" of research §2.

Training form: each block sums a 3×3 conv+BN, a 1×1 conv+BN and (when shapes allow) an identity BN, then
ReLU: a multi-branch net that trains like a ResNet. Deployment form: ``reparameterize()`` folds each
branch's BN into its kernel (W·γ/σ, β − μγ/σ), pads the 1×1 kernel and the identity to 3×3 and sums them
into one plain 3×3 conv with bias: a VGG-style stack of 3×3 convs, fast on every accelerator.
``create_model('repvgg_a0', tax, deploy=True)`` builds the fused structure for loading deployed weights.
A0: widths 48/48/96/192/1280, depths 1/2/4/14/1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashionlabel.models._registry import register_model
from fashionlabel.models.heads import TrunkWithHeads
from fashionlabel.models.layers import conv_bn, fuse_conv_bn
from fashionlabel.taxonomy import Taxonomy


class RepVGGBlock(nn.Module):
    """3×3 conv+BN + 1×1 conv+BN [+ identity BN] → ReLU; ``deploy=True`` builds the fused one-conv form."""

    def __init__(self, cin: int, cout: int, stride: int = 1, deploy: bool = False):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.act = nn.ReLU(inplace=True)
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        else:
            self.dense = conv_bn(cin, cout, 3, stride, act=False)
            # A strided 1×1 conv is a 1×1 conv on every stride-th pixel; written that way because
            # PyTorch's CPU backward of a stride-2 1×1 conv on a 3-channel channels_last input crashes.
            self.one = conv_bn(cin, cout, 1, 1, act=False)
            self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam"):
            return self.act(self.reparam(x))
        s = self.stride
        y = self.dense(x) + self.one(x[:, :, ::s, ::s] if s > 1 else x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the three branches into one 3×3 conv (in place; the block becomes its deploy form)."""
        if hasattr(self, "reparam"):
            return
        k3, b3 = fuse_conv_bn(self.dense[0], self.dense[1])
        k1, b1 = fuse_conv_bn(self.one[0], self.one[1])
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.identity is not None:
            eye = torch.zeros_like(k3)
            eye[torch.arange(self.cin), torch.arange(self.cin), 1, 1] = 1.0
            bn = self.identity
            std = (bn.running_var + bn.eps).sqrt()
            kernel = kernel + eye * (bn.weight / std).reshape(-1, 1, 1, 1)
            bias = bias + bn.bias - bn.running_mean * bn.weight / std
        self.reparam = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, bias=True).to(kernel.device)
        self.reparam.weight.copy_(kernel)
        self.reparam.bias.copy_(bias)
        del self.dense, self.one, self.identity


def _create_repvgg(
    taxonomy: Taxonomy,
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    deploy: bool = False,
    dropout: float = 0.2,
) -> nn.Module:
    blocks: list[nn.Module] = []
    cin = 3
    for w, d in zip(widths, depths, strict=True):
        for i in range(d):
            blocks.append(RepVGGBlock(cin, w, stride=2 if i == 0 else 1, deploy=deploy))
            cin = w
    return TrunkWithHeads(nn.Sequential(*blocks), cin, taxonomy, dropout)


@register_model
def repvgg_a0(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """RepVGG-A0 trunk (8.3 M trunk params) + taxonomy heads; ``deploy=True`` for the fused form."""
    return _create_repvgg(taxonomy, (48, 48, 96, 192, 1280), (1, 2, 4, 14, 1), **kw)
