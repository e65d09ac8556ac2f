"""The evaluation report: RUN/report.md with PNG plots, made from summary.json alone.

Plots: the confusion matrix (row-normalised, so a rare class's mistakes are as visible as a common one's),
accuracy against slow-path budget (from the one run's logged scores; see `fgvr.evaluate.budget_curve` for
when it is exact), and per-class accuracy. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fgvr.io import atomic_write_bytes, atomic_write_text


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = summary["confusion"]["classes"]
    m = np.asarray(summary["confusion"]["matrix"], dtype=np.float64)
    keep = m.sum(1) > 0  # rows of classes present in the test set
    rows = m[keep] / m[keep].sum(1, keepdims=True)
    names = [c for c, k in zip(classes, keep) if k]
    n = len(classes)
    size = min(14, 3 + 0.45 * max(n, len(names)))
    fig, ax = plt.subplots(figsize=(size, size * max(len(names), 1) / max(n, 1) + 1))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        if n <= 15:
            for i in range(len(names)):
                for j in range(n):
                    if m[keep][i, j]:
                        ax.text(j, i, int(m[keep][i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (rows normalised)")
    _save(fig, path)
    plt.close(fig)


def plot_budget_curve(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["budget_curve"]
    pts = curve["points"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p["budget"] for p in pts], [p["accuracy"] for p in pts], marker="o")
    rate = summary.get("slow_rate")
    if rate is not None:
        ax.axvline(rate, color="grey", linestyle="--", label=f"this run's slow rate {rate:.2f}")
        ax.legend()
    ax.set_xlim(0, 1)
    ax.set_xlabel("slow-path budget (fraction of images sent to System 2)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(f"accuracy vs budget ({curve['exact']})")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_per_class(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(summary["per_class"].items(), key=lambda kv: kv[1]["accuracy"])[:40]
    fig, ax = plt.subplots(figsize=(6, 1 + 0.25 * len(items)))
    ax.barh([k for k, _ in items], [v["accuracy"] for _, v in items])
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("per-class accuracy" + (" (40 worst)" if len(summary["per_class"]) > 40 else ""))
    ax.tick_params(axis="y", labelsize=8)
    _save(fig, path)
    plt.close(fig)


_MD_PUNCT = set("\\`*_{}[]()#+-.!|~:")


def _md(text: Any) -> str:
    """Text from the data (a class name, a path) as inert Markdown: line breaks shown as spaces, HTML's
    `& < >` as entities (no tag, no script), and Markdown's punctuation backslash-escaped, so neither a
    link (`[x](javascript:...)`), an image, emphasis nor a table break can come out of a class name."""
    flat = " ".join(str(text).split())
    flat = flat.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join("\\" + ch if ch in _MD_PUNCT else ch for ch in flat)


def _code(text: Any) -> str:
    """Text from the data as a Markdown code span, its delimiter longer than any run of backticks inside."""
    import re

    flat = " ".join(str(text).split())
    fence = "`" * (1 + max((len(m) for m in re.findall(r"`+", flat)), default=0))
    return f"{fence} {flat} {fence}" if "`" in flat else f"`{flat}`"


_cell = _md  # a class name in a table cell: `|` is among the escaped characters

# A spreadsheet runs a cell that starts with one of these as a formula (`=HYPERLINK(...)`).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value for a CSV cell a spreadsheet will open: text that would start a formula gets a leading `'`
    (OWASP's advice), so it shows as the text it is; numbers are left alone."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_report(run: str | Path, summary: dict[str, Any]) -> Path:
    """Write RUN/report.md and its PNGs; returns the Markdown path."""
    run = Path(run)
    write_tables(run, summary)
    plot_confusion(summary, run / "confusion.png")
    plot_budget_curve(summary, run / "budget_curve.png")
    if summary["per_class"]:
        plot_per_class(summary, run / "per_class.png")
    cfg = summary.get("config", {})
    lat = summary["latency_s"]
    mem = summary.get("run", {}).get("peak_memory", {})
    lines = [
        "# fgvr evaluation",
        "",
        f"Knowledge base {_code(cfg.get('kb'))}, encoder {_code(cfg.get('encoder'))}, System 2 "
        f"{_code(cfg.get('system2') or 'none')}, data {_code(cfg.get('data'))}. Correct = exact match on class ids.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| images | {summary['n_images']} ({summary['n_labelled_known']} of known classes, "
        f"{summary['n_errors']} unreadable) |",
        f"| accuracy (an unreadable image is wrong) | {_fmt(summary['accuracy'], True)} |",
        f"| System 1 alone, same images | {_fmt(summary['accuracy_system1_alone'], True)} |",
        f"| accuracy, the {summary['n_labelled_known'] - summary.get('n_unreadable', 0)} readable images only "
        f"({summary.get('n_unreadable', 0)} unreadable) | {_fmt(summary['accuracy_readable'], True)} |",
        f"| System 1 alone, the same readable images | {_fmt(summary.get('accuracy_system1_alone_readable'), True)} |",
        f"| top-5 accuracy | {_fmt(summary.get('top5_accuracy'), True)} |",
        f"| balanced accuracy (mean per-class recall) | {_fmt(summary.get('balanced_accuracy'), True)} |",
        f"| macro-F1 | {_fmt(summary.get('macro_f1'))} |",
        f"| calibration error of the final confidence, renormalised over the top-k candidates (ECE, 15 bins) | {_fmt(summary.get('ece'))} |",
        f"| slow-path rate | {_fmt(summary['slow_rate'], True)} (threshold {_fmt(summary.get('trigger', {}).get('threshold', cfg.get('threshold')))}, "
        f"budget {_fmt(cfg.get('budget'))}) |",
        f"| System 2 calls per image | {_fmt(summary['system2_calls_per_image'])} |",
        f"| tokens per image (in / out) | {_fmt(summary['tokens_in_per_image'])} / {_fmt(summary['tokens_out_per_image'])} |",
        f"| latency per image p50 / p90 / p99 | {_fmt(lat['p50'])} / {_fmt(lat['p90'])} / {_fmt(lat['p99'])} s |",
        f"| peak memory (CPU RSS) | {_fmt((mem.get('cpu_peak_rss_bytes') or 0) / 2**20)} MiB |",
        f"| peak memory (CUDA) | {_fmt((mem['cuda_peak_allocated_bytes']) / 2**20) + ' MiB' if 'cuda_peak_allocated_bytes' in mem else mem.get('cuda', 'n/a')} |",
        "",
        "## Paths",
        "",
        "| path | images | accuracy |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['n']} | {_fmt(v['accuracy'], True)} |" for k, v in summary["paths"].items()]
    sl = summary["slowed_images"]
    lines += ["", f"On the {sl['n']} image(s) answered by System 2: System 1 alone {_fmt(sl['system1_accuracy'], True)}, "
              f"final {_fmt(sl['final_accuracy'], True)}.", ""]
    if summary["unknown_classes"]:
        lines += [f"**Test classes the base does not know:** {', '.join(map(_md, summary['unknown_classes']))} "
                  f"({summary['unknown_class_images']} image(s), classified but not counted in accuracy).", ""]
    lines += _open_set_lines(summary)
    if summary["errors"]:
        lines += ["## Unreadable images", ""] + [f"- {_code(e['path'])}: {_md(e['error'])}" for e in summary["errors"][:50]] + [""]
    curve = summary["budget_curve"]
    lines += ["## Accuracy against slow-path budget", "",
              f"From this run's logged scores, {curve['exact']} (images ranked by the trigger's score; the top "
              "b·N take System 2's decided answer)."
              + ("" if curve["exact"] == "all budgets" else " Run with `--slow-all` for the whole curve."), "",
              "![accuracy vs budget](budget_curve.png)", "",
              "| budget | accuracy |", "| --- | --- |"]
    lines += [f"| {p['budget']:.2f} | {_fmt(p['accuracy'], True)} |" for p in curve["points"]]
    lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion.png)", "",
              "Counts in `confusion.csv` (rows: true class, columns: predicted class); per-class precision, "
              "recall and F1 in `per_class.csv`.", ""]
    if summary["per_class"]:
        lines += ["## Per-class accuracy", "", "![per-class accuracy](per_class.png)", "",
                  "| class | images | accuracy |", "| --- | --- | --- |"]
        lines += [f"| {_cell(k)} | {v['n']} | {_fmt(v['accuracy'], True)} |" for k, v in summary["per_class"].items()]
    md = run / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md


def _open_set_lines(summary: dict[str, Any]) -> list[str]:
    """The open-set section (`fgvr.open_set`): only when the test set has classes the base does not hold."""
    o = summary.get("open_set")
    if not o:
        return []
    ci = lambda k, pct=False: f"[{_fmt(o[k][0], pct)}, {_fmt(o[k][1], pct)}]"  # noqa: E731
    setting = o.get("setting")
    how = ("off: no answer was rejected, the rows show what the score would do" if not setting else
           f"threshold {_fmt(setting['threshold'])} on the {setting['score']}"
           + (f" (--unknown-rate {setting['rate']})" if setting.get("rate") is not None else ""))
    return ["## Open set", "",
            f"{o['n_known']} image(s) of known classes, {o['n_unknown']} of classes outside the base; score: "
            f"System 1's {o['score']} (low = unknown). Open set {how}. Intervals: {o['intervals']}.", "",
            "| measure | value | 95% interval |", "| --- | --- | --- |",
            f"| AUROC, known vs unknown | {_fmt(o['auroc'])} | {ci('auroc_ci')} |",
            f"| FPR at 95% TPR (unknowns accepted as known) | {_fmt(o['fpr_at_95_tpr'], True)} | {ci('fpr_at_95_tpr_ci', True)} |",
            f"| known-class accuracy without rejection | {_fmt(o['known_accuracy_without_rejection'], True)} | "
            f"{ci('known_accuracy_without_rejection_ci', True)} |",
            f"| known-class accuracy with rejection | {_fmt(o['known_accuracy_with_rejection'], True)} | "
            f"{ci('known_accuracy_with_rejection_ci', True)} |",
            f"| accuracy cost of rejection (paired) | {_fmt(o['known_accuracy_cost'], True)} | {ci('known_accuracy_cost_ci', True)} |",
            f"| known images answered unknown / unknown images answered unknown | "
            f"{_fmt(o['known_rejected_rate'], True)} / {_fmt(o['unknown_rejected_rate'], True)} | |", ""]


def write_tables(run: Path, summary: dict[str, Any]) -> None:
    """RUN/per_class.csv (n, correct, accuracy, precision, recall, F1 per class) and RUN/confusion.csv."""
    import csv
    import io

    metrics = summary.get("per_class_metrics", {})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "n", "correct", "accuracy", "predicted", "precision", "recall", "f1"])
    for name in sorted(set(summary["per_class"]) | set(metrics)):
        pc, m = summary["per_class"].get(name, {}), metrics.get(name, {})
        w.writerow([csv_cell(name), pc.get("n", 0), pc.get("correct", 0), pc.get("accuracy", ""), m.get("predicted", 0),
                    m.get("precision", ""), m.get("recall", ""), m.get("f1", "")])
    atomic_write_text(run / "per_class.csv", buf.getvalue())
    conf = summary["confusion"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted", *map(csv_cell, conf["classes"])])
    for name, row in zip(conf["classes"], conf["matrix"]):
        w.writerow([csv_cell(name), *row])
    atomic_write_text(run / "confusion.csv", buf.getvalue())
