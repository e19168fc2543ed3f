"""Labelling throughput: ``fashionlabel label`` (Ray Data) against a plain WebDataset + DataLoader loop.

Both paths label the same shards with the same model artifact and write the same Parquet (the labels
schema, vectorised post-processing); the figure is products per second end to end, from "start" to
"every file written", model loading included. The run builds its own shards: the source JPEGs repeated
under new product ids until ``--products`` is reached (nothing is re-encoded: the tars hold the bytes).

    PYTHONPATH=$PWD python bench/label_throughput.py                   # this laptop: 20k products, CPU
    PYTHONPATH=$PWD python bench/label_throughput.py --products 200000 # GPU machine (see bench/README.md)

Models: the small default (``fl_small``) and a ResNet-50 (``cloth_resnet_a`` from the registry). Weights
are random: labelling speed does not depend on accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fashionlabel.data import decode
from fashionlabel.label.pipeline import LabelConfig, label_shards
from fashionlabel.label.postprocess import to_columns
from fashionlabel.label.predictor import Predictor
from fashionlabel.label.schema import labels_schema
from fashionlabel.models import create_model
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train.export import save_artifact

log = logging.getLogger("bench.label")
# Extracted 60×80 photos, else the dataset's 224-px tar (FPI_DATA: where the dataset is).
FPI_DATA = Path(os.environ.get("FPI_DATA", "data/fashion-product-images"))
SOURCES = [Path("/tmp/fpi/images"), FPI_DATA / "images-224.tar"]


# ---- models ------------------------------------------------------------------------------------------
def make_artifact(arch: str, out: Path, size: tuple[int, int]) -> Path:
    tax = Taxonomy.load("fashion-product-images")
    torch.manual_seed(0)
    model = create_model(arch, tax).eval()
    pre = {"size": list(size), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    save_artifact(out, model, architecture=arch, taxonomy=tax, preprocessing=pre)
    return out


# ---- data --------------------------------------------------------------------------------------------
def source_jpegs(path: str | None, limit: int = 5000) -> list[bytes]:
    """Up to ``limit`` JPEGs from a folder or a tar; synthetic 256-px photos when none is found."""
    candidates = [Path(path)] if path else SOURCES
    for p in candidates:
        if p.is_dir():
            return [f.read_bytes() for f in sorted(p.glob("*.jpg"))[:limit]]
        if p.is_file():
            with tarfile.open(p) as t:
                out = []
                for m in t:
                    if m.isfile() and m.name.endswith(".jpg"):
                        out.append(t.extractfile(m).read())
                        if len(out) >= limit:
                            break
                return out
    log.warning("no product images found; using synthetic 256-px JPEGs")
    return synthetic_jpegs(512)


def synthetic_jpegs(n: int, side: int = 256) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    out = []
    for _ in range(n):
        c = rng.uniform(0, 255, (3, 3))
        img = np.stack(
            [c[k, 0] + (c[k, 1] - c[k, 0]) * xx / side + c[k, 2] * np.sin(yy / 9) for k in range(3)], -1
        )
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_shards(jpegs: list[bytes], products: int, per_shard: int, out: Path) -> Path:
    """WebDataset shards (``key.jpg`` + ``key.json``) of ``products`` products, sources repeated."""
    out.mkdir(parents=True, exist_ok=True)
    shas = [hashlib.sha256(b).hexdigest() for b in jpegs]
    for s in range(0, products, per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, products)):
                k = i % len(jpegs)
                meta = json.dumps({"product_id": f"p{i:08d}", "sha256": shas[k], "labels": {}}).encode()
                for name, data in ((f"p{i:08d}.jpg", jpegs[k]), (f"p{i:08d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


# ---- the plain baseline ----------------------------------------------------------------------------------
class Clock:
    """End-to-end rate and steady rate (from the first labelled batch on, i.e. without start-up).

    Wall-clock times (``time.time``), so that a clock filled in another process compares with this one's."""

    MIN_BATCHES = 8  # fewer batches than this: no steady figure (a short run is all start-up)

    def __init__(self) -> None:
        self.t0, self.first, self.n, self.n_first, self.batches = time.time(), None, 0, 0, 0

    def __call__(self, rows: int) -> None:
        self.n += rows
        self.batches += 1
        if self.first is None:
            self.first, self.n_first = time.time(), self.n

    def rates(self, end: float | None = None) -> tuple[float, float]:
        t = end or time.time()
        ok = self.first is not None and t > self.first and self.batches >= self.MIN_BATCHES
        return self.n / (t - self.t0), (self.n - self.n_first) / (t - self.first) if ok else float("nan")


