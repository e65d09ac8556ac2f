"""The encoder fingerprint's tolerance (fgvr.knowledge_base.integrity.FINGERPRINT_MIN_COSINE): cosine of
the fingerprint image's embedding in fp16 / bf16 against float32 on the same weights, and against another
encoder of the same width (EfficientNet-Lite2 vs Lite0, both 1280-d). Prints a table; CPU unless --device.

    PYTHONPATH=src .venv/bin/python benchmarks/fingerprint.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from fgvr.knowledge_base.integrity import FINGERPRINT_MIN_COSINE, fingerprint_image
from fgvr.models import parse_spec, registry


def _embed(name: str, dtype: str, device: str) -> torch.Tensor:
    with registry.use(parse_spec(name, dtype=dtype, device=device)) as enc:
        return enc.encode_images([fingerprint_image()])[0].float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    ref = _embed("efficientnet-lite0", "fp32", args.device)
    rows = [(f"lite0 {dt} vs fp32 ({args.device})", _embed("efficientnet-lite0", dt, args.device)) for dt in ("fp16", "bf16")]
    rows.append(("lite2 fp32 vs lite0 fp32 (both 1280-d)", _embed("efficientnet-lite2", "fp32", args.device)))
    print(f"| comparison | cosine | accepted (>= {FINGERPRINT_MIN_COSINE}) |\n| --- | --- | --- |")
    for name, v in rows:
        cos = float(torch.nn.functional.cosine_similarity(v, ref, dim=0))
        print(f"| {name} | {cos:.4f} | {'yes' if cos >= FINGERPRINT_MIN_COSINE else 'no'} |")


if __name__ == "__main__":
    main()
