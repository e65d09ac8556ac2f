"""Model specs: the immutable value that names one loaded model, and the config registry of known names.

A spec's `key` is what the registry dedupes on, so everything that changes the loaded weights or where
they live is part of it (path and revision, family, dtype, device, quantisation, pixel caps), and every
spelling of the same thing normalises to one key ("cuda" and "cuda:0", "bf16" and "bfloat16",
relative and absolute paths).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fgvr.errors import SpecError

__all__ = ["ModelSpec", "SpecError", "parse_spec", "normalise_device", "normalise_dtype", "folder_digest"]

_DTYPES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
_QUANT = {None: None, "": None, "none": None, "int8": "int8", "8bit": "int8", "nf4": "nf4", "4bit": "nf4"}

def normalise_device(device: str | None) -> str:
    """'cuda' and 'cuda:0' are one device; 'auto' picks CUDA where it exists."""
    d = (device or "cpu").strip().lower()
    if d == "auto":
        import torch

        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda":
        return "cuda:0"
    if d.startswith("cuda:") and d[5:].isdigit():
        return f"cuda:{int(d[5:])}"
    if d in ("cpu", "meta", "mps"):
        return d
    raise SpecError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")


def normalise_dtype(dtype: str | None) -> str:
    d = (dtype or "float32").strip().lower()
    if d not in _DTYPES:
        raise SpecError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16")
    return _DTYPES[d]


def folder_digest(path: Path) -> str:
    """A cheap content fingerprint of a model folder: config text plus each weight file's name and size.

    Hashing gigabytes of weights on every start would cost more than loading them; name+size+config
    changes whenever a different checkpoint is dropped in.
    """
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json" and f.stat().st_size < 1_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides what a loaded model is. Build through `ModelSpec.create` or `parse_spec`."""

    family: str
    source: str  # an absolute local folder, or a packaged-weights name (efficientnet-lite0)
    revision: str = ""  # file digest of the folder, or the package version
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    image_size: int | None = None  # input resolution for fixed-size encoders
    runtime: str = "torch"  # what runs the network: "torch" or "onnx" (ONNX Runtime, CPU encoders)

    @classmethod
    def create(
        cls,
        family: str,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        quantization: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        image_size: int | None = None,
        runtime: str | None = None,
    ) -> "ModelSpec":
        family = family.strip().lower().replace("-", "_").replace(".", "_")
        fam = _family(family)
        quant = _QUANT.get(quantization.lower() if isinstance(quantization, str) else quantization, "?")
        if quant == "?":
            raise SpecError(f"unknown quantisation {quantization!r}: use int8 or nf4")
        src = str(source)
        if fam.local_folder:
            p = Path(src).expanduser()
            src = str(p.resolve())
            if revision is None and p.is_dir():
                revision = folder_digest(p)
        fields = {"dtype": dtype, "device": normalise_device(device), "max_pixels": max_pixels,
                  "min_pixels": min_pixels, "image_size": image_size}
        if fam.spec_defaults is not None:
            fields = fam.spec_defaults(fields)
        fields["dtype"] = normalise_dtype(fields["dtype"])
        from fgvr.models.runtime import RuntimeChoiceError, resolve_runtime

        try:  # unset/"auto": FGVR_RUNTIME, else ONNX Runtime on CPU where the family exports
            fields["runtime"] = resolve_runtime(runtime, fields["device"], fields["dtype"], family)
        except RuntimeChoiceError as e:
            raise SpecError(str(e)) from None
        return cls(family=family, source=src, revision=revision or "", quantization=quant, **fields)

    @property
    def key(self) -> str:
        """The normalised identity the registry dedupes on."""
        parts = [self.family, self.source]
        if self.revision:
            parts.append("@" + self.revision)
        parts += [self.dtype, self.device, self.quantization or "noquant"]
        if self.max_pixels:
            parts.append(f"maxpx={self.max_pixels}")
        if self.min_pixels:
            parts.append(f"minpx={self.min_pixels}")
        if self.image_size:
            parts.append(f"size={self.image_size}")
        if self.runtime != "torch":
            parts.append(f"rt={self.runtime}")
        return "|".join(parts)

    @property
    def name(self) -> str:
        """Short human name for tables and logs."""
        return Path(self.source).name

    def replace(self, **changes) -> "ModelSpec":
        """A copy with some fields changed, re-normalised (e.g. the same model on another device). A new
        device or dtype chooses the runtime again (ONNX Runtime runs on the CPU only) unless one is given."""
        fields = dataclasses.asdict(self) | changes
        if "runtime" not in changes and ({"device", "dtype"} & changes.keys()):
            fields["runtime"] = None
        return ModelSpec.create(fields.pop("family"), fields.pop("source"), **fields)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _family(name: str):
    """The declaration of family `name` (see `fgvr.models.families`); SpecError for an unknown one."""
    from fgvr.models import families

    try:
        return families.get(name)
    except KeyError as e:
        raise SpecError(e.args[0]) from None


