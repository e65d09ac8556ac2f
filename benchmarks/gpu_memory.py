"""GPU memory check: the real Qwen2.5-VL-7B architecture with random bf16 weights on CUDA, CLIP ViT-B/32
beside it, one System 2-sized generation on a 1024x1024 image at the pixel cap; peak allocated and reserved
memory printed next to `fgvr memory plan`'s estimate.

    python benchmarks/gpu_memory.py                  # 7B + CLIP-B/32, bf16, 18 GiB budget
    python benchmarks/gpu_memory.py --json-out out.json

Memory does not depend on weight values, so random weights take what the real ones take: no download,
no tokenizer. The prompt is built as the processor would build it: chat tokens around one block of
image-pad tokens (id 151655), as many as the image has visual tokens, and pixel_values/image_grid_thw
of the shapes the image processor produces for that image at the cap.

The models are loaded through a `Registry` instance (budget checked before each load, bytes measured
after) whose loader builds the architecture with random weights instead of reading a checkpoint; the
process-wide registry only ever loads real weights. Where there is no CUDA, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a checkout

from fgvr.models.footprint import format_bytes, parse_bytes  # noqa: E402
from fgvr.models.families.qwen_vl import PATCH as QWEN_PATCH  # noqa: E402
from fgvr.models.spec import ModelSpec  # noqa: E402

IMAGE_PAD, VISION_START, VISION_END, IM_START, IM_END = 151655, 151652, 151653, 151644, 151645


def build_random(family: str, config: dict, dtype: str, device: str):
    """The architecture of `config` with random weights, materialised directly on `device`.

    Built under a device context so transformers' own initialisation runs there (fast on a GPU, and the
    rotary buffers are computed as usual); falls back to building on CPU and moving if that fails.
    """
    import torch

    from fgvr.models.spec import normalise_dtype

    tdtype = getattr(torch, normalise_dtype(dtype))

    def make():
        if family == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            return Qwen2_5_VLForConditionalGeneration._from_config(
                Qwen2_5_VLConfig(**config), dtype=tdtype, attn_implementation="sdpa")
        if family == "clip":
            from transformers import CLIPConfig, CLIPModel

            return CLIPModel._from_config(CLIPConfig(**config), dtype=tdtype, attn_implementation="sdpa")
        raise ValueError(f"no random builder for {family}")

    try:
        with torch.device(device):
            model = make()
    except Exception as exc:  # pragma: no cover - only if the device context is not honoured
        print(f"  (building under the device context failed: {exc!r}; building on CPU and moving)", file=sys.stderr)
        model = make()
    model = model.to(device=device, dtype=tdtype).eval().requires_grad_(False)
    return model


class RandomModel:
    """What the benchmark's registry hands out: the module, and `torch_modules()` for measuring."""

    def __init__(self, spec: ModelSpec, model) -> None:
        self.spec, self.model = spec, model

    def torch_modules(self) -> list:
        return [self.model]


def grid_for(height: int, width: int, max_pixels: int, patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """(grid_h, grid_w) in 14-px patches of an image resized under the cap, as Qwen's smart_resize does."""
    from fgvr.models.plan import visual_tokens_for

    f = QWEN_PATCH
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    assert (h // f) * (w // f) == visual_tokens_for(height, width, max_pixels)
    return h // patch, w // patch


def system2_inputs(config: dict, image_size: tuple[int, int], max_pixels: int, text_tokens: int,
                   batch: int, device: str, seed: int = 0) -> dict:
    """Processor-shaped inputs of one System 2 prompt per row: chat text around one image at the cap."""
    import torch

    vis = config["vision_config"]
    patch, merge, tp = vis["patch_size"], vis["spatial_merge_size"], vis["temporal_patch_size"]
    gh, gw = grid_for(image_size[0], image_size[1], max_pixels, patch, merge)
    n_image = gh * gw // (merge * merge)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        words = torch.randint(1000, 100000, (max(text_tokens, 24),), generator=g).tolist()
        head, tail = words[:12], words[12:]  # "system ... user:" before the image, question + options after
        rows.append([IM_START, *head, VISION_START, *([IMAGE_PAD] * n_image), VISION_END, *tail, IM_END, IM_START])
    input_ids = torch.tensor(rows, device=device)
    pixel_values = torch.randn(batch * gh * gw, 3 * tp * patch * patch, generator=g).to(device)  # fp32, as the processor
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, gh, gw]] * batch, device=device),
    }


