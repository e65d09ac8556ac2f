"""What does System 1 cost on top of the encoder, and how does it scale with the number of classes?

    .venv/bin/python benchmarks/fast_path.py [--images 128] [--batch-size 32] [--repeats 3]

Table 1, overhead (same loaded EfficientNet-Lite0, same decoded images, same process, CPU; the three
variants are timed alternately, `--repeats` times each, best run reported, the usual way to filter out a
noisy shared machine):

  bare forward      preprocess + encode_pixels, batch by batch: the floor, what the model alone costs
  System 1          the same + `system1` (fused posterior over all classes, top-k) + `trigger.decide`
  dual, no System 2 `DualSystem.classify_images` with no slow path: the same + decision + Result records

The base is a real Lite0 base over Fashion-MNIST (5 support images per class from the train split, fusion
and leave-one-out statistics as `build-kb` computes them); the queries are test-split images, resized by the
encoder to 224x224. Target (issue 4): System 1 at most 10% slower than the bare forward.

Table 2, scaling: System 1 (+ trigger) latency on random L2-normalised prototypes, D = 1280, 5 exemplars per
class, for C = 10 ... 10,000 classes; per batch of 1 and of `--batch-size` queries. Median of `--reps` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr import fashion_mnist  # noqa: E402
from fgvr.fast_path import system1  # noqa: E402
from fgvr.knowledge_base import KnowledgeBase, choose_fusion, retrieval_stats  # noqa: E402
from fgvr.models import parse_spec, registry  # noqa: E402
from fgvr.pipeline import DualSystem  # noqa: E402
from fgvr.trigger import Trigger  # noqa: E402


def lite0_kb(enc, shots: int) -> KnowledgeBase:
    split = fashion_mnist.load_split("train")
    idx = fashion_mnist.sample_indices(split.labels, per_class=shots, seed=0)
    ex = enc.encode_images(fashion_mnist.to_pil(split.images[idx]), batch_size=32)
    labels = torch.as_tensor(split.labels[idx], dtype=torch.int64)
    protos = torch.nn.functional.normalize(torch.zeros(len(fashion_mnist.CLASSES), ex.shape[1]).index_add_(0, labels, ex), dim=1)
    kb = KnowledgeBase(classes=list(fashion_mnist.CLASSES), encoder_spec=enc.spec.to_json(), encoder_key=enc.spec.key,
                       embed_dim=ex.shape[1], prototypes=protos, exemplars=ex, exemplar_labels=labels)
    kb.fusion = choose_fusion(kb)
    kb.stats = retrieval_stats(kb, kb.fusion)
    return kb


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def overhead_table(images: int, batch_size: int, repeats: int, shots: int) -> None:
    spec = parse_spec("efficientnet-lite0")
    with registry.use(spec) as enc:
        kb = lite0_kb(enc, shots)
        test = fashion_mnist.load_split("test")
        pil = fashion_mnist.to_pil(test.images[fashion_mnist.sample_indices(test.labels, total=images, seed=1)])
        trigger = Trigger(budget=0.3)
        trigger.calibrate_on_support(kb)
        dual = DualSystem(kb, enc, None, trigger, k=5)
        batches = [pil[i:i + batch_size] for i in range(0, len(pil), batch_size)]

        def bare():
            with torch.inference_mode():
                for b in batches:
                    enc.encode_pixels(enc.preprocess(b))

        split = {"forward": 0.0, "System 1 + trigger": 0.0, "forward ": 0.0, "System 1 + trigger + decision + records": 0.0}

        def fast():
            with torch.inference_mode():
                for b in batches:
                    t = time.perf_counter()
                    emb = enc.encode_pixels(enc.preprocess(b))
                    t1 = time.perf_counter()
                    trigger.decide(system1(kb, emb, k=5), kb)
                    split["forward"] += t1 - t
                    split["System 1 + trigger"] += time.perf_counter() - t1

        def full():
            for b in batches:
                t = time.perf_counter()
                with torch.inference_mode():
                    emb = enc.encode_images(b, batch_size=len(b))
                t1 = time.perf_counter()
                dual.classify_embeddings(emb, [f"img{i}" for i in range(len(b))], b)
                split["forward "] += t1 - t
                split["System 1 + trigger + decision + records"] += time.perf_counter() - t1

        bare()  # warm-up: first calls allocate and pick kernels
        runs = {"bare forward": [], "System 1": [], "dual, no System 2": []}
        for _ in range(repeats):
            runs["bare forward"].append(timed(bare))
            runs["System 1"].append(timed(fast))
            runs["dual, no System 2"].append(timed(full))
    best = {k: min(v) for k, v in runs.items()}
    print(f"\n## System 1 vs bare encoder forward: {images} Fashion-MNIST test images, 224x224, batch {batch_size}, "
          f"Lite0 CPU, base of 10 classes x {shots} shots, best of {repeats}\n")
    print("| variant | seconds | images/s | overhead vs bare |")
    print("| --- | --- | --- | --- |")
    for k, t in best.items():
        print(f"| {k} | {t:.3f} | {images / t:.1f} | {100 * (t / best['bare forward'] - 1):+.1f}% |")
    print("\nThe same, timed inside each batch (immune to the machine's load drifting between runs):\n")
    print("| part | seconds (all repeats) | share of the forward |")
    print("| --- | --- | --- |")
    print(f"| System 1 + trigger | {split['System 1 + trigger']:.4f} | "
          f"{100 * split['System 1 + trigger'] / split['forward']:.3f}% |")
    print(f"| System 1 + trigger + decision + Result records | {split['System 1 + trigger + decision + records']:.4f} | "
          f"{100 * split['System 1 + trigger + decision + records'] / split['forward ']:.3f}% |")
    print(f"\n(all runs, seconds: " + "; ".join(f"{k}: {', '.join(f'{x:.2f}' for x in v)}" for k, v in runs.items()) + ")")


def scaling_table(batch_size: int, reps: int, classes: list[int], dim: int = 1280, shots: int = 5) -> None:
    print(f"\n## System 1 latency vs number of classes: random prototypes, D={dim}, {shots} exemplars per class, "
          f"CPU float32, median of {reps}\n")
    print("| classes | exemplars | base MiB | B=1: system1 ms | B=1: +trigger ms | "
          f"B={batch_size}: system1 ms | B={batch_size}: per image ms | B={batch_size}: +trigger per image ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for c in classes:
        ex = torch.nn.functional.normalize(torch.randn(c * shots, dim, generator=g), dim=1)
        labels = torch.arange(c).repeat_interleave(shots)
        protos = torch.nn.functional.normalize(torch.zeros(c, dim).index_add_(0, labels, ex), dim=1)
        stats_n = torch.randint(1, 10, (c,), generator=g)
        kb = KnowledgeBase(classes=[str(i) for i in range(c)], encoder_spec={}, encoder_key="random", embed_dim=dim,
                           prototypes=protos, exemplars=ex, exemplar_labels=labels,
                           fusion={"w": 1.0, "tau": 0.05, "exemplar_weight": 0.5})
        kb.stats = type("S", (), {"pred_total": stats_n, "pred_correct": stats_n // 2})()
        trigger = Trigger(threshold=0.5)
        row = [f"{c:,}", f"{c * shots:,}", f"{(ex.numel() + protos.numel()) * 4 / 2**20:.1f}"]
        for b in (1, batch_size):
            q = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
            system1(kb, q)  # warm-up
            t_fast = statistics.median(timed(lambda: system1(kb, q)) for _ in range(reps))
            t_both = statistics.median(timed(lambda: trigger.decide(system1(kb, q), kb)) for _ in range(reps))
            if b == 1:
                row += [f"{1e3 * t_fast:.2f}", f"{1e3 * t_both:.2f}"]
            else:
                row += [f"{1e3 * t_fast:.2f}", f"{1e3 * t_fast / b:.3f}", f"{1e3 * t_both / b:.3f}"]
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7, help="repetitions per point of the scaling table")
    ap.add_argument("--classes", default="10,100,1000,10000")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice). On a busy shared machine 1 thread "
                         "avoids waiting for a second core's time slice in every small matmul.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if not args.skip_overhead:
        overhead_table(args.images, args.batch_size, args.repeats, args.shots)
    scaling_table(args.batch_size, args.reps, [int(x) for x in args.classes.split(",")])


if __name__ == "__main__":
    main()