def _detect_family(folder: Path) -> str:
    """The family of a model folder: a family's marker file, else config.json's model_type."""
    from fgvr.models import families

    fams = families.all_families()
    for fam in fams:
        if fam.marker_file and (folder / fam.marker_file).is_file():
            return fam.name
    titles = ", ".join(f.title for f in fams if f.model_types)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise SpecError(
            f"{folder} has no config.json: point at a folder saved by transformers' save_pretrained ({titles})"
        )
    model_type = json.loads(cfg.read_text()).get("model_type", "")
    for fam in fams:
        if model_type in fam.model_types:
            return fam.name
    raise SpecError(f"{cfg}: model_type {model_type!r} is not supported; use {titles}")


_ROLE_WORDS = {"image-encoder": "an image encoder", "vlm": "a vision-language model",
               "text-embedder": "a text embedder"}


def parse_spec(text: str, *, dtype: str | None = None, device: str | None = None, role: str | None = None,
               **kw) -> ModelSpec:
    """Turn what a user types (`efficientnet-lite0`, a local model folder) into a spec.

    Names of models that must be fetched by hand (clip-vit-b32, qwen2.5-vl-7b) are refused with the place
    to put them, because nothing downloads at run time. With `role` ("image-encoder" for --encoder), a model
    of another role (MiniLM, a text-only model, given as --encoder) is refused in one line, and the names
    offered are only those of that role.
    """
    from fgvr.models import families

    t = text.strip()
    low = t.lower()
    for fam in families.all_families():
        if low in fam.named_sources:
            _check_role(t, fam, role)
            source, revision = fam.named_sources[low]()
            return ModelSpec.create(fam.name, source, revision=revision, dtype=dtype, device=device, **kw)
    p = Path(t).expanduser()
    if p.is_dir():
        fam_name = _detect_family(p)
        _check_role(t, _family(fam_name), role)
        return ModelSpec.create(fam_name, p, dtype=dtype, device=device, **kw)
    from fgvr.models.configs import HUB_IDS

    if low in HUB_IDS:
        raise SpecError(
            f"{t!r} is not on this machine and nothing is downloaded at run time. Fetch "
            f"{HUB_IDS[low]} (e.g. `huggingface-cli download {HUB_IDS[low]} --local-dir models/{low}`) "
            f"and pass the folder: --encoder/--vlm models/{low}"
        )
    known = ", ".join(n for f in families.all_families() if role in (None, f.role) for n in f.named_sources)
    raise SpecError(
        f"{t!r} is neither a known model name ({known}) nor a local model "
        "folder; pass the path of a folder saved with save_pretrained"
    )


def _check_role(text: str, fam, role: str | None) -> None:
    if role is None or fam.role == role:
        return
    from fgvr.models import families

    offered = ", ".join(n for f in families.all_families() if f.role == role for n in f.named_sources)
    what = ("a text-only model: it cannot encode images" if fam.role == "text-embedder"
            else f"{_ROLE_WORDS.get(fam.role, fam.role)}")
    raise SpecError(f"{text!r} is {fam.title}, {what}; {_ROLE_WORDS.get(role, role)} is needed here"
                    + (f" (known: {offered}, or a local CLIP / SigLIP folder)" if role == "image-encoder" else ""))
