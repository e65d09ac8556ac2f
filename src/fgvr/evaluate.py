"""`fgvr evaluate`: run the dual system over a labelled folder / CSV and measure it honestly.

Correct means exact match on class ids (the predicted class IS the labelled class), never a string
similarity between names. Files written to the run folder RUN:

* `run.json`      what the run is bound to: the knowledge base's content digest (its tensors, classes,
                  fusion, descriptions, support list; not its path: a base rebuilt in place with another
                  seed is another base), the data list's digest, the experience rules' digest, and every
                  setting that changes an answer. A restart with anything different is refused, naming what
                  changed, because appending to results made under other inputs would mix two experiments.
                  (`--limit` may grow or shrink on a restart when the threshold does not depend on the set
                  of images: the plan is a seeded order, so a limit takes a prefix of it; with a threshold
                  calibrated on the run's own images it may not.)
* `.lock` next to RUN: one writer at a time (see `fgvr.locks`); a second `fgvr evaluate` into the same
                  folder is refused naming the first.
* `results.jsonl` one JSON line per image, appended and fsync'ed batch by batch. A killed run restarts
                  where it stopped: images already in the file are skipped, a torn last line (the crash
                  happened mid-write) is cut off and that image is redone. Never a duplicate.
* `summary.json`  computed from results.jsonl alone (so a resumed run gives the same summary as an
                  uninterrupted one, apart from timings and memory), written atomically.
* `report.md` + PNGs (see `fgvr.report`).

Images of a test class the base does not know are classified and listed, but kept out of accuracy: no
prediction can be right for them. Unreadable images are error records; they count as wrong in `accuracy`
(an image the system cannot read is not a correct answer), and `accuracy_readable` leaves them out.

The accuracy-vs-budget curve comes from one run's logged scores: rank the images by the trigger's score; at
budget b the top b·N go slow and take System 2's decided answer, the rest keep System 1's. That is exact for
every b up to the realised slow rate (the slowed images are precisely the top-ranked ones), and for every b
when the run used `slow_all` (System 2 on every image, decisions still made by the trigger).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fgvr.data import Dataset
from fgvr.errors import InputError, RunMismatchError, System2Error
from fgvr.fast_path import system1
from fgvr.io import atomic_write_bytes, atomic_write_json, with_filename
from fgvr.pipeline import (PATH_ERROR, PATH_FAST, PATH_SLOW, PATH_SLOW_FAILED, PATH_UNAVAILABLE, DualSystem,
                           Result)
from fgvr.trigger import Trigger

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run.json"
EMBED_DIR = "embeddings"
CURVE_BUDGETS = [round(0.05 * i, 2) for i in range(21)]
PEAKS = "peak_memory.json"
log = logging.getLogger(__name__)
# What a record depends on; a restart must match them ("limit" too when the run calibrates on itself).
_MUST_MATCH = ("kb_digest", "data_digest", "experience_digest", "encoder", "system2", "system2_spec", "threshold",
               "budget", "calibrate", "top_k", "weight", "slow_all", "n_rules", "rationale", "max_image_pixels")
_WHAT = {"kb_digest": "the knowledge base's content (rebuilt or changed since)",
         "data_digest": "the data list (images or labels added, removed or relabelled)",
         "experience_digest": "the experience rules of the base", "limit": "--limit (the threshold was "
         "calibrated on the first run's images)"}


class EvaluateError(RunMismatchError, RuntimeError):
    """The run cannot start or continue; the message says what to do."""


# ------------------------------------------------------------------------------------------------------
# results.jsonl: append, fsync, resume


def read_results(path: Path, repair: bool = True) -> list[dict[str, Any]]:
    """Records of a results file, first record per path kept.

    A torn last line (a crash mid-write) is cut from the file when `repair`, so the next append starts on
    a clean line and that image is redone. A bad line in the middle (not written by us) is reported on
    stderr and skipped, so its image is redone too.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # everything before `cut` is complete lines
    records = []
    for n, line in enumerate(data[:cut].split(b"\n")[:-1], 1):
        rec = _parse(line)
        if rec is not None:
            records.append(rec)
        elif line.strip():
            log.warning("%s, line %d is not a result record; skipping it (that image is redone)", path, n)
    tail = data[cut:]
    if tail.strip():
        rec = _parse(tail)
        if rec is not None:  # complete record, only its newline missing
            records.append(rec)
            if repair:
                with path.open("ab") as f:
                    f.write(b"\n")
        elif repair:
            log.warning("%s ended in a partly written line (the last run was interrupted); dropping it and "
                        "redoing that image", path)
            with path.open("r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
    seen, unique = set(), []
    for r in records:
        if r["path"] not in seen:
            seen.add(r["path"])
            unique.append(r)
    return unique


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "path" in rec else None


def append_results(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines and fsync, so a batch on disk survives a kill -9 or a power cut.
    A batch is written with one write call, so a full disk leaves at most a torn last line (cut on resume)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    try:
        with path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise with_filename(e, path) from e


# ------------------------------------------------------------------------------------------------------
# planning


def support_files(kb: Any) -> set[str]:
    """Resolved paths of the base's support images (from its manifest), to keep them out of a test set."""
    return {str(f.path.resolve()) for f in kb.support_files()}


def plan(dataset: Dataset, kb_classes: list[str], limit: int | None = None, seed: int = 0,
         exclude: set[str] = frozenset()) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """[(resolved path, label name, kb class id or None)] in a fixed order, and the unknown class names.

    Paths in `exclude` (the base's support images: evaluating on them would measure memory, not
    recognition) are left out. The order is a seeded shuffle of the sorted paths, so `--limit N` takes a
    spread over classes (not the first class's images) and is the same on every restart.
    """
    index = {c: i for i, c in enumerate(kb_classes)}
    unknown = sorted(c for c in dataset.classes if c not in index)
    labels: dict[str, str] = {}
    for s in dataset.samples:  # one record per file: a repeated row would be a duplicate result
        p = str(Path(s.path).resolve())
        if labels.setdefault(p, s.label) != s.label:
            raise InputError(f"{p} is listed under two labels, {labels[p]!r} and {s.label!r}: keep one")
    items = sorted((p, label) for p, label in labels.items() if p not in exclude)
    random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[: max(0, limit)]
    return [(p, label, index.get(label)) for p, label in items], unknown


def _digest(obj: Any) -> str:
    import hashlib

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x, default=str).encode() + b"\0")

    feed(obj)
    return h.hexdigest()[:32]


