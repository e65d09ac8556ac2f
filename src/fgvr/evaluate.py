"""`fgvr evaluate`: run the dual system over a labelled folder / CSV and measure it honestly.

Correct means exact match on class ids (the predicted class IS the labelled class), never a string
similarity between names. Files written to the run folder RUN:

* `run.json`      the settings the run was started with; a restart with other settings is refused, because
                  appending to results made under different settings would mix two experiments.
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
from fgvr.fast_path import system1
from fgvr.io import atomic_write_bytes, atomic_write_json
from fgvr.pipeline import (PATH_ERROR, PATH_FAST, PATH_SLOW, PATH_SLOW_FAILED, PATH_UNAVAILABLE, DualSystem,
                           Result)
from fgvr.trigger import Trigger

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run.json"
EMBED_DIR = "embeddings"
CURVE_BUDGETS = [round(0.05 * i, 2) for i in range(21)]
# Settings that change what a record means; a restart must match them.
log = logging.getLogger(__name__)

_MUST_MATCH = ("kb", "encoder", "system2", "threshold", "budget", "calibrate", "top_k", "weight", "slow_all", "data")


class EvaluateError(RuntimeError):
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
    """Append records as JSON lines and fsync, so a batch on disk survives a kill -9 or a power cut."""
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    items = sorted((p, s.label) for s in dataset.samples if (p := str(Path(s.path).resolve())) not in exclude)
    random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[: max(0, limit)]
    return [(p, label, index.get(label)) for p, label in items], unknown


def check_config(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write run.json on the first start; on a restart refuse settings that differ. Returns what is stored
    (a restart keeps the threshold calibrated the first time)."""
    f = out / RUN_CONFIG
    if f.is_file():
        old = json.loads(f.read_text(encoding="utf-8"))
        diff = [k for k in _MUST_MATCH if old.get(k) != config.get(k)]
        if diff:
            lines = ", ".join(f"{k}: {old.get(k)!r} then, {config.get(k)!r} now" for k in diff)
            raise EvaluateError(
                f"{out} holds a run made with other settings ({lines}). Resume with the same settings, or "
                "pass a new --out folder."
            )
        return {**old, **config}  # keeps the threshold calibrated the first time
    atomic_write_json(f, config)
    return dict(config)


# ------------------------------------------------------------------------------------------------------
# the run


