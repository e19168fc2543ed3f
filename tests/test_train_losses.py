import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.losses import MultiTaskLoss

TAX = Taxonomy.from_dict(
    {
        "name": "t",
        "heads": [
            {"name": "cat", "kind": "single", "values": ["a", "b", "c"], "weight": 2.0},
            {
                "name": "att",
                "kind": "multi",
                "values": ["x", "y"],
                "w_pos": 1.0,
                "w_neg": 0.1,
                "weight": 10.0,
            },
        ],
    }
)


def test_weighted_sum_masks_unknowns_and_weights_positives():
    z = {
        "cat": torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]),
        "att": torch.tensor([[1.0, -1.0], [0.5, 0.5], [3.0, 3.0]]),
    }
    nan = float("nan")
    y = {"cat": torch.tensor([0, 1, -1]), "att": torch.tensor([[1.0, 0.0], [0.0, 1.0], [nan, nan]])}
    total, parts = MultiTaskLoss(TAX)(z, y)
    ce = F.cross_entropy(z["cat"][:2], y["cat"][:2])

    def bce(logit, t, w):
        p = 1 / (1 + math.exp(-logit))
        return -w * (t * math.log(p) + (1 - t) * math.log(1 - p))

    # rows 0 and 1 known; positives weigh 1, negatives 0.1; mean over the 4 entries
    b = (bce(1.0, 1, 1.0) + bce(-1.0, 0, 0.1) + bce(0.5, 0, 0.1) + bce(0.5, 1, 1.0)) / 4
    assert math.isclose(parts["cat"], float(ce), rel_tol=1e-5)
    assert math.isclose(parts["att"], b, rel_tol=1e-5)
    assert math.isclose(float(total), 2.0 * float(ce) + 10.0 * b, rel_tol=1e-5)


def test_uncertainty_weighting_learns_log_variances():
    loss_fn = MultiTaskLoss(TAX, uncertainty=True)
    z = {"cat": torch.randn(4, 3), "att": torch.randn(4, 2)}
    y = {"cat": torch.tensor([0, 1, 2, 0]), "att": torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])}
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.tensor([0.5, -0.3]))
    total, parts = loss_fn(z, y)
    expect = math.exp(-0.5) * parts["cat"] + 0.5 + math.exp(0.3) * parts["att"] - 0.3
    assert math.isclose(float(total.detach()), expect, rel_tol=1e-5)
    total.backward()
    assert loss_fn.log_vars.grad is not None and (loss_fn.log_vars.grad != 0).all()
    # what training records each epoch: exp(-s) per head, learned; the taxonomy's weights otherwise
    assert loss_fn.head_weights() == pytest.approx({"cat": math.exp(-0.5), "att": math.exp(0.3)})
    assert MultiTaskLoss(TAX).head_weights() == {"cat": 2.0, "att": 10.0}


def test_label_smoothing_applies_to_single_heads():
    z = {"cat": torch.tensor([[4.0, 0.0, 0.0]]), "att": torch.zeros(1, 2)}
    y = {"cat": torch.tensor([0]), "att": torch.zeros(1, 2)}
    plain = MultiTaskLoss(TAX)(z, y)[1]["cat"]
    smooth = MultiTaskLoss(TAX, label_smoothing=0.1)(z, y)[1]["cat"]
    assert math.isclose(
        float(smooth), float(F.cross_entropy(z["cat"], y["cat"], label_smoothing=0.1)), rel_tol=1e-6
    )
    assert smooth > plain


def test_a_head_without_known_labels_in_the_batch_adds_nothing():
    z = {"cat": torch.randn(3, 3), "att": torch.randn(3, 2)}
    nan = float("nan")
    y = {"cat": torch.tensor([-1, -1, -1]), "att": torch.tensor([[1.0, 0], [nan, nan], [0, 1]])}
    total, parts = MultiTaskLoss(TAX)(z, y)
    assert float(parts["cat"]) == 0.0 and torch.isfinite(total)
    assert math.isclose(float(total), 10.0 * float(parts["att"]), rel_tol=1e-6)
    only_att = MultiTaskLoss(TAX, uncertainty=True)
    total, parts = only_att(z, y)
    total.backward()  # the unlabelled head's log-variance gets no gradient: nothing was observed
    assert only_att.log_vars.grad[0] == 0 and only_att.log_vars.grad[1] != 0
    assert math.isclose(float(total.detach()), float(parts["att"]), rel_tol=1e-6)  # exp(-0)·L + 0


