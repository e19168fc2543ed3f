"""The weights' moving average: hand-computed updates, BatchNorm statistics included, and a state round trip."""

import pytest
import torch

from fashionlabel.train.ema import EMA, decay_for


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )


def test_decay_spans_the_horizon_in_steps():
    assert decay_for(2.0, 50) == pytest.approx(1 - 1 / 100)
    assert decay_for(0.001, 10) == 0.0  # a window shorter than a step: follow the live weights
    with pytest.raises(ValueError, match="positive"):
        decay_for(0, 10)


def test_update_is_the_warmed_up_exponential_average():
    net = _net()
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    ema = EMA(net, decay=0.9)
    w0, rm0 = net[0].weight.detach().clone(), net[1].running_mean.clone()
    steps = []
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(2, 3, 6, 6))  # train mode: moves the BatchNorm running statistics
        steps.append((net[0].weight.detach().clone(), net[1].running_mean.clone()))
        ema.update()
    expect_w, expect_rm = w0, rm0
    for n, (w, rm) in enumerate(steps, start=1):
        d = min(0.9, (1 + n) / (10 + n))  # early updates follow closely: the random start fades fast
        expect_w, expect_rm = d * expect_w + (1 - d) * w, d * expect_rm + (1 - d) * rm
    assert torch.allclose(ema.model[0].weight, expect_w, atol=1e-5)
    assert torch.allclose(ema.model[1].running_mean, expect_rm, atol=1e-5)
    assert not torch.allclose(ema.model[0].weight, net[0].weight)  # an average, not a copy
    assert ema.model[1].num_batches_tracked == net[1].num_batches_tracked == 31  # copied, not averaged
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_state_round_trip_resumes_the_average():
    net = _net()
    net(torch.randn(2, 3, 6, 6))
    a = EMA(net, decay=0.99)
    for _ in range(5):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        a.update()
    b = EMA(_net_like(net), decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.updates == 5
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _net_like(net: torch.nn.Module) -> torch.nn.Module:
    other = _net()
    other(torch.randn(2, 3, 6, 6))
    other.load_state_dict(net.state_dict())
    return other