def knowledge_base_digest(kb: Any) -> str:
    """The content of a base as System 1, the trigger and System 2 see it: tensors, classes, fusion,
    statistics, descriptions, encoder and the support list (what the re-ranker matches against). Not its
    path or build time: the same content at another path is the same base."""
    stats = getattr(kb, "stats", None)
    manifest = getattr(kb, "manifest", None) or {}
    return _digest({
        "classes": list(kb.classes), "encoder": getattr(kb, "encoder_key", None),
        "prototypes": kb.prototypes, "exemplars": getattr(kb, "exemplars", None),
        "exemplar_labels": getattr(kb, "exemplar_labels", None), "text": getattr(kb, "text_prototypes", None),
        "stats": stats.tensors() if stats is not None and hasattr(stats, "tensors") else None,
        "fusion": getattr(kb, "fusion", None), "descriptions": getattr(kb, "descriptions", None),
        "support": manifest.get("support"), "data_root": (manifest.get("data") or {}).get("root"),
    })


def data_digest(dataset: Dataset) -> str:
    """The data list: every (resolved path, label) pair and the class list, order-free."""
    return _digest({"classes": sorted(dataset.classes),
                    "samples": sorted((str(Path(s.path).resolve()), s.label) for s in dataset.samples)})


def _experience_digest(system: Any) -> str | None:
    lib = getattr(system, "experience", None)
    rules = getattr(lib, "rules", None)
    if not rules:
        return None
    return _digest([r.to_json() if hasattr(r, "to_json") else str(r) for r in rules])


def _show(key: str, value: Any) -> str:
    return f"{value[:12]}…" if key.endswith("_digest") and isinstance(value, str) else repr(value)


