"""`--ray ADDRESS`: the dual system's stages as a Ray Data pipeline, for collections past one process.

The data flow is the single process's, one Ray Data stage per step:

    paths (driver) -> decode + encode        actor pool, `workers` actors; each leases the encoder once from
                                             its own process's registry and keeps it for its life
                   -> System 1 + trigger     one light actor holding the knowledge base
                   -> System 2               only when one is configured: `slow_workers` actors that hold the
                                             VLM (or re-ranker) and run it on the rows the trigger sent slow
                                             (or on every row with --slow-all); other rows pass untouched
                   -> decision               inside System 2's actor, as `DualSystem.classify_embeddings` does
                   -> driver                 writes what arrives (shards for `classify`, results.jsonl for
                                             `evaluate`), deduplicated by path

Every stage calls the same `DualSystem` methods as the single process (`encode_paths`,
`classify_embeddings`), so a Ray run gives the single process's answers. A `--slow-budget` calibrated on
the run's own images needs every trigger score before any decision: `fgvr evaluate` then runs the encode
stage alone first (pass 1, embeddings kept in RUN/embeddings/ exactly as the single process keeps them),
computes the threshold on the driver, and feeds the kept embeddings to the rest (pass 2).

Faults: Ray Data restarts a dead actor and retries its lost batches (its actor pools default to
`max_restarts=-1`, `max_task_retries=-1`: ray/data/.../actor_pool_map_operator.py, Ray 2.60; passing them
ourselves is deprecated there), so a killed worker costs time, not records (tests/test_ray_run.py kills
one); the driver drops any repeat of a path. A killed driver loses only what was not yet written; a rerun skips what was.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any, Iterator

import numpy as np

from fgvr.errors import ModelError
from fgvr.pipeline import PATH_ERROR, EncodedBatch, Result

RAY_MISSING = ("--ray needs Ray, which is not installed here: pip install 'fgvr[ray]' "
               "(or run `make setup`, which installs it)")


class RayError(ModelError, RuntimeError):
    """Ray is missing or the cluster cannot be reached; the message says what to do."""


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayError(RAY_MISSING) from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> dict[str, float]:
    """Join or start the cluster named by --ray: `local` starts one on this machine (all its cores, no
    dashboard), `auto` joins the running one, anything else is a cluster address (host:port or
    ray://host:port). Inside a process already connected, that connection is used. Returns the cluster's
    resources."""
    ray = require_ray()
    if not ray.is_initialized():
        with _NativeStderr() as caught:
            try:
                if address == "local":
                    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                             configure_logging=False, log_to_driver=True)
                else:
                    ray.init(address=address, configure_logging=False, log_to_driver=True)
                error = None
            except Exception as e:  # noqa: BLE001 (ConnectionError, RuntimeError, ray's AuthenticationError, ...)
                error = e
        if error is not None:
            raise _connect_error(address, error, caught.text) from None
        caught.replay()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # fgvr shows its own progress, per image
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return {k: float(v) for k, v in ray.cluster_resources().items()}


AUTH_HINT = ("the cluster asks for a token (`ray start` turns token auth on by default): run with "
             "RAY_AUTH_MODE=token in the environment (the token is read from ~/.ray/auth_token or "
             "RAY_AUTH_TOKEN), or on the head node pass `--ray auto`")


def _connect_error(address: str, error: Exception, native: str) -> RayError:
    """One line for a failed ray.init: a cluster that wants a token says so and how to give it (Ray's own
    output is twenty lines of InvalidAuthToken retries, then "Failed to connect")."""
    text = f"{error} {native}"
    if "InvalidAuthToken" in text or "Unauthenticated" in text or type(error).__name__ == "AuthenticationError":
        return RayError(f"--ray {address}: {AUTH_HINT}")
    if not isinstance(error, (ConnectionError, RuntimeError, ValueError)):
        raise error
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RayError(f"--ray {address}: cannot connect to a Ray cluster ({first}). Use `--ray local` to start "
                    "one on this machine, or start one with `ray start --head` and pass `--ray auto`")


class _NativeStderr:
    """Catches what Ray's C++ core writes to file descriptor 2 while connecting (its retries are printed
    there, past Python's logging), so a failed connection is one line; the caught text goes to the debug log
    and, on success, back to stderr unchanged."""

    def __enter__(self):
        import tempfile

        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        raw = self._tmp.read()
        self._tmp.close()
        self.text = raw.decode("utf-8", "replace")
        if self.text:
            logging.getLogger(__name__).debug("ray.init said: %s", self.text)

    def replay(self) -> None:
        """What was caught, written to stderr after all (a connection that worked keeps Ray's own words)."""
        if self.text:
            os.write(2, self.text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------------
# the stages (each runs in an actor process of its own)


class _Stage:
    """Opens the dual system in this actor's process once: the knowledge base, the encoder lease, and
    System 2 when `system2`. The trigger's threshold is the driver's (already calibrated there).

    `runtime`: the driver's `FGVR_RUNTIME` (`fgvr --runtime`), set in this actor before its encoder spec is
    resolved. An actor's environment is the cluster's, not the driver's: a cluster started before the driver
    set it (`ray start`, or `--ray local` inside a process that already holds one) never sees it otherwise."""

    def __init__(self, open_kwargs: dict[str, Any], threshold: float, system2: bool, threads: int = 0,
                 runtime: str | None = None) -> None:
        from fgvr.models.runtime import ENV
        from fgvr.pipeline import open_system
        from fgvr.threads import configure

        if runtime:
            os.environ[ENV] = runtime
        if threads > 0:
            configure(threads)  # torch and ONNX Runtime in this actor: its num_cpus, no more
        kw = {**open_kwargs, "threshold": threshold, "budget": None}
        if not system2:
            kw.update(vlm=None, reranker=False, slow_all=False)
        self._opened = open_system(**kw)
        self.system = self._opened.__enter__()  # the lease lasts as long as this actor


class EncodeStage(_Stage):
    """Decode + encode: path -> embedding (zeros and an error for an unreadable file)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        enc = self.system.encode_paths(paths, keep_images=False)
        n, dim = len(paths), int(self.system.kb.prototypes.shape[1])
        emb = np.zeros((n, dim), np.float32)
        if enc.ok:
            emb[enc.ok] = enc.embeddings.float().numpy()
        ok = np.zeros(n, bool)
        ok[enc.ok] = True
        decode = np.array([r.timings["decode"] if r is not None else enc.decode_s for r in enc.errors])
        return {"path": np.array(paths, dtype=object), "embedding": emb, "ok": ok,
                "error": np.array([r.error if r is not None else "" for r in enc.errors], dtype=object),
                "decode_s": decode, "encode_s": np.where(ok, enc.encode_s, 0.0)}


class FastStage(_Stage):
    """System 1 + trigger (+ the decision when no System 2 runs): a finished record per row, and whether
    the row still needs System 2."""

    def __init__(self, open_kwargs: dict[str, Any], threshold: float, system2: bool,
                 runtime: str | None = None) -> None:
        super().__init__(open_kwargs, threshold, system2=False, runtime=runtime)
        self.system2, self.slow_all = system2, bool(open_kwargs.get("slow_all")) and system2

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        ok = np.asarray(batch["ok"], bool)
        records: list[str] = [""] * len(paths)
        needs = np.zeros(len(paths), bool)
        for i in np.flatnonzero(~ok):
            d = float(batch["decode_s"][i])
            records[i] = json.dumps(Result(path=paths[i], path_taken=PATH_ERROR, error=str(batch["error"][i]),
                                           timings={"decode": d, "total": d}).to_dict())
        idx = np.flatnonzero(ok)
        if len(idx):
            import torch

            timings = {"decode": float(np.mean(batch["decode_s"][idx])), "encode": float(np.mean(batch["encode_s"][idx]))}
            emb = torch.from_numpy(np.ascontiguousarray(batch["embedding"][idx], dtype=np.float32))
            for i, r in zip(idx, self.system.classify_embeddings(emb, [paths[i] for i in idx], None, timings)):
                records[i] = json.dumps(r.to_dict())
                needs[i] = self.system2 and (self.slow_all or bool(r.trigger and r.trigger["go_slow"]))
        return {"path": batch["path"], "embedding": batch["embedding"], "record": np.array(records, dtype=object),
                "needs_slow": needs}


class SlowStage(_Stage):
    """System 2 and the decision for the rows that need it; other rows pass through unchanged."""

    def __init__(self, open_kwargs: dict[str, Any], threshold: float, runtime: str | None = None) -> None:
        super().__init__(open_kwargs, threshold, system2=True, runtime=runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = list(batch["record"])
        idx = np.flatnonzero(np.asarray(batch["needs_slow"], bool))
        if len(idx):
            import torch

            first = json.loads(records[idx[0]])["timings"]
            timings = {k: first[k] for k in ("decode", "encode") if k in first}
            emb = torch.from_numpy(np.ascontiguousarray(batch["embedding"][idx], dtype=np.float32))
            paths = [str(batch["path"][i]) for i in idx]
            for i, r in zip(idx, self.system.classify_embeddings(emb, paths, None, timings)):
                records[i] = json.dumps(r.to_dict())
        return {"path": batch["path"], "record": np.array(records, dtype=object)}


# ------------------------------------------------------------------------------------------------------
# the engine the driver uses (same two methods as fgvr.engine.LocalEngine)


class RayEngine:
    """Runs the stages on a Ray cluster and yields finished batches to the driver, in completion order.

    `open_kwargs`: what `fgvr.pipeline.open_system` takes (each actor opens its own system from it).
    `system`: the driver's own system (its trigger threshold is read when a pass starts; a run that
    calibrates between passes hands the calibrated system over with `with_system`). `workers`: encode actors (default: one per CPU of the
    cluster, or per GPU with a CUDA device). `slow_workers`: System 2 actors (each takes one GPU with a
    CUDA device). `batch_size`: rows per batch in every stage.
    """

    def __init__(self, open_kwargs: dict[str, Any], system: Any, *, workers: int | None = None,
                 slow_workers: int = 1, batch_size: int = 16) -> None:
        self.ray = require_ray()
        self.open_kwargs, self.system = dict(open_kwargs), system
        self.batch_size, self.slow_workers = max(1, batch_size), max(1, slow_workers)
        res = self.ray.cluster_resources()
        self.cpus = max(1, int(res.get("CPU", 1)))
        self.cuda = str(open_kwargs.get("device", "cpu")).startswith("cuda")
        self.workers = max(1, workers or (int(res.get("GPU", 0)) if self.cuda and res.get("GPU") else self.cpus))
        self.has_system2 = bool(open_kwargs.get("vlm") or open_kwargs.get("reranker"))
        from fgvr.models.runtime import ENV

        self.runtime = os.environ.get(ENV) or None  # the driver's --runtime, handed to every actor

    def with_system(self, system: Any) -> "RayEngine":
        """The same engine (cluster, actors' settings) for `system`, e.g. with the trigger a run calibrated."""
        other = copy.copy(self)
        other.system = system
        return other

    # --- stages -----------------------------------------------------------------------------------------
    def _encode(self, ds: Any, threshold: float) -> Any:
        from ray.data import ActorPoolStrategy

        threads = max(1, self.cpus // self.workers)  # one actor per CPU by default; fewer get more threads
        gpus = float(self.ray.cluster_resources().get("GPU", 0))
        res = {"num_gpus": min(1.0, gpus / self.workers)} if self.cuda and gpus else {"num_cpus": threads}
        return ds.map_batches(EncodeStage, batch_size=self.batch_size, batch_format="numpy",
                              compute=ActorPoolStrategy(size=self.workers),
                              fn_constructor_kwargs={"open_kwargs": self.open_kwargs, "threshold": threshold,
                                                     "system2": False, "threads": 0 if self.cuda else threads,
                                                     "runtime": self.runtime},
                              **res)

    def _decide(self, ds: Any, threshold: float) -> Any:
        from ray.data import ActorPoolStrategy

        ds = ds.map_batches(FastStage, batch_size=self.batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(size=1), num_cpus=0,
                            fn_constructor_kwargs={"open_kwargs": self.open_kwargs, "threshold": threshold,
                                                   "system2": self.has_system2, "runtime": self.runtime})
        if self.has_system2:
            vlm = self.open_kwargs.get("vlm")
            local_vlm = vlm is not None and not vlm.served  # a served VLM's memory is the server's
            res = {"num_gpus": 1} if self.cuda and local_vlm else {"num_cpus": 0}
            ds = ds.map_batches(SlowStage, batch_size=self.batch_size, batch_format="numpy",
                                compute=ActorPoolStrategy(size=self.slow_workers),
                                fn_constructor_kwargs={"open_kwargs": self.open_kwargs, "threshold": threshold,
                                                       "runtime": self.runtime},
                                **res)
        return ds

    def _blocks(self, n: int) -> int:
        return max(1, min(n, math.ceil(n / self.batch_size)))

    def _threshold(self) -> float:
        t = self.system.trigger.threshold
        if t is None:
            raise ValueError("the trigger has no threshold yet (calibrate before running the decision stages)")
        return float(t)

    # --- what the driver calls ----------------------------------------------------------------------------
    def encode(self, paths: list[str]) -> Iterator[tuple[list[str], EncodedBatch]]:
        """(paths, EncodedBatch) per finished batch: decode + encode only (pass 1)."""
        if not paths:
            return
        import torch

        ds = self.ray.data.from_items([{"path": p} for p in paths], override_num_blocks=self._blocks(len(paths)))
        seen: set[str] = set()
        for b in self._encode(ds, threshold=1.0).iter_batches(batch_size=None, batch_format="numpy"):
            keep = [i for i, p in enumerate(b["path"]) if p not in seen]
            seen.update(str(b["path"][i]) for i in keep)
            if not keep:
                continue
            chunk = [str(b["path"][i]) for i in keep]
            ok = [j for j, i in enumerate(keep) if b["ok"][i]]
            errors = [None if b["ok"][i] else Result(path=chunk[j], path_taken=PATH_ERROR, error=str(b["error"][i]),
                                                     timings={"decode": float(b["decode_s"][i]),
                                                              "total": float(b["decode_s"][i])})
                      for j, i in enumerate(keep)]
            emb = torch.from_numpy(np.ascontiguousarray(b["embedding"][[keep[j] for j in ok]], dtype=np.float32))
            oki = [keep[j] for j in ok]
            yield chunk, EncodedBatch(errors, ok, emb, None,
                                      float(np.mean(b["decode_s"][oki])) if oki else 0.0,
                                      float(np.mean(b["encode_s"][oki])) if oki else 0.0)

    def classify(self, paths: list[str], cache: Any = None) -> Iterator[tuple[list[str], list[Result]]]:
        """(paths, Results) per finished batch, from the files or (with `cache`) from kept embeddings."""
        from fgvr.collection import result_from_dict

        if not paths:
            return
        threshold = self._threshold()
        if cache is None:
            ds = self._encode(self.ray.data.from_items([{"path": p} for p in paths],
                                                       override_num_blocks=self._blocks(len(paths))), threshold)
        else:
            missing = [p for p in paths if cache.embedding(p) is None]
            if missing:  # unreadable in pass 1: their error records need no cluster
                errors = [r for r in cache.classify(self.system, missing)]
                yield missing, errors
            rows = [{"path": p, "embedding": cache.embedding(p).float().numpy(), "ok": True, "error": "",
                     "decode_s": cache.timings(p)[0], "encode_s": cache.timings(p)[1]}
                    for p in paths if p in cache.index]
            if not rows:
                return
            ds = self.ray.data.from_items(rows, override_num_blocks=self._blocks(len(rows)))
        seen: set[str] = set()
        for b in self._decide(ds, threshold).iter_batches(batch_size=None, batch_format="numpy"):
            chunk, results = [], []
            for p, rec in zip(b["path"], b["record"]):
                if str(p) in seen:
                    continue  # a batch retried after a worker died, already delivered once
                seen.add(str(p))
                chunk.append(str(p))
                results.append(result_from_dict(json.loads(rec)))
            if chunk:
                yield chunk, results
