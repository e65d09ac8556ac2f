"""`fgvr demo`: the whole dual system on real images, on a laptop CPU, in a few minutes.

What it runs is exactly what a user runs on their own photos, only with the data prepared for them:

    Fashion-MNIST IDX files (Debian: dataset-fashion-mnist)
      -> an image folder: k support images per class from the TRAIN split, N test images from the TEST split
      -> `build_knowledge_base` with EfficientNet-Lite0 (System 1's prototypes, statistics, fusion)
      -> `run_evaluation` with the visual re-ranker as System 2 and a slow-path budget
      -> accuracy of System 1 alone and of the dual system, slow-path rate, timings, report.md

Support and test images come from different splits, so no test image can be in the knowledge base.
Every stage lands under `--out` and reruns reuse it: exported PNGs are kept, the evaluation resumes from
its results.jsonl. Folder names carry the parameters, so runs with other settings never mix.

Sizing (2 CPU cores): Lite0 at 224x224 costs about 50 ms per image, the re-ranker (Lite2 at 224x224 with a
mirrored view) about 90 ms per image it sees. 10 classes x 5 shots + 500 test images at a 30% budget is about
a minute of encoding plus model loading. The 28x28 source images are upsampled; the re-ranker's "higher
resolution" buys nothing on such images, so it runs at 224 here, as it does for any base whose support
images are all that small (`fgvr.reranker.image_size_for`; its size for real photos is 260).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fgvr.defaults import DEFAULTS

log = logging.getLogger(__name__)

DEFAULT_OUT = "demo-output"
DEFAULT_SHOTS = DEFAULTS.shots
DEFAULT_TEST_IMAGES = 500
QUICK_TEST_IMAGES = 100
DEFAULT_BUDGET = DEFAULTS.slow_budget


@dataclass
class DemoResult:
    """What the demo prints, also written to OUT/demo.json."""

    shots: int
    test_images: int
    seed: int
    slow_budget: float
    accuracy_system1: float | None
    accuracy_dual: float | None
    slow_rate: float | None
    slowed_system1_accuracy: float | None  # on the images sent slow: System 1's answer ...
    slowed_final_accuracy: float | None  # ... and the dual system's
    seconds: dict[str, float]
    images_per_second: float | None
    kb: str
    run: str
    report: str
    unreadable: int = 0  # test images neither system could read: counted wrong for both in the two accuracies
    accuracy_system1_readable: float | None = None  # the same pair on the readable images only
    accuracy_dual_readable: float | None = None


def run_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    shots: int = DEFAULT_SHOTS,
    test_images: int = DEFAULT_TEST_IMAGES,
    seed: int = 0,
    slow_budget: float = DEFAULT_BUDGET,
    data_root: str | Path | None = None,
    progress: bool = True,
) -> DemoResult:
    """Prepare Fashion-MNIST, build a k-shot base, evaluate the dual system; see the module docstring."""
    from fgvr.data import read_dataset
    from fgvr.evaluate import run_evaluation
    from fgvr.io import atomic_write_json
    from fgvr.knowledge_base import build_knowledge_base, load_knowledge_base
    from fgvr.models import parse_spec, registry
    from fgvr.pipeline import DualSystem
    from fgvr.reranker import VisualReranker
    from fgvr.trigger import Trigger

    if shots < 1 or test_images < 1:
        raise ValueError("--shots and --test-images must be at least 1")
    if not 0.0 <= slow_budget <= 1.0:
        raise ValueError(f"--slow-budget must lie in [0, 1], got {slow_budget}")
    out = Path(out)
    times: dict[str, float] = {}

    def say(msg: str) -> None:
        if progress:
            log.info("demo: %s", msg)

    # 1. data: the IDX files -> an image folder (support from train, test from test)
    t = time.perf_counter()
    support_dir, test_dir = _export_images(out, shots, test_images, seed, data_root)
    times["data"] = time.perf_counter() - t
    say(f"{shots} support image(s) per class in {support_dir}, {test_images} test image(s) in {test_dir}")

    # 2. System 1's knowledge base, EfficientNet-Lite0
    t = time.perf_counter()
    kb_dir = out / f"kb-k{shots}-seed{seed}"
    if (kb_dir / "manifest.json").is_file():
        kb = load_knowledge_base(kb_dir)
        say(f"reusing knowledge base {kb_dir}")
    else:
        build_knowledge_base(support_dir, kb_dir, shots=shots, seed=seed, encoder="efficientnet-lite0",
                             progress=progress)
        kb = load_knowledge_base(kb_dir)
    times["knowledge_base"] = time.perf_counter() - t

    # 3. the dual system on the held-out test images, the visual re-ranker as System 2
    t = time.perf_counter()
    run_dir = out / f"run-k{shots}-n{test_images}-seed{seed}-budget{slow_budget:g}"
    reranker = VisualReranker.from_knowledge_base(kb, progress=progress)
    trigger = Trigger(budget=slow_budget)
    config = {"kb": str(kb_dir), "data": str(test_dir), "encoder": kb.encoder_key, "demo": True,
              "reranker": {"encoder": reranker.spec.key, "views": list(reranker.views), "grid": reranker.grid}}
    with registry.use(parse_spec("efficientnet-lite0")) as enc:
        system = DualSystem(kb, enc, reranker, trigger)
        summary = run_evaluation(system, read_dataset(test_dir), run_dir, config, progress=progress)
    times["evaluate"] = time.perf_counter() - t
    times["total"] = sum(times.values())

    slowed = summary.get("slowed_images") or {}
    result = DemoResult(
        shots=shots, test_images=test_images, seed=seed, slow_budget=slow_budget,
        accuracy_system1=summary.get("accuracy_system1_alone"), accuracy_dual=summary.get("accuracy"),
        slow_rate=summary.get("slow_rate"),
        slowed_system1_accuracy=slowed.get("system1_accuracy"), slowed_final_accuracy=slowed.get("final_accuracy"),
        seconds={k: round(v, 2) for k, v in times.items()},
        images_per_second=(summary.get("run") or {}).get("images_per_s_this_process"),
        kb=str(kb_dir), run=str(run_dir), report=str(run_dir / "report.md"),
        unreadable=summary.get("n_unreadable", 0),
        accuracy_system1_readable=summary.get("accuracy_system1_alone_readable"),
        accuracy_dual_readable=summary.get("accuracy_readable"),
    )
    atomic_write_json(out / "demo.json", asdict(result) | {"reranker_fit": reranker.fit_log})
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _export_images(out: Path, shots: int, test_images: int, seed: int,
                   data_root: str | Path | None) -> tuple[Path, Path]:
    """Fashion-MNIST's IDX files -> image folders: `shots` per class from train, `test_images` from test."""
    from fgvr import fashion_mnist as fm

    train, test = fm.load_split("train", data_root), fm.load_split("test", data_root)
    support_dir = out / "images" / f"support-k{shots}-seed{seed}"
    test_dir = out / "images" / f"test-n{test_images}-seed{seed}"
    fm.export_image_folder(train, fm.sample_indices(train.labels, per_class=shots, seed=seed), support_dir,
                           prefix="train")
    fm.export_image_folder(test, fm.sample_indices(test.labels, total=test_images, seed=seed), test_dir,
                           prefix="test")
    return support_dir, test_dir


