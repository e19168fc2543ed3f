"""Multi-task training on Ray Train: ``TorchTrainer`` with DDP over N workers (gloo on CPU, NCCL on GPU).

Each worker decodes only its own share of the training shards into memory (uint8), steps through it with
random flips and small crops, and all workers take the same number of steps per epoch (shorter shares are
cycled), so DDP never waits on a rank that ran out of data. The global batch is fixed, not per worker, so
1 and N workers train the same recipe. Rank 0 validates, checkpoints every epoch and decides early stopping;
with ``ema_epochs`` it also keeps a moving average of the weights, validates both sets and keeps the better.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fashionlabel import storage
from fashionlabel.data import BatchPrefetcher, augment, cutmix, load_samples, to_input
from fashionlabel.models import create_model
from fashionlabel.shards import ShardDamaged, list_shards
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train import checkpoint as ckpt
from fashionlabel.train.config import TrainConfig, same_config
from fashionlabel.train.ema import EMA, decay_for
from fashionlabel.train.init_weights import apply_init
from fashionlabel.train.losses import MultiTaskLoss
from fashionlabel.train.metrics import evaluate_probs
from fashionlabel.train.shares import split_work

log = logging.getLogger(__name__)


def val_score(metrics: dict[str, Any]) -> float:
    """One number to pick the best epoch: mean top-1 of single heads and recall@3 of multi heads."""
    vals = [m.get("top1", m.get("recall@3")) for m in metrics["heads"].values()]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else 0.0


@dataclass
class _Parts:
    """What a worker trains and steps: the (DDP-wrapped) model, its loss, optimiser, LR schedule and, on
    rank 0 with ``ema_epochs``, the moving average of its weights."""

    model: torch.nn.Module
    loss_fn: MultiTaskLoss
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None

    def state(self) -> dict[str, Any]:
        return {
            "model": ckpt.unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "loss": self.loss_fn.state_dict() if self.loss_fn.log_vars is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load(self, state: dict[str, Any]) -> None:
        ckpt.unwrap(self.model).load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if len(state["optimizer"]["param_groups"]) == len(self.opt.param_groups):
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before decay was split by parameter kind: its moments do not map
            log.warning("checkpoint optimizer state has other parameter groups: AdamW's moments start afresh")
            self.sched.last_epoch = state["scheduler"]["last_epoch"] - 1  # the schedule goes on where it was
            with warnings.catch_warnings():  # "step() before optimizer.step()": by design, here
                warnings.simplefilter("ignore", UserWarning)
                self.sched.step()
        if state.get("loss") is not None:
            self.loss_fn.load_state_dict(state["loss"])


@dataclass
class _Progress:
    """Where a run stands: the epoch to train next, the curves so far and the best epoch."""

    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = -1
    starts: list[int] = field(default_factory=list)  # the epoch each (re)start began at
    stopped: bool = False  # early stopping already ended this run


def _quiet_ray_train() -> None:
    """Ray Train logs every ``report`` call of every rank at INFO, with its whole metrics dict: two long
    lines per epoch on the driver's console that repeat our own one-line epoch log. Its logger is named
    after its file; where that module moves, this does nothing."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    _quiet_ray_train()
    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)  # the initial weights (DDP then gives every rank rank 0's)
    torch.set_num_threads(max(1, int(config["threads"])))
    tax = Taxonomy.from_dict(config["taxonomy"])
    size = (cfg.height, cfg.width)

    shares = config["shares"]
    if shares is not None:
        mine = load_samples(shares[rank], tax, size, split="train")
    else:  # too few shards to balance whole ones: interleave samples instead
        mine = load_samples(config["shards"], tax, size, split="train", rank=rank, world=world)
    val = load_samples(config["shards"], tax, size, split="val") if rank == 0 else None
    for name, part in (("training", mine), ("validation", val)):
        if part is not None and part.errors:  # packed without a decodable image: trained without, and said so
            pid, why = next(iter(part.errors.items()))
            log.warning(
                "rank %d: %d %s products have no image that decodes and are left out (e.g. %s: %s)",
                rank,
                len(part.errors),
                name,
                pid,
                why,
            )

    device = ray.train.torch.get_device()
    per_worker = max(1, cfg.batch_size // world)
    steps = max(1, math.ceil(config["max_share"] / per_worker))
    parts = _build(cfg, tax, device, steps, rank)
    progress = _resume(config["ckpt_dir"], parts, cfg, tax, rank, config.get("shards_fingerprint"))
    targets = {k: torch.as_tensor(v) for k, v in mine.targets.items()}
    stop = torch.zeros(1, device=device)  # NCCL (--gpu) broadcasts device tensors only
    for epoch in range(progress.start, cfg.epochs):
        if progress.stopped:
            break
        seed_epoch(cfg.seed, rank, epoch)
        t0 = time.time()
        ticker = EpochProgress(epoch, steps, per_worker * world) if rank == 0 else None
        loss = _train_epoch(parts, mine.images, targets, steps, per_worker, config, device, ticker)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss,
            "train_img_per_s": steps * per_worker * world / (time.time() - t0),
            "lr": parts.sched.get_last_lr()[0],
        }
        if parts.loss_fn.log_vars is not None:  # --uncertainty: the learned weights, into curves.json
            metrics["head_weights"] = parts.loss_fn.head_weights()
        if rank == 0:
            stop[0] = float(_validate_and_save(parts, progress, metrics, val, cfg, tax, config, device))
        if world > 1:
            dist.broadcast(stop, src=0)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if stop.item():
            break


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed the draws of one epoch of one rank (data order, flips, crops, CutMix, dropout) from the run's
    seed, the rank and the epoch alone, so a run killed and resumed at an epoch trains it as the run would
    have uninterrupted: seeding once per process replayed epoch 0's draws after every resume."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[1]))


