#!/usr/bin/env bash
# Every GPU figure of docs/models.md and bench/README.md, phase by phase, on one GPU machine.
#
#   bash bench/gpu_suite.sh DATA RESULTS PHASE...
#
# DATA holds the data set's styles.csv, images-60x80.tar and images-224.tar. RESULTS receives one log per
# phase (PHASE.log) and the JSON the phase writes; WORK (default /tmp/flgpu) holds images, shards and
# models between phases, so phases can run in separate calls on the same machine. Phases, in the order
# that gets the most out of a short lease:
#
#   prep              unpack the images, write the catalogs, shard them (60×80 full catalog; 224-px subset)
#   evaluate          re-evaluate a trained model on the held-out split (MODEL=..., default WORK/m_a)
#   train_throughput  bench/train_throughput.py: ResNet-50, 224 px, real shards against synthetic tensors
#   accuracy          cloth_resnet_a, 160×120, the long recipe (EPOCHS, default 45), then evaluate
#   hier              the same recipe with cloth_resnet_a_hier
#   cutmix            the same recipe with CutMix on half the batches (--cutmix 0.5), against `accuracy`
#   baseline          bench/train_baseline.py, 30 epochs, side by side with WORK/m_a (--against)
#   label             bench/label_throughput.py, 200,000 products of the 224-px images, both models, 2 runs
#   split             the decode-placement sweep: nvJPEG in the actor against a share decoded on the CPU
#   compile           bench/compile_startup.py: the AOT package against torch.compile at actor start
#
# EPOCHS (default 45) and GPU (default --gpu; empty for a CPU smoke run) set the training phases; PYTHON
# (default python3, the GPU image's interpreter) runs every step: give the venv's elsewhere.
# Each phase has a time limit (LIMIT seconds, default 570) so that it ends inside a 10-minute command;
# `accuracy` and `hier` resume from their checkpoints when run again with the same settings.
# Before the first phase a check of a few seconds stops the suite (exit 3, no phase run) when a package
# the phases import is missing or, for a GPU run, torch sees no GPU or cannot decode JPEGs on it: without
# it every phase would fail one by one, or the benches would measure the CPU and say so only in a header.
set -euo pipefail
[ $# -ge 3 ] || { sed -n "2,/^set -euo/{/^#/p}" "$0"; exit 2; }
data=$(realpath "$1"); results=$(realpath -m "$2"); shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/flgpu}
limit=${LIMIT:-570}
epochs=${EPOCHS:-45}
gpu=${GPU---gpu}  # GPU= (empty) trains on the CPU: a smoke run of the script itself
# The smoke run checks the script, not figures: the recipe's 2 warm-up epochs would exceed EPOCHS=1 (train
# refuses that), the baseline keeps to EPOCHS and the training-throughput bench to a few batches of a small
# model (ResNet-50 at 224 px on 2 CPU cores takes longer than LIMIT for its 36 steps even at batch 8).
warmup=$((epochs < 2 ? epochs : 2))
if [ -n "$gpu" ]; then
  baseline_epochs=30 tt_model=cloth_resnet_a tt_size="224 224" tt_batch=256 tt_steps=50 tt_device=cuda
else
  baseline_epochs=$epochs tt_model=fl_tiny tt_size="80 60" tt_batch=8 tt_steps=1 tt_device=cpu
fi
mkdir -p "$results" "$work"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_TMPDIR=${RAY_TMPDIR:-/tmp/flray}
# The GPU machine's image names its interpreter python3 (it has no `python`); a checkout elsewhere names its
# venv's (PYTHON=.venv/bin/python): the python3 on PATH there may lack torch, and every phase would fail.
py=${PYTHON:-python3}
python() { "$py" "$@"; }
fl() { python -m fashionlabel.cli "$@"; }

catalog() {  # catalog(images_dir, out_csv, all|present): every styles row, or those whose image is there
  python - "$data/styles.csv" "$1" "$2" "$3" <<'PY'
import csv, sys
from pathlib import Path
styles, images, out, which = sys.argv[1:]
with open(styles, newline="", encoding="utf-8", errors="replace") as f:
    rows = list(csv.DictReader(f))
have = {p.stem for p in Path(images).glob("*.jpg")}
cols = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage",
        "productDisplayName"]
with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["product_id", "image_uri", *cols])
    for r in rows:  # "all": a row without its image stays in, and the shard job quarantines it
        if which == "all" or r["id"] in have:
            w.writerow([r["id"], f"{images}/{r['id']}.jpg", *(r.get(c, "") for c in cols)])
print(f"{out}: {len(rows)} rows, {sum(r['id'] in have for r in rows)} with an image")
PY
}