def check_config(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write run.json on the first start; on a restart refuse inputs or settings that differ. Returns what
    is stored (a restart keeps the threshold calibrated the first time)."""
    f = out / RUN_CONFIG
    if f.is_file():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise EvaluateError(f"{f} cannot be read ({e}): it is not a run of this fgvr; start fresh with a new "
                                f"--out folder (or delete {out})") from None
        must = _MUST_MATCH + (("limit",) if config.get("calibrate") == "run" else ())
        diff = [k for k in must if old.get(k) != config.get(k)]
        if diff:
            lines = "; ".join(f"{_WHAT.get(k, k)}: {_show(k, old.get(k))} then, {_show(k, config.get(k))} now"
                              for k in diff)
            raise EvaluateError(
                f"{out} holds a run made with other settings or inputs ({lines}). Resume with the same "
                f"inputs and settings, or start fresh: pass a new --out folder (or delete {out})."
            )
        stored = {**old, **config}  # keeps the threshold calibrated the first time
        if old.get("limit") != config.get("limit"):
            atomic_write_json(f, stored)  # run.json says what the run now covers
        return stored
    atomic_write_json(f, config)
    return dict(config)


# ------------------------------------------------------------------------------------------------------
# the run


def run_evaluation(system: DualSystem, dataset: Dataset, out: str | Path, config: dict[str, Any], *,
                   limit: int | None = None, batch_size: int = 16, progress: bool = True,
                   report: bool = True, calibrate: str = "run", engine: Any = None) -> dict[str, Any]:
    """Classify every planned image not yet in RUN/results.jsonl, then summarise the whole run.

    With a slow-path budget, `calibrate` says where the trigger's threshold comes from:
      "run"      (default) the (1 - budget) quantile of the trigger scores of this run's own images: so the
                 budget is met on this run. Two passes: every image is decoded and encoded once and its
                 embedding kept in RUN/embeddings/ (resumable); the threshold is computed and stored in
                 run.json; then System 1, trigger, System 2 (re-decoding only the images that go slow) and
                 the decision run batch by batch. Only unlabelled scores are used, never the labels.
      "support"  the base's support images scored leave-one-out (what `fgvr classify` does: one image cannot
                 calibrate anything). Support images are scored against k-1 shots, so they look less certain
                 than queries, and the realised rate comes out below the budget (Fashion-MNIST 5-shot: 0.20
                 for a budget of 0.3); one streaming pass. A threshold the system's trigger already has
                 (`open_system` calibrates on the support set) is used as it is.
    With a threshold given directly, there is nothing to calibrate. The run uses its own copy of the trigger
    with the threshold it settles on (`summary["trigger"]`); `system` (and `engine`) are left as they are.
    `engine` computes the batches: `fgvr.engine.LocalEngine` (default, this process) or
    `fgvr.ray_run.RayEngine` (Ray Data); the files written are the same.
    """
    if calibrate not in ("run", "support"):
        raise ValueError(f"calibrate must be 'run' or 'support', got {calibrate!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    from fgvr.locks import output_lock

    with output_lock(out, "evaluate"):
        return _run_locked(system, dataset, out, config, limit=limit, batch_size=batch_size, progress=progress,
                           report=report, calibrate=calibrate, engine=engine)


def _run_locked(system: DualSystem, dataset: Dataset, out: Path, config: dict[str, Any], *, limit: int | None,
                batch_size: int, progress: bool, report: bool, calibrate: str, engine: Any) -> dict[str, Any]:
    kb = system.kb
    calibrate_on = calibrate if system.trigger.budget is not None else None
    stored = check_config(out, _run_config(system, dataset, config, calibrate_on, limit))
    support = support_files(kb)
    from fgvr.rules import experience_images

    chose_rules = experience_images(getattr(kb, "path", None)) - support
    items, unknown = plan(dataset, kb.classes, limit, exclude=support | chose_rules)
    n_support = sum(1 for smp in dataset.samples if str(Path(smp.path).resolve()) in support)
    n_experience = sum(1 for smp in dataset.samples if str(Path(smp.path).resolve()) in chose_rules)
    _say_what_is_left_out(dataset, items, unknown, n_support)
    if n_experience:
        log.warning("leaving out %d image(s) of %s that the experience build used (its rules were chosen on "
                    "them)", n_experience, dataset.root)
    results_file = out / RESULTS
    planned = {p for p, _, _ in items}
    previous = [r for r in read_results(results_file) if r["path"] in planned]
    done = {r["path"] for r in previous}
    todo = [it for it in items if it[0] not in done]
    if done and todo:
        log.info("resuming %s: %d of %d image(s) already done", out, len(items) - len(todo), len(items))

    from fgvr.engine import LocalEngine

    t0 = time.perf_counter()
    cache = None
    if calibrate_on == "run":
        cache = _encode_pass(engine or LocalEngine(system, batch_size), EmbeddingCache(out / EMBED_DIR), todo,
                             progress)
    trigger, stored = _settle_threshold(system, calibrate_on, stored, cache, items, out)
    system = system.with_trigger(trigger)  # the run's own copy: the caller's system is left as it is
    engine = engine.with_system(system) if engine is not None else LocalEngine(system, batch_size)
    _classify_pass(system, engine, items, todo, previous, results_file, cache, out, progress)
    wall = time.perf_counter() - t0
    peaks = _record_peak(out, system)

    records = _records_in_plan_order(results_file, items)
    summary = summarise(records, kb.classes, unknown)
    summary["support_images_excluded"] = n_support
    summary["experience_images_excluded"] = n_experience
    summary["trigger"] = {"threshold": trigger.threshold, "budget": trigger.budget,
                          "calibrated_on": calibrate_on, "realised_slow_rate": summary["slow_rate"]}
    summary["run"] = {"images_this_process": len(todo), "wall_s_this_process": wall,
                      "images_per_s_this_process": (len(todo) / wall) if wall > 0 and todo else None,
                      "peak_memory_this_process": peaks["this_process"],
                      "peak_memory": peaks["run"]}
    summary["config"] = stored
    how = getattr(system.slow, "describe", None)  # which System 2 answered, and how (backend, mode)
    summary["system2"] = how() if how else ({"system2": system.slow.name} if system.slow else None)
    atomic_write_json(out / SUMMARY, summary)
    if report:
        from fgvr.report import write_report

        write_report(out, summary)
    check_system2(summary, system, out)
    return summary


def system_binding(system: DualSystem) -> dict[str, Any]:
    """Every setting of a system that changes its answers, with digests of its base and experience rules:
    what a resumable run (`fgvr evaluate`, `fgvr classify --out`) is bound to besides its data."""
    from fgvr.data import max_decoded_pixels

    slow_spec = getattr(system.slow, "spec", None)
    return {"threshold": None if system.trigger.budget is not None else system.trigger.threshold,
            "budget": system.trigger.budget, "top_k": system.k, "weight": system.weight,
            "slow_all": system.slow_all, "system2": getattr(system.slow, "name", None) if system.slow else None,
            "system2_spec": getattr(slow_spec, "key", None), "n_rules": system.n_rules,
            "rationale": bool(getattr(system.slow, "rationale", False)),
            "kb_digest": knowledge_base_digest(system.kb), "experience_digest": _experience_digest(system),
            "max_image_pixels": max_decoded_pixels()}


def _run_config(system: DualSystem, dataset: Dataset, config: dict[str, Any], calibrate_on: str | None,
                limit: int | None) -> dict[str, Any]:
    """What the run is bound to (a resumed run must match it): the caller's config, the system's settings,
    and digests of the base, the data and the experience rules."""
    binding = system_binding(system)
    binding.update({k: config[k] for k in ("max_image_pixels",) if k in config})  # the caller's, where given
    return {**config, **binding, "calibrate": calibrate_on, "limit": limit, "data_digest": data_digest(dataset)}


def _say_what_is_left_out(dataset: Dataset, items: list, unknown: list[str], n_support: int) -> None:
    if n_support:
        log.warning("leaving out %d image(s) of %s that are in the knowledge base's support set",
                    n_support, dataset.root)
    if unknown:
        n_unknown = sum(1 for _, _, cid in items if cid is None)
        log.warning("test class(es) not in the knowledge base: %s. Their %d image(s) are classified and "
                    "reported separately, not counted in accuracy.", ", ".join(unknown), n_unknown)


def _encode_pass(engine: Any, cache: "EmbeddingCache", todo: list, progress: bool) -> "EmbeddingCache":
    """Pass 1 of a run-calibrated evaluation: every image not yet in the cache decoded and encoded once."""
    from tqdm import tqdm

    need = [p for p, _, _ in todo if p not in cache]
    bar = tqdm(total=len(todo), initial=len(todo) - len(need), desc="encode (pass 1 of 2)", unit="img",
               file=sys.stderr, disable=not progress or not need, dynamic_ncols=True)
    for chunk, enc in engine.encode(need):
        cache.add(chunk, enc)
        bar.update(len(chunk))
    bar.close()
    return cache


def _settle_threshold(system: DualSystem, calibrate_on: str | None, stored: dict, cache: "EmbeddingCache | None",
                      items: list, out: Path) -> tuple[Trigger, dict]:
    """(the trigger this run uses, run.json's content): a calibrated threshold is stored in run.json the
    first time and read back on a resume, so a resumed run decides with the same threshold."""
    trigger = system.trigger
    if calibrate_on is None:
        return trigger, stored
    if stored.get("calibrated_threshold") is not None:
        return trigger.with_threshold(stored["calibrated_threshold"]), stored
    kb = system.kb
    if calibrate_on == "run":
        readable = [p for p, _, _ in items if cache.embedding(p) is not None]
        emb = torch.stack([cache.embedding(p) for p in readable]) if readable else torch.zeros(0, kb.prototypes.shape[1])
        fast = system1(kb, emb, w=system.w, tau=system.tau, k=system.k)
        trigger = trigger.calibrated(trigger.scores(fast, kb))
        stored = {**stored, "calibrated_threshold": trigger.threshold, "calibrated_on_images": len(readable)}
    else:
        if trigger.threshold is None:
            trigger = trigger.calibrated_on_support(kb, w=system.w, tau=system.tau)
        stored = {**stored, "calibrated_threshold": trigger.threshold, "calibrated_on": "support, leave-one-out"}
    atomic_write_json(out / RUN_CONFIG, stored)
    log.debug("trigger threshold %.4f, calibrated on the %s for a budget of %s", trigger.threshold,
              calibrate_on, trigger.budget)
    return trigger, stored


def _classify_pass(system: DualSystem, engine: Any, items: list, todo: list, previous: list[dict],
                   results_file: Path, cache: "EmbeddingCache | None", out: Path, progress: bool) -> None:
    """Classify `todo` through the engine, appending each batch's records to the results file."""
    from tqdm import tqdm

    n_known = sum(1 for r in previous if r.get("label_id") is not None)
    n_right = sum(1 for r in previous if r.get("correct"))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="evaluate", unit="img",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    labels = {p: (label, cid) for p, label, cid in todo}
    for paths, results in engine.classify([p for p, _, _ in todo], cache):
        batch = [(p, *labels[p]) for p in paths]
        records = []
        for (p, label, cid), res in zip(batch, results):
            rec = res.to_dict()
            rec["path"] = p
            rec["label"] = label
            rec["label_id"] = cid
            rec["correct"] = None if cid is None else (res.prediction == cid)
            records.append(rec)
            if cid is not None:
                n_known += 1
                n_right += bool(rec["correct"])
        append_results(results_file, records)
        _record_peak(out, system)
        bar.update(len(batch))
        if n_known:
            bar.set_postfix(acc=f"{n_right / n_known:.3f}")
    bar.close()


def _records_in_plan_order(results_file: Path, items: list) -> list[dict[str, Any]]:
    """The run's records in plan order; an engine that finished out of order has its file rewritten so."""
    planned = {p for p, _, _ in items}
    everything = read_results(results_file)
    records = [r for r in everything if r["path"] in planned]
    order = {p: i for i, (p, _, _) in enumerate(items)}
    if [r["path"] for r in records] != sorted((r["path"] for r in records), key=order.__getitem__):
        records.sort(key=lambda r: order[r["path"]])
        rest = [r for r in everything if r["path"] not in planned]
        atomic_write_bytes(results_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                 for r in records + rest).encode("utf-8"))
    return records


