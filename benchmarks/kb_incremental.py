"""What does `fgvr kb add` save over a full rebuild?

    .venv/bin/python benchmarks/kb_incremental.py [--classes 10,100,1000] [--shots 5] [--quick]

For each size C: a base of C classes x `--shots` generated tiny images (noisy 24x24 colour patches, one
colour per class) is built; then one new class of `--shots` images is added two ways, each timed:

  incremental   `add_images` (what `fgvr kb add` runs): encode only the new images, recompute the class
                means, refit the fusion and leave-one-out statistics, stage and swap in a new version
  rebuild       `build_knowledge_base` from scratch on all C+1 classes (every image encoded again)

Both run in the same process with the encoder already loaded (model loading excluded from both). The last
column checks the two bases answer alike: the largest difference of System 1's posteriors over the
rebuilt base's exemplars. `--quick` runs EfficientNet-Lite0 at a 64 px input and 2 shots, so the three sizes
finish in a few minutes on a loaded 2-core machine; without it, the default 224 px input and 5 shots.
The header states the machine and its load (`os.getloadavg`): on a shared machine timings move with it.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/kb_build.py; must precede torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr.fast_path import system1  # noqa: E402
from fgvr.knowledge_base import build_knowledge_base, load_knowledge_base  # noqa: E402
from fgvr.knowledge_base.incremental import add_images  # noqa: E402
from fgvr.models import parse_spec, registry  # noqa: E402


def write_class(root: Path, c: int, shots: int) -> None:
    """`shots` noisy 24x24 patches of class c's colour (colours spread over the RGB cube)."""
    rng = np.random.default_rng(c)
    colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 23 + 160) % 256])
    (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(shots):
        a = colour + rng.integers(-30, 30, (24, 24, 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / f"c{c:04d}" / f"{i}.png")


def one_size(work: Path, n: int, shots: int, encoder) -> dict:
    base_data, new_class = work / "base", work / "new"
    for c in range(n):
        write_class(base_data, c, shots)
    write_class(new_class, n, shots)
    kw = dict(shots=shots, encoder=encoder, progress=False)
    build_knowledge_base(base_data, work / "kb", **kw)

    t = time.perf_counter()
    summary = add_images(work / "kb", [new_class / f"c{n:04d}"], f"c{n:04d}", device="cpu")
    incremental = time.perf_counter() - t

    shutil.copytree(new_class / f"c{n:04d}", base_data / f"c{n:04d}")
    t = time.perf_counter()
    ref, _ = build_knowledge_base(base_data, work / "ref", **kw)
    rebuild = time.perf_counter() - t

    kb = load_knowledge_base(work / "kb")
    order = [kb.classes.index(c) for c in ref.classes]
    diff = (system1(kb, ref.exemplars, k=1).probs[:, order] - system1(ref, ref.exemplars, k=1).probs).abs().max()
    return {"classes": n, "images": (n + 1) * shots, "incremental": incremental, "rebuild": rebuild,
            "phases": summary.phases, "diff": float(diff)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="10,100,1000", help="comma list of base sizes")
    ap.add_argument("--shots", type=int, default=None, help="images per class (default 5, 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="64 px input and 2 shots: a few minutes in all")
    args = ap.parse_args()
    shots = args.shots or (2 if args.quick else 5)
    spec = parse_spec("efficientnet-lite0", device="cpu", **({"image_size": 64} if args.quick else {}))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# kb add vs rebuild: {spec.name} input {spec.image_size or 224}px, {shots} shots/class, CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), load average before {load}")
    print(f"{'classes':>8} {'images':>7} {'incremental s':>14} {'rebuild s':>10} {'speed-up':>9}  "
          f"{'max |dp|':>9}  incremental phases (s)")
    warnings.simplefilter("ignore")
    with registry.use(spec) as enc, tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.classes.split(",")):
            r = one_size(Path(tmp) / str(n), n, shots, enc.spec)
            phases = " ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
            print(f"{r['classes']:>8} {r['images']:>7} {r['incremental']:>14.2f} {r['rebuild']:>10.2f} "
                  f"{r['rebuild'] / r['incremental']:>8.1f}x  {r['diff']:>9.1e}  {phases}", flush=True)
    print(f"# load average after {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
