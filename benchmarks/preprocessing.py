"""Which resize filter suits each EfficientNet-Lite encoder on small (28 px) sources? Measured on TRAIN images.

    .venv/bin/python benchmarks/preprocessing.py                  # 1,000 validation images, 3 seeds
    .venv/bin/python benchmarks/preprocessing.py --val 300        # a quicker look

Fashion-MNIST's 28x28 images are upscaled 8x to the encoder's input, and there the filter decides what the
network sees: bicubic overshoots around sharp edges (ringing), bilinear does not. The question is answered
on the TRAIN split only (support: k images per class; validation: other train images), never on the test
split, so the choice it leads to can be checked on the test split afterwards without having been tuned
there. Metric: nearest class mean (L2-normalised pooled features), the core of System 1, paired over the
same validation images for every filter, with a paired bootstrap 95% interval of the difference.

Large sources (downscaling) are not measured here: there is no labelled large-image set offline. They keep
bicubic with antialiasing (PIL's default when shrinking), the filter TF's EfficientNet eval preprocessing
uses. Writes benchmarks/results/preprocessing.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fgvr import fashion_mnist as fm  # noqa: E402
from fgvr.encoder import pil_to_tensor  # noqa: E402
from fgvr.io import atomic_write_json, atomic_write_text  # noqa: E402
from fgvr.models import parse_spec, registry  # noqa: E402
from fgvr.stats import paired_bootstrap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def features(enc, images: list[Image.Image], resample: int, size: int, batch: int = 50) -> torch.Tensor:
    """Pooled features with an explicit resize filter (the images are square, so no crop is needed)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([pil_to_tensor(im.resize((size, size), resample)) for im in images[i:i + batch]])
        out.append(enc.encode_pixels((x - 127.0) / 128.0))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=int, default=1000, help="validation images from the train split")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--encoders", default="efficientnet-lite0@224,efficientnet-lite2@224")
    ap.add_argument("--filters", default="bilinear,bicubic")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    train = fm.load_split("train")
    supports = {s: fm.sample_indices(train.labels, per_class=args.shots, seed=s) for s in seeds}
    used = np.unique(np.concatenate(list(supports.values())))
    rest = np.setdiff1d(np.arange(len(train.labels)), used)
    val = np.sort(np.random.default_rng(1234).choice(rest, size=args.val, replace=False))
    y_val = torch.from_numpy(train.labels[val])
    val_images = fm.to_pil(train.images[val])
    filters = args.filters.split(",")

    rows, raw = [], {}
    for item in args.encoders.split(","):
        name, size = item.split("@")
        with registry.use(parse_spec(name, image_size=int(size))) as enc:
            correct: dict[str, list[np.ndarray]] = {}
            for f in filters:
                t = time.perf_counter()
                q = features(enc, val_images, FILTERS[f], int(size))
                for s, idx in supports.items():
                    sup = features(enc, fm.to_pil(train.images[idx]), FILTERS[f], int(size))
                    y = torch.from_numpy(train.labels[idx])
                    protos = torch.nn.functional.normalize(torch.stack([sup[y == c].mean(0) for c in range(10)]), dim=1)
                    correct.setdefault(f, []).append(((q @ protos.T).argmax(1) == y_val).numpy())
                print(f"{name}@{size} {f}: {[round(float(c.mean()), 4) for c in correct[f]]} "
                      f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
            base = filters[0]
            for f in filters:
                accs = [float(c.mean()) for c in correct[f]]
                diff = paired_bootstrap(np.concatenate(correct[f]), np.concatenate(correct[base]), seed=0)
                rows.append((f"{name} @ {size}", f, accs, diff))
                raw[f"{name}@{size}/{f}"] = {"per_seed": accs, "minus_" + base: diff}

        write(args, rows, raw, filters)


def write(args, rows, raw, filters) -> None:
    """The tables so far (rewritten after every encoder, so an interrupted run keeps what it measured)."""
    lines = [f"# Resize filter for 28 px sources: validation on the TRAIN split ({args.val} images, "
             f"{args.shots}-shot, seeds {args.seeds})", "",
             f"Command: `python benchmarks/preprocessing.py {' '.join(sys.argv[1:])}`. Nearest class mean on "
             "pooled features; difference paired over the same images and seeds, 95% paired bootstrap interval.",
             "", f"| encoder | filter | accuracy per seed | mean | minus {filters[0]} [95% CI] |",
             "| --- | --- | --- | --- | --- |"]
    for enc_name, f, accs, d in rows:
        lines.append(f"| {enc_name} | {f} | {', '.join(f'{a:.3f}' for a in accs)} | {np.mean(accs):.3f} | "
                     f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "preprocessing.md", md)
    atomic_write_json(out / "preprocessing.json", raw)
    print(md, file=sys.stderr)



if __name__ == "__main__":
    main()
