"""`fgvr.run_dir`: a run folder's identity (bind, refuse with a per-key diff, resume), its append-only
journals (a torn line from a kill dropped, a key never twice), its checkpoints and its one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fgvr.errors import LockedError, RunMismatchError
from fgvr.run_dir import RUN_FILE, Checkpoint, Journal, RunDir, identity_diff, identity_key


def test_bind_writes_run_json_then_resumes_with_what_was_stored(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.bind({"kb_digest": "a" * 32, "budget": 0.3, "limit": 10}) == {"kb_digest": "a" * 32, "budget": 0.3,
                                                                            "limit": 10}
    run.update(calibrated_threshold=0.42)  # settled after the start
    again = RunDir(tmp_path / "run").bind({"kb_digest": "a" * 32, "budget": 0.3, "limit": 20},
                                          must_match=("kb_digest", "budget"))
    assert again == {"kb_digest": "a" * 32, "budget": 0.3, "limit": 20, "calibrated_threshold": 0.42}
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text()) == again  # run.json says what it now covers
    assert not list((tmp_path / "run").glob(".*.tmp"))  # written through a temp file, none left behind


def test_a_resume_with_other_inputs_is_refused_naming_each_key(tmp_path):
    first = {"kb_digest": "0123456789abcdef" * 2, "budget": 0.3, "top_k": 5, "data": "a.csv"}
    RunDir(tmp_path).bind(first)
    before = (tmp_path / RUN_FILE).read_bytes()
    with pytest.raises(RunMismatchError) as e:
        RunDir(tmp_path).bind({**first, "kb_digest": "f" * 32, "budget": 0.5},
                              explain={"kb_digest": "the knowledge base's content"})
    msg = str(e.value)
    assert "the knowledge base's content: 0123456789ab… then, ffffffffffff… now" in msg
    assert "budget: 0.3 then, 0.5 now" in msg
    assert "top_k" not in msg and "--out" in msg
    assert e.value.exit_code == 6
    assert (tmp_path / RUN_FILE).read_bytes() == before  # a refused resume changes nothing
    # keys outside must_match may change; a key that must match may not
    RunDir(tmp_path).bind({**first, "data": "b.csv"}, must_match=("kb_digest", "budget", "top_k"))
    with pytest.raises(RunMismatchError, match="top_k: 5 then, 3 now"):
        RunDir(tmp_path).bind({**first, "top_k": 3}, must_match=("top_k",))


def test_an_unreadable_run_json_is_refused_not_overwritten(tmp_path):
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(RunMismatchError, match="cannot be read"):
        RunDir(tmp_path).bind({"a": 1})
    assert (tmp_path / RUN_FILE).read_text() == "{not json"


def test_identity_diff_and_key():
    assert identity_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 then, 3 now", "c: None then, 4 now"]
    assert identity_key({"x": 1, "y": [1, 2]}) == identity_key({"y": [1, 2], "x": 1})
    assert identity_key({"x": 1}) != identity_key({"x": 2}) and len(identity_key({"x": 1}, 12)) == 12


def test_a_torn_last_line_is_dropped_and_the_next_append_is_whole(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_bytes(b'{"path": "a", "v": 1}\n{"path": "b", "v": 2}\n{"path": "c", "v"')  # killed mid-write
    j = Journal(f, key=lambda r: r["path"])
    assert [r["path"] for r in j.read(repair=False)] == ["a", "b"]
    assert f.read_bytes().endswith(b'"v"')  # a reader without repair never changes the file
    assert [r["path"] for r in j.read()] == ["a", "b"]
    assert f.read_bytes() == b'{"path": "a", "v": 1}\n{"path": "b", "v": 2}\n'
    assert [r["path"] for r in j.append([{"path": "c", "v": 3}])] == ["c"]
    assert [json.loads(x)["path"] for x in f.read_text().splitlines()] == ["a", "b", "c"]


def test_a_whole_last_record_without_its_newline_is_kept_and_ended(tmp_path):
    f = tmp_path / "log.jsonl"
    f.write_bytes(b'{"path": "a"}\n{"path": "b"}')
    j = Journal(f, key=lambda r: r["path"])
    assert [r["path"] for r in j.read()] == ["a", "b"]
    j.append([{"path": "c"}])
    assert f.read_text().splitlines() == ['{"path": "a"}', '{"path": "b"}', '{"path": "c"}']


def test_a_key_is_never_counted_or_written_twice(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_text('{"path": "a", "v": 1}\nnot json\n{"path": "a", "v": 9}\n{"path": "b", "v": 2}\n')
    j = Journal(f, key=lambda r: r["path"])
    assert [(r["path"], r["v"]) for r in j.read()] == [("a", 1), ("b", 2)]  # first per key; the bad line skipped
    written = j.append([{"path": "b", "v": 5}, {"path": "c", "v": 3}, {"path": "c", "v": 4}])
    assert written == [{"path": "c", "v": 3}]
    assert [r["path"] for r in Journal(f, key=lambda r: r["path"]).read()] == ["a", "b", "c"]


def test_two_threads_appending_the_same_keys_write_each_once(tmp_path):
    j = Journal(tmp_path / "answers.jsonl", key=lambda r: r["key"])
    j.read()
    recs = [{"key": f"k{i}", "response": i} for i in range(200)]

    def writer() -> None:
        for r in recs:
            j.append([r], fsync=False)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == sorted(r["key"] for r in recs)


def test_a_second_writer_process_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time\nfrom fgvr.run_dir import RunDir\n"
            "with RunDir(sys.argv[1]).lock('evaluate'):\n    print('held', flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__import__("fgvr").__file__).parents[1])}
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"evaluate.*pid {p.pid}"):
            with RunDir(run).lock("evaluate"):
                pass
    finally:
        p.kill()
        p.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead holder's lock: the next writer takes it over
        try:
            with RunDir(run).lock("evaluate"):
                break
        except LockedError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _work(run: RunDir, items: list[str], stop_after: int | None = None) -> list[dict]:
    """A resumable command in miniature: bind, skip what the journal has, append the rest in batches of 2."""
    run.bind({"items": len(items), "rule": "square"}, must_match=("rule",))
    journal = run.journal("results.jsonl")
    done = {r["path"] for r in journal.read()}
    todo = [p for p in items if p not in done]
    for i in range(0, len(todo), 2):
        if stop_after is not None and i >= stop_after:
            raise KeyboardInterrupt  # killed between two batches
        journal.append([{"path": p, "value": int(p[1:]) ** 2} for p in todo[i:i + 2]])
    state = run.checkpoint("state.json")
    state.save({"finished": len(journal.read())})
    return journal.read()


def test_a_killed_and_resumed_run_gives_identical_results(tmp_path):
    items = [f"x{i}" for i in range(9)]
    whole = _work(RunDir(tmp_path / "a"), items)
    with pytest.raises(KeyboardInterrupt):
        _work(RunDir(tmp_path / "b"), items, stop_after=4)
    with open(tmp_path / "b" / "results.jsonl", "ab") as f:
        f.write(b'{"path": "x4", "val')  # and the kill tore the line being written
    resumed = _work(RunDir(tmp_path / "b"), items)
    assert resumed == whole
    assert (tmp_path / "b" / "results.jsonl").read_bytes() == (tmp_path / "a" / "results.jsonl").read_bytes()
    assert Checkpoint(tmp_path / "b" / "state.json").load() == {"finished": 9}
    with pytest.raises(RunMismatchError, match="rule"):  # resuming under another identity is refused
        RunDir(tmp_path / "b").bind({"items": 9, "rule": "cube"}, must_match=("rule",))
