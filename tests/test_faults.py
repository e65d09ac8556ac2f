"""Fault injection through the real `fgvr` command: every case of issue 11 (a hostile user: corrupted
bases, two writers, bad paths, a full disk, silly options) ends either in a correct result or in one line
naming the file or option, with the error family's exit code, and never loses or mixes results.

One small EfficientNet-Lite0 base (3 classes x 3 shots of 32x32 patterns) is built once per session and
copied where a test damages it. The command runs in a subprocess where the process boundary is the point
(a second writer is another process; a traceback is what a process prints) and for the option checks
(cheap: no torch import); elsewhere it runs in this process through click's runner (the same root group,
error handling and exit codes), so Lite0 and Lite2 load once instead of once per case: on 2 cores each
subprocess that loads a model costs ~5 s, and this file has ~40 cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

EXIT_USAGE, EXIT_INPUT, EXIT_KB, EXIT_RUN, EXIT_LOCKED, EXIT_STORAGE, EXIT_SYSTEM2, EXIT_NOTHING = 2, 3, 4, 6, 7, 8, 9, 10


def _patterns(root: Path, per_class: int, seed: int) -> None:
    """fakes.pattern_images (red_disc, blue_stripes, green_checker), with `|` in one class name."""
    from fakes import pattern_images

    pattern_images(root, per_class, seed)
    (root / "blue_stripes").rename(root / "blue | stripes")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    exception: BaseException | None = None


def fgvr_process(*args, prelude: str = "", timeout: int = 300, env: dict | None = None) -> Ran:
    """Run `fgvr ARGS` in a fresh interpreter; `prelude` is Python run first (to inject a fault)."""
    code = prelude + "\nfrom fgvr.cli import main\nmain()\n"
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "FGVR_DEBUG" or v}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    return Ran(r.returncode, r.stdout, r.stderr)


def fgvr(*args, env: dict | None = None) -> Ran:
    """Run `fgvr ARGS` in this process (click's runner); an exception that escapes the command is rendered
    as the traceback a process would print."""
    from click.testing import CliRunner

    from fgvr.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], env={"FGVR_DEBUG": None, **(env or {})})
    stderr = r.stderr
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    if exc is not None:
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(*r.exc_info))
    return Ran(r.exit_code, r.stdout, stderr, exc)


def one_line(r: Ran, code: int, *needles: str) -> str:
    """The run failed with `code` and exactly one `Error:` line containing every needle; no traceback."""
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr[-4000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def results(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]


def reseal(kb: Path, mutate_manifest=None) -> None:
    """What a hostile edit that also updates the checksums does: recompute every file's sha256 in the
    manifest (and the manifest's own seal, where the base has one) after `mutate_manifest`."""
    m = json.loads((kb / "manifest.json").read_text())
    if mutate_manifest is not None:
        m = mutate_manifest(m)
    if isinstance(m, dict):
        for name in list(m.get("checksums", {})):
            if (kb / name).is_file():
                m["checksums"][name] = hashlib.sha256((kb / name).read_bytes()).hexdigest()
        from fgvr.knowledge_base import seal_manifest

        if "manifest_sha256" in m:
            seal_manifest(m)
    (kb / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """support/ (4 images per class), test/ (3 per class), kb/ (Lite0, k=3, seed 0), all built once."""
    import warnings

    from fgvr.knowledge_base import build_knowledge_base

    root = tmp_path_factory.mktemp("faults")
    _patterns(root / "support", 4, seed=0)
    _patterns(root / "test", 3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_knowledge_base(root / "support", root / "kb", shots=3, seed=0, progress=False)
    return root


def copy_kb(world: Path, tmp_path: Path, name: str = "kb") -> Path:
    dst = tmp_path / name
    shutil.copytree(world / "kb", dst)
    return dst


# ------------------------------------------------------------------------------------------------------
# options: nonsense refused at parse time (no torch import for most)


@pytest.mark.parametrize("args, needle", [
    (["classify", "KB", "x.png", "--threshold", "5"], "--threshold"),
    (["classify", "KB", "x.png", "--threshold", "nan"], "--threshold"),
    (["evaluate", "KB", "DATA", "--out", "o", "--slow-budget", "inf"], "--slow-budget"),
    (["memory", "plan", "--text-tokens", "-500"], "--text-tokens"),
    (["memory", "plan", "--new-tokens", "-1"], "--new-tokens"),
    (["memory", "plan", "--max-pixels", "-5"], "--max-pixels"),
    (["memory", "plan", "--budget", "0.5"], "--budget"),
    (["memory", "plan", "--budget", "1e999"], "--budget"),
    (["memory", "plan", "--image-size", "0x0"], "--image-size"),
    (["memory", "report", "--budget", "cuda:0=1e999"], "1e999"),
])
def test_nonsense_options_are_refused_at_parse_time(args, needle):
    r = fgvr_process(*args)
    one_line(r, EXIT_USAGE, needle)


def test_cuda_on_a_cpu_only_torch_is_one_line_in_every_command(world, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    img = world / "test" / "red_disc" / "0.png"
    for args in (["classify", world / "kb", img], ["evaluate", world / "kb", world / "test", "--out", tmp_path / "r"],
                 ["build-kb", world / "support", "--out", tmp_path / "k"], ["memory", "report", "--load",
                                                                          "efficientnet-lite0"]):
        one_line(fgvr(*args, "--device", "cuda"), EXIT_USAGE, "--device", "CPU-only")
    assert not (tmp_path / "r").exists() and not (tmp_path / "k").exists()


def test_debug_shows_the_traceback(tmp_path):
    one_line(fgvr_process("kb", "show", tmp_path), EXIT_KB, "not a knowledge base")
    r = fgvr_process("--debug", "kb", "show", tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "KnowledgeBaseError" in r.stderr
    r = fgvr("kb", "show", tmp_path, env={"FGVR_DEBUG": "1"})
    assert "KnowledgeBaseError" in type(r.exception).__name__
    one_line(fgvr("kb", "show", tmp_path), EXIT_KB, "not a knowledge base")  # --debug did not stick


def test_a_programming_error_is_not_dressed_up_as_bad_input(world, monkeypatch):
    """A ValueError from a bug must show its traceback (the old handler turned any ValueError into one line)."""
    from fgvr import pipeline

    def boom(*a, **kw):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(pipeline, "open_system", boom)
    r = fgvr("classify", world / "kb", world / "test" / "red_disc" / "0.png")
    assert r.returncode == 1 and "Traceback" in r.stderr and "a bug, not bad input" in r.stderr


# ------------------------------------------------------------------------------------------------------
# data: manifests and images


def test_manifest_duplicates_two_labels_and_outside_paths(world, tmp_path):
    a, b = world / "test" / "red_disc" / "0.png", world / "test" / "red_disc" / "1.png"
    c = world / "test" / "green_checker" / "0.png"
    sub = tmp_path / "lists"
    sub.mkdir()
    two = sub / "two.csv"
    two.write_text(f"path,label\n{a},red disc\n{b},red disc\n{a},green checker\n")
    r = fgvr("evaluate", world / "kb", two, "--out", tmp_path / "never", "--threshold", "0.5")
    one_line(r, EXIT_INPUT, "red disc", "green checker", "line 2", "line 4")
    assert not (tmp_path / "never" / "results.jsonl").exists()

    rel = os.path.relpath(c, sub)  # ../../.. : outside the manifest's folder
    dup = sub / "dup.csv"
    dup.write_text(f"path,label\n{a},red disc\n{b},red disc\n{a},red disc\n{rel},green checker\n")
    r = fgvr("evaluate", world / "kb", dup, "--out", tmp_path / "run", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "repeated row" in r.stderr and "outside its folder" in r.stderr
    recs = results(tmp_path / "run")
    assert len(recs) == 3 and len({x["path"] for x in recs}) == 3


def _flat_png(path: Path, width: int, height: int) -> None:
    """A black 1-bit PNG written row by row (never held decoded in memory): a few KB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decoded_size_is_checked_before_decoding_and_all_failed_is_an_error(world, tmp_path):
    bomb = tmp_path / "bomb.png"
    _flat_png(bomb, 16000, 16000)
    assert bomb.stat().st_size < 100_000
    good = world / "test" / "red_disc" / "0.png"
    r = fgvr("classify", world / "kb", good, bomb, "--threshold", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["prediction_name"] == "red disc"
    assert lines[1]["path_taken"] == "error" and "Mpx" in lines[1]["error"] and "limit" in lines[1]["error"]
    # every input failed: not exit 0
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    r = fgvr("classify", world / "kb", bomb, junk, "--threshold", "0.5", "--max-image-pixels", "1000000")
    one_line(r, EXIT_NOTHING, "none of the 2")
    assert [json.loads(x)["path_taken"] for x in r.stdout.splitlines()] == ["error", "error"]


# ------------------------------------------------------------------------------------------------------
# runs bound to their inputs


def test_resume_on_a_rebuilt_base_or_another_limit_is_refused(world, tmp_path):
    import warnings

    from fgvr.knowledge_base import build_knowledge_base

    kb = copy_kb(world, tmp_path)
    run = tmp_path / "run"
    r = fgvr("evaluate", kb, world / "test", "--out", run, "--slow-budget", "0.3", "--limit", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    before = (run / "results.jsonl").read_bytes()
    assert json.loads((run / "run.json").read_text())["limit"] == 6
    # --limit changed while the threshold was calibrated on the first 6 images
    r = fgvr("evaluate", kb, world / "test", "--out", run, "--slow-budget", "0.3", "--limit", "9")
    one_line(r, EXIT_RUN, "--limit", "6 then", "9 now", "--out")
    # the same path, another base (rebuilt with another seed: other support images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_knowledge_base(world / "support", kb, shots=3, seed=1, progress=False)
    r = fgvr("evaluate", kb, world / "test", "--out", run, "--slow-budget", "0.3", "--limit", "6")
    one_line(r, EXIT_RUN, "knowledge base's content", "--out")
    assert (run / "results.jsonl").read_bytes() == before  # nothing lost, nothing mixed in


def test_resume_keeps_peak_memory_of_every_process_and_report_modes(world, tmp_path):
    run = tmp_path / "run"
    r = fgvr("evaluate", world / "kb", world / "test", "--out", run, "--threshold", "0.5", "--limit", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    # a "killed" earlier process that peaked far higher than any resuming one can
    peaks = json.loads((run / "peak_memory.json").read_text())
    peaks["cpu_peak_rss_bytes"] = 10**12
    peaks["pids"] = [1, *peaks["pids"]]
    (run / "peak_memory.json").write_text(json.dumps(peaks))
    r = fgvr("evaluate", world / "kb", world / "test", "--out", run, "--threshold", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["n_images"] == 9 and len(results(run)) == 9
    assert s["run"]["peak_memory"]["cpu_peak_rss_bytes"] == 10**12 and 1 in s["run"]["peak_memory"]["pids"]
    assert s["run"]["peak_memory_this_process"]["cpu_peak_rss_bytes"] < 10**12
    mode = stat.S_IMODE((run / "results.jsonl").stat().st_mode)
    for f in ("report.md", "summary.json", "run.json", "confusion.png"):
        assert stat.S_IMODE((run / f).stat().st_mode) == mode, f
    # a class name with `|` stays one cell of the per-class table
    rows = [x for x in (run / "report.md").read_text().splitlines() if "stripes" in x and x.startswith("| blue")]
    assert rows == [rows[0]] and rows[0].count("|") - rows[0].count("\\|") == 4


# ------------------------------------------------------------------------------------------------------
# one writer per output


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(world, tmp_path):
    from fgvr.locks import lock_path, output_lock

    run, kb = tmp_path / "run", tmp_path / "kb2"
    with output_lock(run, "evaluate"):  # held by this process; the commands run in another one
        r = fgvr_process("evaluate", world / "kb", world / "test", "--out", run, "--threshold", "0.5")
        one_line(r, EXIT_LOCKED, str(os.getpid()), "fgvr evaluate")
        with output_lock(kb, "build-kb"), output_lock(tmp_path / "pred", "classify"):
            r = fgvr_process("build-kb", world / "support", "--shots", "2", "--out", kb)
            one_line(r, EXIT_LOCKED, str(os.getpid()), "build-kb")
            r = fgvr_process("classify", world / "kb", world / "test", "--out", tmp_path / "pred")
            one_line(r, EXIT_LOCKED, str(os.getpid()), "classify")
    assert not (run / "results.jsonl").exists() and not kb.exists() and not (tmp_path / "pred").exists()
    # a lock file left by a process that died (kill -9): its flock is gone, the lock is taken over
    lock_path(run).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "evaluate", "since": "then"}))
    r = fgvr("evaluate", world / "kb", world / "test", "--out", run, "--threshold", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over" in r.stderr and len(results(run)) == 9


# ------------------------------------------------------------------------------------------------------
# the disk: full, read-only, paths that cannot be folders

def test_disk_full_and_impossible_out_paths_are_one_line(world, tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        r = fgvr("build-kb", world / "support", "--shots", "2", "--out", tmp_path / "kb")
        one_line(r, EXIT_STORAGE, "no space left", "class-")
        r = fgvr("evaluate", world / "kb", world / "test", "--out", tmp_path / "run", "--threshold", "0.5")
        one_line(r, EXIT_STORAGE, "no space left", "run.json")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    r = fgvr("evaluate", world / "kb", world / "test", "--out", a_file / "run", "--threshold", "0.5")
    one_line(r, EXIT_STORAGE, "file.txt", "not a folder")
    r = fgvr("build-kb", world / "support", "--out", a_file / "kb")
    one_line(r, EXIT_STORAGE, "file.txt", "not a folder")
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        r = fgvr("evaluate", world / "kb", world / "test", "--out", "/sys/fgvr-run", "--threshold", "0.5")
        one_line(r, EXIT_STORAGE, "/sys")


# ------------------------------------------------------------------------------------------------------
# knowledge-base integrity


def test_damaged_bases_are_one_line_errors(world, tmp_path):
    img = world / "test" / "red_disc" / "0.png"
    cases = {}
    # the encoder changed in the manifest by hand (another encoder with the same width)
    kb = cases["encoder"] = copy_kb(world, tmp_path, "encoder")
    m = json.loads((kb / "manifest.json").read_text())
    m["encoder"]["spec"]["source"] = m["encoder"]["name"] = "efficientnet-lite2"
    (kb / "manifest.json").write_text(json.dumps(m, indent=2))
    # tensors truncated, checksums updated
    kb = cases["truncated"] = copy_kb(world, tmp_path, "truncated")
    data = (kb / "tensors.safetensors").read_bytes()
    (kb / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    reseal(kb)
    # manifest `[]`, manifest without encoder, a class removed (checksums updated)
    kb = cases["list"] = copy_kb(world, tmp_path, "list")
    (kb / "manifest.json").write_text("[]")
    kb = cases["no-encoder"] = copy_kb(world, tmp_path, "no-encoder")
    reseal(kb, lambda m: {k: v for k, v in m.items() if k != "encoder"})
    kb = cases["class-removed"] = copy_kb(world, tmp_path, "class-removed")
    reseal(kb, lambda m: {**m, "classes": m["classes"][:-1]})
    # descriptions.json not JSON (checksum updated)
    kb = cases["descriptions"] = copy_kb(world, tmp_path, "descriptions")
    (kb / "descriptions.json").write_text("{not json")
    reseal(kb)
    needles = {"encoder": "does not match its own checksum", "truncated": "tensors.safetensors", "list": "manifest.json",
               "no-encoder": "lacks the 'encoder' entry", "class-removed": "class id outside the class list", "descriptions": "descriptions.json"}
    for name, kb in cases.items():
        r = fgvr("classify", kb, img, "--threshold", "0.5")
        one_line(r, EXIT_KB, str(kb), needles[name])
        assert r.stdout == "", name  # no answer from a damaged base


@pytest.mark.slow
def test_reranker_cache_damaged_or_unwritable_is_rebuilt_and_system2_failing_everywhere_is_an_error(world,
                                                                                                     tmp_path):
    kb = copy_kb(world, tmp_path)
    args = ("evaluate", kb, world / "test", "--reranker", "--threshold", "0", "--limit", "2")  # all go slow
    r = fgvr(*args, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    caches = list((kb / "reranker-cache").glob("*.safetensors"))
    assert len(caches) == 1
    good = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert good["system2_calls_per_image"] == 1.0
    # damaged cache: rebuilt with a warning, System 2 still answers, same results
    caches[0].write_bytes(caches[0].read_bytes()[:-64] + b"\0" * 64)
    r = fgvr(*args, "--out", tmp_path / "b")
    assert r.returncode == 0 and "re-ranker cache" in r.stderr and "damaged" in r.stderr, r.stderr[-3000:]
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["system2_calls_per_image"] == 1.0 and s["accuracy"] == good["accuracy"]
    from safetensors import safe_open

    with safe_open(str(caches[0]), framework="pt") as sf:  # repaired for good: the rewritten file checks out
        digest = sf.metadata()["sha256"]
        assert hashlib.sha256(sf.get_tensor("descriptors").float().numpy().tobytes()).hexdigest() == digest
    # a cache that cannot be written (its folder is a file): kept in memory, with a warning
    shutil.rmtree(kb / "reranker-cache")
    (kb / "reranker-cache").write_text("in the way")
    r = fgvr(*args, "--out", tmp_path / "d")
    assert r.returncode == 0 and "keeping it in memory" in r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["system2_calls_per_image"] == 1.0
    # System 2 fails for every image (a support image it matches against is now unreadable): an error
    (kb / "reranker-cache").unlink()
    support = json.loads((kb / "manifest.json").read_text())["support"][0]["path"]
    target = Path(support) if Path(support).is_absolute() else world / "support" / support
    saved = target.read_bytes()
    try:
        target.write_bytes(b"garbage")
        r = fgvr(*args, "--out", tmp_path / "e")
    finally:
        target.write_bytes(saved)
    one_line(r, EXIT_SYSTEM2, "System 2 failed for all 2")
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["system2_calls"] == 0  # the summary is kept
