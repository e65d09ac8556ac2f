"""Large test sets: `fgvr evaluate` streams (memory bounded by the chunk size, not the number of test
images) and resumes after a kill -9 at any stage with the numbers an uninterrupted run gives.

Memory is checked with counters, not timings or RSS: the rows each streaming stage holds at once (the
`fgvr.evaluate.STREAM_HOOK` seam), the embeddings the cache keeps loaded, and how many result rows are
alive at once (weak references to every row read back from results.jsonl)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

import fgvr
import fgvr.embedding_cache as embedding_cache
import fgvr.evaluate as evaluate
from fgvr.data import read_dataset
from fgvr.pipeline import DualSystem
from fgvr.records import ResultRow, read_results
from fgvr.trigger import Trigger
from fakes import ColourEncoder, PickLast, colour_kb, make_data

STABLE = ("n_images", "n_labelled_known", "n_errors", "accuracy", "accuracy_readable", "accuracy_system1_alone",
          "per_class", "confusion", "unknown_classes", "unknown_class_images", "unknown_class_predictions",
          "slow_rate", "paths", "slowed_images", "system2_calls", "tokens_in_per_image", "budget_curve",
          "acc1", "acc5", "balanced_accuracy", "macro_f1", "ece", "per_class_metrics", "trigger")
BATCH = 4
CONFIG = {"kb": "colours", "encoder": "colour", "data": "d"}


def budget_system() -> DualSystem:
    """The colour base with a 30% budget calibrated on the run (all three streaming stages run)."""
    enc = ColourEncoder()
    return DualSystem(colour_kb(enc), enc, PickLast(), Trigger(budget=0.3), k=3, weight=1.0)


class Watch:
    """What the streaming stages held at once: rows per stage chunk, loaded cache rows, live result rows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stage_rows: dict[str, list[int]] = {}
        self.cache_rows = 0
        self.live = 0
        self.live_peak = 0
        monkeypatch.setattr(evaluate, "STREAM_HOOK", self.hook)
        monkeypatch.setattr(evaluate, "CALIBRATE_CHUNK", 8)
        real_chunk = embedding_cache.EmbeddingCache._chunk

        def chunk(cache, number):  # the embeddings the cache holds after each read
            out = real_chunk(cache, number)
            self.cache_rows = max(self.cache_rows, sum(t.shape[0] for t in cache._recent.values()))
            return out

        monkeypatch.setattr(embedding_cache.EmbeddingCache, "_chunk", chunk)
        real_from = ResultRow.from_dict.__func__

        def from_dict(cls, d):  # every row read back from results.jsonl, alive until collected
            row = real_from(cls, d)
            self.live += 1
            self.live_peak = max(self.live_peak, self.live)
            weakref.finalize(row, self._gone)
            return row

        monkeypatch.setattr(ResultRow, "from_dict", classmethod(from_dict))

    def _gone(self) -> None:
        self.live -= 1

    def hook(self, stage: str, rows: int) -> None:
        self.stage_rows.setdefault(stage, []).append(rows)


@pytest.mark.parametrize("resume", [False, True])
def test_memory_is_bounded_by_the_chunk_not_the_test_set(tmp_path, monkeypatch, resume):
    """A test set 4x larger holds no more rows at once in any stage; only the chunk count grows."""
    seen = {}
    for per_class in (4, 16):
        data = read_dataset(make_data(tmp_path / f"data{per_class}", per_class=per_class))
        out = tmp_path / f"run{per_class}"
        if resume:  # a first run, then one over the same folder: every row is read back from the journal
            run_evaluation_quiet(budget_system(), data, out)
        w = Watch(monkeypatch)
        s = run_evaluation_quiet(budget_system(), data, out)
        assert s["n_images"] == 6 * per_class + 1
        seen[per_class] = w
    small, large = seen[4], seen[16]
    for w in (small, large):
        assert w.live_peak <= BATCH + 1, w.live_peak  # rows are read one at a time, never all
        assert w.cache_rows <= embedding_cache.RECENT_CHUNKS * BATCH
        for stage, sizes in w.stage_rows.items():
            assert max(sizes) <= (8 if stage == "calibrate" else BATCH), (stage, sizes)
    if not resume:
        assert sum(large.stage_rows["classify"]) == 4 * sum(small.stage_rows["classify"]) - 3
        assert len(large.stage_rows["calibrate"]) > len(small.stage_rows["calibrate"]) > 1
        assert max(large.stage_rows["encode"]) == max(small.stage_rows["encode"]) == BATCH
    else:  # nothing left to do: no stage ran, the summary came from the journal
        assert not large.stage_rows.get("encode") and not large.stage_rows.get("classify")
    assert large.live_peak <= small.live_peak + 1


def run_evaluation_quiet(system: DualSystem, data, out: Path) -> dict:
    return evaluate.run_evaluation(system, data, out, CONFIG, batch_size=BATCH, progress=False, report=False)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import fgvr.evaluate as evaluate
    from fgvr.data import read_dataset
    from test_scale import budget_system, BATCH, CONFIG

    stage, after = sys.argv[3], int(sys.argv[4])
    seen = []

    def hook(name, rows):
        if name == stage:
            seen.append(rows)
            if len(seen) == after:  # the chunk is on disk; die as a kill -9 would find us
                os.kill(os.getpid(), signal.SIGKILL)

    evaluate.STREAM_HOOK = hook
    evaluate.CALIBRATE_CHUNK = 8
    evaluate.run_evaluation(budget_system(), read_dataset(sys.argv[1]), sys.argv[2], CONFIG, batch_size=BATCH,
                            progress=False, report=False)
""")


def _comparable(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "timings"} for r in records), key=lambda r: r["path"])


@pytest.mark.parametrize("stage,after", [("encode", 3), ("calibrate", 2), ("classify", 2)])
def test_sigkill_mid_run_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch, stage, after):
    root = make_data(tmp_path / "data", per_class=5)
    data = read_dataset(root)
    full = run_evaluation_quiet(budget_system(), data, tmp_path / "full")

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fgvr.__file__).parents[1]), str(Path(__file__).parent)])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(root), str(out), stage, str(after)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not (out / "summary.json").exists()
    cached = len(list((out / "embeddings").glob("chunk-*.safetensors")))
    done = len(read_results(out / "results.jsonl", repair=False)) if (out / "results.jsonl").exists() else 0

    w = Watch(monkeypatch)
    resumed = run_evaluation_quiet(budget_system(), data, out)
    n = 6 * 5 + 1
    # the finished chunks are not redone: only what the kill left undone is encoded and classified again
    assert sum(w.stage_rows.get("encode", [])) == n - cached * BATCH if stage == "encode" else not w.stage_rows.get("encode")
    assert sum(w.stage_rows["classify"]) == n - done
    if stage == "encode":
        assert cached == after
    if stage == "classify":
        assert done == after * BATCH
    for key in STABLE:
        assert resumed[key] == full[key], key
    assert json.loads((out / "run.json").read_text())["calibrated_threshold"] == full["trigger"]["threshold"]
    assert _comparable(read_results(out / "results.jsonl")) == _comparable(read_results(tmp_path / "full" / "results.jsonl"))
