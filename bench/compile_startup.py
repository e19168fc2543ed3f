"""Start-up of a compiled labelling actor: our AOT package vs ``torch.compile``, each in a fresh process.

Every labelling actor is a new process. With ``--compile`` it has to compile the model before its first
batch, and on a GPU that start-up is most of a 200,000-product run (bench/README.md). Our path keeps the
compiled model as an AOT package in the node's compile cache folder (``fashionlabel.label.aot``); the plain
way is ``torch.compile`` in every process, with inductor's kernel cache folder. Both are measured cold (an
empty folder: a fresh node) and warm (the folder an earlier process filled: the next actor or night), with
eager beside them, each in a fresh Python process, rounds interleaved. Printed per mode: seconds from
process start to the first labelled batch (imports included) and steady img/s after it, as medians, and
the ratios of our path to the plain one.

    PYTHONPATH=. python bench/compile_startup.py                       # fl_small, CPU 80×60 / GPU 224
    PYTHONPATH=. python bench/compile_startup.py --models small resnet50 --rounds 3
"""

import time

STARTED = time.monotonic()  # before torch is imported: a fresh actor pays the import too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ARCH = {"small": "fl_small", "resnet50": "cloth_resnet_a"}
# mode: (compile, where the folder goes: None, "jit" → TORCHINDUCTOR_CACHE_DIR, "aot" → compile_cache)
MODES = {
    "eager": (False, None),
    "compile cold": (True, "jit"),
    "compile warm": (True, "jit"),
    "ours cold": (True, "aot"),
    "ours warm": (True, "aot"),
}


def child(a: argparse.Namespace) -> None:
    """One actor's life: build the predictor, label one batch, then ``--batches`` more at steady state."""
    import numpy as np

    from fashionlabel.label.predictor import Predictor

    compile, where = MODES[a.mode]
    if where == "jit":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = a.folder
    pred = Predictor(
        a.model,
        device=a.device,
        batch_size=a.batch,
        compile=compile,
        compile_cache=a.folder if where == "aot" else None,
    )
    h, w = pred.size
    images = np.random.default_rng(0).integers(0, 256, (a.batch, h, w, 3), dtype=np.uint8)
    pred.probs_on_device(images)
    first = time.monotonic() - STARTED
    t = time.monotonic()
    for _ in range(a.batches):
        pred.probs_on_device(images)
    rate = a.batch * a.batches / (time.monotonic() - t)
    print(json.dumps({"first": first, "rate": rate, "how": pred.compiled_from or "eager"}))


def run_child(mode: str, model: Path, folder: Path, a: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--folder", str(folder)]
    cmd += ["--device", device, "--batch", str(a.batch), "--batches", str(a.batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode}: the child process failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, root: Path, a: argparse.Namespace, device: str, size: tuple[int, int]) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from label_throughput import make_artifact

    model = make_artifact(ARCH[name], root / name / "model", size)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    warm = {"jit": root / name / "warm-jit", "aot": root / name / "warm-aot"}
    for where, folder in warm.items():  # an earlier process filled each warm folder
        run_child("compile warm" if where == "jit" else "ours warm", model, folder, a, device)
    for r in range(a.rounds):
        for mode, (_, where) in MODES.items():
            folder = root / name / f"{mode.replace(' ', '-')}-{r}"
            if mode.endswith("warm"):
                folder = warm[where]
            res = run_child(mode, model, folder, a, device)
            results[mode].append(res)
            print(
                f"  [{name} round {r + 1}/{a.rounds}] {mode:13s} first batch after {res['first']:6.1f} s, "
                f"then {res['rate']:8,.0f} img/s ({res['how']})",
                flush=True,
            )
        for mode in MODES:
            if mode.endswith("cold"):  # one round's empty folders are not reused
                shutil.rmtree(root / name / f"{mode.replace(' ', '-')}-{r}", ignore_errors=True)
    return {
        m: {k: statistics.median(x[k] for x in rs) for k in ("first", "rate")} for m, rs in results.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small"], choices=list(ARCH))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="default: 512 on a GPU, 256 on CPU")
    p.add_argument("--batches", type=int, default=20, help="batches timed after the first")
    p.add_argument("--size", default=None, help="HxW model input (default: 224x224 on a GPU, 80x60 on CPU)")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder)")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.mode = a.child
        return child(a)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.batch = a.batch or (512 if device == "cuda" else 256)
    size = tuple(int(v) for v in (a.size or ("224x224" if device == "cuda" else "80x60")).split("x"))
    what = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"compile start-up: {what}, batch {a.batch}, input {size[0]}x{size[1]}, {a.rounds} round(s), "
        f"each mode a fresh process"
    )
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="compile-bench-"))
    table = {name: bench_model(name, root, a, device, size) for name in a.models}
    print(f"\n{'model':10s} {'mode':14s} {'first batch s':>13s} {'steady img/s':>13s}")
    for name, res in table.items():
        for mode, r in res.items():
            print(f"{name:10s} {mode:14s} {r['first']:13.1f} {r['rate']:13,.0f}")
        ours, plain, eager = res["ours warm"], res["compile warm"], res["eager"]
        print(
            f"{name}: warm start-up, torch.compile / ours: {plain['first'] / ours['first']:.2f}x "
            f"({plain['first']:.1f} s vs {ours['first']:.1f} s; eager {eager['first']:.1f} s); "
            f"cold: {res['compile cold']['first'] / res['ours cold']['first']:.2f}x; "
            f"steady ours / eager {ours['rate'] / eager['rate']:.2f}x, "
            f"ours / torch.compile {ours['rate'] / plain['rate']:.2f}x"
        )
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