def _build(cfg: TrainConfig, tax: Taxonomy, device: torch.device, steps: int, rank: int) -> _Parts:
    """The model (``--init-weights`` loaded, DDP-wrapped), loss, AdamW, warm-up + cosine schedule, EMA."""
    import ray.train.torch

    model = create_model(cfg.model, tax)
    if cfg.init_weights:  # checked on the driver (train/run.py): loadable, and fits most of the model
        apply_init(model, tax, cfg.init_weights)  # head rows by value name; new values start fresh
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    loss_fn = MultiTaskLoss(tax, uncertainty=cfg.uncertainty, label_smoothing=cfg.label_smoothing).to(device)
    opt = make_optimizer(model, loss_fn, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_schedule(steps * cfg.epochs, int(cfg.warmup_epochs * steps))
    )
    # Only rank 0 validates and checkpoints, and DDP keeps every rank's weights equal: one average is enough.
    ema = (
        EMA(ckpt.unwrap(model), decay_for(cfg.ema_epochs, steps))
        if cfg.ema_epochs > 0 and rank == 0
        else None
    )
    return _Parts(model, loss_fn, opt, sched, ema)


def make_optimizer(
    model: torch.nn.Module, loss_fn: torch.nn.Module, lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW that decays only the weights of convs and linear layers: decaying BatchNorm scales, biases or
    the learned loss weights (``--uncertainty``) pulls them towards 0 for no regularising gain."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1] + list(loss_fn.parameters()), "weight_decay": 0.0},
        ],
        lr=lr,
    )


