"""`fgvr bench`: a paper's k-shot table on a named dataset, with one command.

    fgvr bench cub-200-2011 --root /data/CUB_200_2011 --shots 1,5,16 --seeds 0,1,2 --reranker --out bench-cub

For every (k, seed) cell: a k-shot knowledge base drawn with `seed` from the dataset's TRAIN split, then the
dual system evaluated on its TEST split (the same test images for every cell, so cells
compare pairwise). Then one table, rows = methods, columns = k, each entry the mean over seeds ± the 95%
t-interval over seeds, in the form papers print; below it every run with a 95% bootstrap interval over its
test images, and the paired difference dual − System 1. Exact match on class ids, always.

What lands under OUT:

The split is the publisher's (`--split official`, the default; `--fold N` where it comes in folds) or CoOp's
re-split file (`--split coop`); every table and bench.json name it. Several datasets at once, one table with
a row per dataset and the mean: `fgvr.bench_suite`.

* `data/train.csv`, `data/test.csv`: the splits as `path,label` manifests (`--limit N`: the test
  manifest holds the N images evaluated, a seeded round-robin over classes). The cells are built from these
  files with the public functions `fgvr build-kb` and `fgvr evaluate` call, so the per-cell commands printed
  under the table are the same computation.
* `k{K}-seed{S}/kb`, `k{K}-seed{S}/run` (results.jsonl, summary.json, report.md), `k{K}-seed{S}/cell.json`
  (the cell's numbers and the settings it is bound to).
* `bench.json` (the settings and every invocation), `table.md`, `table.json`.

Resumable at every level: a finished cell is skipped when its settings match; a cell killed mid-way keeps
its knowledge base and its results.jsonl (`fgvr evaluate` resumes). A rerun with other settings (encoder,
System 2, budget, limit, top-k, weight, or other data) in the same OUT is refused, because mixing cells made
differently in one table would be wrong; other --shots / --seeds are fine (cells are added).

The test images are encoded once: every cell evaluates the same images with the same encoder, so a cell
starts with the query embeddings of a finished cell (`run/embeddings`, the run-calibrated evaluation's own
cache), and only System 1 onwards is repeated.

Statistics. Over seeds: mean ± t(0.975, n−1)·s/√n (no interval with one seed). Per run: a percentile
bootstrap over test images (10,000 resamples, seeded); for dual − System 1 the same resamples for both, so
the interval is paired. An unreadable test image counts as wrong for both methods.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shlex
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from fgvr.data import ManifestWarning, Sample
from fgvr.defaults import DEFAULTS
from fgvr.errors import RunMismatchError, UsageError
from fgvr.io import atomic_write_bytes, atomic_write_json, path_resolver
from fgvr.run_dir import identity_diff

if TYPE_CHECKING:
    from fgvr.records import ResultRow

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend

log = logging.getLogger(__name__)

DEFAULT_SHOTS = (1, 5, 16)
DEFAULT_SEEDS = (0, 1, 2)
BOOTSTRAP_RESAMPLES = 10_000  # 1,000 left a cell's "excludes 0" call to the draw
CONFIDENCE = 0.95


class BenchError(RunMismatchError, RuntimeError):
    """OUT holds cells made with other settings or data; the message names what changed and what to do."""


@dataclass
class CellResult:
    """One (k, seed) run: accuracies on the test images, bootstrap intervals, the paired difference."""

    k: int
    seed: int
    n_test: int
    system1: float
    dual: float
    system1_ci: tuple[float, float]
    dual_ci: tuple[float, float]
    delta: float  # dual - System 1, same images
    delta_ci: tuple[float, float]
    slow_rate: float | None
    system2_calls_per_image: float | None
    errors: int
    seconds: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


@dataclass
class BenchTable:
    """What `fgvr bench` prints and writes (table.md, table.json)."""

    dataset: str
    title: str
    settings: dict[str, Any]
    shots: list[int]
    seeds: list[int]
    cells: list[CellResult]
    summary: dict[str, dict[str, Any]]  # per k: per method {mean, half_width, n, values}
    command: str
    markdown: str = ""


# ----------------------------------------------------------------------------------------------------------
# statistics


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """(mean, half-width of the t-interval); the half-width is None for fewer than two values."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean()) if a.size else float("nan")
    if a.size < 2:
        return mean, None
    from scipy.stats import t

    return mean, float(t.ppf(0.5 + confidence / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))


