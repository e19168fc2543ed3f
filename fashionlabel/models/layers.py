"""Building blocks shared by the model families, and the one re-parameterisation walker.

- ``SqueezeExcite`` (Hu et al. 2018): global pool → FC(C→C/r)+ReLU → FC(C/r→C)+sigmoid → rescale channels.
- ``ECA`` (Wang et al. 2020): the same idea without the bottleneck, a 1-D conv over the pooled channels.
- ``GhostModule`` (Han et al. 2020): a few ordinary 1×1 convs make primary maps, cheap depthwise convs the rest.
- ``HetConv`` (Singh et al. 2019): within a filter only 1/P of the kernels are 3×3, the rest 1×1; written as a
  grouped 3×3 conv (each filter sees C/P channels at 3×3) plus a 1×1 conv.
- ``reparameterize_model``: converts a copy of a model into its deployment form by calling
  ``reparameterize()`` on every block that has one (RepVGG's structural re-parameterisation).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (``k``×``k``, "same" padding, no bias) → BatchNorm → ReLU unless ``act`` is False."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: rescale channels by an MLP of their global mean (hidden width
    ``max(8, channels // reduction)``)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class ECA(nn.Module):
    """Efficient channel attention: a k-wide 1-D conv over the channel descriptor, no dimensionality cut."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.conv(x.mean(dim=(2, 3)).unsqueeze(1))).squeeze(1)
        return x * w[:, :, None, None]


class GhostModule(nn.Module):
    """``cout`` maps from ``cout/ratio`` primary 1×1-conv maps plus cheap depthwise 3×3 'ghosts' of them."""

    def __init__(self, cin: int, cout: int, ratio: int = 2, act: bool = True):
        super().__init__()
        primary = -(-cout // ratio)
        self.cout = cout
        self.primary = conv_bn(cin, primary, 1, act=act)
        self.cheap = conv_bn(primary, primary * (ratio - 1), 3, groups=primary, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        return torch.cat([p, self.cheap(p)], dim=1)[:, : self.cout]


class HetConv(nn.Module):
    """Heterogeneous kernels: 1/P of each filter's kernels are 3×3 (grouped conv), the others 1×1."""

    def __init__(self, cin: int, cout: int, p: int = 4, stride: int = 1):
        super().__init__()
        while cin % p or cout % p:  # fall back to the largest P that divides both
            p -= 1
        self.k3 = nn.Conv2d(cin, cout, 3, stride, 1, groups=p, bias=False)
        self.k1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.k3(x) + self.k1(x))


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv followed by BN in eval mode: W·γ/σ and β − μγ/σ (RepVGG eq. 3)."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * t, bn.bias + (bias - bn.running_mean) * bn.weight / std


@torch.no_grad()
def reparameterize_model(model: nn.Module) -> nn.Module:
    """A deployment copy of ``model``: every block with ``reparameterize()`` fused in place, eval mode.

    The copy records ``model_kwargs['deploy'] = True`` so an artifact rebuilds the fused structure.
    ``model`` itself is left untouched.
    """
    out = copy.deepcopy(model).eval()
    fused = 0
    for m in list(out.modules()):
        if hasattr(m, "reparameterize") and callable(m.reparameterize):
            m.reparameterize()
            fused += 1
    if fused:
        out.model_kwargs = {**getattr(model, "model_kwargs", {}), "deploy": True}
    return out