_TABLE_HEAD = (
    "| phase | plan estimate | measured (peak alloc - alloc before) | peak allocated | peak reserved | s | note |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
)


def _table_row(r: dict) -> str:
    return (f"| {r['phase']} | {format_bytes(r['plan_estimate'])} | {format_bytes(r['peak_allocated_delta'])} | "
            f"{format_bytes(r['peak_allocated'])} | {format_bytes(r['peak_reserved'])} | {r['seconds']:.1f} | "
            f"{r['note']} |")


def run(args: argparse.Namespace) -> dict:
    import torch

    from fgvr.models import Registry
    from fgvr.models.families import architecture
    from fgvr.models.plan import estimate_spec_bytes, make_plan, parse_image_size
    from fgvr.models.probe import CudaProbe

    device = args.device
    probe = CudaProbe(device)
    torch.cuda.init()
    torch.zeros(1, device=device)  # create the context now, so what it takes can be read
    free, total = torch.cuda.mem_get_info(probe.index)
    context = total - free - probe.reserved_bytes()
    image_size = parse_image_size(args.image_size)
    max_pixels = args.max_visual_tokens * QWEN_PATCH * QWEN_PATCH
    budget = parse_bytes(args.budget)
    plan = make_plan(args.vlm, args.encoder, args.dtype, budget, max_pixels=max_pixels, image_size=image_size,
                     text_tokens=args.text_tokens, new_tokens=args.new_tokens)
    w = plan.workload
    print(plan.format(), "\n", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fgvr-gpu-memory-"))
    specs, configs = {}, {}
    for role, name in (("vlm", args.vlm), ("encoder", args.encoder)):
        family, cfg = architecture(name)
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))  # config only: estimate_spec_bytes reads it
        specs[role] = ModelSpec.create(family, folder, dtype=args.dtype, device=device,
                                       max_pixels=max_pixels if family == "qwen2_5_vl" else None)
        configs[role] = (family, cfg)

    def loader(spec: ModelSpec) -> RandomModel:
        role = "vlm" if spec.family == "qwen2_5_vl" else "encoder"
        return RandomModel(spec, build_random(*configs[role], spec.dtype, spec.device))

    reg = Registry(loader=loader, estimator=estimate_spec_bytes)
    reg.set_budget(device, budget)
    rows: list[dict] = []

    def row(phase: str, estimate: int | None, base: int, t0: float, note: str = "") -> None:
        torch.cuda.synchronize(probe.index)
        rows.append({
            "phase": phase, "plan_estimate": estimate,
            "peak_allocated_delta": probe.peak_bytes() - base, "peak_allocated": probe.peak_bytes(),
            "peak_reserved": probe.peak_reserved_bytes(), "seconds": round(time.perf_counter() - t0, 2),
            "note": note,
        })
        r = rows[-1]
        print(_table_row(r), flush=True)

    def phase(name: str, estimate: int | None, fn, note: str = "") -> None:
        probe.reset_peak()
        base, t0 = probe.used_bytes(), time.perf_counter()
        try:
            fn()
        except torch.cuda.OutOfMemoryError as exc:
            note = f"OUT OF MEMORY: {str(exc).splitlines()[0][:120]}"
        except Exception as exc:  # keep going: one failed phase must not lose the others' numbers
            note = f"FAILED: {type(exc).__name__}: {str(exc)[:160]}"
        row(name, estimate, base, t0, note)

    vlm_size = next(m.weight_bytes for m in plan.models if m.role == "vlm")
    enc_size = next(m.weight_bytes for m in plan.models if m.role == "encoder")
    held = {}
    print(_TABLE_HEAD, flush=True)
    phase(f"load {args.vlm} (random {args.dtype})", vlm_size, lambda: held.update(vlm=reg.acquire(specs["vlm"])))
    phase(f"load {args.encoder} beside it", enc_size, lambda: held.update(enc=reg.acquire(specs["encoder"])))
    if "vlm" not in held:
        return {"error": "the VLM did not load", "rows": rows, "context_bytes": context}
    model = held["vlm"].model
    vlm_cfg = configs["vlm"][1]

    if "enc" in held:
        def encode():
            clip = held["enc"].model
            size = clip.config.vision_config.image_size
            px = torch.randn(64, 3, size, size, device=device, dtype=clip.dtype)
            with torch.inference_mode():
                clip.get_image_features(pixel_values=px)
        phase("encoder: a batch of 64 images", None, encode)

    def generate(batch: int):
        def go():
            inputs = system2_inputs(vlm_cfg, image_size, max_pixels, args.text_tokens, batch, device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=IM_END, eos_token_id=IM_END)
            assert out.shape[1] == inputs["input_ids"].shape[1] + args.new_tokens
        return go

    def score(batch: int, last_only: bool):
        def go():
            inputs = system2_inputs(vlm_cfg, image_size, max_pixels, args.text_tokens, batch, device)
            extra = {"logits_to_keep": 1} if last_only else {}
            with torch.inference_mode():
                logits = model(**inputs, **extra).logits[:, -1, :].float()
            torch.log_softmax(logits, dim=-1)
        return go

    n_img = w.image_tokens
    phase(f"System 2 generation: {n_img} visual + {args.text_tokens} text tokens, {args.new_tokens} new",
          w.working_bytes, generate(1))
    phase("option scoring forward, logits for every position", w.working_bytes + w.full_logits_bytes,
          score(1, last_only=False), "(what slow_path does without logits_to_keep)")
    phase("option scoring forward, logits_to_keep=1", w.working_bytes, score(1, last_only=True))
    if args.batch > 1:
        wb = make_plan(args.vlm, args.encoder, args.dtype, budget, max_pixels=max_pixels, image_size=image_size,
                       text_tokens=args.text_tokens, new_tokens=args.new_tokens, batch=args.batch).workload
        phase(f"option scoring forward, batch {args.batch}, every position", wb.working_bytes + wb.full_logits_bytes,
              score(args.batch, False), "(slow_path's default batch)")
        phase(f"option scoring forward, batch {args.batch}, logits_to_keep=1", wb.working_bytes,
              score(args.batch, True))

    rep = reg.report()
    measured_total = probe.read()
    result = {
        "device": torch.cuda.get_device_name(probe.index), "torch": torch.__version__,
        "budget": budget, "plan": plan.to_json(), "rows": rows, "context_bytes": context,
        "registry": rep.to_json(), "total_device_bytes": total,
        "peak_reserved_overall": max(r["peak_reserved"] for r in rows) if rows else 0,
    }
    print()
    print(f"CUDA context (device used - torch reserved, measured at start): {format_bytes(context)}; "
          f"plan allowance {format_bytes(plan.context_bytes)}")
    for m in rep.models:
        print(f"registry: {m.name:<16} estimated {format_bytes(m.estimated_bytes)}  measured "
              f"{format_bytes(m.measured_bytes)}  ({m.state})")
    worst = max(r["peak_reserved"] for r in rows) + context
    print(f"peak reserved + context: {format_bytes(worst)} ({worst / 2**30:.2f} GiB) against the plan's total "
          f"{format_bytes(plan.total_bytes)} and the budget {format_bytes(budget)}; allocated now "
          f"{format_bytes(measured_total.used)}")
    for key in ("vlm", "enc"):
        if key in held:
            reg.release(specs["vlm" if key == "vlm" else "encoder"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm", default="qwen2.5-vl-7b")
    ap.add_argument("--encoder", default="clip-vit-b32")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--budget", default="18GiB")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--image-size", default="1024x1024")
    ap.add_argument("--max-visual-tokens", type=int, default=1280)
    ap.add_argument("--text-tokens", type=int, default=400, help="prompt text: instructions + ~5 options")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="also score a batch this size (slow_path's default); 1 skips")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): "
              "nothing measured. `fgvr memory plan` gives the estimate; run this where a GPU exists.")
        return 0
    result = run(args)
    if args.json_out:
        from fgvr.io import atomic_write_json

        atomic_write_json(args.json_out, result)
        print(f"wrote {args.json_out}")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