def format_result(r: DemoResult) -> str:
    """The demo's printed summary: what was run, the two accuracies, the slow-path rate, where the report is."""
    s = r.seconds
    ips = f"{r.images_per_second:.1f} images/s" if r.images_per_second else "resumed run: no new images"
    return "\n".join([
        f"Fashion-MNIST, 10 classes: {r.shots}-shot knowledge base (train split, seed {r.seed}), "
        f"{r.test_images} held-out test images (test split)",
        f"  {'System 1 alone (EfficientNet-Lite0 prototypes)':<52}{_pct(r.accuracy_system1)}",
        f"  {'dual system, System 2 = visual re-ranker':<52}{_pct(r.accuracy_dual)}",
        *([f"  {r.unreadable} unreadable test image(s), wrong for both above; on the readable ones: System 1 "
           f"{_pct(r.accuracy_system1_readable)} -> dual {_pct(r.accuracy_dual_readable)}"] if r.unreadable else []),
        f"  {f'slow-path rate (budget {_pct(r.slow_budget)})':<52}{_pct(r.slow_rate)}",
        f"  on the images sent slow: System 1 {_pct(r.slowed_system1_accuracy)} -> "
        f"dual {_pct(r.slowed_final_accuracy)}",
        f"  time: data {s['data']:.1f}s, knowledge base {s['knowledge_base']:.1f}s, "
        f"evaluation {s['evaluate']:.1f}s ({ips}), total {s['total']:.1f}s",
        f"  report: {r.report}",
    ])


def main(out: str | Path, shots: int, test_images: int | None, seed: int, slow_budget: float, quick: bool) -> Any:
    """The CLI's entry: `--quick` shrinks the test sample to QUICK_TEST_IMAGES unless --test-images is given."""
    n = test_images if test_images is not None else (QUICK_TEST_IMAGES if quick else DEFAULT_TEST_IMAGES)
    result = run_demo(out, shots=shots, test_images=n, seed=seed, slow_budget=slow_budget)
    print(format_result(result))
    return result