def bootstrap_interval(correct: np.ndarray, baseline: np.ndarray | None = None, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over test images of the accuracy (or of accuracy − baseline's, paired). The
    resamples are drawn in chunks, so 10,000 of 10,000 images never hold 800 MB of indices at once."""
    x = np.asarray(correct, dtype=np.float64)
    if baseline is not None:
        x = x - np.asarray(baseline, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // x.size))
    means = np.concatenate([x[rng.integers(0, x.size, (min(chunk, resamples - i), x.size))].mean(axis=1)
                            for i in range(0, resamples, chunk)])
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def cell_result(records: Iterable[ResultRow | dict[str, Any]], k: int, seed: int,
                resamples: int = BOOTSTRAP_RESAMPLES) -> CellResult:
    """A cell's numbers from its results.jsonl rows (labelled images only; an error is wrong for both), taken
    one at a time: per image only two booleans are kept (the bootstrap resamples images)."""
    from fgvr.pipeline import PATH_ERROR
    from fgvr.records import iter_as_rows

    s1_list: list[bool] = []
    dual_list: list[bool] = []
    n = n_readable = n_slow = n_ran = 0
    for r in iter_as_rows(records):
        n += 1
        if r.known:
            s1_list.append(r.fast_prediction is not None and r.fast_prediction == r.label_id)
            dual_list.append(bool(r.correct))
        if r.path_taken != PATH_ERROR:
            n_readable += 1
            n_slow += bool((r.trigger or {}).get("go_slow"))
            n_ran += bool(r.slow_ran)
    s1, dual = np.array(s1_list, dtype=bool), np.array(dual_list, dtype=bool)
    known = s1.size
    return CellResult(
        k=k, seed=seed, n_test=known,
        system1=float(s1.mean()) if known else float("nan"), dual=float(dual.mean()) if known else float("nan"),
        system1_ci=bootstrap_interval(s1, resamples=resamples), dual_ci=bootstrap_interval(dual, resamples=resamples),
        delta=float((dual.astype(float) - s1).mean()) if known else float("nan"),
        delta_ci=bootstrap_interval(dual, s1, resamples=resamples),
        slow_rate=n_slow / n_readable if n_readable else None,
        system2_calls_per_image=n_ran / n_readable if n_readable else None,
        errors=n - n_readable,
    )


def summarise_cells(cells: list[CellResult], shots: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per k: mean ± t-interval over seeds of System 1, dual, their paired difference and the slow rate."""
    out: dict[str, dict[str, Any]] = {}
    for k in shots:
        row = [c for c in cells if c.k == k]
        out[str(k)] = {}
        for key in ("system1", "dual", "delta", "slow_rate"):
            vals = [getattr(c, key) for c in row if getattr(c, key) is not None]
            mean, half = t_interval(vals)
            out[str(k)][key] = {"mean": mean, "half_width": half, "n": len(vals), "values": vals}
    return out


# ----------------------------------------------------------------------------------------------------------
# the table


def _pm(entry: dict[str, Any], signed: bool = False) -> str:
    if not entry["n"]:
        return "n/a"
    mean = f"{100 * entry['mean']:+.1f}" if signed else f"{100 * entry['mean']:.1f}"
    return mean if entry["half_width"] is None else f"{mean} ± {100 * entry['half_width']:.1f}"


def _ci(v: float, ci: tuple[float, float], signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * v)} [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def missing_words(settings: dict[str, Any]) -> str:
    """What a table says when the test list names images that are not on disk (a partial Birdsnap)."""
    missing = settings.get("test_images_missing") or 0
    if not missing:
        return ""
    return (f" ({missing:,} of the {settings['test_images_listed']:,} listed test images are not on disk and "
            "are not evaluated)")


def method_names(settings: dict[str, Any]) -> dict[str, str]:
    s2 = settings["system2"]
    s2_name = "visual re-ranker" if s2 == "reranker" else ("none" if s2 == "none" else settings.get("vlm_name", "VLM"))
    return {"system1": f"System 1 alone ({settings['encoder_name']} prototypes)",
            "dual": f"dual system (System 2 = {s2_name}, budget {100 * settings['slow_budget']:g}%)"}


def format_table(t: BenchTable) -> str:
    """The Markdown table (papers' form), the per-run detail, and the commands that produced it."""
    names = method_names(t.settings)
    ks = t.shots
    s = t.settings
    n_test = t.cells[0].n_test if t.cells else 0
    with_s2 = s["system2"] != "none"
    head = "| method | " + " | ".join(f"{k}-shot" for k in ks) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in ks) + " |"
    rows = [f"| {names['system1']} | " + " | ".join(_pm(t.summary[str(k)]["system1"]) for k in ks) + " |"]
    if with_s2:
        rows.append(f"| {names['dual']} | " + " | ".join(_pm(t.summary[str(k)]["dual"]) for k in ks) + " |")
        rows.append("| dual − System 1 (paired, points) | "
                    + " | ".join(_pm(t.summary[str(k)]["delta"], signed=True) for k in ks) + " |")
    rows.append("| slow-path rate (%) | " + " | ".join(_pm(t.summary[str(k)]["slow_rate"]) for k in ks) + " |")
    split = s.get("split", "official")
    limit = (f"{n_test:,} of the {s['test_images_official']:,} test images (`--limit {s['limit']}`: a "
             "seeded round-robin over classes)" if s["limit"] is not None else f"all {n_test:,} test images")
    lines = [
        f"## {t.title} ({split} split): k-shot top-1 accuracy (%)",
        "",
        f"{s['classes']} classes; split: {split}; knowledge base from its train split ({s['train_images']:,} "
        f"images), {limit}{missing_words(s)}; encoder {s['encoder_name']}; seeds {', '.join(map(str, t.seeds))} for every k; entries are "
        f"mean ± 95% t-interval over seeds (exact match on class ids)."
        + f" The trigger's threshold is the {1 - s['slow_budget']:g} quantile of the test images' own trigger "
          "scores (unlabelled: `fgvr evaluate --calibrate run`), so the slow-path rate meets the budget."
        + ("" if with_s2 else " No System 2 was given: the images the trigger picks keep System 1's answer."),
        "",
        head, rule, *rows, "",
        f"Per run (95% bootstrap interval over the test images, {BOOTSTRAP_RESAMPLES:,} resamples"
        + ("; the difference is paired):" if with_s2 else "):"),
        "",
        "| k | seed | System 1 | " + ("dual | dual − System 1 | " if with_s2 else "") + "slow rate | test images | errors |",
        "| ---: | ---: | --- | " + ("--- | --- | " if with_s2 else "") + "---: | ---: | ---: |",
    ]
    for c in sorted(t.cells, key=lambda c: (c.k, c.seed)):
        dual = f"{_ci(c.dual, c.dual_ci)} | {_ci(c.delta, c.delta_ci, signed=True)} | " if with_s2 else ""
        lines.append(f"| {c.k} | {c.seed} | {_ci(c.system1, c.system1_ci)} | {dual}"
                     f"{'n/a' if c.slow_rate is None else f'{100 * c.slow_rate:.1f}%'} | {c.n_test} | {c.errors} |")
    lines += ["", "Produced by:", "", "```", t.command, "```", "",
              "Each cell is the same computation as (shown for the first cell; the others differ in k and seed):",
              "", "```", *(t.cells[0].commands if t.cells else []), "```"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the run


def _csv_bytes(samples: Sequence[Sample]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    for s in samples:
        w.writerow([str(s.path), s.label])
    return buf.getvalue().encode("utf-8")


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def _seed_embeddings(cell_run: Path, done_runs: list[Path]) -> None:
    """Start a cell's run with the query embeddings a finished cell computed (same images, same encoder)."""
    from fgvr.embedding_cache import EMBED_DIR

    dst = cell_run / EMBED_DIR
    if dst.is_dir() and any(dst.iterdir()):
        return
    for run in done_runs:
        src = run / EMBED_DIR
        chunks = sorted(src.glob("chunk-*.safetensors")) if src.is_dir() else []
        if chunks:
            dst.mkdir(parents=True, exist_ok=True)
            for f in chunks:
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)
            return


def _with_cache(vlm: "VlmBackend | None", cache_dir: Path | None) -> "VlmBackend | None":
    """The backend with a served VLM's answer cache where `fgvr evaluate --out RUN` keeps it."""
    if vlm is None:
        return None
    from fgvr.backends import reopen

    return reopen(vlm, cache_dir=cache_dir)


def vlm_identity(vlm: "VlmBackend | None") -> tuple[str | None, str | None, str | None]:
    """(what cells are bound to, the name in tables, the --vlm words in the printed commands)."""
    if vlm is None:
        return None, None, None
    text = (getattr(vlm, "opened_as", None) or (None,))[0]
    spec = getattr(vlm, "spec", None)
    if vlm.served or spec is None:
        model = getattr(getattr(vlm, "options", None), "model", None)
        family = getattr(vlm, "family", None)  # a served VLM's images are sized on its family's grid
        from fgvr.backends.openai_vlm import family_key

        return f"{text} model={model}" + family_key(family).replace("|", " "), text, text
    return spec.replace(device="cpu").key, spec.name, text or spec.source


def split_options(split: str = "official", fold: int | None = None) -> list[str]:
    """The words of `fgvr bench` that choose this split (none for the default)."""
    return [*(["--split", split] if split != "official" else []), *(["--fold", str(fold)] if fold is not None else [])]


def bench_command(dataset: str, root: str | None, out: str | Path, shots: Sequence[int], seeds: Sequence[int],
                  extra: Sequence[str], split: str = "official", fold: int | None = None) -> str:
    """The one command that (re)produces this table: running it again resumes or reuses every cell."""
    args = ["fgvr", "bench", dataset]
    if root is not None:
        args += ["--root", str(root)]
    args += split_options(split, fold)
    args += ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds)), *extra, "--out", str(out)]
    return shlex.join(args)


