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
from typing import Any

import torch

from fgvr.binding import EXPLAIN, MUST_MATCH, data_digest, system_binding
from fgvr.data import Dataset
from fgvr.embedding_cache import EMBED_DIR, EmbeddingCache
from fgvr.errors import InputError, KnowledgeBaseError, RunMismatchError, System2Error
from fgvr.fast_path import system1
from fgvr.io import atomic_write_bytes, atomic_write_json, json_dumps, path_resolver
from fgvr.pipeline import PATH_SLOW_FAILED, DualSystem
from fgvr.records import RESULTS, ResultRow, iter_rows, read_results, results_journal
from fgvr.run_dir import RunDir
from fgvr.summary import budget_curve, summarise
from fgvr.trigger import Trigger

__all__ = ["EMBED_DIR", "RESULTS", "SUMMARY", "EmbeddingCache", "EvaluateError", "budget_curve", "headline",
           "plan", "read_results", "run_evaluation", "summarise", "support_files"]

SUMMARY = "summary.json"
CALIBRATE_CHUNK = 1024  # images per System 1 call when the threshold is calibrated on the run's images
# Called with (stage, rows) for every chunk a streaming stage holds at once ("encode", "calibrate",
# "classify"); None in normal runs. A test sets it to check that memory is bounded by the chunk size.
STREAM_HOOK: Any = None
PEAKS = "peak_memory.json"
log = logging.getLogger(__name__)


class EvaluateError(RunMismatchError, RuntimeError):
    """The run cannot start or continue; the message says what to do."""


# ------------------------------------------------------------------------------------------------------
# planning


def support_files(kb: Any) -> set[str]:
    """Resolved paths of the base's support images (from its manifest), to keep them out of a test set."""
    resolve = path_resolver()
    return {resolve(f.path) for f in kb.support_files()}


def plan(dataset: Dataset, kb_classes: list[str], limit: int | None = None, seed: int = 0,
         exclude: set[str] = frozenset()) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """[(resolved path, label name, kb class id or None)] in a fixed order, and the unknown class names.

    Paths in `exclude` (the base's support images: evaluating on them would measure memory, not
    recognition) are left out. The order is a stratified round-robin: each class's paths in a seeded
    shuffle, the classes in a seeded order, then one image of each class in turn. So `--limit N` takes a
    spread over classes (per-class counts differ by at most one until a class runs out, never the first
    classes' images) and the same images on every restart.
    """
    index = {c: i for i, c in enumerate(kb_classes)}
    unknown = sorted(c for c in dataset.classes if c not in index)
    labels: dict[str, str] = {}
    resolve = path_resolver()
    for s in dataset.samples:  # one record per file: a repeated row would be a duplicate result
        p = resolve(s.path)
        if labels.setdefault(p, s.label) != s.label:
            raise InputError(f"{p} is listed under two labels, {labels[p]!r} and {s.label!r}: keep one")
    items = _round_robin(sorted((p, label) for p, label in labels.items() if p not in exclude), seed)
    if limit is not None:
        items = items[: max(0, limit)]
    return [(p, label, index.get(label)) for p, label in items], unknown


def _previous_rows(results: Any, items: list[tuple[str, str, int | None]], out: Path) -> tuple[set[str], int, int]:
    """(paths already in results.jsonl for planned images, how many of them are labelled, how many right),
    read one row at a time. A row whose label disagrees with the data's (the data list is bound by its
    digest, so only a hand-edited file has one) is refused: it would be counted as it stands."""
    plan_of = {p: (label, cid) for p, label, cid in items}
    done: set[str] = set()
    n_known = n_right = 0
    for d in results.records():
        if d["path"] not in plan_of:
            continue
        r = ResultRow.from_dict(d)
        wrong_mark = r.label_id is not None and r.correct != (r.prediction == r.label_id)
        if (r.label, r.label_id) != plan_of[r.path] or wrong_mark:
            raise EvaluateError(f"{out / RESULTS}: the record of {r.path} says label {r.label!r} (id {r.label_id}, "
                                f"correct {r.correct}) where the data says {plan_of[r.path][0]!r}: the file was "
                                f"edited; start fresh with a new --out folder (or delete {out})")
        done.add(r.path)
        n_known += r.known
        n_right += bool(r.correct)
    return done, n_known, n_right


