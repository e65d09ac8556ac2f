"""The whole job under each runtime, side by side: `fgvr demo`, `fgvr build-kb` and `fgvr bench fashion-mnist`.

    .venv/bin/python benchmarks/whole_job.py [--repeats 3] [--demo-test-images 500] [--kb-shots 16] \
        [--bench-limit 200] [--jobs demo,build-kb,bench] [--out benchmarks/results/whole_job.md]

Each job runs as a subprocess of the real CLI (`python -c "from fgvr.cli import main; main()" --runtime R ...`,
this checkout's src first on PYTHONPATH), once under `--runtime torch` and once under `--runtime onnx` per
repeat, the order alternating (torch first in odd repeats, onnx first in even ones) so that a load that comes
and goes on a shared machine does not favour one runtime. Every run writes into a fresh temporary folder
(the demo and bench reuse what they find in theirs), so nothing is resumed. Reported per job: the median
wall seconds of each runtime, the ratio torch/onnx (the speed-up; issue 21 asks for at least 2.5x), the
median CPU seconds of the child (user + system, from wait4), and every run.

Before timing, one untimed tiny `fgvr demo` per runtime (1 shot, 4 test images) loads the weights into the
page cache and makes ONNX Runtime's exported graphs (Lite0 and the re-ranker's Lite2; cached beside the
weights, made once), so neither the first torch run pays for a cold disk nor the first onnx run for the export.

The build-kb job reads a Fashion-MNIST support folder (`--kb-shots` per class from the train split, seed 0),
exported once before timing, the same way the demo exports its own. The machine, the load average
(`uptime`) at start and end and the command line are printed with the table; `--out` writes it (and a
.json beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import cli_env, uptime  # noqa: E402  (serve_load puts this checkout's src on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnx")
CLI = [sys.executable, "-c", "from fgvr.cli import main; main()"]


@dataclass
class Run:
    """One timed subprocess."""

    job: str
    runtime: str
    repeat: int
    wall_s: float
    cpu_s: float
    load_before: float


def timed(argv: list[str], log: Path) -> tuple[float, float]:
    """Run `argv` to completion; (wall seconds, child CPU seconds). A failure stops the benchmark, with the
    tail of the child's output, since a table of a failed job would be a lie."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with log.open("wb") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT).returncode
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        sys.exit(f"{' '.join(argv[3:])} exited with {rc}; its output ends:\n{tail}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def export_support(root: Path, shots: int) -> Path:
    """`shots` Fashion-MNIST train images per class as an image folder (the demo's own export, seed 0)."""
    from fgvr import fashion_mnist as fm

    train = fm.load_split("train")
    fm.export_image_folder(train, fm.sample_indices(train.labels, per_class=shots, seed=0), root, prefix="train")
    return root


def jobs(a: argparse.Namespace, support: Path) -> dict[str, Callable[[str, Path], list[str]]]:
    """Job name -> (runtime, fresh output folder) -> the CLI's arguments after `fgvr`."""
    demo_n = ["--test-images", str(a.demo_test_images)] if a.demo_test_images else []
    return {
        "demo": lambda rt, out: ["--runtime", rt, "demo", "--out", str(out), *demo_n],
        "build-kb": lambda rt, out: ["--runtime", rt, "build-kb", str(support), "--shots", str(a.kb_shots),
                                     "--out", str(out / "kb")],
        "bench": lambda rt, out: ["--runtime", rt, "bench", "fashion-mnist", "--shots", a.bench_shots,
                                  "--seeds", a.bench_seeds, "--limit", str(a.bench_limit), "--no-reports",
                                  "--out", str(out / "bench")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="Runs of each job under each runtime (default 3).")
    ap.add_argument("--jobs", default="demo,build-kb,bench", help="Which jobs, comma-separated (default all).")
    ap.add_argument("--demo-test-images", type=int, default=None, help="fgvr demo --test-images (its default: 500).")
    ap.add_argument("--kb-shots", type=int, default=16, help="Support images per class for build-kb (default 16).")
    ap.add_argument("--bench-shots", default="5", help="fgvr bench --shots (default 5).")
    ap.add_argument("--bench-seeds", default="0", help="fgvr bench --seeds (default 0).")
    ap.add_argument("--bench-limit", type=int, default=200, help="fgvr bench --limit (default 200).")
    ap.add_argument("--no-warmup", action="store_true", help="Skip the untimed tiny demo per runtime.")
    ap.add_argument("--out", type=Path, default=None, help="Write the table here (and a .json beside it).")
    a = ap.parse_args()
    if a.repeats < 1:
        sys.exit("--repeats must be at least 1")

    known = jobs(a, Path("SUPPORT"))
    wanted = [j.strip() for j in a.jobs.split(",") if j.strip()]
    unknown = [j for j in wanted if j not in known]
    if unknown or not wanted:
        sys.exit(f"--jobs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")

    tmp = Path(tempfile.mkdtemp(prefix="fgvr-whole-job-"))
    runs: list[Run] = []
    try:
        support = export_support(tmp / "support", a.kb_shots)
        table = jobs(a, support)
        if not a.no_warmup:
            for rt in RUNTIMES:
                out = tmp / f"warmup-{rt}"
                timed([*CLI, "--runtime", rt, "demo", "--shots", "1", "--test-images", "4", "--out", str(out)],
                      tmp / f"warmup-{rt}.log")
                shutil.rmtree(out, ignore_errors=True)
        load_start = uptime()
        for r in range(a.repeats):
            order = RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]
            for job in wanted:
                for rt in order:
                    out = tmp / f"{job}-{rt}-{r}"
                    out.mkdir()
                    load = os.getloadavg()[0]
                    wall, cpu = timed([*CLI, *table[job](rt, out)], tmp / f"{job}-{rt}-{r}.log")
                    runs.append(Run(job, rt, r + 1, wall, cpu, load))
                    print(f"repeat {r + 1}: {job} --runtime {rt}: {wall:.1f} s wall, {cpu:.1f} s CPU "
                          f"(load {load:.1f})", file=sys.stderr, flush=True)
                    shutil.rmtree(out, ignore_errors=True)
        load_end = uptime()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(job: str, rt: str, field: str) -> float:
        return statistics.median(getattr(x, field) for x in runs if x.job == job and x.runtime == rt)

    example = {job: " ".join(["fgvr", *known[job]("R", Path("OUT"))]) for job in wanted}
    lines = ["# The whole job, torch against ONNX Runtime (issue 21 item 4)", "",
             f"Command: `{' '.join([Path(sys.executable).name, 'benchmarks/whole_job.py', *sys.argv[1:]])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}, "
             f"FGVR_THREADS={os.environ.get('FGVR_THREADS', '(unset: the cores available)')}  ",
             f"Load at start: `{load_start}`  ", f"Load at end: `{load_end}`  ",
             f"{a.repeats} repeat(s), runtimes alternating; medians of wall seconds (and of the child's CPU seconds):",
             "", "| job | torch s | onnx s | torch / onnx | torch CPU s | onnx CPU s | all runs torch | all runs onnx |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for job in wanted:
        t, o = med(job, "torch", "wall_s"), med(job, "onnx", "wall_s")
        every = {rt: ", ".join(f"{x.wall_s:.1f}" for x in runs if x.job == job and x.runtime == rt) for rt in RUNTIMES}
        lines.append(f"| {job} | {t:.1f} | {o:.1f} | {t / o:.2f}x | {med(job, 'torch', 'cpu_s'):.1f} | "
                     f"{med(job, 'onnx', 'cpu_s'):.1f} | {every['torch']} | {every['onnx']} |")
    lines += ["", f"Each job's command (R = torch or onnx, OUT a fresh folder per run, SUPPORT {a.kb_shots} Fashion-MNIST "
                  "train images per class, seed 0, exported before timing):", ""]
    lines += [f"- {job}: `{cmd}`" for job, cmd in example.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(
            {"runs": [asdict(x) for x in runs], "load_start": load_start, "load_end": load_end,
             "commands": example, "argv": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