def check_system2(summary: dict[str, Any], system: DualSystem, out: Path) -> None:
    """System 2 was configured and images went to it, yet not one answer came back: the run's answers are
    System 1's alone, which is not what was asked for. The summary is written; the exit is an error."""
    if system.slow is None:
        return
    failed = summary["paths"].get(PATH_SLOW_FAILED, {}).get("n", 0)
    if failed and summary["system2_calls"] == 0:
        errors = [r for r in read_results(out / RESULTS, repair=False) if r.get("path_taken") == PATH_SLOW_FAILED]
        reason = errors[0].get("error") if errors else "unknown"
        raise System2Error(
            f"System 2 failed for all {failed} image(s) sent to it, so every answer in {out} is System 1's "
            f"(first error: {reason}); fix the cause and start fresh with a new --out"
        )


def _record_peak(out: Path, system: DualSystem) -> dict[str, Any]:
    """This process's peak memory, merged into RUN/peak_memory.json (the largest of every process that
    worked on the run, so a resumed run does not report only the resuming process)."""
    this = peak_memory(getattr(getattr(system.encoder, "spec", None), "device", "cpu"))
    f = out / PEAKS
    try:
        old = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except ValueError:
        old = {}
    merged = dict(old) if isinstance(old, dict) else {}
    for k, v in this.items():
        if isinstance(v, (int, float)):
            merged[k] = max(v, merged.get(k, 0) if isinstance(merged.get(k), (int, float)) else 0)
        else:
            merged.setdefault(k, v)
    pids = set(merged.get("pids", [])) | {os.getpid()}
    merged["pids"] = sorted(pids)
    merged["processes"] = len(pids)
    atomic_write_json(f, merged)
    return {"this_process": this, "run": merged}


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