def run_evaluation(system: DualSystem, dataset: Dataset, out: str | Path, config: dict[str, Any], *,
                   limit: int | None = None, batch_size: int = 16, progress: bool = True,
                   report: bool = True, calibrate: str = "run") -> dict[str, Any]:
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
    with the threshold it settles on (`summary["trigger"]`); `system` is left as it is.
    """
    if calibrate not in ("run", "support"):
        raise ValueError(f"calibrate must be 'run' or 'support', got {calibrate!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kb = system.kb
    calibrate_on = calibrate if system.trigger.budget is not None else None
    stored = check_config(out, _run_config(system, config, calibrate_on))
    support = support_files(kb)
    items, unknown = plan(dataset, kb.classes, limit, exclude=support)
    n_support = sum(1 for smp in dataset.samples if str(Path(smp.path).resolve()) in support)
    _say_what_is_left_out(dataset, items, unknown, n_support)
    results_file = out / RESULTS
    planned = {p for p, _, _ in items}
    previous = [r for r in read_results(results_file) if r["path"] in planned]
    done = {r["path"] for r in previous}
    todo = [it for it in items if it[0] not in done]
    if done and todo:
        log.info("resuming %s: %d of %d image(s) already done", out, len(items) - len(todo), len(items))

    t0 = time.perf_counter()
    cache = None
    if calibrate_on == "run":
        cache = _encode_pass(system, EmbeddingCache(out / EMBED_DIR), todo, batch_size, progress)
    trigger, stored = _settle_threshold(system, calibrate_on, stored, cache, items, out)
    system = system.with_trigger(trigger)
    _classify_pass(system, items, todo, previous, results_file, cache, batch_size, progress)
    wall = time.perf_counter() - t0

    records = [r for r in read_results(results_file) if r["path"] in planned]
    summary = summarise(records, kb.classes, unknown)
    summary["support_images_excluded"] = n_support
    summary["trigger"] = {"threshold": trigger.threshold, "budget": trigger.budget,
                          "calibrated_on": calibrate_on, "realised_slow_rate": summary["slow_rate"]}
    summary["run"] = {"images_this_process": len(todo), "wall_s_this_process": wall,
                      "images_per_s_this_process": (len(todo) / wall) if wall > 0 and todo else None,
                      "peak_memory": peak_memory(getattr(getattr(system.encoder, "spec", None), "device", "cpu"))}
    summary["config"] = stored
    how = getattr(system.slow, "describe", None)  # which System 2 answered, and how (backend, mode)
    summary["system2"] = how() if how else ({"system2": system.slow.name} if system.slow else None)
    atomic_write_json(out / SUMMARY, summary)
    if report:
        from fgvr.report import write_report

        write_report(out, summary)
    return summary


def _run_config(system: DualSystem, config: dict[str, Any], calibrate_on: str | None) -> dict[str, Any]:
    """What identifies the run (a resumed run must match it): the caller's config plus the system's settings."""
    budgeted = system.trigger.budget is not None
    return {**config, "threshold": None if budgeted else system.trigger.threshold, "budget": system.trigger.budget,
            "calibrate": calibrate_on, "top_k": system.k, "weight": system.weight, "slow_all": system.slow_all,
            "system2": getattr(system.slow, "name", None) if system.slow is not None else None}


def _say_what_is_left_out(dataset: Dataset, items: list, unknown: list[str], n_support: int) -> None:
    if n_support:
        log.warning("leaving out %d image(s) of %s that are in the knowledge base's support set",
                    n_support, dataset.root)
    if unknown:
        n_unknown = sum(1 for _, _, cid in items if cid is None)
        log.warning("test class(es) not in the knowledge base: %s. Their %d image(s) are classified and "
                    "reported separately, not counted in accuracy.", ", ".join(unknown), n_unknown)


def _encode_pass(system: DualSystem, cache: "EmbeddingCache", todo: list, batch_size: int,
                 progress: bool) -> "EmbeddingCache":
    """Pass 1 of a run-calibrated evaluation: every image not yet in the cache decoded and encoded once."""
    from tqdm import tqdm

    need = [p for p, _, _ in todo if p not in cache]
    bar = tqdm(total=len(todo), initial=len(todo) - len(need), desc="encode (pass 1 of 2)", unit="img",
               file=sys.stderr, disable=not progress or not need, dynamic_ncols=True)
    for start in range(0, len(need), batch_size):
        chunk = need[start:start + batch_size]
        cache.add(chunk, system.encode_paths(chunk, keep_images=False))
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


def _classify_pass(system: DualSystem, items: list, todo: list, previous: list[dict], results_file: Path,
                   cache: "EmbeddingCache | None", batch_size: int, progress: bool) -> None:
    """Classify `todo` batch by batch, appending each batch's records to the results file."""
    from tqdm import tqdm

    n_known = sum(1 for r in previous if r.get("label_id") is not None)
    n_right = sum(1 for r in previous if r.get("correct"))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="evaluate", unit="img",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        paths = [p for p, _, _ in batch]
        results = system.classify_paths(paths) if cache is None else cache.classify(system, paths)
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
        bar.update(len(batch))
        if n_known:
            bar.set_postfix(acc=f"{n_right / n_known:.3f}")
    bar.close()


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
            meta = json.loads(_safetensors_metadata(f)["fgvr"])
            emb = load_file(str(f))["embeddings"]
            for j, p in enumerate(meta["paths"]):
                self.rows[p] = (emb[j], meta["decode_s"], meta["encode_s"])
            self.errors.update(meta["errors"])
            self.count += 1

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
    return {
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
