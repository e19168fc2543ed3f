import pytest
import torch

from fashionlabel.models import create_model, list_models
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", [(80, 60), (224, 224)])
def test_every_model_forward(name, size):
    model = create_model(name, TAX).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert set(out) == {h.name for h in TAX.heads}
    for h in TAX.heads:
        assert out[h.name].shape == (2, h.num_classes)
        assert torch.isfinite(out[h.name]).all()


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope", TAX)
