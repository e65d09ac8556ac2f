"""System 1's exemplar weight: the plain minimum of the leave-one-out NLL against the one-standard-error rule.

    .venv/bin/python benchmarks/exemplar_weight.py                 # 500 validation images, k = 5, 10, 20
    .venv/bin/python benchmarks/exemplar_weight.py --val 1000

`knowledge_base.fitting.choose_fusion` fits the exemplar weight (prototype vs best exemplar) on the support
set alone. It reports both the weight with the lowest leave-one-out NLL (`best_exemplar_weight`) and the one
the rule keeps (`exemplar_weight`: the smallest within one paired standard error of the best). This script
measures what each choice gives on validation images of Fashion-MNIST's TRAIN split (never the test split;
disjoint from every support draw), so the rule was chosen without looking at test images. Accuracy does not
depend on the temperature, so System 1's top-1 is the argmax of the image scores at the chosen weight.
Writes benchmarks/results/exemplar_weight.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr import fashion_mnist as fm  # noqa: E402
from fgvr.io import atomic_write_text  # noqa: E402
from fgvr.knowledge_base.fitting import choose_fusion  # noqa: E402
from fgvr.models import parse_spec, registry  # noqa: E402
from fgvr.scoring import Support, image_scores  # noqa: E402
from fgvr.stats import paired_bootstrap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=500, help="validation images from the train split")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    shots, seeds = [int(k) for k in args.shots.split(",")], [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()

    train = fm.load_split("train")
    supports = {(k, s): fm.sample_indices(train.labels, per_class=k, seed=s) for k in shots for s in seeds}
    used = np.unique(np.concatenate(list(supports.values())))
    rest = np.setdiff1d(np.arange(len(train.labels)), used)
    val = np.sort(np.random.default_rng(1234).choice(rest, size=args.val, replace=False))
    every = np.unique(np.concatenate([used, val]))
    with registry.use(parse_spec("efficientnet-lite0")) as enc:  # the encoder, preprocessing and all, of System 1
        feats = enc.encode_images(fm.to_pil(train.images[every]), batch_size=50).float()
    row_of = {int(i): j for j, i in enumerate(every)}
    x_val, y_val = feats[[row_of[int(i)] for i in val]], torch.from_numpy(train.labels[val]).long()

    lines = [f"# System 1's exemplar weight: plain minimum vs one-standard-error rule ({args.val} TRAIN-split "
             "validation images)", "",
             f"Command: `python benchmarks/exemplar_weight.py {' '.join(sys.argv[1:])}`. Lite0 at 224x224; the "
             "weight is fitted on the support set alone (leave-one-out NLL); accuracy of System 1's top-1 on the "
             "validation images at each choice.", "",
             "| k | seed | weight: minimum | weight: rule | accuracy: minimum | accuracy: rule |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary = []
    for k in shots:
        hits_min, hits_rule = [], []
        for s in seeds:
            idx = supports[k, s]
            x = torch.nn.functional.normalize(feats[[row_of[int(i)] for i in idx]], dim=1)
            y = torch.from_numpy(train.labels[idx]).long()
            support = Support(x, y, 10)
            fusion = choose_fusion(SimpleNamespace(prototypes=support.prototypes, exemplars=x, exemplar_labels=y,
                                                   text_prototypes=None, num_classes=10))
            hit = {e: (image_scores(x_val, support.prototypes, x, y, e).argmax(1) == y_val).numpy()
                   for e in (fusion["best_exemplar_weight"], fusion["exemplar_weight"])}
            a, b = hit[fusion["best_exemplar_weight"]], hit[fusion["exemplar_weight"]]
            hits_min.append(a)
            hits_rule.append(b)
            lines.append(f"| {k} | {s} | {fusion['best_exemplar_weight']} | {fusion['exemplar_weight']} | "
                         f"{a.mean():.3f} | {b.mean():.3f} |")
        d = paired_bootstrap(np.concatenate(hits_rule), np.concatenate(hits_min), seed=0)
        summary.append(f"| {k} | {np.mean([h.mean() for h in hits_min]):.3f} | "
                       f"{np.mean([h.mean() for h in hits_rule]):.3f} | "
                       f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
    lines += ["", "Over the seeds (the difference paired over the same images and seeds, 95% bootstrap interval, "
              "in points):", "", "| k | accuracy: minimum | accuracy: rule | rule − minimum |",
              "| ---: | ---: | ---: | --- |", *summary, "",
              f"{time.perf_counter() - t0:.0f} s wall, 2-core CPU machine."]
    md = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.out) / "exemplar_weight.md", md)
    print(md)


if __name__ == "__main__":
    main()