def peak_memory(device: str = "cpu") -> dict[str, Any]:
    """Peak RSS of this process, and the CUDA allocator's peak where CUDA is in use (else why not)."""
    from fgvr.models.probe import CpuProbe, CudaProbe, ProbeUnavailable

    out: dict[str, Any] = {"cpu_peak_rss_bytes": CpuProbe().peak_bytes()}
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            raise ProbeUnavailable("CUDA was not used in this process")
        out["cuda_peak_allocated_bytes"] = CudaProbe(device if device.startswith("cuda") else "cuda:0").peak_bytes()
    except ProbeUnavailable as e:
        out["cuda"] = f"not measured: {e}"
    return out


# ------------------------------------------------------------------------------------------------------
# summary


def _acc(rows: list[dict[str, Any]]) -> float | None:
    return (sum(1 for r in rows if r.get("correct")) / len(rows)) if rows else None


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def budget_curve(records: list[dict[str, Any]], budgets: list[float] = CURVE_BUDGETS) -> dict[str, Any]:
    """Accuracy if a fraction b of the labelled, readable images (the most uncertain) had gone slow.

    Points whose top-b images include one without a System 2 answer are not computable and are left out.
    """
    rows = [r for r in records if r.get("label_id") is not None and r.get("path_taken") != PATH_ERROR
            and r.get("trigger")]
    rows.sort(key=lambda r: (-(r["trigger"]["score"] if r["trigger"]["score"] is not None else 0.0), r["path"]))
    n = len(rows)
    points = []
    for b in budgets:
        m = int(round(b * n))
        if any(r.get("slow_prediction") is None for r in rows[:m]):
            continue
        right = sum(r["slow_prediction"] == r["label_id"] for r in rows[:m])
        right += sum(r["fast_prediction"] == r["label_id"] for r in rows[m:])
        points.append({"budget": b, "slow_images": m, "accuracy": right / n if n else None})
    has_slow = sum(1 for r in rows if r.get("slow_prediction") is not None)
    return {"points": points, "n": n, "images_with_slow_answer": has_slow,
            "exact": "all budgets" if n and has_slow == n else f"budgets up to {has_slow / n:.3f}" if n else "none"}


