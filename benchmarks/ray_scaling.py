"""Images per second: one process versus Ray Data with 1 and 2 encode workers, and Ray's overhead per image.

    .venv/bin/python benchmarks/ray_scaling.py [--images 96] [--batch-size 8] [--repeats 2] [--cpus N]

The job is `fgvr classify KB SOURCE --out PRED` without System 2 (threshold 0.5: escalations are marked, no
VLM runs), so the encoder is the bottleneck: a 5-shot EfficientNet-Lite0 base over Fashion-MNIST, queries
from the test split (28x28 PNGs, resized to 224x224 by the encoder). Each configuration runs the same
engine the CLI uses (`LocalEngine` / `RayEngine`) over the same images, `--repeats` times in turn, best run
kept (the usual filter on a shared machine). Threads: the single process uses torch's default (all cores);
a Ray encode actor gets cores / workers threads, so 1 worker has what the single process has.

Columns:
  wall (N img)   seconds from the call to the last record (Ray: includes starting the actors and pipeline)
  wall (2B img)  the same over two batches only: mostly the fixed cost (actor start-up, model loads)
  steady img/s   (N - 2B) / (wall N - wall 2B): throughput once running, fixed costs differenced out
  overhead       Ray's steady seconds per image minus the single process's, as a share of the latter
  tail img/s     the last two thirds of the records of the full run / the seconds they took to arrive (a
                 second estimate of the running throughput, from one run: start-up is over by then)
  CPU s per image  CPU seconds of this process and all below it (Ray's daemons, workers, actors) per image,
                 differenced the same way; CPU overhead = Ray's / the single process's - 1. Less sensitive
                 than wall time to other jobs on a shared machine.
  CPU s, 2 batches the CPU seconds of the short run: start-up (actor processes, imports, model loads)

Per-stage costs per image (decode, encode, System 1, trigger, decision) come from the single process's
records; they feed the throughput model in docs/SCALING.md. Targets (issue 13): 2 workers >= 1.6x one
worker (steady), overhead at 1 worker < 10%. The machine's load (uptime) is printed: on a shared machine
read the numbers with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr import fashion_mnist  # noqa: E402
from fgvr.collection import LocalEngine, list_source  # noqa: E402
from fgvr.pipeline import open_system  # noqa: E402


def prepare(work: Path, n: int) -> tuple[Path, list[str]]:
    """Support (5 per class, train split) and `n` query images (test split) as PNG folders; the base."""
    from fgvr.knowledge_base import build_knowledge_base

    train, test = fashion_mnist.load_split("train"), fashion_mnist.load_split("test")
    fashion_mnist.export_image_folder(train, fashion_mnist.sample_indices(train.labels, per_class=5),
                                      work / "support", prefix="train")
    queries = work / f"queries-{n}"
    fashion_mnist.export_image_folder(test, fashion_mnist.sample_indices(test.labels, total=n), queries,
                                      prefix="test")
    kb = work / "kb"
    if not (kb / "manifest.json").exists():
        build_knowledge_base(work / "support", kb, shots=5, progress=False)
    return kb, list_source(queries)


class CpuMeter:
    """CPU seconds used by this process and every process below it (Ray's raylet, GCS, workers, actors),
    sampled from /proc every 50 ms so actors that exit at the end of a pass are counted too. On a shared
    machine CPU seconds per image are a steadier measure of overhead than wall time."""

    def __init__(self) -> None:
        import threading

        self.tick = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (first, last) CPU seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> dict[int, float]:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                    stats[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / self.tick)
                except (OSError, IndexError, ValueError):
                    pass
        mine, frontier, out = set(), [os.getpid()], {}
        while frontier:
            p = frontier.pop()
            kids = [c for c, (pp, _) in stats.items() if pp == p and c not in mine]
            mine.update(kids)
            frontier += kids
        return {p: stats[p][1] for p in mine}

    def _run(self) -> None:
        t = time.thread_time()
        while not self.stop.is_set():
            for pid, cpu in self._cpu().items():
                first = self.seen.get(pid, (cpu, cpu))[0]
                self.seen[pid] = (first, cpu)
            self.stop.wait(0.05)
        self.own = time.thread_time() - t  # the sampling itself is not the job's cost

    def __enter__(self) -> "CpuMeter":
        self.base = dict(self._cpu())  # processes alive before: count only what they use from now
        self.self0 = sum(os.times()[:2])
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.seconds = sum(os.times()[:2]) - self.self0 - self.own + sum(
            last - self.base.get(pid, 0.0) for pid, (_, last) in self.seen.items())


def timed(engine, paths: list[str]) -> dict:
    t0 = time.perf_counter()
    results, arrivals = [], []
    with CpuMeter() as cpu:
        for _, res in engine.classify(paths):
            results += res
            arrivals.append((time.perf_counter() - t0, len(results)))
    wall = time.perf_counter() - t0
    assert len(results) == len(paths) and len({r.path for r in results}) == len(paths)
    # the last two thirds of the records, over the time they took to arrive: start-up is long over by then
    t_third = next(t for t, n in arrivals if n >= len(paths) / 3)
    n_third = next(n for t, n in arrivals if n >= len(paths) / 3)
    tail = (len(paths) - n_third) / (wall - t_third) if wall > t_third else float("nan")
    return {"wall": wall, "cpu": cpu.seconds, "tail": tail, "results": results}


def measured(make, paths: list[str], short: int) -> dict:
    """Fixed cost and throughput by differencing: a run over `short` images (start-up + a little work) and
    one over all; steady img/s = (N - short) / (wall_N - wall_short)."""
    a, b = timed(make(), paths[:short]), timed(make(), paths)
    dt = b["wall"] - a["wall"]
    return {"wall": b["wall"], "short_wall": a["wall"], "steady": (len(paths) - short) / dt if dt > 0 else float("nan"),
            "cpu_per_image": (b["cpu"] - a["cpu"]) / (len(paths) - short), "startup_cpu": a["cpu"], "tail": b["tail"],
            "results": b["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/cache/ray_scaling"))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    kb, paths = prepare(args.work, args.images)
    load_before = os.getloadavg()
    kwargs = dict(kb_path=str(kb.resolve()), threshold=0.5)
    import ray

    from fgvr.ray_run import RayEngine, connect

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect("local", num_cpus=args.cpus)
    rows: dict[str, dict] = {}
    with open_system(**kwargs) as system:
        system.classify_paths(paths[: args.batch_size])  # warm the single process (model loaded, caches)
        engines = {"single process": lambda: LocalEngine(system, args.batch_size),
                   "Ray, 1 worker": lambda: RayEngine(kwargs, system, workers=1, batch_size=args.batch_size),
                   "Ray, 2 workers": lambda: RayEngine(kwargs, system, workers=2, batch_size=args.batch_size)}
        for _ in range(args.repeats):
            for name, make in engines.items():
                got = measured(make, paths, short=2 * args.batch_size)
                best = rows.get(name)
                if best is None or got["steady"] > best["steady"]:
                    rows[name] = got
    ray.shutdown()
    load_after = os.getloadavg()

    single = rows["single process"]
    stages = {k: statistics.mean(r.timings.get(k, 0.0) for r in single["results"] if r.path_taken != "error")
              for k in ("decode", "encode", "fast", "trigger", "decide")}
    base = 1.0 / single["steady"]
    print(f"{len(paths)} Fashion-MNIST test images, batch {args.batch_size}, EfficientNet-Lite0 on CPU, "
          f"{os.cpu_count()} cores, Ray cluster of {args.cpus} CPUs, best of {args.repeats}")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min)\n")
    print(f"| run | wall s ({len(paths)} img) | wall s ({2 * args.batch_size} img) | steady img/s | vs 1 worker "
          "| overhead per image (wall) | tail img/s | CPU s per image | CPU overhead | CPU s, 2 batches |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    one = rows["Ray, 1 worker"]["steady"]
    out = {}
    for name, r in rows.items():
        over = "" if name == "single process" else f"{(1.0 / r['steady'] - base) * 1e3:+.1f} ms ({(1.0 / r['steady'] - base) / base:+.0%})"
        ratio = "" if name == "single process" else f"{r['steady'] / one:.2f}x"
        cpu_over = "" if name == "single process" else f"{r['cpu_per_image'] / single['cpu_per_image'] - 1:+.0%}"
        print(f"| {name} | {r['wall']:.1f} | {r['short_wall']:.1f} | {r['steady']:.2f} | {ratio} | {over} "
              f"| {r['tail']:.2f} | {r['cpu_per_image']:.3f} | {cpu_over} | {r['startup_cpu']:.1f} |")
        out[name] = {k: r[k] for k in ("wall", "short_wall", "steady", "tail", "cpu_per_image", "startup_cpu")}
    print("\nper image, single process (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items()))
    if args.json:
        args.json.write_text(json.dumps({"images": len(paths), "batch": args.batch_size, "cpus": args.cpus,
                                         "load": [load_before, load_after], "runs": out,
                                         "stages_ms": {k: v * 1e3 for k, v in stages.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