def test_weight_decay_reaches_conv_and_linear_weights_only():
    from fashionlabel.models import create_model
    from fashionlabel.train.loop import make_optimizer

    tax = Taxonomy.load("fashion-product-images")
    model = create_model("fl_tiny", tax)
    loss_fn = MultiTaskLoss(tax, uncertainty=True)
    opt = make_optimizer(model, loss_fn, lr=1e-3, weight_decay=0.05)
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    ids = {id(p) for p in decayed["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in ids) == (p.ndim > 1), name  # BatchNorm scales and biases are not decayed
    assert any(p is loss_fn.log_vars for p in free["params"])
    n_all = sum(1 for _ in model.parameters()) + 1
    assert len(decayed["params"]) + len(free["params"]) == n_all


def test_a_checkpoint_of_the_single_group_optimizer_resumes_its_schedule():
    from fashionlabel.models import create_model
    from fashionlabel.train.loop import _Parts, lr_schedule, make_optimizer

    tax = Taxonomy.load("fashion-product-images")
    model, loss_fn = create_model("fl_tiny", tax), MultiTaskLoss(tax)
    old_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # one group, as checkpoints once held
    old_sched = torch.optim.lr_scheduler.LambdaLR(old_opt, lr_schedule(100, 10))
    for _ in range(30):
        old_opt.step()
        old_sched.step()
    state = {
        "model": model.state_dict(),
        "optimizer": old_opt.state_dict(),
        "scheduler": old_sched.state_dict(),
    }
    opt = make_optimizer(model, loss_fn, lr=1e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(100, 10))
    _Parts(model, loss_fn, opt, sched, None).load(state)
    assert sched.last_epoch == 30
    assert [g["lr"] for g in opt.param_groups] == [old_opt.param_groups[0]["lr"]] * 2


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_a_cutmix_step_mixes_the_losses_of_both_products_labels_by_area(share):
    """With --cutmix every step's loss is own·L(labels) + (1 − own)·L(partners' labels); without, L alone."""
    from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD
    from fashionlabel.models import create_model
    from fashionlabel.train.loop import _Parts, _train_epoch, make_optimizer

    torch.manual_seed(0)
    np.random.seed(0)
    tax = Taxonomy.load("fashion-product-images")
    model = create_model("fl_tiny", tax)
    calls: list[dict[str, torch.Tensor]] = []

    class Recording(MultiTaskLoss):
        def forward(self, logits, targets):
            calls.append({k: v.clone() for k, v in targets.items()})
            return super().forward(logits, targets)

    loss_fn = Recording(tax)
    opt = make_optimizer(model, loss_fn, 1e-3, 0.0)
    parts = _Parts(model, loss_fn, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)
    n = 8
    images = np.random.default_rng(0).integers(0, 256, (n, 80, 60, 3), dtype=np.uint8)
    targets = {"gender": torch.arange(n) % 5}
    for h in tax.heads:
        if h.name != "gender":
            targets[h.name] = (
                torch.full((n, h.num_classes), float("nan"))
                if h.kind == "multi"
                else -torch.ones(n, dtype=torch.long)
            )
    config = {"cfg": {"cutmix": share}, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    loss = _train_epoch(parts, images, targets, 3, n, config, torch.device("cpu"))
    assert np.isfinite(loss)
    assert len(calls) == 3 * (2 if share else 1)  # one loss per step, two when the step is mixed
    if share:
        for own, other in zip(calls[::2], calls[1::2], strict=True):
            assert sorted(other["gender"].tolist()) == sorted(own["gender"].tolist())  # a permutation
            assert not torch.equal(other["gender"], own["gender"])  # seeded: these draws move labels


def _ddp_uncertainty_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: two training steps with learned loss weights on data of its own; saves its weights."""
    import torch.distributed as dist

    from fashionlabel.models import create_model
    from fashionlabel.train.loop import _Parts, _train_epoch, lr_schedule, make_optimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        np.random.seed(rank)
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(create_model("fl_tiny", TAX))
        loss_fn = MultiTaskLoss(TAX, uncertainty=True)
        opt = make_optimizer(model, loss_fn, lr=0.1, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(2, 0))
        rng = np.random.default_rng(rank)  # each rank sees other products, as in training
        images = rng.integers(0, 255, (8, 32, 24, 3), dtype=np.uint8)
        targets = {
            "cat": torch.as_tensor(rng.integers(0, 3, 8)),
            "att": torch.as_tensor(rng.integers(0, 2, (8, 2)).astype(np.float32)),
        }
        config = {"cfg": {"cutmix": 0.0}, "mean": [0.5] * 3, "std": [0.25] * 3}
        _train_epoch(
            _Parts(model, loss_fn, opt, sched, None), images, targets, 2, 4, config, torch.device("cpu")
        )
        torch.save(loss_fn.log_vars.detach(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_learned_loss_weights_stay_equal_on_every_ddp_rank(tmp_path):
    """The log-variances of ``--uncertainty`` live outside the DDP-wrapped model: their gradients must be
    averaged over the ranks as the model's are, or each rank learns its own head weights and the
    checkpoint (rank 0's) holds weights the other ranks never trained with."""
    import torch.multiprocessing as mp
    from ports import free_port

    mp.start_processes(
        _ddp_uncertainty_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (a != 0).all()  # they did learn
    assert torch.allclose(a, b), (a, b)
