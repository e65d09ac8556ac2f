"""`fgvr bench --datasets A,B,...`: several datasets, one table with a row per dataset and the mean.

    fgvr bench --datasets cub-200-2011,stanford-dogs,oxford-pets:coop --root /data --shots 1,16 --out bench-all

Each dataset is an ordinary `fgvr bench` under OUT/<name>/ (its own cells, table and resume), read from the
one `--root` where each sits under its usual folder name. The suite's table is the form of papers' main
tables: one row per dataset with its split named, a column per k (and method), each cell the mean over
seeds ± the 95% t-interval over seeds; the last row is the mean over datasets, its interval from the
per-seed means over datasets (every dataset runs the same seeds, so a seed's mean is one draw of the
whole suite). A partial download (Birdsnap) shows its missing test images in its row.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from fgvr.bench import BenchTable, _pm, method_names, run_bench, split_options, t_interval
from fgvr.errors import UsageError
from fgvr.io import atomic_write_bytes, atomic_write_json


@dataclass
class SuiteTable:
    """What `fgvr bench --datasets` prints and writes (OUT/table.md, OUT/table.json)."""

    tables: list[BenchTable]
    shots: list[int]
    seeds: list[int]
    mean: dict[str, dict[str, Any]]  # per k: per method {mean, half_width, n, values (per seed)}
    command: str
    markdown: str = ""


def _other_options(command: str) -> list[str]:
    """The options of one dataset's bench command besides those the suite sets itself."""
    words = shlex.split(command)[3:]  # fgvr bench DATASET
    mine = {"--root", "--split", "--fold", "--shots", "--seeds", "--out"}
    out, i = [], 0
    while i < len(words):
        if words[i] in mine:
            i += 2
            continue
        out.append(words[i])
        i += 1
    return out


def suite_mean(tables: Sequence[BenchTable], shots: Sequence[int], seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per k and method: the mean over datasets for each seed, then mean ± t-interval over those seeds."""
    out: dict[str, dict[str, Any]] = {}
    for k in shots:
        out[str(k)] = {}
        for key in ("system1", "dual"):
            per_seed = []
            for seed in seeds:
                vals = [getattr(c, key) for t in tables for c in t.cells if (c.k, c.seed) == (k, seed)]
                if len(vals) == len(tables):
                    per_seed.append(sum(vals) / len(vals))
            mean, half = t_interval(per_seed)
            out[str(k)][key] = {"mean": mean, "half_width": half, "n": len(per_seed), "values": per_seed}
    return out


def format_suite(s: SuiteTable) -> str:
    """The main table: a row per dataset (split named, test images counted), the mean row last."""
    settings = s.tables[0].settings
    with_s2 = settings["system2"] != "none"
    methods = ["system1", "dual"] if with_s2 else ["system1"]
    short = {"system1": "System 1", "dual": "dual"}
    head = "| dataset | split | test images | " + " | ".join(
        f"{k}-shot {short[m]}" for k in s.shots for m in methods) + " |"
    rule = "| --- | --- | ---: | " + " | ".join("---:" for _ in s.shots for _ in methods) + " |"
    rows = []
    for t in s.tables:
        st = t.settings
        n = t.cells[0].n_test if t.cells else 0
        missing = st.get("test_images_missing") or 0
        count = f"{n:,}" + (f" ({missing:,} of {st['test_images_listed']:,} missing)" if missing else "")
        rows.append(f"| {t.title} | {st['split']} | {count} | "
                    + " | ".join(_pm(t.summary[str(k)][m]) for k in s.shots for m in methods) + " |")
    rows.append(f"| **mean of {len(s.tables)}** | | | "
                + " | ".join(_pm(s.mean[str(k)][m]) for k in s.shots for m in methods) + " |")
    names = method_names(settings)
    lines = [f"## {len(s.tables)} datasets: k-shot top-1 accuracy (%)", "",
             f"{names['system1']}" + (f"; {names['dual']}" if with_s2 else "") + f"; seeds "
             f"{', '.join(map(str, s.seeds))}; each entry the mean ± 95% t-interval over seeds (exact match on "
             "class ids); the mean row's interval is over the seeds' means across datasets. Each dataset's own "
             "table (per-run bootstrap intervals, commands) is in OUT/<dataset>/table.md.", "",
             head, rule, *rows, "", "Produced by:", "", "```", s.command, "```"]
    return "\n".join(lines)


def run_suite(datasets: Sequence[tuple[str, str]], out: str | Path, *, root: str | Path | None = None,
              fold: int | None = None, shots: Sequence[int] = (1, 5, 16), seeds: Sequence[int] = (0, 1, 2),
              progress: bool = True, **bench_options: Any) -> SuiteTable:
    """`fgvr bench` for each (dataset, split) under OUT/<name>/, then the suite's table (module docstring).
    `fold` applies to the datasets published in folds; `bench_options` are `run_bench`'s."""
    from fgvr.datasets import dataset_info
    from fgvr.locks import output_lock

    infos = [(dataset_info(name), split) for name, split in datasets]
    names = [i.name for i, _ in infos]
    if len(set(names)) != len(names):
        raise UsageError(f"--datasets names a dataset twice: {', '.join(names)}")
    out = Path(out)
    shots, seeds = sorted(set(int(k) for k in shots)), sorted(set(int(x) for x in seeds))
    with output_lock(out, "bench"):
        tables = [run_bench(info.name, out / info.name, root=root, split=split, fold=fold if info.folds else None,
                            shots=shots, seeds=seeds, progress=progress, **bench_options) for info, split in infos]
        words = ",".join(f"{i.name}:{s}" if s != "official" else i.name for i, s in infos)
        command = shlex.join(["fgvr", "bench", "--datasets", words, *(["--root", str(root)] if root is not None else []),
                              *split_options("official", fold), "--shots", ",".join(map(str, shots)), "--seeds",
                              ",".join(map(str, seeds)), *_other_options(tables[0].command), "--out", str(out)])
        suite = SuiteTable(tables=tables, shots=shots, seeds=seeds, mean=suite_mean(tables, shots, seeds),
                           command=command)
        suite.markdown = format_suite(suite)
        atomic_write_bytes(out / "table.md", (suite.markdown + "\n").encode("utf-8"))
        atomic_write_json(out / "table.json", {
            "datasets": [{"dataset": t.dataset, "title": t.title, "split": t.settings["split"],
                          "test_images": t.cells[0].n_test if t.cells else 0,
                          "test_images_missing": t.settings.get("test_images_missing", 0), "summary": t.summary}
                         for t in tables],
            "mean": suite.mean, "shots": shots, "seeds": seeds, "command": command,
            "settings": {k: v for k, v in asdict(tables[0]).get("settings", {}).items()
                         if k not in ("dataset", "root", "split", "classes", "train_images", "test_images_official",
                                      "test_images_listed", "test_images_missing", "train_sha256", "test_sha256")}})
        return suite
