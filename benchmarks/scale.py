"""Does `fgvr evaluate` (and `fgvr bench`) keep its memory flat as the test set grows to ImageNet's size?

    .venv/bin/python benchmarks/scale.py                       # 1,000 classes x 16 shots, N = 5k, 20k, 50k
    .venv/bin/python benchmarks/scale.py --quick               # 100 classes x 4 shots, N = 500, 2,000 (< 3 min)
    .venv/bin/python benchmarks/scale.py --n 5000,20000 --via bench --out benchmarks/results/scale.json

A generated ImageNet-1k replica in a temporary folder (torchvision's layout, the one `fgvr bench imagenet`
reads: `imagenet/images/train/<wnid>/`, `imagenet/images/val/<wnid>/`, `imagenet/classnames.txt`): small
JPEGs (`--size`, 32x32 by default), a colour and noise pattern per class, `--shots` train images per class
and max(N) validation images spread round-robin over the classes. Then, on CPU with the default encoder:

  --via evaluate (default)  `fgvr build-kb` once (its own row), then for every N a fresh `fgvr evaluate
                            KB val/ --limit N` (the run-calibrated default: pass 1 encodes and caches,
                            the threshold is computed, pass 2 decides), each in its own child process;
  --via bench               for every N a fresh `fgvr bench imagenet --shots K --seeds 0 --limit N` (the
                            base is built in every row, so the rows compare like with like).

Per row: N, the child's peak RSS (`os.wait4`'s rusage of that child alone), the test images per second the
run reports (`summary.json`: images / wall of the evaluation, model loading excluded), and the RSS added
per 1,000 test images from one N to the next: the number that says whether memory grows with N. (At a few
dozen images the runtime's own warm-up, a fixed cost, still shows between the first two rows.)
Timings are only meaningful on a quiet machine; run it there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"


def write_replica(top: Path, classes: int, shots: int, n_test: int, size: int, seed: int = 0) -> Path:
    """The ImageNet replica under `top/imagenet`; returns that folder. Class c is wnid n{c:08d}."""
    root = top / "imagenet"
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (classes, 3))
    wnids = [f"n{c:08d}" for c in range(classes)]

    def image(path: Path, c: int) -> None:
        a = np.broadcast_to(colours[c], (size, size, 3)).astype(np.int64)
        a = a + rng.integers(-30, 30, a.shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)

    for c, w in enumerate(wnids):
        for i in range(shots):
            image(root / "images" / "train" / w / f"{w}_{i}.JPEG", c)
    for n in range(n_test):
        c = n % classes
        image(root / "images" / "val" / wnids[c] / f"ILSVRC2012_val_{n + 1:08d}.JPEG", c)
    (root / "classnames.txt").write_text("".join(f"{w} class {c}\n" for c, w in enumerate(wnids)))
    return root


def run_child(args: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of `fgvr ARGS` in a child process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from fgvr.cli import main; sys.argv = ['fgvr'] + sys.argv[1:]; main()"
    t0 = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 classes x 4 shots, N = 500,2000 (under 3 minutes)")
    p.add_argument("--classes", type=int, default=None, help="default 1000 (100 with --quick)")
    p.add_argument("--shots", type=int, default=None, help="default 16 (4 with --quick)")
    p.add_argument("--n", default=None, help="test set sizes, comma list (default 5000,20000,50000)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--via", choices=("evaluate", "bench"), default="evaluate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    classes = a.classes or (100 if a.quick else 1000)
    shots = a.shots or (4 if a.quick else 16)
    sizes = sorted(int(x) for x in (a.n or ("500,2000" if a.quick else "5000,20000,50000")).split(","))
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fgvr-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(work, classes, shots, sizes, a)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, classes, shots, a)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"classes": classes, "shots": shots, "image_size": a.size, "via": a.via,
                                     "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows},
                                    indent=2) + "\n")


def measure(work: Path, classes: int, shots: int, sizes: list[int], a: argparse.Namespace) -> list[dict]:
    t0 = time.perf_counter()
    root = write_replica(work / "data", classes, shots, max(sizes), a.size)
    print(f"replica: {classes} classes x {shots} shots + {max(sizes):,} test images of {a.size}x{a.size} in "
          f"{time.perf_counter() - t0:.0f} s under {root}", file=sys.stderr)
    rows = []
    if a.via == "evaluate":
        kb = work / "kb"
        rc, wall, rss = run_child(["build-kb", str(root / "images" / "train"), "--shots", str(shots), "--out",
                                   str(kb), "--batch-size", str(a.batch_size)], work / "build-kb.log")
        check(rc, work / "build-kb.log")
        rows.append({"step": "build-kb", "images": classes * shots, "peak_rss_bytes": rss, "wall_s": wall,
                     "images_per_s": classes * shots / wall})
    for n in sizes:
        run = work / f"run-{n}"
        if a.via == "evaluate":
            args = ["evaluate", str(kb), str(root / "images" / "val"), "--limit", str(n), "--out", str(run),
                    "--batch-size", str(a.batch_size)]
            summary_file = run / "summary.json"
        else:
            args = ["bench", "imagenet", "--root", str(root), "--shots", str(shots), "--seeds", "0", "--limit",
                    str(n), "--out", str(run)]
            summary_file = run / f"k{shots}-seed0" / "run" / "summary.json"
        log = work / f"{a.via}-{n}.log"
        rc, wall, rss = run_child(args, log)
        check(rc, log)
        s = json.loads(summary_file.read_text())
        rows.append({"step": a.via, "images": s["n_images"], "peak_rss_bytes": rss, "wall_s": wall,
                     "images_per_s": s["run"]["images_per_s_this_process"], "accuracy": s["accuracy"]})
        print(f"N={n:,}: peak RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
    return rows


def check(rc: int, log: Path) -> None:
    if rc != 0:
        sys.exit(f"a child failed (exit {rc}); its output: {log}\n" + log.read_text(errors="replace")[-3000:])


def print_table(rows: list[dict], classes: int, shots: int, a: argparse.Namespace) -> None:
    runs = [r for r in rows if r["step"] != "build-kb"]
    print(f"\n{classes} classes, {shots} shots, {a.size}x{a.size} JPEGs, via `fgvr {a.via}`, CPU, "
          f"{os.cpu_count()} CPUs, {platform.platform()}\n")
    print("| step | images | peak RSS (MiB) | images/s | RSS added per 1,000 more test images than the row above (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        grow = ""
        i = next((j for j, x in enumerate(runs) if x is r), 0)
        if i > 0 and r["images"] > runs[i - 1]["images"]:
            prev = runs[i - 1]
            grow = f"{(r['peak_rss_bytes'] - prev['peak_rss_bytes']) / 2**20 / ((r['images'] - prev['images']) / 1000):+.2f}"
        ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "n/a"
        print(f"| {r['step']} | {r['images']:,} | {r['peak_rss_bytes'] / 2**20:.0f} | {ips} | {grow} |")


if __name__ == "__main__":
    main()
