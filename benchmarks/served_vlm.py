"""System 2 on a served VLM: throughput and latency of the OpenAI-compatible backend, and fgvr's own share.

Starts tests/vlm_server.py (the tiny random Qwen2.5-VL answering from its real logits over HTTP on
loopback, batching whatever requests are waiting, up to --max-batch) and scores lettered questions on
random images through `fgvr.backends.openai_vlm` at each concurrency. Per request it times fgvr's side
(resize to the cap + PNG + base64 + JSON before sending; reading the answer after) and the wait for the
server; the share is fgvr's time over the request's whole time. The server's compute is a tiny model on
CPU here: with a 7B on a GPU each request takes longer and fgvr's (fixed) share is smaller.

    python benchmarks/served_vlm.py [--requests 48] [--concurrency 1,4,16] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

QUESTION = ("Which one of these is shown in the image?\nA. coat\nB. pullover\nC. shirt\nD. T-shirt\nE. dress\n"
            "Answer with the letter only.")


def start(model: Path, tmp: Path, max_batch: int, max_pixels: int) -> tuple[subprocess.Popen, str]:
    ready = tmp / "port"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "vlm_server.py"), "--model", str(model),
                             "--ready-file", str(ready), "--max-batch", str(max_batch), "--max-pixels", str(max_pixels)],
                            stdout=subprocess.DEVNULL)
    for _ in range(1200):
        if ready.is_file():
            return proc, f"http://127.0.0.1:{ready.read_text()}/v1"
        if proc.poll() is not None:
            raise SystemExit("the test server did not start")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the test server did not start within 120 s")


def run(url: str, concurrency: int, n: int, images: list[Image.Image], max_pixels: int) -> dict:
    from fgvr.backends import BackendOptions, get_backend

    b = get_backend(url, BackendOptions(max_pixels=max_pixels, concurrency=concurrency))
    b.score_options([QUESTION] * concurrency, images[:concurrency], [5] * concurrency)  # warm connections
    b.timings.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    got = b.score_options([QUESTION] * n, images[:n], [5] * n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(g.error is None for g in got), [g.error for g in got if g.error][:3]
    lat = sorted(sum(t) for t in b.timings)
    own = sum(p + r for p, _, r in b.timings) / sum(sum(t) for t in b.timings)
    b.close()
    return {"concurrency": concurrency, "requests": n, "mode": b.mode, "images_per_s": n / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "fgvr_ms": 1000 * sum(p + r for p, _, r in b.timings) / len(b.timings), "fgvr_share": own,
            "cpu_ms": 1000 * cpu / n, "cpu_share": (cpu / n) / statistics.mean(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's batch (continuous batching stand-in)")
    ap.add_argument("--visual-tokens", type=int, default=256, help="pixel cap in 28x28 tokens")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--server-delay", type=float, default=0.0,
                    help="extra seconds per server batch (a stand-in for a bigger model's compute)")
    ap.add_argument("--quick", action="store_true", help="16 requests per concurrency")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    n = 16 if a.quick else a.requests
    max_pixels = a.visual_tokens * 28 * 28
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (a.image_size, a.image_size, 3), dtype=np.uint8)) for _ in range(n)]
    import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_models.build_tiny_qwen(Path(tmp) / "tiny-qwen")
        proc, url = start(model, Path(tmp), a.max_batch, max_pixels)
        if a.server_delay:
            from vlm_client import admin

            admin(url, delay_s=a.server_delay)
        try:
            rows = [run(url, int(c), n, images, max_pixels) for c in a.concurrency.split(",")]
        finally:
            proc.kill()
    lines = [f"System 2 over HTTP on loopback: tests/vlm_server.py (tiny random Qwen2.5-VL, CPU, server batch "
             f"<= {a.max_batch}), {n} requests per row, {a.image_size}x{a.image_size} images at a "
             f"{a.visual_tokens}-token cap, 5 options, mode {rows[0]['mode']}"
             + (f", server +{a.server_delay:g} s per batch" if a.server_delay else ""),
             "",
             "| concurrency | images/s | p50 latency (ms) | p99 latency (ms) | fgvr-side wall per request (ms) | "
             "its share of the request | fgvr CPU per request (ms) | CPU share of mean latency |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['fgvr_ms']:.1f} | {100 * r['fgvr_share']:.1f}% | {r['cpu_ms']:.1f} | "
                     f"{100 * r['cpu_share']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    name = "served_vlm" + ("_quick" if a.quick else "") + ("_delay" if a.server_delay else "")
    (a.out / f"{name}.md").write_text(
        table + f"\n\ncommand: python benchmarks/served_vlm.py {' '.join(sys.argv[1:])}\n")


if __name__ == "__main__":
    main()
