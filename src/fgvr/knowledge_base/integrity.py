"""Knowledge-base integrity (used by `storage`): everything a base holds is checked before a single score comes out of it.

A base is `manifest.json` + `tensors.safetensors` + `descriptions.json`. The manifest lists the sha256 of
the other two files in `checksums`, and also seals itself: `manifest_sha256` is the sha256
of the manifest's canonical JSON (keys sorted, no whitespace) without that one field. So an edited encoder name,
a removed class, or a changed support list fails here, as a damaged tensors file always did. A base
written before manifests were sealed loads with a warning (rebuild it to protect it).

Checksums say a file is the one that was written, not that it is usable: someone who edits a file and
updates its checksum gets past them. So the structure is checked too, and each failure is one
`KnowledgeBaseError` naming the file: the manifest is an object with the fields the loader reads; class
ids are 0..C-1; the tensors parse and their shapes agree with the manifest (C classes, D dimensions, one
exemplar per support record with the same class id); descriptions are an object of class name -> text.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fgvr.errors import KnowledgeBaseError

SEAL = "manifest_sha256"  # the manifest's own checksum, a top-level field
REBUILD = "rebuild the base with fgvr build-kb"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, leaving out its own checksum."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """Store the manifest's own checksum in it (the last step before it is written)."""
    manifest[SEAL] = manifest_digest(manifest)
    return manifest


def _fail(where: Path, what: str) -> KnowledgeBaseError:
    return KnowledgeBaseError(f"{where}: {what}; the base is damaged or was edited by hand: {REBUILD}")


def check_manifest(manifest: Any, mf: Path) -> None:
    """The manifest is sealed and has the structure the loader reads (called after the version check)."""
    if not isinstance(manifest, dict):
        raise _fail(mf, f"is a JSON {type(manifest).__name__}, not an object")
    sums = manifest.get("checksums")
    if not isinstance(sums, dict):
        raise _fail(mf, "has no file checksums")
    want = manifest.get(SEAL)
    if want is None:
        warnings.warn(f"{mf} was written before manifests carried their own checksum: edits to it cannot be "
                      f"detected; {REBUILD} to protect it", stacklevel=3)
    elif want != manifest_digest(manifest):
        raise _fail(mf, "does not match its own checksum (it was changed after the base was built)")
    enc = manifest.get("encoder")
    if not isinstance(enc, dict) or not isinstance(enc.get("spec"), dict) or not isinstance(enc.get("key"), str):
        raise _fail(mf, "lacks the 'encoder' entry (key, spec) that says which model made the embeddings")
    if not isinstance(enc.get("embed_dim"), int) or enc["embed_dim"] < 1:
        raise _fail(mf, "the encoder's 'embed_dim' is missing or not a positive integer")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes:
        raise _fail(mf, "lists no classes")
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
               for c in classes):
        raise _fail(mf, "has a class entry without an integer 'id' and a 'name'")
    ids = sorted(c["id"] for c in classes)
    if ids != list(range(len(classes))):
        raise _fail(mf, f"class ids are not 0..{len(classes) - 1} (a class was removed or added)")
    names = [c["name"] for c in classes]
    if len(set(names)) != len(names):
        raise _fail(mf, "names a class twice")
    support = manifest.get("support", [])
    if not isinstance(support, list) or not all(
            isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("class_id"), int)
            and 0 <= s["class_id"] < len(classes) for s in support):
        raise _fail(mf, "has a support entry without a path or with a class id outside the class list")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors file, or one error naming it (a truncated file raises SafetensorError, not OSError)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError: all mean "unusable file"
        raise _fail(path, f"cannot be read as tensors ({type(e).__name__}: {e})") from None


def check_tensors(t: dict[str, torch.Tensor], manifest: dict, path: Path) -> None:
    """Shapes agree with the manifest: prototypes (C,D), exemplars (N,D) with labels in 0..C-1 matching the
    support list, optional text prototypes (C,D), statistics per class."""
    c, d = len(manifest["classes"]), manifest["encoder"]["embed_dim"]
    for name in ("prototypes", "exemplars", "exemplar_labels"):
        if name not in t:
            raise _fail(path, f"has no '{name}' tensor")
    shapes = {"prototypes": (c, d)}
    if "text_prototypes" in t:
        shapes["text_prototypes"] = (c, d)
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise _fail(path, f"'{name}' has shape {tuple(t[name].shape)}, but the manifest has {c} classes of "
                              f"{d} dimensions")
    ex, labels = t["exemplars"], t["exemplar_labels"]
    if ex.ndim != 2 or ex.shape[1] != d or labels.shape != (ex.shape[0],):
        raise _fail(path, f"exemplars {tuple(ex.shape)} and labels {tuple(labels.shape)} do not fit {d} dimensions")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise _fail(path, f"an exemplar label lies outside the {c} classes of the manifest")
    support = manifest.get("support")
    if support and [s["class_id"] for s in support] != labels.tolist():
        raise _fail(path, "the exemplars do not match the manifest's support list (one per support image)")
    for name, shape in (("stats.pred_correct", (c,)), ("stats.pred_total", (c,)), ("stats.true_correct", (c,)),
                        ("stats.true_total", (c,)), ("stats.confusion", (c, c))):
        if name in t and tuple(t[name].shape) != shape:
            raise _fail(path, f"'{name}' has shape {tuple(t[name].shape)}, not {shape}")
    for name, x in t.items():
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise _fail(path, f"'{name}' holds NaN or infinite values")


