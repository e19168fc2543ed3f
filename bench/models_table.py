"""Cost of every registered model on this machine: params, FLOPs, training and labelling images/s.

    PYTHONPATH=. python bench/models_table.py [--threads 2] [--out bench/models_table.json]

FLOPs from torch.utils.flop_counter (2 per multiply-add); speeds are medians of short timed runs on
random tensors (fp32, channels_last, CPU unless --device cuda), so they measure the model, not the input
pipeline. Prints a markdown table for docs/models.md and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from fashionlabel.models import create_model, list_models, reparameterize_model
from fashionlabel.models.profile import count_flops, count_params, inference_speed, train_speed
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger("bench")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--out", default="bench/models_table.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-time", action="store_true", help="images per CPU-second (for shared machines)")
    p.add_argument("--batch", type=int, default=32, help="training batch at 60×80 (224: a quarter of it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    tax = Taxonomy.load("fashion-product-images")
    rows = []
    for name in a.models.split(","):
        model = create_model(name, tax)
        deploy = reparameterize_model(model.eval())
        row = {
            "model": name,
            "params_m": count_params(model) / 1e6,
            "gflops_60x80": count_flops(deploy, (80, 60)) / 1e9,
            "gflops_224": count_flops(deploy, (224, 224)) / 1e9,
            "train_img_s_60x80": train_speed(model, (80, 60), a.batch, 2, a.device, a.cpu_time),
            "label_img_s_60x80": inference_speed(deploy, (80, 60), 2 * a.batch, 3, a.device, a.cpu_time),
            "train_img_s_224": train_speed(model, (224, 224), max(1, a.batch // 4), 2, a.device, a.cpu_time),
            "label_img_s_224": inference_speed(
                deploy, (224, 224), max(1, a.batch // 2), 3, a.device, a.cpu_time
            ),
        }
        log.info("%s", row)
        rows.append(row)
    with open(a.out, "w") as f:
        json.dump(
            {
                "threads": a.threads,
                "device": a.device,
                "cpu_time": a.cpu_time,
                "load_avg": os.getloadavg(),
                "rows": rows,
            },
            f,
            indent=2,
        )
    unit = "img/CPU-s" if a.cpu_time else "img/s"
    print(
        f"| model | params (M) | GFLOPs 60×80 | GFLOPs 224 | train {unit} 60×80 | label {unit} 60×80 | "
        f"train {unit} 224 | label {unit} 224 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params_m']:.2f} | {r['gflops_60x80']:.3f} | {r['gflops_224']:.2f} | "
            f"{r['train_img_s_60x80']:.0f} | {r['label_img_s_60x80']:.0f} | {r['train_img_s_224']:.1f} | "
            f"{r['label_img_s_224']:.1f} |"
        )


if __name__ == "__main__":
    main()
