"""The training job's settings: one frozen config, checked when it is made (a bad value fails in a second
with its name, before any worker starts), saved in every checkpoint and in the artifact's ``model.json``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from fashionlabel.models import list_models
from fashionlabel.settings import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (``fashionlabel train``); invalid values raise when it is made."""

    model: str = "fl_small"  # a registered model name
    epochs: int = 15  # at most: early stopping may end sooner
    batch_size: int = 64  # global, split across workers
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear warm-up to ``lr``, then a cosine to 0 at the last epoch
    workers: int = 2  # DDP workers
    gpu: bool = False  # one GPU per worker
    height: int = 80  # model input size, in pixels
    width: int = 60
    patience: int = 5  # early stopping: epochs without improvement
    uncertainty: bool = False  # learn the head weights (Kendall et al.) instead of the taxonomy's
    seed: int = 0  # seed of weights and of each epoch's data order and augmentation, resumed or not
    init_weights: str | None = None  # start from this weights.pt or checkpoint
    label_smoothing: float = 0.0  # for single heads' cross-entropy
    ema_epochs: float = 0.0  # horizon of the weights' moving average, in epochs; 0: no average
    cutmix: float = 0.0  # share of batches trained as CutMix (Yun et al. 2019); 0: off
    review_share: float | None = None  # thresholds flagging at most this share of validation products

    def __post_init__(self) -> None:
        # Checked before any worker starts: a bad value fails in a second with its name, not mid-run.
        checks = {
            "epochs": self.epochs >= 1,
            # split evenly: 65 on 2 workers would train 64 a step while the model records 65
            "batch_size": self.batch_size >= self.workers and self.batch_size % max(1, self.workers) == 0,
            "workers": self.workers >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            # a warm-up longer than the run never reaches ``lr`` and never decays: the run ends part-way up
            # (measured against a valid --epochs only: a default warm-up is not blamed for --epochs 0)
            "warmup_epochs": self.warmup_epochs >= 0
            and (self.epochs < 1 or self.warmup_epochs <= self.epochs),
            "height": self.height >= 16,
            "width": self.width >= 16,
            "patience": self.patience >= 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "ema_epochs": self.ema_epochs >= 0,
            "cutmix": 0 <= self.cutmix <= 1,
            "review_share": self.review_share is None or 0 < self.review_share < 1,
            "model": self.model in list_models(),
            # each epoch's draws are seeded by SeedSequence, which refuses a negative seed inside the
            # workers; an empty path (an unset shell variable) would otherwise train from scratch silently
            "seed": 0 <= self.seed < 2**63,
            "init_weights": self.init_weights is None or bool(self.init_weights.strip()),
        }
        check(
            "training",
            self,
            checks,
            "epochs, workers, patience ≥ 1; batch size a multiple of workers; lr > 0; warm-up ≤ epochs (a run started with a longer one resumes with --warmup-epochs equal to its --epochs); height, width ≥ 16; "
            "0 ≤ label smoothing < 1; 0 ≤ cutmix ≤ 1; 0 < review share < 1; others ≥ 0; model: one of `fashionlabel models`; "
            "init weights: a path",
        )


def _as_now(saved: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A saved training config (a checkpoint's, ``model.json``'s) as this version reads it, and what was
    changed to read it: options added since count as their defaults, and a warm-up longer than the run,
    saved before that was refused, as one as long as the run (``--epochs``). That is what the old run's
    warm-up amounted to by its end (it never reached ``--lr`` nor decayed), and the one value a resumed
    run can take on: refused by name, such a run could neither resume nor be exported, with any setting."""
    was = {**asdict(TrainConfig()), **saved}
    warm, epochs = was.get("warmup_epochs"), was.get("epochs")
    if isinstance(warm, int | float) and isinstance(epochs, int) and epochs >= 1 and warm > epochs:
        was["warmup_epochs"] = float(epochs)
        return (
            was,
            f"--warmup-epochs {warm:g} longer than its --epochs {epochs}, read as --warmup-epochs {epochs}",
        )
    return was, None


def same_config(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """A checkpoint's config equals ``cfg``, as this version reads it (:func:`_as_now`)."""
    return _as_now(saved)[0] == asdict(cfg)


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> str:
    """The settings in which a saved training config differs from ``cfg``, as "name old → new"."""
    now = asdict(cfg)
    was = _as_now(saved)[0]
    return ", ".join(f"{k} {was[k]} → {now[k]}" for k in now if was.get(k) != now[k])


def config_adjusted(saved: dict[str, Any]) -> str | None:
    """What reading a saved config changes in it (a warm-up longer than the run), or None."""
    return _as_now(saved)[1]


def saved_config(saved: dict[str, Any], what: str) -> TrainConfig:
    """The ``TrainConfig`` of a saved config (``what``: where it was saved, for the warning): one saved
    before a check that refuses it now is read as :func:`_as_now` says, with a warning, not refused."""
    was, changed = _as_now(saved)
    if changed:
        log.warning("%s was written with %s", what, changed)
    return TrainConfig(**was)
