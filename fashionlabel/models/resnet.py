"""ResNet trunks with taxonomy heads: "Cloth ResNet A" (research §2) and the ResNet-18 baseline.

Cloth ResNet A is the best simple multi-task model of the DeepFashion study: a ResNet-50 trunk, global
average pooling and one linear head per task. ``resnet18_heads`` is the same shape on a ResNet-18 trunk;
it is the plain baseline every fashionlabel model is compared with. ``cloth_resnet_a_hier`` gives the
ResNet-50 trunk the hierarchical coarse/fine attention heads of ``fl_small_hier``. Both come from torchvision's
definitions (random init: we train from scratch), with the classifier replaced by taxonomy heads. The
trunks down-sample by 32, so a 60×80 catalog photo ends as a 2×3 map and a 224 photo as 7×7; adaptive
pooling serves both.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fashionlabel.models._registry import register_model
from fashionlabel.models.heads import TrunkWithHeads
from fashionlabel.taxonomy import Taxonomy


def _create_resnet(
    taxonomy: Taxonomy, variant: str, dropout: float = 0.2, hierarchical: bool = False
) -> nn.Module:
    # Imported here, not at the top: torchvision's import takes seconds (its ops register with torch),
    # which every labelling actor would pay at start-up even when it serves a model of another family.
    from torchvision.models import resnet

    net = getattr(resnet, variant)(weights=None)
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return TrunkWithHeads(trunk, net.fc.in_features, taxonomy, dropout, hierarchical)


@register_model
def cloth_resnet_a(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """ResNet-50 trunk + avg pool + one linear head per taxonomy head (research §2, "Cloth ResNet A")."""
    return _create_resnet(taxonomy, "resnet50", **kw)


@register_model
def cloth_resnet_a_hier(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """Cloth ResNet A with the hierarchical coarse/fine attention heads (research §3) for the fine levels."""
    return _create_resnet(taxonomy, "resnet50", hierarchical=True, **kw)


@register_model
def resnet18_heads(taxonomy: Taxonomy, **kw: Any) -> nn.Module:
    """ResNet-18 trunk + one linear head per taxonomy head: the plain baseline's architecture."""
    return _create_resnet(taxonomy, "resnet18", **kw)
