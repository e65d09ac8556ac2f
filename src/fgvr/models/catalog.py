"""The models fgvr knows, as a user reads them before fetching weights (`fgvr models`).

One row per known model name (each family's `known_configs`) and one per family that has none (it loads
any folder of its kind): its role, where its weights come from, its size in each dtype computed from the
architecture on the meta device (the same numbers `fgvr memory plan` uses), and whether its weights are
already in a given models folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from fgvr.models import configs, families

DTYPES = ("fp32", "bf16", "int8", "nf4")  # int8/nf4: bitsandbytes, bf16 compute dtype for the rest
USES = {
    "image-encoder": "System 1: image features (retrieval, prototypes)",
    "vlm": "System 2: option scoring, descriptions, reflections",
    "text-embedder": "similarity of descriptions and rules",
}


@dataclass
class CatalogRow:
    """One model: `sizes` maps a dtype of DTYPES to bytes (None where not computable without a folder)."""

    family: str
    title: str
    role: str
    name: str
    source: str  # a hub id to fetch, "packaged" (a pip package ships it) or "any local folder"
    sizes: dict[str, int | None] = field(default_factory=dict)
    present: bool | None = None  # None: no --dir given

    def to_json(self) -> dict:
        return asdict(self)


def weights_present(folder: Path) -> bool:
    """A save_pretrained folder with a config.json and weights (safetensors or .bin)."""
    return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def _sizes(name: str, role: str, with_quant: bool) -> dict[str, int | None]:
    from fgvr.models.plan import model_size

    out: dict[str, int | None] = {}
    for dtype in DTYPES:
        quant = dtype if dtype in ("int8", "nf4") else None
        if quant and not with_quant:
            out[dtype] = None
            continue
        out[dtype] = model_size(name, role, "float32" if dtype == "fp32" else "bfloat16", quant).weight_bytes
    return out


def rows(models_dir: Path | None = None, family: str | None = None, sizes: bool = True) -> list[CatalogRow]:
    """Every known model (of `family` if given), sized per dtype when `sizes`, checked in `models_dir`."""
    out = []
    for fam in families.all_families():
        if family and fam.name != family:
            continue
        names = list(fam.known_configs) or list(fam.named_sources)
        for name in names or ["-"]:
            packaged = name in fam.named_sources
            source = "packaged" if packaged else configs.HUB_IDS.get(name, "any local folder")
            row = CatalogRow(fam.name, fam.title, fam.role, name, source)
            if sizes and name in fam.known_configs and fam.build_meta is not None:
                row.sizes = _sizes(name, fam.role, with_quant=fam.role == "vlm")
            if models_dir is not None:
                row.present = packaged or (name != "-" and weights_present(Path(models_dir) / name))
            out.append(row)
    return out


def format_rows(table: list[CatalogRow]) -> str:
    """A fixed-width table; sizes in GiB/MiB, '-' where a size does not apply."""
    from fgvr.models.footprint import format_bytes

    head = ["family", "name", "role", *DTYPES, "weights from"]
    if any(r.present is not None for r in table):
        head.append("present")
    lines = []
    for r in table:
        cells = [r.family, r.name, r.role, *(format_bytes(r.sizes[d]) if r.sizes.get(d) else "-" for d in DTYPES),
                 r.source]
        if r.present is not None:
            cells.append("yes" if r.present else "no")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines])


def markdown(table: list[CatalogRow]) -> str:
    """The README's model table and its `huggingface-cli download` lines (`fgvr models --markdown`)."""
    from fgvr.models.footprint import format_bytes

    lines = ["| family | name | fgvr uses it for | weights from | bf16 | int8 |", "|---|---|---|---|---|---|"]
    for r in table:
        where = f"`{r.source}`" if "/" in r.source else r.source
        sizes = [format_bytes(r.sizes[d]) if r.sizes.get(d) else "-" for d in ("bf16", "int8")]
        lines.append(f"| {r.title} (`{r.family}`) | {r.name} | {USES[r.role]} | {where} | {sizes[0]} | {sizes[1]} |")
    fetch = [f"huggingface-cli download {r.source} --local-dir models/{r.name}" for r in table if "/" in r.source]
    return "\n".join(lines + ["", "```bash", *fetch, "```"])
