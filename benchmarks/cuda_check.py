"""CUDA correctness check of the model layer, on the tiny random checkpoints (no download, ~1 minute).

What CPU tests cannot show: on a real GPU, through the process-wide registry,
  1. each family's estimate before loading equals the bytes the CUDA allocator gained (CudaProbe),
  2. unloading gives the memory back (allocator bytes return to the baseline),
  3. a budget too small for two models offloads the idle one to CPU before loading the other,
  4. CPU fp32 and CUDA bf16/fp16 answers agree (VLM option scores, CLIP embeddings),
  5. int8 / nf4 through bitsandbytes load and score (skipped where bitsandbytes is not installed),
  6. the whole pipeline (knowledge base, System 1, re-ranker, a VLM System 2) gives the CPU's answers.
Prints one table row per check; exits 0 where there is no GPU (saying so), 1 if any check failed.

    python benchmarks/cuda_check.py
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

rows: list[tuple[str, str, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    rows.append((name, "ok" if ok else "FAIL", detail))
    print(f"{'ok ' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def allocator_bytes(obj) -> int:
    """What the CUDA caching allocator hands out for a model's unique storages: each rounded up to 512 B."""
    from fgvr.models.registry import torch_modules

    seen, total = set(), 0
    for m in torch_modules(obj):
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += -(-st.nbytes() // 512) * 512
    return total


def photo_folder(root: Path, per_class: int = 4) -> Path:
    """A small labelled folder cut from scikit-learn's two photos: 4 classes of random crops."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for c, (photo, gray) in enumerate([(0, False), (0, True), (1, False), (1, True)]):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = photos[photo].size
            x, y = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 200))
            im = photos[photo].crop((x, y, x + 200, y + 200))
            (im.convert("L") if gray else im).save(d / f"{i}.png")
    return root


def pipeline_on_cuda(tmp: Path, clip_dir: Path, qwen_dir: Path) -> None:
    import torch

    from fgvr.data import read_dataset
    from fgvr.knowledge_base import build_knowledge_base
    from fgvr.models import registry
    from fgvr.backends import BackendOptions, get_backend
    from fgvr.pipeline import open_system

    data = photo_folder(tmp / "photos")
    paths = [str(s.path) for s in read_dataset(data).samples]
    kbs = {}
    for device in ("cpu", "cuda"):
        kbs[device], _ = build_knowledge_base(data, tmp / f"kb-{device}", shots=3, encoder="efficientnet-lite0",
                                              device=device, progress=False)
    d = float((kbs["cpu"].prototypes - kbs["cuda"].prototypes).abs().max())
    same_stats = torch.equal(kbs["cpu"].stats.pred_correct, kbs["cuda"].stats.pred_correct)
    check("knowledge base cpu vs cuda (Lite0)", d < 1e-3 and same_stats, f"max |dprototype| {d:.1e}; same LOO counts {same_stats}")
    answers = {}
    for device in ("cpu", "cuda"):
        with open_system(tmp / f"kb-{device}", reranker=True, device=device, budget=0.5) as system:
            answers[device] = [r.to_dict() for r in system.classify_paths(paths)]
    agree = sum(a["prediction"] == b["prediction"] for a, b in zip(answers["cpu"], answers["cuda"]))
    paths_same = all(a["path_taken"] == b["path_taken"] for a, b in zip(answers["cpu"], answers["cuda"]))
    check("dual system with re-ranker cpu vs cuda", agree == len(paths) and paths_same,
          f"{agree}/{len(paths)} predictions agree; same fast/slow routing {paths_same}")
    registry.unload_all()
    kb_clip, _ = build_knowledge_base(data, tmp / "kb-clip", shots=3, encoder=str(clip_dir), vlm=get_backend(str(qwen_dir), BackendOptions(device="cuda")),
                                      device="cuda", progress=False)
    loads_before = {m.key: m.loads for m in registry.report().models}
    torch.cuda.reset_peak_memory_stats()
    with open_system(tmp / "kb-clip", vlm=get_backend(str(qwen_dir), BackendOptions(device="cuda")), device="cuda", budget=1.0) as system:
        res = [r.to_dict() for r in system.classify_paths(paths[:6])]
    vlm = [k for k in registry.report().models if k.family == "qwen2_5_vl"]
    ok = all(r["path_taken"] == "slow" for r in res) and vlm and vlm[0].device.startswith("cuda")
    check("tiny CLIP + tiny VLM System 2 on cuda (default dtype)", bool(ok),
          f"{len(res)} images slow; VLM {[p for p in vlm[0].key.split('|') if 'float' in p] if vlm else '?'} "
          f"on {vlm[0].device if vlm else '?'}, "
          f"loaded {vlm[0].loads - loads_before.get(vlm[0].key, 0) if vlm else '?'} more time(s) for classify; descriptions {len(kb_clip.descriptions)}; "
          f"peak {torch.cuda.max_memory_allocated() / 1e6:.1f} MB")
    registry.unload_all()


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here (torch", torch.__version__, ") - nothing to check")
        return 0

    import tiny_models
    from PIL import Image

    from fgvr.backends.transformers_vlm import TransformersVlm
    from fgvr.models import parse_spec, registry
    from fgvr.models.probe import CudaProbe
    from fgvr.slow_path import SlowQuery, VlmReasoner

    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    qwen_dir = tiny_models.build_tiny_qwen(tmp / "qwen")
    clip_dir = tiny_models.build_tiny_clip(tmp / "clip")
    probe = CudaProbe("cuda:0")
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(96, 128, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    queries = [SlowQuery(image=im, candidates=[0, 1, 2, 3]) for im in images]
    names = ["cat", "dog", "fox", "owl"]

    # 1+2: estimate == allocator delta, unload returns to baseline, for each family and dtype
    for fam_dir, dtype in [(qwen_dir, "bf16"), (qwen_dir, "fp16"), (clip_dir, "fp16"), (clip_dir, "fp32")]:
        spec = parse_spec(str(fam_dir), dtype=dtype, device="cuda")
        try:
            torch.cuda.synchronize()
            base = probe.used_bytes()
            t0 = time.perf_counter()
            with registry.use(spec) as obj:
                torch.cuda.synchronize()
                grown = probe.used_bytes() - base
                secs = time.perf_counter() - t0
                rounded = allocator_bytes(obj)
            del obj  # a reference kept past the lease would (rightly) be reported as a leak
            rec = registry.report().model(spec.key)
            check(f"footprint {spec.family} {dtype}", rec.estimated_bytes == rec.measured_bytes and grown == rounded,
                  f"estimated {rec.estimated_bytes:,} B = measured {rec.measured_bytes:,} B; CUDA allocator "
                  f"+{grown:,} B = the same tensors rounded to 512-B blocks ({rounded:,} B); load {secs:.2f}s")
            state = registry.unload(spec)
            torch.cuda.synchronize()
            back = probe.used_bytes() - base
            check(f"unload {spec.family} {dtype}", back == 0 and state == "unloaded",
                  f"state {state}, allocator {back:+,} B from baseline")
        except Exception as e:  # keep going: one failure must not hide the other checks
            check(f"footprint {spec.family} {dtype}", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()

    # 3: budget -> idle model offloaded to CPU before the next load
    try:
        a = parse_spec(str(qwen_dir), dtype="bf16", device="cuda")
        b = parse_spec(str(qwen_dir), dtype="fp32", device="cuda")
        from fgvr.models.families import estimate_bytes

        est_b = estimate_bytes(b)
        with registry.use(a):
            pass
        held_a = registry.report().model(a.key).estimated_bytes
        registry.set_budget("cuda:0", held_a + (est_b or 0) - 1)
        before = probe.used_bytes()
        with registry.use(b):
            torch.cuda.synchronize()
            rep = registry.report()
            state_a = rep.model(a.key).state
            used = probe.used_bytes()
        check("budget offloads idle model", state_a in ("offloaded", "unloaded") and used <= held_a + est_b,
              f"A is {state_a}; allocator {before:,} -> {used:,} B; budget {held_a + est_b - 1:,} B")
        registry.set_budget("cuda:0", None)
        registry.unload_all()
    except Exception as e:
        check("budget offloads idle model", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()

    # 4: CPU fp32 vs CUDA answers agree
    try:
        cpu = VlmReasoner(TransformersVlm(parse_spec(str(qwen_dir), device="cpu")), names).rank(queries)
        for dtype, tol in [("fp32", 1e-3), ("bf16", 0.05)]:
            gpu = VlmReasoner(TransformersVlm(parse_spec(str(qwen_dir), dtype=dtype, device="cuda")), names).rank(queries)
            diff = max(abs(x - y) for ca, ga in zip(cpu, gpu) for x, y in zip(ca.probs, ga.probs))
            check(f"VLM option scores cpu fp32 vs cuda {dtype}", diff < tol, f"max |dp| = {diff:.2e} (tol {tol})")
        registry.unload_all()
    except Exception as e:
        check("VLM option scores cpu vs cuda", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
    try:
        texts = ["a photo of a cat.", "a very long description " * 40]
        with registry.use(parse_spec(str(clip_dir), device="cpu")) as enc:
            ci, ct = enc.encode_images(images), enc.encode_texts(texts)
        with registry.use(parse_spec(str(clip_dir), dtype="fp16", device="cuda")) as enc:
            gi, gt = enc.encode_images(images), enc.encode_texts(texts)
        cos = min(float((ci * gi).sum(1).min()), float((ct * gt).sum(1).min()))
        check("CLIP cpu fp32 vs cuda fp16", cos > 0.99 and gi.device.type == "cpu" and gi.dtype == torch.float32,
              f"min cosine {cos:.4f}; returned {gi.dtype} on {gi.device}")
        registry.unload_all()
    except Exception as e:
        check("CLIP cpu fp32 vs cuda fp16", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()

    # 5: bitsandbytes quantisation
    import importlib.util

    for quant in ("int8", "nf4") if importlib.util.find_spec("bitsandbytes") else ():
        try:
            spec = parse_spec(str(qwen_dir), dtype="bf16", device="cuda", quantization=quant)
            torch.cuda.synchronize()
            base = probe.used_bytes()
            ans = VlmReasoner(TransformersVlm(spec), names).rank(queries[:2])
            with registry.use(spec):
                torch.cuda.synchronize()
                grown = probe.used_bytes() - base
            rec = registry.report().model(spec.key)
            ok = all(abs(sum(a.probs) - 1) < 1e-4 for a in ans)
            check(f"bitsandbytes {quant}", ok,
                  f"scores sum to 1; estimated {rec.estimated_bytes:,} B, allocator +{grown:,} B "
                  f"(measured by registry {rec.measured_bytes:,} B)")
            registry.unload_all()
        except Exception as e:
            check(f"bitsandbytes {quant}", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()

    # 6: the whole pipeline on CUDA agrees with the CPU: knowledge base (Lite0), System 1, re-ranker, tiny VLM
    try:
        pipeline_on_cuda(tmp, clip_dir, qwen_dir)
    except Exception as e:
        check("pipeline on CUDA", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()

    print("\n| check | result | detail |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
