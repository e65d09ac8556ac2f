"""RUN/embeddings/: the query embeddings of a run-calibrated evaluation, kept so that the threshold can be
computed over every image before any decision, and so that a resumed (or another bench cell's) run does
not decode and encode the same images again.

Streaming: the embeddings stay on disk. The cache holds an index (path -> chunk file, row) and the last
few chunks it read (`RECENT_CHUNKS`), so its memory is a few batches of embeddings however many test images
the run has (50,000 ImageNet validation images would be 100 MB of float32 768-d rows held for nothing).
A reader in plan order (calibration, the classify pass) reads each chunk once."""

from __future__ import annotations

import json
import logging
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fgvr.io import atomic_write_bytes
from fgvr.pipeline import PATH_ERROR, DualSystem, Result

EMBED_DIR = "embeddings"
RECENT_CHUNKS = 4  # chunks kept in memory: a batch that straddles two chunks reads each once
log = logging.getLogger(__name__)


class EmbeddingCache:
    """RUN/embeddings/: the query embeddings of a run-calibrated evaluation, one safetensors file per batch
    (written atomically, so a kill loses at most the batch being encoded). Unreadable files are kept with
    their reason, so they are not decoded twice. Only an index is in memory (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[int, int]] = {}  # path -> (chunk number, row)
        self.chunk_timings: dict[int, tuple[float, float]] = {}  # chunk number -> (decode_s, encode_s)
        self.errors: dict[str, str] = {}
        self.count = 0
        self.loads = 0  # chunk files read (a test checks that a plan-order reader reads each once)
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()
        for f in sorted(folder.glob("chunk-*.safetensors")):
            try:  # new chunks are numbered after every existing one, damaged ones included
                number = int(f.stem.split("-")[1])
                self.count = max(self.count, number + 1)
            except ValueError:
                continue
            try:
                meta, rows = _check_chunk(f)
            except Exception as e:  # noqa: BLE001 - a derived file: any failure means "encode again"
                log.warning("%s is damaged (%s: %s); its images are encoded again", f, type(e).__name__, e)
                f.unlink(missing_ok=True)
                continue
            if rows != len(meta["paths"]):
                log.warning("%s is damaged (%d embeddings for %d paths); its images are encoded again",
                            f, rows, len(meta["paths"]))
                f.unlink(missing_ok=True)
                continue
            for j, p in enumerate(meta["paths"]):
                self.index[p] = (number, j)
            self.chunk_timings[number] = (meta["decode_s"], meta["encode_s"])
            self.errors.update(meta["errors"])

    def __contains__(self, path: str) -> bool:
        return path in self.index or path in self.errors

    def __len__(self) -> int:
        return len(self.index)

    def _path(self, number: int) -> Path:
        return self.folder / f"chunk-{number:06d}.safetensors"

    def _chunk(self, number: int) -> torch.Tensor:
        emb = self._recent.get(number)
        if emb is None:
            from safetensors.torch import load_file

            emb = load_file(str(self._path(number)))["embeddings"]
            self.loads += 1
            self._recent[number] = emb
            while len(self._recent) > RECENT_CHUNKS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(number)
        return emb

    def embedding(self, path: str) -> torch.Tensor | None:
        at = self.index.get(path)
        return None if at is None else self._chunk(at[0])[at[1]]

    def embeddings(self, paths: Sequence[str]) -> torch.Tensor:
        """(len(paths), D) for paths that are all in the index, read chunk by chunk."""
        return torch.stack([self.embedding(p) for p in paths]) if paths else torch.zeros(0, 0)

    def timings(self, path: str) -> tuple[float, float]:
        """(decode_s, encode_s) of the batch that encoded `path`."""
        return self.chunk_timings[self.index[path][0]]

    def readable(self, paths: Sequence[str], size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        """The cached paths among `paths`, in their order, with their embeddings, `size` at a time."""
        ok = [p for p in paths if p in self.index]
        for start in range(0, len(ok), size):
            chunk = ok[start:start + size]
            yield chunk, self.embeddings(chunk)

    def add(self, paths: list[str], enc: Any) -> None:
        from safetensors.torch import save

        ok_paths = [paths[i] for i in enc.ok]
        errors = {paths[i]: r.error for i, r in enumerate(enc.errors) if r is not None}
        meta = {"paths": ok_paths, "errors": errors, "decode_s": enc.decode_s, "encode_s": enc.encode_s}
        emb = enc.embeddings.float().contiguous()
        data = save({"embeddings": emb}, metadata={"fgvr": json.dumps(meta)})
        number = self.count
        atomic_write_bytes(self._path(number), data)
        self.count += 1
        for j, p in enumerate(ok_paths):
            self.index[p] = (number, j)
        self.chunk_timings[number] = (enc.decode_s, enc.encode_s)
        self.errors.update(errors)

    def classify(self, system: DualSystem, paths: list[str]) -> list[Result]:
        """System 1 onwards for cached images; error Results for the unreadable ones."""
        out: list[Result | None] = [None] * len(paths)
        ok = [i for i, p in enumerate(paths) if p in self.index]
        for i, p in enumerate(paths):
            if p not in self.index:
                out[i] = Result(path=p, path_taken=PATH_ERROR,
                                error=self.errors.get(p, "not encoded in pass 1 (the embedding cache lacks it)"))
        if ok:
            emb = self.embeddings([paths[i] for i in ok])
            decode_s, encode_s = self.timings(paths[ok[0]])
            timings = {"decode": decode_s, "encode": encode_s}
            for i, r in zip(ok, system.classify_embeddings(emb, [paths[i] for i in ok], None, timings)):
                out[i] = r
        return out  # type: ignore[return-value]


def _check_chunk(path: Path) -> tuple[dict[str, Any], int]:
    """(fgvr's metadata, rows) of a chunk from its header alone, after checking that the file holds every
    byte the header promises (a truncated file is damaged); the tensor is read only when used."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size}")
        header = json.loads(f.read(n))
    tensor = header["embeddings"]
    end = tensor["data_offsets"][1]
    if 8 + n + end != size:
        raise ValueError(f"{size} bytes where the header describes {8 + n + end}")
    if len(tensor["shape"]) != 2:
        raise ValueError(f"embeddings of shape {tensor['shape']}")
    return json.loads(header["__metadata__"]["fgvr"]), int(tensor["shape"][0])

