"""RUN/embeddings/: the query embeddings of a run-calibrated evaluation, kept so that the threshold can be
computed over every image before any decision, and so that a resumed (or another bench cell's) run does
not decode and encode the same images again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fgvr.io import atomic_write_bytes
from fgvr.pipeline import PATH_ERROR, DualSystem, Result

EMBED_DIR = "embeddings"
log = logging.getLogger(__name__)


class EmbeddingCache:
    """RUN/embeddings/: the query embeddings of a run-calibrated evaluation, one safetensors file per batch
    (written atomically, so a kill loses at most the batch being encoded). Unreadable files are kept with
    their reason, so they are not decoded twice."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, tuple[torch.Tensor, float, float]] = {}
        self.errors: dict[str, str] = {}
        self.count = 0
        for f in sorted(folder.glob("chunk-*.safetensors")):
            try:  # new chunks are numbered after every existing one, damaged ones included
                self.count = max(self.count, int(f.stem.split("-")[1]) + 1)
            except ValueError:
                pass
            try:
                meta = json.loads(_safetensors_metadata(f)["fgvr"])
                emb = load_file(str(f))["embeddings"]
                if emb.shape[0] != len(meta["paths"]):
                    raise ValueError(f"{emb.shape[0]} embeddings for {len(meta['paths'])} paths")
            except Exception as e:  # noqa: BLE001 - a derived file: any failure means "encode again"
                log.warning("%s is damaged (%s: %s); its images are encoded again", f, type(e).__name__, e)
                f.unlink(missing_ok=True)
                continue
            for j, p in enumerate(meta["paths"]):
                self.rows[p] = (emb[j], meta["decode_s"], meta["encode_s"])
            self.errors.update(meta["errors"])

    def __contains__(self, path: str) -> bool:
        return path in self.rows or path in self.errors

    def embedding(self, path: str) -> torch.Tensor | None:
        row = self.rows.get(path)
        return None if row is None else row[0]

    def add(self, paths: list[str], enc: Any) -> None:
        from safetensors.torch import save

        ok_paths = [paths[i] for i in enc.ok]
        errors = {paths[i]: r.error for i, r in enumerate(enc.errors) if r is not None}
        meta = {"paths": ok_paths, "errors": errors, "decode_s": enc.decode_s, "encode_s": enc.encode_s}
        data = save({"embeddings": enc.embeddings.float().contiguous()}, metadata={"fgvr": json.dumps(meta)})
        atomic_write_bytes(self.folder / f"chunk-{self.count:06d}.safetensors", data)
        self.count += 1
        for j, p in enumerate(ok_paths):
            self.rows[p] = (enc.embeddings[j], enc.decode_s, enc.encode_s)
        self.errors.update(errors)

    def classify(self, system: DualSystem, paths: list[str]) -> list[Result]:
        """System 1 onwards for cached images; error Results for the unreadable ones."""
        out: list[Result | None] = [None] * len(paths)
        ok = [i for i, p in enumerate(paths) if p in self.rows]
        for i, p in enumerate(paths):
            if p not in self.rows:
                out[i] = Result(path=p, path_taken=PATH_ERROR,
                                error=self.errors.get(p, "not encoded in pass 1 (the embedding cache lacks it)"))
        if ok:
            emb = torch.stack([self.rows[paths[i]][0] for i in ok])
            timings = {"decode": self.rows[paths[ok[0]]][1], "encode": self.rows[paths[ok[0]]][2]}
            for i, r in zip(ok, system.classify_embeddings(emb, [paths[i] for i in ok], None, timings)):
                out[i] = r
        return out  # type: ignore[return-value]


def _safetensors_metadata(path: Path) -> dict[str, str]:
    import struct

    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})