def summarise(records: list[dict[str, Any]], classes: list[str], unknown: list[str]) -> dict[str, Any]:
    """Everything `summary.json` holds except run timings and memory; a function of the records alone."""
    known = [r for r in records if r.get("label_id") is not None]
    readable = [r for r in records if r.get("path_taken") != PATH_ERROR]
    known_readable = [r for r in known if r.get("path_taken") != PATH_ERROR]
    c = len(classes)
    confusion = [[0] * c for _ in range(c)]
    per_class: dict[str, dict[str, Any]] = {}
    for r in known:
        name = classes[r["label_id"]]
        pc = per_class.setdefault(name, {"n": 0, "correct": 0})
        pc["n"] += 1
        pc["correct"] += bool(r.get("correct"))
        if r.get("prediction") is not None:
            confusion[r["label_id"]][r["prediction"]] += 1
    for pc in per_class.values():
        pc["accuracy"] = pc["correct"] / pc["n"]
    per_class = dict(sorted(per_class.items()))

    paths: dict[str, dict[str, Any]] = {}
    for name in (PATH_FAST, PATH_SLOW, PATH_UNAVAILABLE, PATH_SLOW_FAILED, PATH_ERROR):
        rows = [r for r in records if r.get("path_taken") == name]
        if rows:
            paths[name] = {"n": len(rows), "accuracy": _acc([r for r in rows if r.get("label_id") is not None])}
    triggered = [r for r in readable if r.get("trigger") and r["trigger"].get("go_slow")]
    slowed = [r for r in known_readable if r.get("path_taken") == PATH_SLOW]
    ran = [r for r in readable if r.get("slow_ran")]
    unknown_preds: dict[str, dict[str, int]] = {}
    for r in records:
        if r.get("label_id") is None and r.get("prediction_name") is not None:
            d = unknown_preds.setdefault(r["label"], {})
            d[r["prediction_name"]] = d.get(r["prediction_name"], 0) + 1
    n_read = max(1, len(readable))
    from fgvr.metrics import classification_metrics

    return {
        **classification_metrics(records, classes),  # acc1/acc5, balanced accuracy, macro-F1, ECE (fgvr.metrics)
        "n_images": len(records),
        "n_labelled_known": len(known),
        "n_errors": len(records) - len(readable),
        "errors": [{"path": r["path"], "error": r.get("error")} for r in records if r.get("path_taken") == PATH_ERROR],
        "accuracy": _acc(known),
        "accuracy_readable": _acc(known_readable),
        "accuracy_system1_alone": (sum(r["fast_prediction"] == r["label_id"] for r in known_readable)
                                   / len(known_readable)) if known_readable else None,
        "per_class": per_class,
        "confusion": {"classes": classes, "rows": "true class", "columns": "predicted class", "matrix": confusion},
        "unknown_classes": unknown,
        "unknown_class_images": len(records) - len(known),
        "unknown_class_predictions": unknown_preds,
        "slow_rate": len(triggered) / n_read if readable else None,
        "paths": paths,
        "slowed_images": {"n": len(slowed),
                          "system1_accuracy": (sum(r["fast_prediction"] == r["label_id"] for r in slowed) / len(slowed))
                          if slowed else None,
                          "final_accuracy": _acc(slowed)},
        "system2_calls": len(ran),
        "system2_calls_per_image": len(ran) / n_read if readable else None,
        "tokens_in_per_image": sum(r.get("slow_tokens_in", 0) for r in readable) / n_read if readable else None,
        "tokens_out_per_image": sum(r.get("slow_tokens_out", 0) for r in readable) / n_read if readable else None,
        "latency_s": _pct([r["timings"]["total"] for r in readable if r.get("timings", {}).get("total") is not None]),
        "budget_curve": budget_curve(records),
    }
