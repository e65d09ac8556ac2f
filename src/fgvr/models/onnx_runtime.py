"""ONNX Runtime for the CPU encoders: the network exported locally on first use, cached, and run by ORT.

Why: on CPU, PyTorch eager runs EfficientNet-Lite at about a sixth of what the cores do, and its OpenMP
threads collapse when anything else runs on the machine; ONNX Runtime runs the same graph several times
faster with the same features (within 1e-5; benchmarks/encoder_runtime.py). CUDA keeps torch.

The graph is exported by torch's own exporter (`dynamo=False`, nothing downloaded) into a cache:

* where: `FGVR_CACHE_DIR/onnx` when that variable is set; else `fgvr-onnx/` beside the weights file when
  that folder is writable (a user's venv); else `$XDG_CACHE_HOME/fgvr/onnx` (default `~/.cache/fgvr/onnx`),
  e.g. for weights in a read-only system site-packages.
* name: the variant, input size and a digest of everything that changes the graph (weights file name and
  size, torch and onnx versions, opset, graph format), so new weights or a new torch export afresh.
* written atomically (temporary file, fsync, rename), with a `.sha256` sidecar written after it; a file
  whose digest does not match (truncated, damaged, half-copied) is exported again, with a warning.
* two processes exporting at once: an exclusive `flock` on `<name>.lock` around check-and-export, so the
  second waits and then finds the first one's graph.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_FORMAT = "1"  # bump when what the exported graph computes changes


class OnnxRuntimeMissing(ImportError):
    """onnxruntime / onnx are not installed (they are fgvr dependencies: `make setup` installs them)."""


def cache_root(weights: Path) -> Path:
    """The folder exported graphs go to for weights at `weights` (see the module docstring)."""
    env = os.environ.get("FGVR_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser() / "onnx"
    beside = weights.parent / "fgvr-onnx"
    if os.access(beside if beside.is_dir() else weights.parent, os.W_OK):
        return beside
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fgvr" / "onnx"


def graph_name(stem: str, weights: Path, extra: Sequence[object] = ()) -> str:
    """`<stem>-<digest>.onnx`: the digest covers the weights file, the exporter that made the graph and
    `extra` (what else identifies the weights, e.g. a model folder's revision)."""
    st = weights.stat()
    ident = [weights.name, st.st_size, torch.__version__.split("+")[0], _onnx_version(), OPSET, GRAPH_FORMAT]
    ident += [str(x) for x in extra]
    return f"{stem}-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]}.onnx"


def _onnx_version() -> str:
    """The onnx package's version from its metadata: importing onnx takes about half a second (its
    ml_dtypes extension), paid by every CPU command before its first image otherwise."""
    from importlib import metadata

    try:
        return metadata.version("onnx")
    except metadata.PackageNotFoundError:
        import onnx  # not installed as a distribution: ask the module (ImportError if it is not there)

        return onnx.__version__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_intact(path: Path) -> bool:
    """The graph exists and its sha256 is the one written beside it when it was exported."""
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    return side.read_text().strip() == _sha256(path)


@contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: the second exporter waits for the first one's file
        yield
    finally:
        os.close(fd)  # drops the flock; the lock file stays (unlinking it would let two holders exist)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export `module` (input 'pixels', batch axis dynamic, output 'out') to `path`, atomically + digest."""
    import io

    buf = io.BytesIO()
    import warnings

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's constant-folding notes, not problems
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is the exporter that works here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants (batch stays dynamic)
        torch.onnx.export(module, (example,), buf, input_names=["pixels"], output_names=["out"],
                          dynamic_axes={"pixels": {0: "batch"}, "out": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
    data = buf.getvalue()
    _sidecar(path).unlink(missing_ok=True)  # a graph without a matching sidecar is never trusted
    _atomic_write(path, data)
    _atomic_write(_sidecar(path), hashlib.sha256(data).hexdigest().encode())


def cached_graph(path: Path, make: Callable[[], tuple[torch.nn.Module, torch.Tensor]]) -> Path:
    """`path`, exported first with `make()` -> (module, example input) unless an intact copy is there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from fgvr.errors import StorageError

        raise StorageError(f"cannot create the ONNX cache {path.parent} ({e.strerror}): set FGVR_CACHE_DIR "
                           "to a writable folder, or use --runtime torch") from None
    with _export_lock(path):
        if is_intact(path):
            return path
        if path.exists():
            log.warning("%s does not match its checksum (damaged or incomplete): exporting it again", path)
        else:
            log.info("exporting %s for ONNX Runtime (once; cached)", path.name)
        module, example = make()
        export(module, example, path)
    return path


def initializer_bytes(path: Path) -> int:
    """Bytes of the weights the graph at `path` carries (its initializers, at their stored dtype): what an
    ORT session holds of its own beside the torch modules. Read from the file's tensor headers (dims x
    dtype size), so a graph is not decoded to count it. Not an RSS measurement: ORT's arena and any
    pre-packed copies of the weights come on top (see docs/ARCHITECTURE.md)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def graph_weight_bytes(path: Path) -> int:
    """`initializer_bytes(path)`, remembered in `<graph>.weights.json` beside the graph under the digest of
    its `.sha256` sidecar: counting needs the onnx package, whose import is half a second of every command's
    start. A memo for another digest (the graph exported again) is not used; a read-only cache counts anew."""
    memo = path.with_name(path.name + ".weights.json")
    try:
        digest = _sidecar(path).read_text().strip()
    except OSError:
        return initializer_bytes(path)
    try:
        known = json.loads(memo.read_text())
        if known.get("sha256") == digest and type(known.get("initializer_bytes")) is int:
            return known["initializer_bytes"]
    except (OSError, ValueError, AttributeError):
        pass
    n = initializer_bytes(path)
    try:
        _atomic_write(memo, json.dumps({"sha256": digest, "initializer_bytes": n}).encode())
    except OSError:
        pass  # a read-only cache: the count is right, only not remembered
    return n


@dataclass
class OrtGraph:
    """An ONNX Runtime session on one exported graph, sized by `fgvr.threads`. Thread-safe: `run` may be
    called from several threads at once (ORT sessions are), which the server's encoder worker relies on.
    `weight_bytes`: the graph's initializer bytes, which the model registry counts on the ledger."""

    path: Path
    session: object
    threads: int
    weight_bytes: int = 0

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run(["out"], {"pixels": x})
        return torch.from_numpy(out)


def open_graph(path: Path, threads: int | None = None) -> OrtGraph:
    """An ORT session on `path` with intra-op threads from `fgvr.threads` and one inter-op thread."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxRuntimeMissing("ONNX Runtime is not installed: `pip install onnxruntime` (or run with "
                                 "--runtime torch)") from e
    from fgvr.threads import intra_op_threads

    n = threads or intra_op_threads()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        # The process asked for idle workers that sleep rather than spin (`fgvr serve` does: between two
        # micro-batches its request threads need the cores); ORT's own pool spins by default, like OpenMP's
        # active policy, and each spin after a batch was CPU the event loop and the decoders did not get.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return OrtGraph(path, session, n, graph_weight_bytes(path))