def run_bench(
    dataset: str,
    out: str | Path,
    *,
    root: str | Path | None = None,
    split: str = "official",
    fold: int | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    encoder: str = DEFAULTS.encoder,
    vlm: "VlmBackend | None" = None,
    reranker: bool = False,
    slow_budget: float = DEFAULTS.slow_budget,
    limit: int | None = None,
    top_k: int = DEFAULTS.top_k,
    weight: float = DEFAULTS.decision_weight,
    device: str = "cpu",
    batch_size: int = 16,
    cli_args: Sequence[str] = (),
    reports: bool = True,
    progress: bool = True,
) -> BenchTable:
    """Every (k, seed) cell, then the table; see the module docstring. `vlm`: an open backend
    (`fgvr.backends.get_backend`): System 2, and class descriptions in the base when the encoder has a text
    tower; a served one is opened again per cell with that run's answer cache.
    `cli_args`: the options to print in the commands besides those named here (VLM loading options).
    `reports`: write each cell's report.md and plots (what `fgvr evaluate` writes; the table does not need them).
    `split`/`fold`: which split of the dataset (`fgvr.datasets.load_splits`); tables and bench.json name it."""
    from fgvr.datasets import dataset_info

    shots, seeds = sorted(set(int(k) for k in shots)), sorted(set(int(s) for s in seeds))
    if not shots or min(shots) < 1:
        raise UsageError("--shots: give one or more k >= 1, e.g. 1,5,16")
    if not seeds:
        raise UsageError("--seeds: give one or more seeds, e.g. 0,1,2")
    if vlm and reranker:
        raise UsageError("choose one System 2: --vlm SPEC or --reranker, not both")
    if not 0.0 <= slow_budget <= 1.0:
        raise UsageError(f"--slow-budget must lie in [0, 1], got {slow_budget}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    info = dataset_info(dataset)
    out = Path(out)
    from fgvr.locks import output_lock

    with output_lock(out, "bench"), warnings.catch_warnings():  # one bench writes into OUT at a time
        # the manifests under OUT/data name the dataset's own files by absolute path, on purpose
        warnings.filterwarnings("ignore", message=r".*lead outside its folder", category=ManifestWarning)
        o = dict(root=root, split=split, fold=fold, shots=shots, seeds=seeds, encoder=encoder, vlm=vlm, reranker=reranker,
                 slow_budget=slow_budget, limit=limit, top_k=top_k, weight=weight, device=device,
                 batch_size=batch_size, cli_args=list(cli_args), reports=reports,
                 progress=progress)
        b = _prepare(info, out, o)
        cells: list[CellResult] = []
        done_runs: list[Path] = []
        grid = [(k, s) for k in shots for s in seeds]
        for n, (k, seed) in enumerate(grid, 1):
            cells.append(_run_cell(b, k, seed, f"[{n}/{len(grid)}] k={k} seed={seed}", done_runs))
            done_runs.append(out / f"k{k}-seed{seed}" / "run")
            atomic_write_json(b.bench_file, b.state)
        table = BenchTable(dataset=info.name, title=info.title, settings=b.settings, shots=shots, seeds=seeds,
                           cells=cells, summary=summarise_cells(cells, shots), command=b.command)
        table.markdown = format_table(table)
        atomic_write_bytes(out / "table.md", (table.markdown + "\n").encode("utf-8"))
        atomic_write_json(out / "table.json", {k: v for k, v in asdict(table).items() if k != "markdown"}
                          | {"methods": method_names(b.settings)})
        return table


@dataclass
class _Bench:
    """What every cell of one invocation shares: the manifests, the models, the settings cells are bound to."""

    info: Any
    out: Path
    o: dict[str, Any]
    splits: Any
    test: list[Sample]
    train_csv: Path
    test_csv: Path
    settings: dict[str, Any]
    enc_spec: Any
    vlm: "VlmBackend | None"
    describe: bool
    vlm_word: str | None
    eval_opts: list[str]
    command: str
    bench_file: Path
    state: dict[str, Any]
    invocation: dict[str, Any]
    train_ds: Any = None  # the train manifest as `fgvr build-kb` reads it (only to write on-demand images)

    def say(self, msg: str) -> None:
        if self.o["progress"]:
            log.info("bench: %s", msg)


def kb_descriptions(family: str, have_vlm: bool) -> bool:
    """Whether the base asks the VLM for class descriptions: only an encoder with a text tower turns them
    into text prototypes (the family's `text_tower` declaration)."""
    from fgvr.models import families

    return have_vlm and families.get(family).text_tower


def _prepare(info: Any, out: Path, o: dict[str, Any]) -> _Bench:
    """The dataset's splits -> OUT/data manifests (test: the evaluated images), the settings check, bench.json."""
    from fgvr.datasets import load_splits
    from fgvr.evaluate import plan
    from fgvr.models.spec import parse_spec

    splits = load_splits(info.name, o["root"], split=o["split"], fold=o["fold"],
                         cache_dir=(out / "data" / "images").resolve())
    items, _ = plan(splits.test, splits.test.classes, o["limit"])
    test = sorted((Sample(Path(p), label) for p, label, _ in items), key=lambda s: str(s.path))
    resolve = path_resolver()
    train = sorted((Sample(Path(resolve(s.path)), s.label) for s in splits.train.samples), key=lambda s: str(s.path))
    train_bytes, test_bytes = _csv_bytes(train), _csv_bytes(test)
    vlm, device = o["vlm"], o["device"]
    enc_spec = parse_spec(o["encoder"], device=device, role="image-encoder")
    vlm_key, vlm_name, vlm_word = vlm_identity(vlm)
    settings = {
        "dataset": info.name, "root": str(splits.root.resolve()), "split": splits.split,
        "encoder": enc_spec.replace(device="cpu").key, "encoder_name": enc_spec.name,
        "system2": "reranker" if o["reranker"] else ("vlm" if vlm else "none"),
        "vlm": vlm_key, "vlm_name": vlm_name,
        "kb_descriptions": kb_descriptions(enc_spec.family, bool(vlm)),
        "slow_budget": float(o["slow_budget"]), "top_k": int(o["top_k"]), "weight": float(o["weight"]),
        "limit": o["limit"], "classes": len(splits.train.classes), "train_images": len(train),
        "test_images_official": len(splits.test.samples), "test_images_listed": splits.test_listed,
        "test_images_missing": splits.test_missing,
        "train_sha256": hashlib.sha256(train_bytes).hexdigest(), "test_sha256": hashlib.sha256(test_bytes).hexdigest(),
    }
    bench_file = out / "bench.json"
    state = json.loads(bench_file.read_text(encoding="utf-8")) if bench_file.is_file() else {"invocations": []}
    old = state.get("settings")
    diff = ", ".join(identity_diff(old, settings, keys=settings)) if old is not None else ""
    if diff:
        raise BenchError(f"{out} holds a bench made with other settings ({diff}). Rerun with the same settings "
                         "(other --shots/--seeds are fine), or pass a new --out.")
    train_csv, test_csv = out / "data" / "train.csv", out / "data" / "test.csv"
    _write_if_changed(train_csv, train_bytes)
    _write_if_changed(test_csv, test_bytes)
    splits.prepare(test)
    eval_opts = _evaluate_options(o, vlm_word)
    command = bench_command(info.name, None if o["root"] is None else str(o["root"]), out, o["shots"], o["seeds"],
                            [*(["--encoder", o["encoder"]] if o["encoder"] != DEFAULTS.encoder else []),
                             *eval_opts, *(["--limit", str(o["limit"])] if o["limit"] is not None else [])],
                            split=o["split"], fold=o["fold"])
    invocation = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                  "cells_run": [], "cells_reused": []}
    state = {"settings": settings, "invocations": state["invocations"] + [invocation]}
    atomic_write_json(bench_file, state)
    b = _Bench(info=info, out=out, o=o, splits=splits, test=test, train_csv=train_csv, test_csv=test_csv,
               settings=settings, enc_spec=enc_spec, vlm=vlm,
               describe=settings["kb_descriptions"], vlm_word=vlm_word, eval_opts=eval_opts, command=command,
               bench_file=bench_file, state=state, invocation=invocation)
    b.say(f"{info.title} ({splits.split}): {len(train):,} train / {len(test):,} test images{missing_words(settings)}, "
          f"{len(splits.train.classes)} classes; "
          f"{len(o['shots']) * len(o['seeds'])} cell(s) under {out}")
    return b