def lr_schedule(total: int, warm: int) -> Callable[[int], float]:
    """The learning rate of step s as a share of ``--lr``: a linear warm-up to 1 over ``warm`` steps, then a
    cosine to 0 at ``total`` (the cosine starts where the warm-up ends, so a short run reaches ``--lr``)."""

    def share(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    return share


def _resume(
    ckpt_dir: str, parts: _Parts, cfg: TrainConfig, tax: Taxonomy, rank: int, data: str | None
) -> _Progress:
    """Load the last checkpoint of this same run (same taxonomy version, config and shards: ``data``, their
    fingerprint) into ``parts``. Another run's checkpoints are refused on the driver unless --overwrite."""
    progress = _Progress()
    state = ckpt.load(ckpt_dir)
    if (
        state is not None
        and state["taxonomy_version"] == tax.version
        and same_config(state["config"], cfg)
        and state.get("shards_fingerprint", data) == data
    ):
        parts.load(state)
        progress = _Progress(
            start=state["epoch"] + 1,
            history=state["history"],
            best=state["best_score"],
            best_epoch=state["best_epoch"],
            starts=list(state.get("starts", [])),
            stopped=bool(state.get("stopped")),
        )
        if rank == 0:
            log.info("resuming from checkpoint at epoch %d", progress.start)
    progress.starts.append(progress.start)  # resumes stay visible in the artifact afterwards
    return progress


def _train_epoch(
    parts: _Parts,
    images: np.ndarray,
    targets: dict[str, torch.Tensor],
    steps: int,
    per_worker: int,
    config: dict[str, Any],
    device: torch.device,
    ticker: EpochProgress | None = None,
) -> float:
    """``steps`` batches of this worker's samples (reshuffled, cycled when the share is short); mean loss.
    ``ticker`` (rank 0's) logs how far the epoch is while it runs."""
    parts.model.train()
    n = len(images)
    order = np.concatenate(
        [np.random.permutation(n) for _ in range(math.ceil(steps * per_worker / max(1, n)))]
    )[: steps * per_worker]
    cutmix_share = config["cfg"].get("cutmix", 0.0)
    running = torch.zeros((), device=device)  # summed on the device: one host sync per epoch, not per step
    batches = (order[s * per_worker : (s + 1) * per_worker] for s in range(steps))
    for step, (batch, y) in enumerate(BatchPrefetcher(images, targets, batches, device), 1):
        x = augment(to_input(batch, config["mean"], config["std"], device))
        mix = cutmix_share > 0 and np.random.random() < cutmix_share
        if mix:
            x, perm, own = cutmix(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = parts.model(x)
        loss, _ = parts.loss_fn(out, y)
        if mix:  # each head's loss is linear in the label weights: mix the two losses by area
            other, _ = parts.loss_fn(out, {k: v[perm] for k, v in y.items()})
            loss = own * loss + (1 - own) * other
        parts.opt.zero_grad(set_to_none=True)
        loss.backward()
        parts.loss_fn.average_gradients()  # learned head weights: DDP averages only the model's
        parts.opt.step()
        parts.sched.step()
        if parts.ema is not None:
            parts.ema.update()
        running += loss.detach()
        if ticker is not None and (line := ticker.at(step)):
            log.info("%s", line)
    return float(running) / steps


class EpochProgress:
    """A line every ``every`` seconds while an epoch runs (step, img/s, time left): the epoch's own line
    comes at its end, and one epoch over a whole catalog on CPU ran for many minutes without a word.
    Counts steps only, so it adds no device sync to the loop."""

    def __init__(
        self,
        epoch: int,
        steps: int,
        images_per_step: int,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.epoch, self.steps, self.images_per_step = epoch, steps, images_per_step
        self.every, self.clock = every, clock
        self.t0 = self.last = clock()

    def at(self, step: int) -> str | None:
        """The line to log after ``step`` steps of the epoch, or None when the last one is recent."""
        now = self.clock()
        if now - self.last < self.every or step >= self.steps:
            return None
        self.last = now
        per_step = (now - self.t0) / step
        return (
            f"epoch {self.epoch}: step {step}/{self.steps}, {self.images_per_step / per_step:.0f} img/s, "
            f"{per_step * (self.steps - step):.0f} s left in the epoch"
        )


def _validate_and_save(
    parts: _Parts,
    progress: _Progress,
    metrics: dict[str, Any],
    val: Any,
    cfg: TrainConfig,
    tax: Taxonomy,
    config: dict[str, Any],
    device: torch.device,
) -> bool:
    """Rank 0 after an epoch: validate, checkpoint (best first, then last) and log; True to stop early."""
    epoch = metrics["epoch"]
    # With an average, both weight sets are validated and the better one is this epoch's candidate.
    candidates = {"raw": ckpt.unwrap(parts.model)} | (
        {"ema": parts.ema.model} if parts.ema is not None else {}
    )
    scored = {}
    for name, m in candidates.items():
        vm = evaluate_probs(tax, _predict(m, val, config, device), val.targets)
        scored[name] = (val_score(vm), vm)
        metrics[f"val_score_{name}"] = scored[name][0]
    weights = max(scored, key=lambda k: scored[k][0])
    metrics["val_score"], vm = scored[weights]
    metrics["weights"] = weights
    metrics["val"] = {
        h: {k: v for k, v in m.items() if k in ("top1", "recall@3")} for h, m in vm["heads"].items()
    }
    progress.history.append(metrics)
    improved = metrics["val_score"] > progress.best
    if improved:
        progress.best, progress.best_epoch = metrics["val_score"], epoch
    stopped = epoch - progress.best_epoch >= cfg.patience
    state = parts.state() | {
        "epoch": epoch,
        "weights": weights,
        "config": asdict(cfg),
        "taxonomy_version": tax.version,
        "taxonomy": config["taxonomy"],  # the heads' value names: --init-weights maps rows by them
        "shards_fingerprint": config.get("shards_fingerprint"),
        "history": progress.history,
        "starts": progress.starts,
        "best_score": progress.best,
        "best_epoch": progress.best_epoch,
        "stopped": stopped,
    }
    if improved:
        ckpt.save(config["ckpt_dir"], ckpt.BEST, state)
    ckpt.save(config["ckpt_dir"], ckpt.LAST, state)  # last: written after best, resume point
    log.info(
        "epoch %d: loss %.3f, val %.3f (%s weights), %.0f img/s",
        epoch,
        metrics["train_loss"],
        metrics["val_score"],
        weights,
        metrics["train_img_per_s"],
    )
    if "head_weights" in metrics:
        log.info(
            "epoch %d: learned head weights %s",
            epoch,
            ", ".join(f"{h} {w:.3g}" for h, w in metrics["head_weights"].items()),
        )
    return stopped


@torch.inference_mode()
def _predict(model: torch.nn.Module, samples, config: dict[str, Any], device) -> dict[str, np.ndarray]:
    model.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(samples), 256):
        x = to_input(samples.images[s : s + 256], config["mean"], config["std"], device)
        for k, v in model(x).items():
            z = v.float()
            p = torch.softmax(z, 1) if k in config["single"] else torch.sigmoid(z)
            outs.setdefault(k, []).append(p.cpu().numpy())
    model.train()
    return {k: np.concatenate(v) for k, v in outs.items()}


def fit(
    shards: str,
    run_dir: str,
    taxonomy: Taxonomy,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    num_cpus: float,
    checkpoints: str | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) training; return the best checkpoint's state.

    Args:
        run_dir: local folder for Ray Train's own run state.
        mean, std: per-channel (RGB) normalisation of the model's input.
        checkpoints: folder or ``s3://`` prefix for last.pt / best.pt (default ``run_dir/checkpoints``);
            a run restarted with the same command and storage resumes from its last.pt.
        data: the shards' fingerprint (``run.shards_fingerprint``), kept in the checkpoints: a run resumes
            only the checkpoints of the same shards.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    uris = list_shards(shards)
    shares, max_share = split_work(shards, cfg.workers)
    ckpt_dir = checkpoints or storage.join(run_dir, "checkpoints")
    if not storage.is_s3(ckpt_dir):
        storage.makedirs(ckpt_dir)
    from fashionlabel.runtime import worker_cpus

    per_worker = min(num_cpus / cfg.workers, worker_cpus(cfg.workers))
    threads = max(1, int(per_worker))
    config = {
        "cfg": asdict(cfg),
        "taxonomy": taxonomy.to_dict(),
        "shards": uris,
        "shares": shares,
        "max_share": max_share,
        "ckpt_dir": ckpt.local_dir(ckpt_dir),
        "mean": list(mean),
        "std": list(std),
        "threads": threads,
        "single": [h.name for h in taxonomy.single_heads],
        "shards_fingerprint": data,
    }
    # Shares of the cluster's CPUs, so that any worker count fits (more workers than CPUs only time-slice).
    res_per_worker = (
        {"CPU": per_worker} if not cfg.gpu else {"CPU": min(2.0, num_cpus / cfg.workers), "GPU": 1}
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=res_per_worker
        ),
        run_config=ray.train.RunConfig(
            storage_path=ckpt.local_dir(storage.join(run_dir, "ray")), name="train"
        ),
    )
    try:
        trainer.fit()
    except Exception as e:
        # A damaged shard found by a worker reaches the driver as the worker's traceback in Ray Train's
        # text: the command shows the one line that names the shard and what to do.
        found = re.search(rf"^(?:[\w.]+\.)?{ShardDamaged.__name__}: (.+)$", str(e), re.MULTILINE)
        if found:
            raise ShardDamaged(found.group(1)) from None
        raise
    last = ckpt.load(ckpt_dir, ckpt.LAST)
    best = ckpt.load(ckpt_dir, ckpt.BEST) or last
    if best is None:
        raise RuntimeError("training finished without a checkpoint")
    best["history"], best["starts"] = last["history"], last.get("starts", [0])
    return best
