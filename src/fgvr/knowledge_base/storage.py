"""Knowledge-base storage: the records (`KnowledgeBase`, `RetrievalStats`), the on-disk format, and the
encoder identity check.

Storage: a directory with `manifest.json` (format version, encoder, classes, k, seed, augmentations,
support files, skipped files with reasons, sha256 checksums, fgvr version, time), `tensors.safetensors`
and `descriptions.json`. It is written into a temporary sibling directory and renamed into place; a
rebuild replaces the old base wholesale, never merges with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fgvr import __version__
from fgvr.errors import KnowledgeBaseError
from fgvr.io import json_dumps, read_json
from fgvr.knowledge_base.integrity import (check_fingerprint, check_manifest, check_tensors, load_descriptions,
                                           load_tensors, seal_manifest)

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
DESCRIPTIONS_FILE = "descriptions.json"


# ----------------------------------------------------------------------------------------------------------
# records


@dataclass
class RetrievalStats:
    """Leave-one-out counts on the support set, per class id (int64 tensors of shape (C,)).

    pred_total[c]  = n: support images System 1 predicted as c;  pred_correct[c] = m: of those, truly c.
    true_total[c]  = support images of class c that were scored; true_correct[c]: of those, predicted c.
    confusion[t, p]: images of true class t predicted as p. `excluded`: images left out (single-image class).
    """

    pred_correct: torch.Tensor
    pred_total: torch.Tensor
    true_correct: torch.Tensor
    true_total: torch.Tensor
    confusion: torch.Tensor
    excluded: int = 0

    @classmethod
    def from_predictions(cls, pred: torch.Tensor, true: torch.Tensor, num_classes: int,
                         excluded: int = 0) -> "RetrievalStats":
        pred, true = pred.long().cpu(), true.long().cpu()
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        confusion.index_put_((true, pred), torch.ones_like(true), accumulate=True)
        diag = confusion.diagonal().clone()
        return cls(pred_correct=diag, pred_total=confusion.sum(0), true_correct=diag.clone(),
                   true_total=confusion.sum(1), confusion=confusion, excluded=int(excluded))

    def precision(self) -> torch.Tensor:
        """m / n per predicted class (NaN where a class was never predicted)."""
        return self.pred_correct.double() / self.pred_total.double()

    def recall(self) -> torch.Tensor:
        return self.true_correct.double() / self.true_total.double()

    @property
    def accuracy(self) -> float:
        n = int(self.true_total.sum())
        return float(self.true_correct.sum()) / n if n else float("nan")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "stats.pred_correct": self.pred_correct, "stats.pred_total": self.pred_total,
            "stats.true_correct": self.true_correct, "stats.true_total": self.true_total,
            "stats.confusion": self.confusion,
        }


class SupportFile(NamedTuple):
    """One support image of a base: where it is and its class id."""

    path: Path
    class_id: int


def support_files(manifest: dict) -> list[SupportFile]:
    """`KnowledgeBase.support_files` on a bare manifest (see there)."""
    root = Path((manifest.get("data") or {}).get("root") or ".")
    out = []
    for r in manifest.get("support") or []:
        p = Path(r["path"])
        out.append(SupportFile(p if p.is_absolute() else root / p, int(r["class_id"])))
    return out


@dataclass
class KnowledgeBase:
    """What System 1 and the trigger read. Class id = index into `classes`."""

    classes: list[str]
    encoder_spec: dict
    encoder_key: str
    embed_dim: int
    prototypes: torch.Tensor  # (C, D) float32, L2-normalised class means
    exemplars: torch.Tensor  # (N, D) float32, L2-normalised
    exemplar_labels: torch.Tensor  # (N,) int64
    text_prototypes: torch.Tensor | None = None  # (C, D) float32
    descriptions: dict[str, str] = field(default_factory=dict)
    stats: RetrievalStats | None = None
    fusion: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def k(self) -> int | None:
        return self.manifest.get("k")

    @property
    def seed(self) -> int | None:
        return self.manifest.get("seed")

    @property
    def support_paths(self) -> list[str]:
        """The support images as stored in the manifest (relative to the data root where possible); an
        evaluation on the same folder must leave these out."""
        return [s["path"] for s in self.manifest.get("support", [])]

    def support_files(self) -> list[SupportFile]:
        """The support images with their class ids, in manifest order; stored paths are relative to the data
        root the base was built from where possible, and are returned joined to it (absolute, unresolved).
        The one place a support path is read back from the manifest (the re-ranker's exemplars, the images
        an evaluation or the experience build must leave out)."""
        return support_files(self.manifest)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {
            "prototypes": self.prototypes.float().contiguous(),
            "exemplars": self.exemplars.float().contiguous(),
            "exemplar_labels": self.exemplar_labels.long().contiguous(),
        }
        if self.text_prototypes is not None:
            t["text_prototypes"] = self.text_prototypes.float().contiguous()
        if self.stats is not None:
            t.update(self.stats.tensors())
        return t



# ----------------------------------------------------------------------------------------------------------
# encoder identity


_IDENTITY_FIELDS = ("family", "source", "revision", "quantization", "max_pixels", "min_pixels")


def _spec_json(encoder: Any) -> tuple[dict, int | None]:
    """(spec as JSON, effective image size or None) from a ModelSpec, an Encoder, a spec string or dict."""
    if encoder is None:
        raise TypeError("no encoder")
    if isinstance(encoder, dict):
        return dict(encoder), None
    if isinstance(encoder, str):
        from fgvr.models.spec import parse_spec

        encoder = parse_spec(encoder, role="image-encoder")
    if hasattr(encoder, "to_json") and hasattr(encoder, "key"):  # ModelSpec
        return encoder.to_json(), None
    if hasattr(encoder, "spec"):  # a loaded Encoder
        return encoder.spec.to_json(), getattr(encoder, "image_size", None)
    raise TypeError(f"cannot read an encoder spec from {type(encoder).__name__}")


def check_encoder(manifest: dict, encoder: Any, where: Path | str = "the knowledge base") -> None:
    """Refuse a query encoder whose embeddings are not comparable with the base's.

    Compared: family, source, revision (weights), quantisation, pixel caps, and the input size (when both
    sides state one). Ignored: the device (the same weights on cuda and cpu give the same features up to
    float noise). A different dtype is allowed with a warning: fp16 and fp32 features of the same weights
    agree to ~1e-3, which is below what separates classes, but scores shift slightly.
    """
    got, got_size = _spec_json(encoder)
    want = manifest["encoder"]["spec"]
    diff = [f for f in _IDENTITY_FIELDS if (got.get(f) or None) != (want.get(f) or None)]
    want_size = manifest["encoder"].get("image_size")  # the size the base's encoder really used
    have_size = got_size or got.get("image_size")
    if have_size is None and want.get("image_size") is None:
        have_size = want_size  # neither side chose a size: both use the family default
    if want_size != have_size:
        diff.append("image_size")
    if diff:
        details = ", ".join(f"{f}: base {want.get(f) if f != 'image_size' else want_size!r} vs query "
                            f"{got.get(f) if f != 'image_size' else have_size!r}" for f in diff)
        raise KnowledgeBaseError(
            f"{where} was built with encoder {manifest['encoder']['key']} but the query encoder differs "
            f"({details}); embeddings of different encoders are not comparable: use --encoder "
            f"{manifest['encoder'].get('name', want.get('source'))} or rebuild the base with fgvr build-kb"
        )
    if (got.get("dtype") or "float32") != (want.get("dtype") or "float32"):
        warnings.warn(
            f"{where} was built in {want.get('dtype')} and the query encoder runs in {got.get('dtype')}: "
            "allowed, but scores shift slightly", stacklevel=3,
        )


def check_encoder_behaviour(kb: "KnowledgeBase", encoder: Any) -> None:
    """The loaded encoder gives the base's features (`integrity.check_fingerprint`): what the spec check
    cannot see (weights changed under the same name, a hand-edited and resealed manifest). Checked once per
    (base, encoder) pair; an in-memory base without a manifest (a test's) has nothing to check."""
    if not kb.manifest or not hasattr(encoder, "encode_images"):
        return
    done = kb.__dict__.setdefault("_fingerprint_checked", set())
    if id(encoder) in done:
        return
    check_fingerprint(kb.manifest, encoder, kb.path or "the knowledge base")
    done.add(id(encoder))


# ----------------------------------------------------------------------------------------------------------
# loading


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_knowledge_base(path: str | Path, encoder: Any = None, verify: bool = True) -> KnowledgeBase:
    """Read a base written by `build_knowledge_base`.

    `encoder` (a ModelSpec, loaded Encoder or spec string) is the encoder queries will be embedded with;
    a base built with other weights is refused (see `check_encoder`). `verify` checks the sha256 of every
    file against the manifest, so a truncated copy fails here rather than as odd scores later.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if verify:
        _verify_checksums(path, manifest)
    if encoder is not None:
        check_encoder(manifest, encoder, path)
    t = load_tensors(path / TENSORS_FILE)
    check_tensors(t, manifest, path / TENSORS_FILE)
    stats = None
    if "stats.confusion" in t:
        stats = RetrievalStats(
            pred_correct=t["stats.pred_correct"], pred_total=t["stats.pred_total"],
            true_correct=t["stats.true_correct"], true_total=t["stats.true_total"],
            confusion=t["stats.confusion"], excluded=int(manifest.get("stats", {}).get("excluded", 0)),
        )
    classes = [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["id"])]
    descriptions = load_descriptions(path / DESCRIPTIONS_FILE, classes)
    return KnowledgeBase(
        classes=classes,
        encoder_spec=manifest["encoder"]["spec"],
        encoder_key=manifest["encoder"]["key"],
        embed_dim=int(manifest["encoder"]["embed_dim"]),
        prototypes=t["prototypes"],
        exemplars=t["exemplars"],
        exemplar_labels=t["exemplar_labels"],
        text_prototypes=t.get("text_prototypes"),
        descriptions=descriptions,
        stats=stats,
        fusion=dict(manifest.get("fusion", {})),
        manifest=manifest,
        path=path,
    )


def _read_manifest(path: Path) -> dict:
    """The manifest of the base at `path`, refusing a folder that is not a base or has another format."""
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        hint = ""
        leftovers = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if leftovers and not path.exists():
            hint = f" (a rebuild was interrupted while swapping directories; the previous base is {leftovers[-1]})"
        raise KnowledgeBaseError(
            f"{path} is not a knowledge base (no {MANIFEST_FILE}){hint}: build one with "
            f"`fgvr build-kb DATA --out {path}`"
        )
    try:
        manifest = read_json(mf)
    except (OSError, ValueError) as e:
        raise KnowledgeBaseError(f"{mf} cannot be read ({e}): rebuild the base with fgvr build-kb") from None
    if not isinstance(manifest, dict):
        check_manifest(manifest, mf)  # says what is wrong
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise KnowledgeBaseError(
            f"{path} has knowledge-base format version {version!r} (written by fgvr "
            f"{manifest.get('fgvr_version', '?')}); this fgvr {__version__} reads version {FORMAT_VERSION}: "
            "rebuild it with fgvr build-kb"
        )
    check_manifest(manifest, mf)  # sealed, and shaped as the loader reads it (see integrity.py)
    return manifest


def _verify_checksums(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and matches its sha256."""
    for name, digest in manifest.get("checksums", {}).items():
        f = path / name
        if not f.is_file():
            raise KnowledgeBaseError(f"{f} is missing: the base is incomplete, rebuild it with fgvr build-kb")
        if _sha256(f) != digest:
            raise KnowledgeBaseError(f"{f} does not match its checksum in {path / MANIFEST_FILE}: the file is "
                                     "damaged, rebuild the base with fgvr build-kb")


# ----------------------------------------------------------------------------------------------------------
# saving


def save_knowledge_base(kb: KnowledgeBase, out: str | Path) -> Path:
    """Write `kb` to `out` atomically: a temporary sibling directory, fsynced, then renamed into place.

    An existing base at `out` is replaced wholesale (moved aside, the new one renamed in, the old one
    deleted), so nothing of the old copy can leak into the new one. A directory that is not a knowledge
    base is never replaced.
    """
    from safetensors.torch import save

    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {TENSORS_FILE: save(kb.tensors()),
             DESCRIPTIONS_FILE: (json_dumps(kb.descriptions, indent=2) + "\n").encode()}
    manifest = dict(kb.manifest)
    manifest["checksums"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest["fusion"] = kb.fusion
    seal_manifest(manifest)
    files[MANIFEST_FILE] = (json_dumps(manifest, indent=2) + "\n").encode()

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a base is meant to be shared
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the old base, and any left by a save killed between its two renames
    for leftover in ([old] if old is not None else []) + list(out.parent.glob(f".{out.name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    kb.manifest, kb.path = manifest, out
    return out


def _check_out(out: str | Path) -> Path:
    """`out` may be new, empty, or an existing knowledge base; anything else is never overwritten."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise KnowledgeBaseError(f"{out} exists and is a file: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise KnowledgeBaseError(f"{out} exists and is not a knowledge base (no {MANIFEST_FILE}); refusing to "
                                 "replace it: choose another --out")
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# showing


def format_knowledge_base(kb: KnowledgeBase, max_classes: int = 50) -> str:
    """A readable account of what a base holds (`fgvr kb show`)."""
    m = kb.manifest
    lines = [f"knowledge base {kb.path}", f"  format v{m.get('format_version')}, fgvr {m.get('fgvr_version')}, "
             f"created {m.get('created')}"]
    enc = m.get("encoder", {})
    lines.append(f"  encoder {enc.get('name')} ({enc.get('embed_dim')}-d, input {enc.get('image_size')}px, "
                 f"{'image+text' if enc.get('has_text') else 'image only'}), key {enc.get('key')}")
    lines.append(f"  {kb.num_classes} classes, k={m.get('k')}, seed={m.get('seed')}, "
                 f"augmentations: {', '.join(m.get('augmentations') or []) or 'none'}")
    sizes = ""
    if kb.path is not None:
        sizes = ", ".join(f"{f.name} {f.stat().st_size:,} B" for f in sorted(kb.path.iterdir()) if f.is_file())
    lines.append(f"  exemplars {tuple(kb.exemplars.shape)}, prototypes {tuple(kb.prototypes.shape)}, text prototypes "
                 f"{tuple(kb.text_prototypes.shape) if kb.text_prototypes is not None else 'none'}")
    if sizes:
        lines.append(f"  files: {sizes}")
    f = kb.fusion
    lines.append(f"  fusion: w={f.get('w')}, tau={f.get('tau'):.4g}, exemplar_weight={f.get('exemplar_weight')} "
                 f"({f.get('source', '')})" if f.get("tau") is not None else f"  fusion: {f}")
    if kb.stats is not None:
        s = kb.stats
        lines.append(f"  leave-one-out accuracy on the support set: {s.accuracy:.3f} over {int(s.true_total.sum())} "
                     f"images ({s.excluded} excluded: single-image classes)")
    lines.append("")
    lines.append(f"  {'id':>4}  {'class':<32} {'support':>7}  {'recall m/n':>10}  {'precision m/n':>13}")
    support = {c["id"]: c.get("support") for c in m.get("classes", [])}
    for i, name in enumerate(kb.classes[:max_classes]):
        rec = prec = "-"
        if kb.stats is not None:
            rec = f"{int(kb.stats.true_correct[i])}/{int(kb.stats.true_total[i])}"
            prec = f"{int(kb.stats.pred_correct[i])}/{int(kb.stats.pred_total[i])}"
        lines.append(f"  {i:>4}  {name[:32]:<32} {support.get(i, '?'):>7}  {rec:>10}  {prec:>13}")
    if kb.num_classes > max_classes:
        lines.append(f"  ... {kb.num_classes - max_classes} more classes")
    skipped = m.get("skipped", [])
    lines.append("")
    lines.append(f"  skipped files: {len(skipped)}")
    lines += [f"    {s['path']}: {s['reason']}" for s in skipped[:max_classes]]
    if kb.descriptions:
        lines.append("")
        lines.append(f"  descriptions ({(m.get('vlm') or {}).get('name', '?')}):")
        for name in kb.classes[:max_classes]:
            if name in kb.descriptions:
                lines.append(f"    {name}: {kb.descriptions[name]}")
    return "\n".join(lines)