def _evaluate_options(o: dict[str, Any], vlm_word: str | None) -> list[str]:
    """The options of `fgvr evaluate` this bench sets (the same words on `fgvr bench`)."""
    return [*(["--reranker"] if o["reranker"] else []), *(["--vlm", vlm_word] if vlm_word else []),
            *o["cli_args"], "--slow-budget", f"{o['slow_budget']:g}",
            *(["--top-k", str(o["top_k"])] if o["top_k"] != DEFAULTS.top_k else []),
            *(["--weight", f"{o['weight']:g}"] if o["weight"] != DEFAULTS.decision_weight else []),
            *(["--device", o["device"]] if o["device"] != "cpu" else [])]


def _run_cell(b: _Bench, k: int, seed: int, tag: str, done_runs: list[Path]) -> CellResult:
    """One (k, seed) cell: reused when done with the same binding; else base (kept if built), evaluation."""
    from fgvr.data import read_dataset, split_k_shot
    from fgvr.evaluate import run_evaluation
    from fgvr.records import RESULTS, iter_rows
    from fgvr.knowledge_base import build_knowledge_base
    from fgvr.pipeline import open_system

    o = b.o
    cell = b.out / f"k{k}-seed{seed}"
    kb_dir, run_dir, cell_file = cell / "kb", cell / "run", cell / "cell.json"
    binding = {**b.settings, "k": k, "seed": seed}
    if cell_file.is_file():
        stored = json.loads(cell_file.read_text(encoding="utf-8"))
        diff = identity_diff(stored.get("binding") or {}, binding)
        if diff:
            raise BenchError(f"{cell_file} was made with other settings ({'; '.join(diff)}); pass a new --out")
        b.invocation["cells_reused"].append(cell.name)
        b.say(f"{tag}: done before, reused")
        return CellResult(**{**stored["result"], **{f: tuple(stored["result"][f])
                                                     for f in ("system1_ci", "dual_ci", "delta_ci")}})
    vlm_flags = ["--vlm", b.vlm_word, *o["cli_args"]] if b.describe else []
    build_cmd = shlex.join(["fgvr", "build-kb", str(b.train_csv), "--shots", str(k), "--seed", str(seed),
                            "--encoder", o["encoder"], *vlm_flags,
                            *(["--device", o["device"]] if o["device"] != "cpu" else []), "--out", str(kb_dir)])
    eval_cmd = shlex.join(["fgvr", "evaluate", str(kb_dir), str(b.test_csv), "--out", str(run_dir), *b.eval_opts])
    t0 = time.perf_counter()
    if not (kb_dir / "manifest.json").is_file():
        b.say(f"{tag}: knowledge base")
        if b.splits.on_demand:
            b.train_ds = b.train_ds or read_dataset(b.train_csv)
            b.splits.prepare(split_k_shot(b.train_ds, k, seed)[0])
        describer = b.vlm if b.describe else None  # what `fgvr build-kb --vlm` passes
        build_knowledge_base(b.train_csv, kb_dir, shots=k, seed=seed, encoder=b.enc_spec, vlm=describer,
                             device=o["device"], progress=o["progress"])
    times = {"knowledge_base_s": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    b.say(f"{tag}: evaluation on {len(b.test):,} test images")
    _seed_embeddings(run_dir, done_runs)
    with open_system(kb_dir, vlm=_with_cache(b.vlm, run_dir / "vlm-cache"), reranker=o["reranker"],
                     budget=o["slow_budget"], k=o["top_k"], weight=o["weight"], device=o["device"]) as system:
        config = {"kb": str(kb_dir.resolve()), "encoder": system.encoder.spec.key,
                  "data": str(b.test_csv.resolve()), "limit": None}
        run_evaluation(system, read_dataset(b.test_csv), run_dir, config, batch_size=o["batch_size"],
                       progress=o["progress"], report=o["reports"], calibrate="run")
    times["evaluate_s"] = round(time.perf_counter() - t0, 2)
    planned = {str(s.path) for s in b.test}
    result = cell_result((r for r in iter_rows(run_dir / RESULTS) if r.path in planned), k, seed)
    result.seconds, result.commands = times, [build_cmd, eval_cmd]
    atomic_write_json(cell_file, {"binding": binding, "result": asdict(result)})
    b.invocation["cells_run"].append(cell.name)
    return result
