"""Shard throughput: ``shard_catalog`` on Ray tasks vs a plain single-process loop doing the same work.

Both paths read and validate the same catalog with the same code, then run the same per-product function
(``shards.pack_row``: fetch the source bytes, decode and normalise — EXIF orientation, RGB, longest side ≤
--max-side, one JPEG quality — and take the sha256 of the source), write the JPEG and its JSON into tars of
--samples-per-shard products, and write index.parquet. The catalog repeats the extracted Fashion Product Images JPEGs under new ids until it holds
--products rows; it lives in a temp folder and is deleted afterwards.

    PYTHONPATH=$PWD python bench/shard_throughput.py                      # 50,000 products, all cores
    PYTHONPATH=$PWD python bench/shard_throughput.py --products 200000 --repeats 3
    PYTHONPATH=$PWD python bench/shard_throughput.py --products 5000 --http-latency 30   # a distant CDN

With ``--http-latency MS`` both paths fetch the images over HTTP from a local server that answers each
request after MS milliseconds, as a CDN or object store across a network does: there the fetches of a
shard task overlap (``--fetches-in-flight``), the plain loop's do not.

Ray is started once before timing (a job runs against a running cluster); worker start-up, task
scheduling, the catalog read, the plan, the merge and stats are all inside the timed job run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashionlabel import storage  # noqa: E402
from fashionlabel.catalog import FetchError, read_catalog, validate  # noqa: E402
from fashionlabel.images import ImageReject  # noqa: E402
from fashionlabel.shards import ShardConfig, index_schema, pack_row, shard_catalog  # noqa: E402
from fashionlabel.tarwriter import TarWriter  # noqa: E402
from fashionlabel.taxonomy import Taxonomy  # noqa: E402

# The Fashion Product Images dataset (styles.csv, image tars); FPI_DATA points at another copy.
DATA = Path(os.environ.get("FPI_DATA", "data/fashion-product-images"))
COLUMNS = [
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
]


def build_catalog(images: Path, styles: Path, n: int, out: Path, base: str | None = None) -> Path:
    """``n`` rows over the available images (absolute paths, or URLs under ``base``), repeated under new
    ids ``<id>r<k>``."""
    with open(styles, newline="", encoding="utf-8", errors="replace") as f:
        meta = {r["id"]: r for r in csv.DictReader(f)}
    ids = sorted(p.stem for p in images.glob("*.jpg") if p.stem in meta)
    if not ids:
        raise SystemExit(f"no images with a styles.csv row under {images}")
    path = out / "catalog.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "image_uri", *COLUMNS])
        for i in range(n):
            src = ids[i % len(ids)]
            w.writerow(
                [
                    f"{src}r{i // len(ids)}",
                    f"{base}/{src}.jpg" if base else str(images / f"{src}.jpg"),
                    *(meta[src][c] for c in COLUMNS),
                ]
            )
    return path


class _Distant(http.server.SimpleHTTPRequestHandler):
    """Serves the image folder, each answer after ``latency`` seconds (a network round trip away)."""

    latency = 0.0

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        time.sleep(self.latency)
        super().do_GET()


def serve(images: Path, latency_ms: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("Handler", (_Distant,), {"latency": latency_ms / 1000})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=images))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def baseline(catalog: Path, out: Path, taxonomy: Taxonomy, cfg: ShardConfig) -> tuple[int, float]:
    """The same work in one process, one product after the other."""
    t0 = time.perf_counter()
    rows, _ = read_catalog(str(catalog))
    valid, _ = validate(rows, str(catalog), taxonomy)
    out.mkdir(parents=True)
    index, rejected = [], 0
    for s in range(0, len(valid), cfg.samples_per_shard):
        name = f"shard-{s // cfg.samples_per_shard:06d}"
        tmp = out / f"{name}.tar.tmp"
        with TarWriter(open(tmp, "wb")) as tar:  # noqa: SIM115 - the writer closes it
            for r in valid[s : s + cfg.samples_per_shard]:
                try:
                    jpg, sidecar, entry = pack_row(r, name, cfg)
                except (FetchError, ImageReject):
                    rejected += 1
                    continue
                tar.add(f"{r.key}.jpg", jpg)
                tar.add(f"{r.key}.json", sidecar)
                index.append(entry)
        os.replace(tmp, out / f"{name}.tar")
    storage.write_parquet(pa.Table.from_pylist(index, schema=index_schema(taxonomy)), out / "index.parquet")
    return len(index), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--products", type=int, default=50_000)
    p.add_argument("--images", type=Path, default=Path("/tmp/fpi/images"))
    p.add_argument("--styles", type=Path, default=DATA / "styles.csv")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="Ray CPUs (default: all cores)")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="default: 1000, fewer when needed to give every worker at least 4 shards",
    )
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="alternate baseline/job runs; medians are quoted")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument(
        "--http-latency", type=float, default=0, help="serve the images over HTTP, MS ms a request"
    )
    p.add_argument("--fetches-in-flight", type=int, default=ShardConfig().fetches_in_flight)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # the labels come from the data set's styles.csv, which the repository does not hold: say where to look
    if not a.styles.is_file():
        raise SystemExit(
            f"no {a.styles}: set FPI_DATA to the Fashion Product Images folder (its styles.csv) or pass --styles"
        )
    # the catalog is written elsewhere: a relative image folder would resolve against it and miss them all
    a.images = a.images.absolute()
    if a.work:
        a.work.mkdir(parents=True, exist_ok=True)

    import ray

    load0 = os.getloadavg()[0]  # other work on the machine takes cores from both paths: print it
    server = None
    work = Path(tempfile.mkdtemp(prefix="shard-bench-", dir=a.work))
    try:
        server, base = serve(a.images, a.http_latency) if a.http_latency else (None, None)
        catalog = build_catalog(a.images, a.styles, a.products, work, base)
        taxonomy = Taxonomy.load("fashion-product-images")
        per_shard = a.samples_per_shard or max(100, min(1000, a.products // (4 * a.workers)))
        cfg = ShardConfig(
            samples_per_shard=per_shard, max_side=a.max_side, fetches_in_flight=a.fetches_in_flight
        )
        (work / "ray").mkdir()
        ray.init(
            num_cpus=a.workers,
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
            logging_level="WARNING",
            log_to_driver=False,
        )
        base, job = [], []
        for rep in range(a.repeats):
            # alternate which path goes first, so a change in the machine's load does not favour one
            for path in ("base", "job") if rep % 2 == 0 else ("job", "base"):
                # Flush the previous run's dirty pages first: the kernel's writeback would otherwise
                # charge one path's output to the CPU time of the next.
                os.sync()
                cpu0 = time.process_time()
                if path == "base":
                    n_b, t_b = baseline(catalog, work / f"base{rep}", taxonomy, cfg)
                    cpu_b = time.process_time() - cpu0
                else:
                    s = shard_catalog(str(catalog), str(work / f"job{rep}"), taxonomy, cfg)
                    cpu_driver = time.process_time() - cpu0
            assert s.packed == n_b, (s.packed, n_b)
            base.append(n_b / t_b)
            job.append(s.images_per_s)
            print(
                f"run {rep}: ratio {job[-1] / base[-1]:.2f}x   single process {n_b / t_b:,.0f} img/s ({t_b:.1f} s wall, {cpu_b:.1f} s CPU)   "
                f"shard_catalog {s.images_per_s:,.0f} img/s ({s.seconds:.1f} s wall: driver read+check "
                f"{s.timings['read_validate_s']:.1f} s, plan {s.timings['plan_s']:.1f} s; CPU: driver "
                f"{cpu_driver:.1f} s, tasks {s.timings['tasks_cpu_s']:.1f} s)   "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            shutil.rmtree(work / f"base{rep}")
            shutil.rmtree(work / f"job{rep}")
        ray.shutdown()
        b, j = statistics.median(base), statistics.median(job)
        print(
            f"\nproducts {a.products:,}  cores {os.cpu_count()}  ray workers {a.workers}  "
            f"load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f}  "
            f"samples/shard {per_shard}  repeats {a.repeats}  "
            + (f"images over HTTP, {a.http_latency:g} ms a request  " if server else "images on local disk  ")
            + f"fetches in flight per task {a.fetches_in_flight}"
        )
        print(f"single process : {b:,.0f} img/s (median)")
        print(f"shard_catalog  : {j:,.0f} img/s (median)")
        print(
            f"ratio          : {j / b:.2f}x (of the medians); "
            f"{statistics.median(x / y for x, y in zip(job, base, strict=True)):.2f}x (median of the per-run "
            f"ratios: each pair ran back to back, so drift in the machine's speed cancels)"
        )
    finally:
        if server:
            server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
