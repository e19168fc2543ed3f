"""Channel pruning of SE-Xception's middle modules (research §1; He, Zhang & Sun 2017).

For a separable conv pair A → B inside a middle module, the channels between them are thinned:
1. **Channel selection by LASSO.** B's pointwise conv computes Y = Σ_c D_c·W_c, where D_c is channel c of
   B's depthwise output (depthwise convs act per channel, so dropping c from A drops exactly D_c). Find a
   sparse β minimising ‖Y − Σ_c β_c D_c W_c‖² + λ‖β‖₁ (coordinate descent on the C×C Gram matrix, λ
   searched until ``keep`` channels remain), keep the channels with the largest |β|.
2. **Reconstruction by least squares.** Refit B's pointwise weights on the kept channels so that the
   pruned module reproduces the *original* model's Y at sampled positions.
Then A's pointwise rows and BN entries, and B's depthwise filters, of dropped channels are removed.
Sampling: ``positions`` random spatial positions per calibration image (the paper samples 10).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from fashionlabel.models.xception_se import SeparableConv, XceptionBlock

if TYPE_CHECKING:
    from fashionlabel.data import Samples
    from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)


def lasso_select(gram: np.ndarray, b: np.ndarray, keep: int, iters: int = 60) -> np.ndarray:
    """Indices of ``keep`` channels chosen by the LASSO path of ½βᵀGβ − bᵀβ + λ|β|₁ (sorted)."""
    n = len(b)
    if keep >= n:
        return np.arange(n)
    diag = np.maximum(np.diag(gram), 1e-12)

    def solve(lam: float) -> np.ndarray:
        beta = np.ones(n)
        for _ in range(iters):
            for c in range(n):
                rho = b[c] - gram[c] @ beta + diag[c] * beta[c]
                beta[c] = np.sign(rho) * max(abs(rho) - lam, 0.0) / diag[c]
        return beta

    lo, hi = 0.0, float(np.abs(b).max())
    beta = solve(lo)
    for _ in range(18):  # bisection on λ: more λ, fewer non-zero β
        mid = 0.5 * (lo + hi)
        cand = solve(mid)
        if np.count_nonzero(cand) >= keep:
            lo, beta = mid, cand
        else:
            hi = mid
    return np.sort(np.argsort(-np.abs(beta), kind="stable")[:keep])


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module`` when ``model`` runs on ``x``."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        seen["in"], seen["out"] = inp[0].detach(), out.detach()

    h = module.register_forward_hook(hook)
    try:
        model(x)
    finally:
        h.remove()
    return seen["in"], seen["out"]


def _sample(t: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    """N×C×H×W → (N·P)×C at the flat spatial positions ``idx`` (N×P)."""
    n, c = t.shape[:2]
    flat = t.reshape(n, c, -1)
    return (
        torch.gather(flat, 2, idx[:, None, :].expand(n, c, idx.shape[1]))
        .permute(0, 2, 1)
        .reshape(-1, c)
        .double()
        .numpy()
    )


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, groups: int | None = None) -> nn.Conv2d:
    cout, cin_g = weight.shape[:2]
    g = groups if groups is not None else conv.groups
    new = nn.Conv2d(cin_g * g, cout, conv.kernel_size, conv.stride, conv.padding, groups=g, bias=False)
    new.weight.data.copy_(weight)
    return new


def _bn_subset(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    for name in ("weight", "bias"):
        getattr(new, name).data.copy_(getattr(bn, name).data[keep])
    new.running_mean.copy_(bn.running_mean[keep])
    new.running_var.copy_(bn.running_var[keep])
    return new.train(bn.training)  # a fresh module is in training mode: keep the model's mode


@torch.no_grad()
def prune_pair(
    model: nn.Module,
    original: nn.Module,
    a: SeparableConv,
    b: SeparableConv,
    b_orig: SeparableConv,
    x: torch.Tensor,
    keep: int,
    positions: int = 10,
    seed: int = 0,
) -> int:
    """Thin the channels between separable convs ``a`` and ``b`` of ``model`` to ``keep`` (in place)."""
    d_full, _ = _capture(model, b.pw, x)  # B's depthwise output in the current (partly pruned) model
    _, y_full = _capture(original, b_orig.pw, x)  # target: the original model's pointwise output
    n, _, h, w = d_full.shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, h * w, (n, min(positions, h * w)), generator=g)
    d, y = _sample(d_full, idx), _sample(y_full, idx)
    wt = b.pw.weight[:, :, 0, 0].double().numpy()  # Cout × C
    gram = (d.T @ d) * (wt.T @ wt)
    lin = ((d.T @ y) * wt.T).sum(axis=1)
    kept = lasso_select(gram, lin, keep)
    w_new, *_ = np.linalg.lstsq(d[:, kept], y, rcond=None)  # k × Cout
    k = torch.as_tensor(kept)
    a.pw = _conv_like(a.pw, a.pw.weight[k])
    a.bn = _bn_subset(a.bn, k)
    b.dw = _conv_like(b.dw, b.dw.weight[k], groups=len(kept))
    b.pw = _conv_like(b.pw, torch.as_tensor(w_new.T, dtype=torch.float32)[:, :, None, None])
    return len(kept)


@torch.no_grad()
def check_blocks(model: nn.Module, blocks: Sequence[int]) -> None:
    """Refuse a model that is not an SE-Xception, and middle modules it lacks or that are named twice (a
    module pruned twice in one pass would regress its second cut against widths the first one changed)."""
    trunk = getattr(model, "trunk", None)
    if trunk is None or not hasattr(trunk, "middle"):
        raise ValueError("channel pruning needs an SE-Xception model (xception_se, xception_se_s)")
    bad = [i for i in blocks if not 0 <= i < len(trunk.middle)]
    if bad:
        raise ValueError(f"middle modules {bad} do not exist; this model has 0..{len(trunk.middle) - 1}")
    twice = sorted({i for i in blocks if list(blocks).count(i) > 1})
    if twice:
        raise ValueError(
            f"middle modules {twice} are named more than once: name each once (to thin one further, prune "
            "the pruned model again)"
        )


def prune_xception(
    model: nn.Module, images: torch.Tensor, blocks: Sequence[int], keep: float = 0.5, positions: int = 10
) -> nn.Module:
    """A pruned copy of an SE-Xception model: middle modules ``blocks`` keep ``keep`` of their inner channels.

    Args:
        model: an ``xception_se*`` model (eval mode is used; the model is not modified).
        images: normalised N×3×H×W calibration images (training products).
        blocks: middle-module indices to prune (the research pruned 3, 5 and 7 of 8).
        keep: fraction of each pruned layer's channels kept.
        positions: sampled spatial positions per image for the regressions.
    """
    check_blocks(model, blocks)
    original = copy.deepcopy(model).eval()
    pruned = copy.deepcopy(model).eval()
    mid = dict(getattr(model, "model_kwargs", {}).get("mid_channels") or {})
    for i in blocks:
        blk: XceptionBlock = pruned.trunk.middle[i]
        orig_blk: XceptionBlock = original.trunk.middle[i]
        widths = []
        for j in range(len(blk.convs) - 1):
            c = blk.convs[j].pw.out_channels
            k = max(8, int(round(c * keep)))
            widths.append(
                prune_pair(
                    pruned,
                    original,
                    blk.convs[j],
                    blk.convs[j + 1],
                    orig_blk.convs[j + 1],
                    images,
                    k,
                    positions,
                    seed=i * 10 + j,
                )
            )
        mid[str(i)] = widths
        log.info("pruned middle module %d to inner widths %s", i, widths)
    pruned.model_name = getattr(model, "model_name", None)
    pruned.model_kwargs = {**getattr(model, "model_kwargs", {}), "mid_channels": mid}
    return pruned


def prune_artifact(
    model_dir: str,
    shards: str,
    out: str,
    blocks: Sequence[int],
    keep: float = 0.5,
    calib_images: int = 256,
    positions: int = 10,
    speed_rounds: int = 5,
) -> dict:
    """Prune an SE-Xception artifact; write the pruned artifact to ``out``; return before/after figures.

    Calibration images come from the training split; accuracy is measured on the validation split, and the
    pruned model's temperatures and thresholds are refitted there, to the source's review-queue target (its
    ``review_share``, else its ``error_cut``).
    """
    import time
    from types import SimpleNamespace

    from fashionlabel import settings, storage
    from fashionlabel.data import load_samples, to_input
    from fashionlabel.shards import list_shards
    from fashionlabel.train.calibrate import calibrate, review_settings
    from fashionlabel.train.export import check_derived_out, check_replaceable, load_artifact, save_artifact

    settings.check(
        "prune",
        SimpleNamespace(keep=keep, calib_images=calib_images),
        {"keep": 0 < keep < 1, "calib_images": calib_images >= 1},
        "0 < keep < 1; calib images ≥ 1",
    )
    if storage.absolute(out).rstrip("/") == storage.absolute(model_dir).rstrip("/"):
        raise ValueError(f"--out {out} is the model being pruned: give the pruned model a folder of its own")
    check_replaceable(out)
    model, spec = load_artifact(model_dir)
    check_derived_out(out, spec["version"], "pruned_from")
    check_blocks(model, blocks)  # before the shards are read: decoding a catalog takes minutes
    tax, pre = spec["taxonomy_obj"], spec["preprocessing"]
    from fashionlabel.train.run import check_shard_labels, metrics_writer

    check_shard_labels(tax, shards)  # accuracy and the refitted calibration need the model's labels
    size = tuple(pre["size"])
    uris = list_shards(shards)
    train = load_samples(uris, tax, size, split="train")
    val = load_samples(uris, tax, size, split="val")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{shards} has no training or no validation products to prune with")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train), size=min(calib_images, len(train)), replace=False)
    x = to_input(train.images[np.sort(pick)], pre["mean"], pre["std"]).contiguous()
    t0 = time.time()
    model.model_kwargs = spec.get("model_kwargs", {})
    pruned = prune_xception(model, x, blocks, keep, positions)
    seconds = time.time() - t0

    before, _ = _measure(model, val, tax, pre)
    after, logits = _measure(pruned, val, tax, pre)
    before["label_img_per_cpu_s"], after["label_img_per_cpu_s"] = _cpu_speeds(
        model, pruned, size, speed_rounds
    )
    metrics: dict[str, Any] = {}
    # the same metrics.json as a trained artifact's, with the before/after figures beside them
    finalize = metrics_writer(shards, metrics, {"pruning": {"before": before, "after": after}})

    version = save_artifact(
        out,
        pruned,
        architecture=spec["architecture"],
        taxonomy=tax,
        preprocessing=pre,
        # the source's review-queue target: a model calibrated to flag at most 30% of the products was
        # refitted at the default error cut, and its pruned copy sent almost every product to review
        calibration=calibrate(tax, logits, val.targets, **review_settings(spec.get("calibration") or {})),
        model_kwargs=pruned.model_kwargs,
        training=spec.get("training", {})
        | {"pruned_from": spec["version"], "pruned_blocks": list(blocks), "keep": keep},
        finalize=finalize,
    )
    return {
        "before": before,
        "after": after,
        "metrics": metrics,
        "version": version,
        "seconds": seconds,
        "out": out,
        "val_products": len(val),
        "mid_channels": pruned.model_kwargs["mid_channels"],
    }


def _measure(m: nn.Module, val: Samples, tax: Taxonomy, pre: dict[str, Any]) -> tuple[dict, dict]:
    """Params, FLOPs and validation scores of ``m``, and its validation logits (for calibration)."""
    from fashionlabel.data import to_input
    from fashionlabel.models.profile import count_flops, count_params
    from fashionlabel.train.metrics import evaluate_probs, summary_scores

    with torch.inference_mode():
        logits: dict[str, Any] = {}
        for s in range(0, len(val), 256):
            for k, v in m(to_input(val.images[s : s + 256], pre["mean"], pre["std"])).items():
                logits.setdefault(k, []).append(v.float())
    logits = {k: torch.cat(v) for k, v in logits.items()}
    probs = {
        h.name: (
            torch.softmax(logits[h.name], 1) if h.kind == "single" else torch.sigmoid(logits[h.name])
        ).numpy()
        for h in tax.heads
    }
    fig = {"params": count_params(m), "flops": count_flops(m, tuple(pre["size"]))}
    fig |= summary_scores(evaluate_probs(tax, probs, val.targets))
    return fig, logits


def _cpu_speeds(
    before: nn.Module, after: nn.Module, size: tuple[int, int], rounds: int
) -> tuple[float, float]:
    """Images per CPU-second of both models, medians over ``rounds`` interleaved rounds.

    CPU time, not wall time: stays a property of the model on a shared machine. Rounds alternate which
    model goes first: one timing each gave 38 vs 60 img per CPU-second for a 12% FLOPs cut whose
    interleaved medians differ by 1.1x.
    """
    from fashionlabel.models.profile import inference_speed

    speeds: dict[str, list[float]] = {"before": [], "after": []}
    models = {"before": before, "after": after}
    for r in range(rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            speeds[name].append(inference_speed(models[name], size, batch=32, cpu_time=True))
    return float(np.median(speeds["before"])), float(np.median(speeds["after"]))