def load_descriptions(path: Path, classes: list[str]) -> dict[str, str]:
    """descriptions.json: an object of class name -> description (empty object when none were written)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(path, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise _fail(path, "is not an object of class name -> description text")
    unknown = sorted(set(data) - set(classes))
    if unknown:
        raise _fail(path, f"describes class(es) the base does not have: {unknown[:5]}")
    return data


# ----------------------------------------------------------------------------------------------------------
# the encoder fingerprint

FINGERPRINT_IMAGE = "fgvr-fingerprint-v1"  # names the generated image below; change it if the image changes
# The fingerprint is compared by cosine similarity, with a tolerance for the same weights run in another
# precision or on another device. Measured here on EfficientNet-Lite0 (CPU, benchmarks/fingerprint.py):
# fp16 0.99999 and bf16 0.9968 against float32 (bf16 keeps 8 bits of mantissa; CUDA bf16 kernels round the
# same way, not checked on a GPU here). Another encoder of the same width is far below: Lite2 against Lite0,
# both 1280-d, 0.062. 0.98 sits between, with room for bf16 on deeper models.
FINGERPRINT_MIN_COSINE = 0.98


def fingerprint_image():
    """A fixed 224x224 RGB image made without any random generator (so no library version can change it):
    two gradients and integer-hash noise, so every channel and spatial frequency is exercised."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:224, 0:224].astype(np.int64)
    noise = [((x * 73856093) ^ (y * 19349663) ^ (c * 83492791)) % 251 for c in range(3)]
    r = (x * 255 // 223 + noise[0]) // 2
    g = (y * 255 // 223 + noise[1]) // 2
    b = ((x + y) * 255 // 446 + noise[2]) // 2
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), mode="RGB")


def encoder_fingerprint(encoder: Any) -> dict:
    """What a base stores of its encoder's behaviour: the embedding of `fingerprint_image()`."""
    emb = encoder.encode_images([fingerprint_image()])[0].detach().float().cpu()
    return {"image": FINGERPRINT_IMAGE, "min_cosine": FINGERPRINT_MIN_COSINE,
            "embedding": [round(float(v), 6) for v in emb]}


def check_fingerprint(manifest: dict, encoder: Any, where: Any) -> None:
    """Refuse an encoder whose embedding of the fingerprint image is not the one the base stored: a manifest
    that names another encoder of the same width, weights changed on disk, another model under the same
    name. A base built before fingerprints existed loads with a warning."""
    fp = (manifest.get("encoder") or {}).get("fingerprint")
    if fp is None:
        warnings.warn(f"{where} has no encoder fingerprint (built by an older fgvr): the encoder cannot be "
                      f"checked against it; {REBUILD} to protect it", stacklevel=3)
        return
    if not isinstance(fp, dict) or fp.get("image") != FINGERPRINT_IMAGE or not isinstance(fp.get("embedding"), list):
        raise KnowledgeBaseError(f"{where}: the encoder fingerprint is not one this fgvr reads; {REBUILD}")
    want = torch.tensor(fp["embedding"], dtype=torch.float32)
    got = encoder.encode_images([fingerprint_image()])[0].detach().float().cpu()
    if got.shape != want.shape:
        raise KnowledgeBaseError(f"{where}: the encoder gives {got.shape[0]}-d features, the base's encoder gave "
                                 f"{want.shape[0]}-d: it is another encoder; {REBUILD} with this one")
    cos = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    limit = float(fp.get("min_cosine", FINGERPRINT_MIN_COSINE))
    if not cos >= limit:
        raise KnowledgeBaseError(
            f"{where}: the encoder {getattr(getattr(encoder, 'spec', None), 'key', '')} does not give the features "
            f"the base was built with (fingerprint cosine {cos:.3f}, needs {limit:g}): another encoder, changed "
            f"weights or an edited manifest; use the encoder the base was built with, or {REBUILD}")
