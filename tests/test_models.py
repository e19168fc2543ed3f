import pytest
import torch

from fashionlabel.models import create_model, list_models, reparameterize_model
from fashionlabel.models.heads import HierarchicalHeads
from fashionlabel.models.profile import count_flops, count_params
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_small_and_large_images(name):
    model = create_model(name, TAX).eval()
    for size in [(80, 60), (224, 224)]:
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert set(out) == {h.name for h in TAX.heads}
        for h in TAX.heads:
            assert out[h.name].shape == (1, h.num_classes)
            assert torch.isfinite(out[h.name]).all()


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_a_training_step_in_channels_last(name):
    """The training loop's memory format: forward + backward must work (and give finite gradients)."""
    model = create_model(name, TAX).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 80, 60).contiguous(memory_format=torch.channels_last)
    sum(v.logsumexp(1).mean() for v in model(x).values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_every_model_reparameterizes_and_exports_to_the_same_outputs(name):
    """The deploy copy matches the training form, rebuilds from its recorded kwargs, and exports (the first
    step of a compiled labelling package, ``fashionlabel.label.aot``) to a graph with the same outputs."""
    model = create_model(name, TAX)
    _randomise_bn(model)
    model.eval()
    deploy = reparameterize_model(model)
    x = torch.randn(2, 3, 80, 60)
    with torch.no_grad():
        a, b = model(x), deploy(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3, rtol=1e-3), k
    rebuilt = create_model(name, TAX, **getattr(deploy, "model_kwargs", {}))
    rebuilt.load_state_dict(deploy.state_dict())  # strict: same structure
    x, deploy = x.contiguous(memory_format=torch.channels_last), deploy.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, exported = deploy(x), torch.export.export(deploy, (x,)).module()(x)
    for k in ref:
        assert torch.allclose(exported[k], ref[k], atol=1e-4, rtol=1e-4), k


def test_repvgg_deploy_form_is_plain_3x3_convs():
    model = create_model("repvgg_a0", TAX)
    _randomise_bn(model, seed=3)
    deploy = reparameterize_model(model.eval())
    convs = [m for m in deploy.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 22 and all(c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.trunk.modules())
    assert deploy.model_kwargs == {"deploy": True}
    assert count_flops(deploy, (80, 60)) < count_flops(model, (80, 60))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = model(x), deploy(x)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the original is untouched"


def test_hierarchical_heads_attend_for_fine_levels_only():
    heads = HierarchicalHeads(32, TAX)
    assert set(heads.attention) == {h.name for h in TAX.heads if h.parent} == {"subCategory", "articleType"}
    model = create_model("fl_small_hier", TAX).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 80, 60))
    assert out["articleType"].shape == (2, TAX.head("articleType").num_classes)


def test_model_sizes_follow_the_research():
    """Parameter counts of the trunks are those of the published architectures (heads excluded)."""

    def trunk(name):
        return count_params(create_model(name, TAX).trunk) / 1e6

    assert 23.0 < trunk("cloth_resnet_a") < 23.6  # ResNet-50 without fc
    assert 7.0 < trunk("repvgg_a0") < 8.0  # RepVGG-A0 (8.3 M with its 1000-way fc)
    assert 20.0 < trunk("xception_se") < 22.5  # Xception 20.8 M without fc, + SE
    assert trunk("hsnet") < 4.0


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope", TAX)


def test_speed_probes_measure_and_leave_the_model_trainable():
    from fashionlabel.models.profile import inference_speed, train_speed

    model = create_model("fl_tiny", Taxonomy.load("fashion-product-images"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_speed(model, (80, 60), batch=4, repeats=1)
    assert fast > 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # timing the labelling path first must not turn the weights into inference-only tensors
    assert train_speed(model, (80, 60), batch=4, repeats=1) > 0
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # AdamW stepped


ODD_NAMES = Taxonomy.from_dict(
    {
        "name": "odd",
        "heads": [
            # the built-in DeepFashion coarse head is called "type", an attribute of every torch module
            {"name": "type", "kind": "single", "values": ["upper", "lower"]},
            {
                "name": "values",  # a method of nn.ModuleDict, and a fine level: its attention MLP too
                "kind": "single",
                "values": ["tee", "jeans"],
                "parent": "type",
                "parent_map": {"tee": "upper", "jeans": "lower"},
            },
            {"name": "neck.design", "kind": "single", "values": ["v", "round"]},  # '.': no module name
            {"name": "head:type", "kind": "multi", "values": ["x", "y", "z"]},  # must not meet "type"
            {"name": "gender", "kind": "single", "values": ["m", "f"]},
        ],
    }
)


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_any_head_name_and_keeps_plain_names_in_its_weights(name):
    model = create_model(name, ODD_NAMES).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 80, 60))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        h.name: (1, h.num_classes) for h in ODD_NAMES.heads
    }
    keys = set(model.state_dict())
    assert "head.heads.gender.weight" in keys  # a plain name keeps its key: older artifacts still load
    rebuilt = create_model(name, ODD_NAMES)
    rebuilt.load_state_dict(model.state_dict())  # strict


def test_every_model_builds_for_the_builtin_deepfashion_taxonomy():
    tax = Taxonomy.load("deepfashion").learn([{"attributes": ["texture:striped", "fabric:denim"]}])
    for name in list_models():
        out = create_model(name, tax).eval()(torch.randn(1, 3, 80, 60))
        assert set(out) == {"type", "category", "attributes"}, name