def _round_robin(items: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """(path, label) pairs interleaved by label: see `plan`."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    for label, group in by_label.items():
        random.Random(f"{seed}\x00{label}").shuffle(group)
    order = sorted(by_label)
    random.Random(seed).shuffle(order)
    out: list[tuple[str, str]] = []
    for i in range(max((len(g) for g in by_label.values()), default=0)):
        out += [by_label[label][i] for label in order if i < len(by_label[label])]
    return out


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
                 than queries, and the realised rate comes out below the budget (Fashion-MNIST 5-shot: 0.249
                 for a budget of 0.3, benchmarks/results/fashion_mnist.json); one streaming pass. A threshold
                 the system's trigger already has (`open_system` calibrates on the support set) is used as it is.
    With a threshold given directly, there is nothing to calibrate. The run uses its own copy of the trigger
    with the threshold it settles on (`summary["trigger"]`); `system` (and `engine`) are left as they are.
    `engine` computes the batches: `fgvr.engine.LocalEngine` (default, this process) or
    `fgvr.ray_run.RayEngine` (Ray Data); the files written are the same.
    """
    if calibrate not in ("run", "support"):
        raise ValueError(f"calibrate must be 'run' or 'support', got {calibrate!r}")
    out = Path(out)
    if len(system.kb.classes) < 2:  # every answer would be that class: an accuracy of 1.0 that means nothing
        raise KnowledgeBaseError(f"the knowledge base {getattr(system.kb, 'path', None) or ''} has "
                                 f"{len(system.kb.classes)} class(es) ({', '.join(map(repr, system.kb.classes))}): "
                                 "evaluation needs two or more; rebuild it from data with one folder per class")
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
    must = MUST_MATCH + (("limit",) if calibrate_on == "run" else ())
    run = RunDir(out, error=EvaluateError)
    stored = run.bind(_run_config(system, dataset, config, calibrate_on, limit), must, EXPLAIN)
    support = support_files(kb)
    from fgvr.rules import experience_images

    chose_rules = experience_images(getattr(kb, "path", None)) - support
    items, unknown = plan(dataset, kb.classes, limit, exclude=support | chose_rules)
    resolve = path_resolver()
    resolved = [resolve(smp.path) for smp in dataset.samples] if support or chose_rules else []
    n_support = sum(1 for p in resolved if p in support)
    n_experience = sum(1 for p in resolved if p in chose_rules)
    _say_what_is_left_out(dataset, items, unknown, n_support)
    if n_experience:
        log.warning("leaving out %d image(s) of %s that the experience build used (its rules were chosen on "
                    "them)", n_experience, dataset.root)
    results = results_journal(out / RESULTS)
    previous = _previous_rows(results, items, out)
    done = previous[0]
    todo = [it for it in items if it[0] not in done]
    if done and todo:
        log.info("resuming %s: %d of %d image(s) already done", out, len(items) - len(todo), len(items))

    from fgvr.engine import LocalEngine

    t0 = time.perf_counter()
    cache = None
    if calibrate_on == "run":
        cache = _encode_pass(engine or LocalEngine(system, batch_size), EmbeddingCache(out / EMBED_DIR), todo,
                             progress)
    trigger, stored = _settle_threshold(system, calibrate_on, stored, cache, items, run)
    system = system.with_trigger(trigger)  # the run's own copy: the caller's system is left as it is
    engine = engine.with_system(system) if engine is not None else LocalEngine(system, batch_size)
    _classify_pass(system, engine, items, todo, previous, results, cache, out, progress)
    wall = time.perf_counter() - t0
    peaks = _record_peak(out, system)

    planned = _results_in_plan_order(results.path, items)
    summary = summarise((r for r in iter_rows(results.path) if r.path in planned), kb.classes, unknown)
    summary["support_images_excluded"] = n_support
    summary["experience_images_excluded"] = n_experience
    summary["trigger"] = {"threshold": trigger.threshold, "budget": trigger.budget,
                          "calibrated_on": calibrate_on, "realised_slow_rate": summary["slow_rate"]}
    summary["run"] = {"images_this_process": len(todo), "wall_s_this_process": wall,
                      "images_per_s_this_process": (len(todo) / wall) if wall > 0 and todo else None,
                      "peak_memory_this_process": peaks["this_process"],
                      "peak_memory": peaks["run"]}
    summary["config"] = stored
    if summary.get("open_set") is not None:
        summary["open_set"]["setting"] = system.open_set.to_dict() if system.open_set is not None else None
    how = getattr(system.slow, "describe", None)  # which System 2 answered, and how (backend, mode)
    summary["system2"] = how() if how else ({"system2": system.slow.name} if system.slow else None)
    atomic_write_json(out / SUMMARY, summary)
    if report:
        from fgvr.report import write_report

        write_report(out, summary)
    check_system2(summary, system, out)
    return summary


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers `fgvr evaluate` prints on stdout (the rest is in summary.json)."""
    keep = ("n_images", "accuracy", "accuracy_system1_alone", "n_unreadable", "accuracy_readable",
            "accuracy_system1_alone_readable", "slow_rate", "system2_calls_per_image", "unknown_classes", "n_errors")
    out = {**{k: summary[k] for k in keep}, "latency_p50_s": summary["latency_s"]["p50"]}
    o = summary.get("open_set")
    if o:  # test images of classes outside the base: how well the unknown score tells them apart
        out["open_set"] = {"auroc": o["auroc"], "auroc_ci": o["auroc_ci"], "fpr_at_95_tpr": o["fpr_at_95_tpr"],
                           "fpr_at_95_tpr_ci": o["fpr_at_95_tpr_ci"],
                           "known_accuracy_with_rejection": o["known_accuracy_with_rejection"],
                           "known_accuracy_without_rejection": o["known_accuracy_without_rejection"],
                           "known_accuracy_cost_ci": o["known_accuracy_cost_ci"]}
    return out


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
        if STREAM_HOOK is not None:
            STREAM_HOOK("encode", len(chunk))
        bar.update(len(chunk))
    bar.close()
    return cache


def _settle_threshold(system: DualSystem, calibrate_on: str | None, stored: dict, cache: "EmbeddingCache | None",
                      items: list, run: RunDir) -> tuple[Trigger, dict]:
    """(the trigger this run uses, run.json's content): a calibrated threshold is stored in run.json the
    first time and read back on a resume, so a resumed run decides with the same threshold."""
    trigger = system.trigger
    if calibrate_on is None:
        return trigger, stored
    if stored.get("calibrated_threshold") is not None:
        return trigger.with_threshold(stored["calibrated_threshold"]), stored
    kb = system.kb
    if calibrate_on == "run":
        scores, n = calibration_scores(system, cache, [p for p, _, _ in items])
        trigger = trigger.calibrated(scores)
        stored = {**stored, "calibrated_threshold": trigger.threshold, "calibrated_on_images": n}
    else:
        if trigger.threshold is None:
            trigger = trigger.calibrated_on_support(kb, w=system.w, tau=system.tau)
        stored = {**stored, "calibrated_threshold": trigger.threshold, "calibrated_on": "support, leave-one-out"}
    stored = run.update(**stored)
    log.debug("trigger threshold %.4f, calibrated on the %s for a budget of %s", trigger.threshold,
              calibrate_on, trigger.budget)
    return trigger, stored


def calibration_scores(system: DualSystem, cache: "EmbeddingCache", paths: list[str],
                       chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(the trigger's score of every readable image among `paths`, how many): System 1 over the cached
    embeddings `chunk` images at a time, so the (N, classes) posteriors of 50,000 images over 1,000 classes
    are never in memory at once; only the N scores are (a quantile needs them all). The scores are each
    image's own, so chunking does not change them."""
    kb = system.kb
    parts = [torch.zeros(0, dtype=torch.float64)]
    n = 0
    for _, emb in cache.readable(paths, chunk or CALIBRATE_CHUNK):
        fast = system1(kb, emb, w=system.w, tau=system.tau, k=system.k)
        parts.append(system.trigger.scores(fast, kb))
        n += emb.shape[0]
        if STREAM_HOOK is not None:
            STREAM_HOOK("calibrate", emb.shape[0])
    return torch.cat(parts), n


def _classify_pass(system: DualSystem, engine: Any, items: list, todo: list, previous: tuple[set[str], int, int],
                   results: Any, cache: "EmbeddingCache | None", out: Path, progress: bool) -> None:
    """Classify `todo` through the engine, appending each batch's rows to the results journal."""
    from tqdm import tqdm

    _, n_known, n_right = previous
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="evaluate", unit="img",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    labels = {p: (label, cid) for p, label, cid in todo}
    for paths, got in engine.classify([p for p, _, _ in todo], cache):
        batch = [(p, *labels[p]) for p in paths]
        rows = [ResultRow.of(res, label, cid) for (_, label, cid), res in zip(batch, got)]
        for row, (p, _, _) in zip(rows, batch):
            row.path = p  # the planned (resolved) path, whatever the engine echoed
        new = {d["path"] for d in results.append([r.to_dict() for r in rows])}
        if STREAM_HOOK is not None:
            STREAM_HOOK("classify", len(rows))
        n_known += sum(1 for r in rows if r.path in new and r.known)
        n_right += sum(1 for r in rows if r.path in new and r.correct)
        _record_peak(out, system)
        bar.update(len(batch))
        if n_known:
            bar.set_postfix(acc=f"{n_right / n_known:.3f}")
    bar.close()


def _results_in_plan_order(results_file: Path, items: list) -> set[str]:
    """The planned paths; results.jsonl is checked to hold their rows in plan order, one row at a time.
    An engine that finished out of order (Ray) has its file rewritten so, the one step that reads the
    whole file into memory (the local engine appends in plan order and never needs it)."""
    planned = {p for p, _, _ in items}
    order = {p: i for i, (p, _, _) in enumerate(items)}
    last = -1
    for d in results_journal(results_file).records():
        at = order.get(d["path"])
        if at is None:
            continue
        if at < last:
            break
        last = at
    else:
        return planned
    everything = read_results(results_file)
    records = sorted((r for r in everything if r["path"] in planned), key=lambda r: order[r["path"]])
    rest = [r for r in everything if r["path"] not in planned]
    atomic_write_bytes(results_file, "".join(json_dumps(r) + "\n" for r in records + rest).encode("utf-8"))
    return planned


def check_system2(summary: dict[str, Any], system: DualSystem, out: Path) -> None:
    """System 2 was configured and images went to it, yet not one answer came back: the run's answers are
    System 1's alone, which is not what was asked for. The summary is written; the exit is an error."""
    if system.slow is None:
        return
    failed = summary["paths"].get(PATH_SLOW_FAILED, {}).get("n", 0)
    if failed and summary["system2_calls"] == 0:
        first = next((r for r in iter_rows(out / RESULTS, repair=False) if r.path_taken == PATH_SLOW_FAILED), None)
        reason = first.error if first else "unknown"
        raise System2Error(
            f"System 2 failed for all {failed} image(s) sent to it, so every answer in {out} is System 1's "
            f"(first error: {reason}); fix the cause and start fresh with a new --out"
        )


def _record_peak(out: Path, system: DualSystem) -> dict[str, Any]:
    """This process's peak memory, merged into RUN/peak_memory.json (the largest of every process that
    worked on the run, so a resumed run does not report only the resuming process)."""
    this = peak_memory(getattr(getattr(system.encoder, "spec", None), "device", "cpu"))
    peaks = RunDir(out).checkpoint(PEAKS)
    try:
        old = peaks.load() if peaks.exists() else {}
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
    peaks.save(merged)
    return {"this_process": this, "run": merged}


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
