"""How many bytes a model takes: before loading (meta device, safetensors header) and after (its tensors).

The registry checks the budget *before* a load, so the size must be known without the weights in memory:
either the architecture built on the meta device (shapes, no storage) or the header of the safetensors
files (shapes and dtypes, read without the data). After loading, the measured size is the unique tensor
storages of the parameters plus all buffers: summing `state_dict()` would count tied weights (Qwen2.5-VL-3B's
embedding and lm_head, CLIP's nothing, many LMs') twice.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so importing the registry stays instant
    import torch

# safetensors dtype names -> bytes per element
_ST_SIZES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_ST_FLOAT = {"F64", "F32", "F16", "BF16"}


def _tensors(modules: Iterable[torch.nn.Module]) -> Iterable[torch.Tensor]:
    for m in modules:
        # remove_duplicate=False: we dedupe ourselves across modules, and by storage, not by name
        for _, p in m.named_parameters(remove_duplicate=False):
            yield p
        for _, b in m.named_buffers(remove_duplicate=False):
            yield b


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the unique storages behind `tensors`.

    Two tensors sharing a storage (tied weights, views) count once. Meta tensors have no storage, so they
    are deduplicated by identity and counted by shape, which is what they will take once materialised.
    """
    seen: set = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "meta":
            key = ("meta", id(t))
            size = t.numel() * t.element_size()
        else:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            size = st.nbytes()
            if st.data_ptr() == 0:  # empty tensor: nothing allocated, nothing to dedupe
                key = ("empty", id(t))
        if key in seen:
            continue
        seen.add(key)
        total += size
    return total


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers of `modules`, tied weights and shared storages counted once."""
    return tensor_bytes(_tensors(modules))


def module_params(*modules: torch.nn.Module) -> int:
    """Number of unique parameters (tied weights once), the figure model cards quote."""
    seen: set[int] = set()
    n = 0
    for m in modules:
        for p in m.parameters():  # parameters() already drops tied duplicates within one module
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def meta_bytes(build: Callable[[], torch.nn.Module]) -> int:
    """Bytes of the module `build()` returns, built on the meta device (no memory, no weights read)."""
    import torch

    with torch.device("meta"):
        model = build()
    return module_bytes(model)


def quantised_bytes(model: torch.nn.Module, quantization: str | None) -> int:
    """Bytes once loaded with bitsandbytes the way transformers does it: every nn.Linear except the output
    embedding (lm_head) is quantised; embeddings, norms, convolutions and biases keep the compute dtype.
    The one place quantised sizes are computed (the family estimates and `fgvr memory plan` both use it).

    int8 (LLM.int8): 1 byte per weight + one fp32 scale per output row.
    nf4: half a byte per weight + one fp32 absmax per 64-weight block (no double quantisation).
    """
    import math

    import torch

    total = module_bytes(model)
    if not quantization:
        return total
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m is out_emb:
            continue
        w = m.weight
        n = w.numel()
        total -= n * w.element_size()
        if quantization == "int8":
            total += n + m.out_features * 4
        elif quantization == "nf4":
            total += (n + 1) // 2 + math.ceil(n / 64) * 4
        else:
            from fgvr.errors import SpecError

            raise SpecError(f"unknown quantisation {quantization!r}: use int8 or nf4")
    return total


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file: {name: {dtype, shape, data_offsets}} (data not read)."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: header length {n} is implausible; the file is not safetensors")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def safetensors_bytes(folder: Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors in a folder's *.safetensors files take once loaded.

    With `dtype`, floating tensors are counted at that dtype (a checkpoint stored in fp32 and loaded in
    bf16 takes half). Tied weights are stored once by save_pretrained, so they are counted once here.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files to read sizes from")
    import torch

    target = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    total = 0
    for f in files:
        for name, info in read_safetensors_header(f).items():
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            if target is not None and info["dtype"] in _ST_FLOAT:
                total += numel * target
            else:
                total += numel * _ST_SIZES[info["dtype"]]
    return total


def format_bytes(n: int | float | None) -> str:
    """'16.58 GB' (decimal, as model cards quote) — GiB are given where they matter, next to it."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str | int | float) -> int:
    """'18GiB', '18 GB', '16e9', '500MiB', 1234 -> bytes. GB is 10^9, GiB 2^30."""
    if isinstance(text, (int, float)):
        return int(text)
    t = str(text).strip().lower().replace(" ", "").replace("_", "")
    i = len(t)
    while i > 0 and t[i - 1].isalpha():
        i -= 1
    num, unit = t[:i], t[i:]
    if unit not in _UNITS or not num:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 18GiB, 18GB, 16e9 or 500MiB")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 18GiB, 18GB, 16e9 or 500MiB") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * _UNITS[unit])
