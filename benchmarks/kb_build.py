"""How much does `build-kb` cost on top of the encoder's own forward pass?

    .venv/bin/python benchmarks/kb_build.py [--images 200] [--batch-size 32] [--repeats 2]

Same images, same loaded EfficientNet-Lite0, same process, CPU. Timed, alternating, `--repeats` times each
(the best run is reported, the usual way to filter out a noisy shared machine):

  bare forward        pixels already decoded and preprocessed in memory; only `encode_pixels` in batches
                      (the floor: what the model alone costs)
  bare decode+forward a plain loop: load_image + preprocess + encode_pixels, batch by batch, no threads
  build-kb            `build_knowledge_base` over the same images as the support set (k = all of them):
                      decode, encode, per-class partial files, leave-one-out statistics, fusion search,
                      atomic save; with the default decode workers (1 thread on CPU, see
                      `fgvr.knowledge_base.default_workers`) and with none (--workers 0)

The images are Fashion-MNIST product photos (28x28 PNGs, exported as an image folder, `--images` spread
evenly over the 10 classes); the encoder resizes them to 224x224, so decoding is cheap and the model
dominates, which is what makes the 10% target strict. Model loading is excluded everywhere (it is loaded
once before timing). The target of issue 3: build-kb at most 10% slower than the bare forward.

OpenMP wait policy: torch's CPU kernels use libgomp, whose threads spin between parallel regions. On a
machine shared with other busy processes, spinning threads that get descheduled make every barrier wait:
measured here, a Lite0 batch took 4.1 s with 2 threads against 2.1 s with 1. libgomp throttles the spinning
as soon as more OpenMP threads exist than CPUs, which the build's decode threads cause, so under load the
build looked 3x *faster* than the bare forward. To compare like with like, this script sets
OMP_WAIT_POLICY=PASSIVE (unless the caller set a policy) before torch starts; the header prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see the docstring; must precede importing torch

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr import fashion_mnist  # noqa: E402
from fgvr.data import load_image, read_dataset  # noqa: E402
from fgvr.knowledge_base import build_knowledge_base  # noqa: E402
from fgvr.models import parse_spec, registry  # noqa: E402


def export(n: int, root: Path) -> list[Path]:
    split = fashion_mnist.load_split("train")
    idx = fashion_mnist.sample_indices(split.labels, total=n, seed=0)
    return fashion_mnist.export_image_folder(split, idx, root, prefix="train")


def bare_forward(enc, pixels: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            enc.encode_pixels(pixels[i:i + batch_size])
    return time.perf_counter() - t0


def bare_decode_forward(enc, paths: list[Path], batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            enc.encode_pixels(enc.preprocess([load_image(p) for p in paths[i:i + batch_size]]))
    return time.perf_counter() - t0


PHASES: list[dict[str, float]] = []


def build(data: Path, out: Path, shots: int, batch_size: int, workers: int | None) -> float:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, summary = build_knowledge_base(data, out, shots=shots, seed=0, batch_size=batch_size,
                                          workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    if workers is None:
        PHASES.append(summary.phases | {"total": seconds})
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-workers0", action="store_true", help="skip the build without decode threads")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fgvr-kb-bench-"))
    try:
        data = tmp / "data"
        export(args.images, data)
        ds = read_dataset(data)
        paths = [s.path for s in ds.samples]
        shots = max(len(v) for v in ds.by_class().values())
        spec = parse_spec("efficientnet-lite0", device="cpu")
        with registry.use(spec) as enc:
            pixels = enc.preprocess([load_image(p) for p in paths])
            bare_forward(enc, pixels[: args.batch_size], args.batch_size)  # warm-up
            runs: dict[str, list[float]] = {}
            methods = {
                "bare forward (pixels in memory)": lambda: bare_forward(enc, pixels, args.batch_size),
                "bare decode+forward (no threads)": lambda: bare_decode_forward(enc, paths, args.batch_size),
                "build-kb (default workers)": lambda: build(data, tmp / "kb", shots, args.batch_size, None),
                "build-kb (--workers 0)": lambda: build(data, tmp / "kb", shots, args.batch_size, 0),
            }
            if args.no_workers0:
                del methods["build-kb (--workers 0)"]
            cpu: dict[str, list[float]] = {}
            for r in range(args.repeats):
                for name, fn in methods.items():
                    c0 = time.process_time()
                    runs.setdefault(name, []).append(fn())
                    cpu.setdefault(name, []).append(time.process_time() - c0)
                    print(f"run {r + 1}: {name}: {runs[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU",
                          file=sys.stderr, flush=True)
        n = len(paths)
        base = min(runs["bare forward (pixels in memory)"])
        print(f"\nkb_build: {n} Fashion-MNIST images ({len(ds.classes)} classes, k={shots}), EfficientNet-Lite0 "
              f"224px, batch {args.batch_size}, best of {args.repeats}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.1f}\n")
        cbase = min(cpu["bare forward (pixels in memory)"])
        print(f"| {'method':<36} | {'wall s':>7} | {'images/s':>8} | {'wall vs bare':>12} | {'CPU s':>7} | "
              f"{'CPU vs bare':>11} |")
        print(f"|{'-' * 38}|{'-' * 9}|{'-' * 10}|{'-' * 14}|{'-' * 9}|{'-' * 13}|")
        for name, times in runs.items():
            t, c = min(times), min(cpu[name])
            print(f"| {name:<36} | {t:7.2f} | {n / t:8.1f} | {t / base:11.3f}x | {c:7.2f} | {c / cbase:10.3f}x |")
        ratio = min(runs["build-kb (default workers)"]) / base
        cratio = min(cpu["build-kb (default workers)"]) / cbase
        print(f"\nbuild-kb overhead over the bare forward: {100 * (ratio - 1):+.1f}% wall, {100 * (cratio - 1):+.1f}% "
              "CPU time (target: at most +10%). CPU time (all threads of this process) is the steadier measure "
              "on a shared machine.")
        best = min(PHASES, key=lambda p: p["total"])
        print("build-kb phases of its best run (s): " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
        print("all runs (s): " + "; ".join(f"{k}: {', '.join(f'{t:.2f}' for t in v)}" for k, v in runs.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
