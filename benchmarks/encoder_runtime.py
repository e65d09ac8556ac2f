"""Images/s of the CPU encoders under torch eager and ONNX Runtime, side by side in one process.

    python benchmarks/encoder_runtime.py            # Lite0 and Lite2, batch 1/16/32
    python benchmarks/encoder_runtime.py --short    # fewer repetitions (a minute or two on 2 loaded cores)

Prints, per encoder and batch size: images/s for each runtime, their ratio, GFLOP/s, the share of the
machine's measured float32 peak (a large numpy matmul on the same threads), the largest feature difference
between the runtimes, and the load average (`uptime`) when each row was measured: on a shared machine the
absolute numbers move with the load, the side-by-side ratio much less. Both runtimes use the thread count of
`fgvr.threads` (FGVR_THREADS, else the cores available).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from fgvr.models import parse_spec, registry
from fgvr.threads import configure

# Multiply-adds x 2 per image at the input size the variant runs at (TF's EfficientNet-Lite table:
# Lite0 0.41 GMAC at 224 px is about 0.77 GFLOP with the convolutions' adds; Lite2 0.90 GMAC at 260 px).
GFLOP = {"efficientnet-lite0": 0.77, "efficientnet-lite2": 1.8}


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def peak_gflops(n: int = 2048, reps: int = 3) -> float:
    """Float32 matmul GFLOP/s on this process's threads: the best of `reps` n x n products."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def images_per_s(enc, pixels: torch.Tensor, seconds: float) -> float:
    """Encode `pixels` repeatedly for about `seconds` (after one warm-up call); images/s."""
    enc.encode_pixels(pixels)
    n, t0 = 0, time.perf_counter()
    while True:
        enc.encode_pixels(pixels)
        n += len(pixels)
        if time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="about 1 s per measurement instead of 4")
    ap.add_argument("--encoders", default="efficientnet-lite0,efficientnet-lite2")
    ap.add_argument("--batches", default="1,16,32")
    args = ap.parse_args()
    threads = configure()
    seconds = 1.0 if args.short else 4.0
    peak = peak_gflops()
    print(f"# threads {threads}, torch {torch.__version__}, measured float32 matmul peak {peak:.0f} GFLOP/s, "
          f"load average at start {load()}")
    print("| encoder | batch | torch img/s | ORT img/s | ORT/torch | torch GFLOP/s | ORT GFLOP/s (of peak) "
          "| max feature diff | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.encoders.split(","):
        with registry.use(parse_spec(name, runtime="torch")) as t_enc, \
                registry.use(parse_spec(name, runtime="onnx")) as o_enc:
            rng = torch.Generator().manual_seed(0)
            for b in (int(x) for x in args.batches.split(",")):
                pixels = torch.rand(b, 3, t_enc.image_size, t_enc.image_size, generator=rng) * 2 - 1
                diff = (t_enc.encode_pixels(pixels) - o_enc.encode_pixels(pixels)).abs().max().item()
                tv, ov = images_per_s(t_enc, pixels, seconds), images_per_s(o_enc, pixels, seconds)
                g = GFLOP[name]
                peak = max(peak, peak_gflops(reps=1))  # the load moves the peak too: keep the best seen
                print(f"| {name} | {b} | {tv:.1f} | {ov:.1f} | {ov / tv:.1f}x | {tv * g:.0f} | "
                      f"{ov * g:.0f} ({ov * g / peak:.0%}) | {diff:.1e} | {load()} |", flush=True)
    print(f"# peak float32 matmul, best seen over the run: {peak:.0f} GFLOP/s; load average at end {load()}")


if __name__ == "__main__":
    main()