recipe() {  # recipe(model, out, [option...]): the long 160×120 GPU recipe of docs/models.md
  fl train --shards "$work/s80" --out "$2" --model "$1" $gpu --workers 1 --epochs "$epochs" \
    --batch-size 128 --lr 2e-3 --weight-decay 0.05 --ema-epochs 3 --warmup-epochs "$warmup" \
    --label-smoothing 0.1 --patience "$epochs" --height 160 --width 120 "${@:3}"
  fl evaluate --model "$2" --shards "$work/s80" --split test --out "$results/$(basename "$2")-eval"
}

phase() {
  case "$1" in
    prep)
      mkdir -p "$work/images" "$work/images224"
      tar -xf "$data/images-60x80.tar" -C "$work/images" --strip-components=1
      tar -xf "$data/images-224.tar" -C "$work/images224" --strip-components=1
      catalog "$work/images" "$work/catalog.csv" all
      catalog "$work/images224" "$work/catalog224.csv" present  # a subset of the products
      fl shard --catalog "$work/catalog.csv" --out "$work/s80" --max-side 80 --samples-per-shard 2000
      fl shard --catalog "$work/catalog224.csv" --out "$work/s224" --max-side 224 --samples-per-shard 1000
      ;;
    evaluate) fl evaluate --model "${MODEL:-$work/m_a}" --shards "$work/s80" --split test --out "$results/eval" ;;
    train_throughput)
      python bench/train_throughput.py --shards "$work/s224" --model "$tt_model" --size $tt_size \
        --batch "$tt_batch" --steps "$tt_steps" --device "$tt_device"
      ;;
    accuracy) recipe cloth_resnet_a "$work/m_a" ;;
    hier) recipe cloth_resnet_a_hier "$work/m_hier" ;;
    cutmix) recipe cloth_resnet_a "$work/m_cutmix" --cutmix 0.5 ;;
    baseline)
      python bench/train_baseline.py --styles "$data/styles.csv" --images "$work/images" --epochs "$baseline_epochs" \
        --out "$results/baseline.json" --against "${MODEL:-$work/m_a}" --shards "$work/s80"
      ;;
    # label and split label the same 200,000-product shards: built once in WORK (1.3 GB, ~30 s), not per call
    label)
      python bench/label_throughput.py --images "$data/images-224.tar" --products 200000 --repeats 2 \
        --compile-cache warm --keep "$work/label-bench"
      ;;
    split)
      for share in 0 0.3 0.5 0.65; do
        python bench/label_throughput.py --images "$data/images-224.tar" --products 200000 --models resnet50 \
          --decode split --cpu-decode-share "$share" --compile-cache warm --keep "$work/label-bench"
      done
      ;;
    # 2 rounds: 3 (the script's default) of cold ResNet-50 compiles would outlast LIMIT before the table
    compile) python bench/compile_startup.py --models resnet50 --rounds 2 ;;
    *) echo "unknown phase: $1 (see: bash $0)" >&2; return 2 ;;
  esac
}

preflight() {  # what the phases need, checked in seconds before any of them runs
  python - "$gpu" <<'PY'
import importlib.util
import sys

gpu = bool(sys.argv[1])
# ray and webdataset are not in the GPU machine's image: they come from the staged wheels (bench/README.md)
missing = [m for m in ("torch", "torchvision", "ray", "webdataset", "pyarrow", "pandas", "PIL", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"preflight: cannot import {', '.join(missing)} (staged wheels installed, and their folder on PYTHONPATH?)")
import torch
import torchvision

print(f"preflight: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")
if gpu:
    if not torch.cuda.is_available():
        sys.exit("preflight: torch sees no GPU; GPU= (empty) runs the CPU smoke run on purpose")
    import io

    from PIL import Image
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    jpg = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    out = decode_jpeg([jpg, jpg], device="cuda")  # the labelling actors' batched nvJPEG call
    print(f"preflight: {torch.cuda.get_device_name()}, nvJPEG batch decode {tuple(out[0].shape)} on {out[0].device}")
PY
}

cd "$root"
if [ "$1" = --one ]; then phase "$2"; exit; fi  # one phase, under the loop's time limit below
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU visible: figures say nothing about one"
preflight || { echo "== stopped before the first phase: the check above failed" >&2; exit 3; }
for p in "$@"; do
  echo "== $p ($(date -u +%FT%TZ), limit ${limit}s)"
  start=$SECONDS
  # One log per phase. A phase that fails or runs out of time does not stop the next one: a training
  # phase stopped here resumes from its last epoch's checkpoint when run again.
  set +e
  timeout --kill-after=20 "$limit" bash "$0" "$data" "$results" --one "$p" 2>&1 | tee "$results/$p.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "== $p: exit $rc after $((SECONDS - start)) s" | tee -a "$results/$p.log"
done