@dataclass(frozen=True)
class PlainRun:
    """One run of the plain loop: what it labels, with what, and into which file."""

    shards: str
    model: str
    out: str
    workers: int
    batch: int
    device: str
    compile: bool
    compile_cache: str | None


def plain_loop(run: PlainRun, clock: Clock) -> int:
    """webdataset + DataLoader(workers) + the same Predictor + the same post-processing + pyarrow writer."""
    import webdataset as wds

    shards, batch, device = Path(run.shards), run.batch, run.device
    if run.compile_cache:
        # The plain way to compile: torch.compile in the process, its kernels in inductor's cache folder
        # (a warm folder saves code generation, not the compile itself). Our path keeps an AOT package there.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = run.compile_cache
    pred = Predictor(run.model, device=device, batch_size=batch, compile=run.compile)
    size, tax = pred.size, pred.taxonomy
    schema = labels_schema(tax)

    def sample(s: dict) -> tuple[np.ndarray, str, str]:
        meta = json.loads(s["json"])
        return decode(s["jpg"], size), meta["product_id"], meta["sha256"]

    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    ds = wds.WebDataset(
        urls, shardshuffle=False, workersplitter=wds.split_by_worker, nodesplitter=None, empty_check=False
    ).map(sample)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        num_workers=run.workers,
        pin_memory=device == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if run.workers else None,
    )
    n = 0
    ident_of_run = {"model_version": pred.version, "taxonomy_version": tax.version, "run_id": "plain"}
    with pq.ParquetWriter(run.out, schema, compression="zstd") as w:
        for images, pids, shas in dl:
            cols = to_columns(tax, pred.probs_on_device(images), pred.calibration)
            m = len(pids)
            ident = {
                "product_id": pa.array(list(pids)),
                "image_sha256": pa.array(list(shas)),
                **{k: pa.array([v] * m) for k, v in ident_of_run.items()},
                "labeled_at": pa.array([time.time_ns() // 1000] * m, pa.timestamp("us", tz="UTC")),
                "error": pa.nulls(m, pa.string()),
            }
            w.write_table(pa.table({f.name: (ident | cols)[f.name] for f in schema}, schema=schema))
            n += m
            clock(m)
    return n


def plain_process(run: PlainRun) -> tuple[float, float, int]:
    """The plain loop as its user runs it: a fresh Python process (torch import and CUDA start-up included).

    Returns (end-to-end img/s from the spawn to the last row written, steady img/s, products)."""
    import subprocess

    cmd = [sys.executable, __file__, "--plain-child", json.dumps(asdict(run))]
    clock = Clock()  # started at the spawn
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        },
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLAIN ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"plain loop failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(lines[-1][6:])
    end = child.pop("end")
    vars(clock).update(child)  # the child's counts and first-batch time; the start stays the spawn
    return (*clock.rates(end), clock.n)


def _plain_child(spec: str) -> int:
    """Entry of :func:`plain_process`: run the plain loop, print wall-clock times as one JSON line."""
    clock = Clock()
    plain_loop(PlainRun(**json.loads(spec)), clock)
    print(
        "PLAIN "
        + json.dumps(
            {
                "first": clock.first,
                "n": clock.n,
                "n_first": clock.n_first,
                "batches": clock.batches,
                "end": time.time(),
            }
        ),
        flush=True,
    )
    return 0


# ---- one comparison ----------------------------------------------------------------------------------------
def compare(
    name: str,
    arch: str,
    jpegs: list[bytes],
    products: int,
    a: argparse.Namespace,
    root: Path,
    size: tuple[int, int],
    run_dir: Path,
) -> dict:
    """Ours against the plain loop on the same shards. The shards, kept in ``root``, depend only on the
    source images, the product count and the shard size: another model, or another call with the same
    ``--keep`` folder, labels the same tars. Everything a run writes or compiles goes in ``run_dir``, new
    for every call, so no run starts from another call's labels or compiled kernels."""
    work = run_dir / name
    sources = hashlib.sha256(b"".join(hashlib.sha256(j).digest() for j in jpegs)).hexdigest()[:12]
    shards = root / f"shards-{products}-of-{len(jpegs)}-{sources}-by-{a.samples_per_shard}"
    if not (shards / "_complete").exists():
        build_shards(jpegs, products, a.samples_per_shard, shards)
        (shards / "_complete").touch()
    model = make_artifact(arch, work / "model", size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, plain = [], []
    for r in range(a.repeats):
        # Each path compiles into a folder of its own, never the other's: with torch's one default folder
        # the path that runs second would start from the first one's kernels. Cold: an empty folder per
        # run (a fresh node); warm: one folder per path across runs (from run 2 on, a node's next night).
        cache = {
            k: str(
                run_dir
                / (f"compiled-{arch}-{k}-{r}" if a.compile_cache == "cold" else f"compiled-{arch}-{k}")
            )
            for k in ("ours", "plain")
        }
        cfg = LabelConfig(
            batch_size=a.batch_size,
            compile=a.compile,
            compile_cache=cache["ours"] if a.compile else None,
            decode=a.decode,
            cpu_decode_share=a.cpu_decode_share,
        )
        clock = Clock()
        s = label_shards(
            str(shards), str(model), str(work / f"labels-{r}"), "2026-01-01", cfg, progress=clock
        )
        ours.append(clock.rates())
        assert s["labelled"] == products, s
        run = PlainRun(
            str(shards),
            str(model),
            str(work / f"plain-{r}.parquet"),
            a.workers,
            s["batch_size"],
            device,
            a.compile,
            cache["plain"],
        )
        if a.plain_in_process:
            clock = Clock()
            n = plain_loop(run, clock)
            plain.append(clock.rates())
        else:
            *rates, n = plain_process(run)
            plain.append(tuple(rates))
        assert n == products
        # Where each path ran and how it was compiled, every run: a GPU that Ray did not see, or an AOT
        # package that fell back to torch.compile, would otherwise be measured without a word.
        print(
            f"  [{name} run {r + 1}/{a.repeats}] ours {ours[-1][0]:,.0f} img/s (steady {_num(ours[-1][1])}; "
            f"{s['actors']} actor(s) on {s['device']}, {s['compiled'] or 'eager'}, reads in {s['read']}, "
            f"decode {s['decode']}, batch {s['batch_size']})"
            f"   plain {plain[-1][0]:,.0f} img/s (steady {_num(plain[-1][1])}; "
            f"{device}, {'torch.compile' if a.compile else 'eager'})",
            flush=True,
        )
    agree = _agreement(work / "labels-0", work / "plain-0.parquet")
    o, p = (statistics.median(x[0] for x in ours), statistics.median(x[0] for x in plain))
    os_, ps = (statistics.median(x[1] for x in ours), statistics.median(x[1] for x in plain))
    return {
        "model": name,
        "products": products,
        "ours": o,
        "plain": p,
        "ratio": o / p,
        "steady_ours": os_,
        "steady_plain": ps,
        "agree": agree,
    }


def _num(x: float, spec: str = ",.0f", unit: str = "") -> str:
    """A figure, or a dash where a run was too short to have one (NaN)."""
    return "—" if math.isnan(x) else f"{x:{spec}}{unit}"


def _agreement(ours: Path, plain: Path) -> float:
    """Share of products whose articleType is the same in both outputs (pyarrow join: no DuckDB needed on a
    bare GPU machine)."""
    cols = ["product_id", "articleType"]
    a = pq.read_table([str(f) for f in sorted((ours / "history").glob("*/*.parquet"))], columns=cols)
    b = pq.read_table(plain, columns=cols).rename_columns(["product_id", "articleType_plain"])
    j = a.join(b, "product_id")
    return float(pc.mean(pc.cast(pc.equal(j["articleType"], j["articleType_plain"]), pa.int8())).as_py())


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--products", type=int, default=200_000 if gpu else 20_000, help="fl_small products")
    p.add_argument(
        "--resnet-products",
        type=int,
        default=None,
        help="ResNet-50 products (default: --products on a GPU, 2,000 on CPU: it is slow there)",
    )
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument(
        "--images",
        default=None,
        help="folder or tar of source JPEGs (default: /tmp/fpi/images, else $FPI_DATA/images-224.tar)",
    )
    p.add_argument("--synthetic", action="store_true", help="use synthetic 256-px JPEGs")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="model input (default: 80 60 for 60×80 sources, else 224 224)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the baseline")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--decode", default="auto", choices=["cpu", "gpu", "split", "auto"])
    p.add_argument(
        "--cpu-decode-share",
        type=float,
        default=0.5,
        help="with --decode split: share decoded by the read tasks",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=gpu,
        help="torch.compile in both paths (default: on with a GPU)",
    )
    p.add_argument(
        "--compile-cache",
        default="cold",
        choices=["cold", "warm"],
        help="where each path keeps what it compiled (ours: an AOT package, plain: torch.compile's kernels): "
        "cold, an empty folder every run (a fresh node); warm, one folder per path across runs, so runs "
        "after the first start from what the path itself compiled before",
    )
    p.add_argument("--models", nargs="+", default=["small", "resnet50"], choices=["small", "resnet50"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--keep",
        default=None,
        help="work folder to keep; calls given the same one build the shards once and share them, each "
        "call's labels and compiled models in a folder of its own (default: a temp folder, deleted)",
    )
    p.add_argument(
        "--plain-in-process",
        action="store_true",
        help="run the plain loop inside this process, where torch is already imported and the GPU "
        "already initialised (default: a fresh process, as its user runs it)",
    )
    p.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.plain_child:
        return _plain_child(a.plain_child)
    logging.basicConfig(level=logging.WARNING)
    import ray

    jpegs = synthetic_jpegs(512) if a.synthetic else source_jpegs(a.images)
    from PIL import Image

    side = max(Image.open(io.BytesIO(jpegs[0])).size)
    size = tuple(a.size) if a.size else ((80, 60) if side <= 100 else (224, 224))
    archs = {
        "small": ("fl_small", a.products),
        "resnet50": ("cloth_resnet_a", a.resnet_products or (a.products if gpu else 2000)),
    }
    root = Path(a.keep or tempfile.mkdtemp(prefix="label-bench-"))
    run_dir = root / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    print(
        f"label throughput: {len(jpegs)} source JPEGs ({side}px), model input {size}, "
        f"{os.cpu_count()} CPUs, {'GPU ' + torch.cuda.get_device_name() if gpu else 'no GPU'}, "
        f"compile={a.compile} ({a.compile_cache} cache), baseline DataLoader workers={a.workers} "
        f"({'in this process' if a.plain_in_process else 'in a fresh process'})",
        flush=True,
    )
    results = []
    try:
        for m in a.models:
            arch, n = archs[m]
            results.append(compare(f"{m} ({arch})", arch, jpegs, n, a, root, size, run_dir))
    finally:
        ray.shutdown()
        if not a.keep:  # gigabytes of shards and labels at GPU sizes, one folder per call
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nmedian of {a.repeats} run(s); end to end (model loading and start-up included), then steady "
        f"(from the first labelled batch on)"
    )
    print(
        f"{'model':<28} {'products':>9} {'ours img/s':>11} {'plain img/s':>12} {'ratio':>6}   "
        f"{'steady ours':>11} {'plain':>7} {'ratio':>6} {'same labels':>12}"
    )
    for r in results:
        print(
            f"{r['model']:<28} {r['products']:>9,} {r['ours']:>11,.0f} {r['plain']:>12,.0f} "
            f"{r['ratio']:>5.2f}×   {_num(r['steady_ours']):>11} {_num(r['steady_plain']):>7} "
            f"{_num(r['steady_ours'] / r['steady_plain'], '.2f', '×'):>6} {100 * r['agree']:>11.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
