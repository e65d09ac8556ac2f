"""Where does `fgvr serve`'s CPU go per request? The server's threads and stages, in CPU ms per answer.

    .venv/bin/python benchmarks/serve_profile.py --kb demo-output/kb-k5-seed0 \
        --images demo-output/images/test-n100-seed0 [--runtime onnx] [--clients 16] [--requests 800] \
        [--cprofile]

This process is the server (`fgvr serve KB`, the real CLI, on a free 127.0.0.1 port); the load comes from a
child process (benchmarks/serve_load.py's raw keep-alive clients, one image per request, POST /v1/classify
multipart), so the server's figures hold its own work only. Before the server starts, each stage of the
request path is wrapped with a timer of the calling thread's CPU time (`time.thread_time`), cheap enough
not to move the figures:

- event loop: `http parse` (the protocol's data_received: the request line, headers, body bytes handed
  on), `http write` (the protocol's send: the response bytes), `multipart` (`read_images`), `respond` (the
  answer's dict), `json` (JSONResponse.render), `metrics`; the rest of the loop thread's CPU (routing,
  FastAPI and Starlette, the guard, asyncio's scheduling, the queues) is `loop, other`;
- the decode pool: `decode` (`decode_upload`: header check and decode);
- the encoder worker: `preprocess` (resize, crop, to pixels), `encoder run` (the runtime's call from the
  worker thread), `system 1` (scoring, trigger, decision: `classify_embeddings`), and the rest of the
  batch function;
- threads Python does not know (the runtimes' own intra-op pools): `other threads`.

Per-thread CPU comes from /proc/self/task/TID/stat, read before and after the measured load; the whole
process's from /proc/self/stat. `--cprofile` then runs the same load again with cProfile on the event loop
thread and lists its functions by own time (cProfile slows Python code down, so its milliseconds are
larger than the timed run's; it says where, the timers say how much). The table goes to
benchmarks/results/serve_profile.md unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `fgvr serve` sets it, before torch starts
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402

from serve_load import batches, cli_env, free_port, run_level, uptime  # noqa: E402

_lock = threading.Lock()
STAGES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # stage -> [CPU seconds, calls]
THREADS: dict[int, str] = {}  # native thread id -> the role it was seen in
LOOP: list[asyncio.AbstractEventLoop] = []


def _add(stage: str, seconds: float) -> None:
    with _lock:
        s = STAGES[stage]
        s[0] += seconds
        s[1] += 1
        THREADS.setdefault(threading.get_native_id(), ROLE[stage])


ROLE = {"http parse": "event loop", "http write": "event loop", "multipart": "event loop", "respond": "event loop",
        "json": "event loop", "metrics": "event loop", "decode": "decode pool", "preprocess": "encoder worker",
        "encoder run": "encoder worker", "system 1": "encoder worker", "batch": "encoder worker"}


def timed(stage: str, fn):
    """`fn` with its calling thread's CPU time added to `stage` (a coroutine function: the CPU from its
    start to its end on the loop thread, which is its own where it does not yield, as these do not)."""
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return await fn(*a, **k)
            finally:
                _add(stage, time.thread_time() - t)
    else:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                _add(stage, time.thread_time() - t)
    return wrapper


def instrument() -> None:
    """Wrap the request path's stages (see the module docstring) before the server is built."""
    from starlette.responses import JSONResponse

    import fgvr.serve.routes as routes
    import fgvr.serve.server as server
    import fgvr.serve.service as service
    from fgvr.models import onnx_runtime
    from fgvr.models.families import efficientnet
    from fgvr.pipeline import DualSystem
    from fgvr.serve.metrics import Metrics

    routes.read_images = timed("multipart", routes.read_images)
    service.decode_upload = timed("decode", service.decode_upload)
    service.Service.respond = timed("respond", service.Service.respond)
    service.Service._fast_batch = timed("batch", service.Service._fast_batch)
    JSONResponse.render = timed("json", JSONResponse.render)
    for name in ("request", "result", "batch"):
        setattr(Metrics, name, timed("metrics", getattr(Metrics, name)))
    efficientnet.EfficientNetEncoder.preprocess = timed("preprocess", efficientnet.EfficientNetEncoder.preprocess)
    onnx_runtime.OrtGraph.run = timed("encoder run", onnx_runtime.OrtGraph.run)
    efficientnet.EfficientNetEncoder.feature_map = _torch_run(efficientnet.EfficientNetEncoder.feature_map)
    DualSystem.classify_embeddings = timed("system 1", DualSystem.classify_embeddings)

    made = server.header_deadline_protocol

    def protocol(*a, **k):
        cls = made(*a, **k)
        from uvicorn.protocols.http import h11_impl

        cycles = [h11_impl.RequestResponseCycle]
        try:
            from uvicorn.protocols.http import httptools_impl

            cycles.append(httptools_impl.RequestResponseCycle)
        except ImportError:
            pass
        for c in cycles:
            if not getattr(c.send, "_timed", False):
                c.send = timed("http write", c.send)
                c.send._timed = True

        class Timed(cls):
            def connection_made(self, transport):
                if not LOOP:
                    LOOP.append(asyncio.get_running_loop())
                super().connection_made(transport)

            data_received = timed("http parse", cls.data_received)

        PROTOCOL.append(next(c.__name__ for c in cls.__mro__ if c.__module__.startswith("uvicorn.")))
        return Timed

    server.header_deadline_protocol = protocol


PROTOCOL: list[str] = []


def _torch_run(feature_map):
    """feature_map on torch (no ONNX graph) timed as `encoder run`; on ONNX Runtime OrtGraph.run is."""
    @functools.wraps(feature_map)
    def wrapper(self, pixels):
        if self.graph is not None:
            return feature_map(self, pixels)
        t = time.thread_time()
        try:
            return feature_map(self, pixels)
        finally:
            _add("encoder run", time.thread_time() - t)
    return wrapper


def task_cpu() -> dict[int, float]:
    """CPU seconds of every thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc/self/task").iterdir():
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(f[11]) + int(f[12])) / tick
        except (OSError, ValueError):
            pass
    return out


def process_cpu() -> float:
    f = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, images: Path, clients: int, requests: int, seconds: float) -> dict:
    """The load, from a child process (this script with --load): its row, with the child's CPU per answer."""
    out = subprocess.run([sys.executable, __file__, "--load", url, "--images", str(images), "--clients", str(clients),
                          "--requests", str(requests), "--seconds", str(seconds)],
                         capture_output=True, text=True, env=cli_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def photos_of(images: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    if not files:
        sys.exit(f"no images under {images}")
    return [(p.name, p.read_bytes()) for p in files]


def load_main(a: argparse.Namespace) -> None:
    photos = photos_of(a.images)
    c0 = time.process_time()
    row = run_level(a.load, photos, a.clients, a.requests, a.seconds)
    row["client_cpu_ms"] = 1000 * (time.process_time() - c0) / max(1, row["answered"])
    print(json.dumps(row))


def measure(url: str, a: argparse.Namespace, controller: int) -> dict:
    """One measured load: per-stage and per-thread CPU ms per answer, and the load's own row."""
    with _lock:
        STAGES.clear()
    t0, p0, (b0, n0) = task_cpu(), process_cpu(), batches(url)
    row = load(url, a.images, a.clients, a.requests, a.seconds)
    t1, p1, (b1, n1) = task_cpu(), process_cpu(), batches(url)
    n = max(1, row["answered"])
    with _lock:
        stages = {k: (1000 * v[0] / n, v[1] / n) for k, v in STAGES.items()}
        roles = dict(THREADS)
    per_role: dict[str, float] = defaultdict(float)
    for tid, cpu in t1.items():
        d = cpu - t0.get(tid, 0.0)
        if tid == controller:
            role = "profiler's controller"
        else:
            role = roles.get(tid) or ("event loop" if tid == os.getpid() else "other threads (runtime pools)")
        per_role[role] += 1000 * d / n
    return {"row": row, "stages": stages, "threads": dict(per_role), "process_ms": 1000 * (p1 - p0) / n,
            "mean_batch": (n1 - n0) / (b1 - b0) if b1 > b0 else None}


def report(a: argparse.Namespace, m: dict, load_before: str, load_after: str, cprofile_text: str | None) -> str:
    st, th, row = m["stages"], m["threads"], m["row"]
    loop_known = sum(st.get(k, (0, 0))[0] for k in ("http parse", "http write", "multipart", "respond", "json",
                                                    "metrics"))
    lines = [f"# Where `fgvr serve`'s CPU goes per request (System 1 only, {a.clients} clients)", "",
             f"Command: `{' '.join(['python', 'benchmarks/serve_profile.py', *sys.argv[1:]])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
             f"HTTP protocol: uvicorn's {PROTOCOL[0] if PROTOCOL else '?'}  ",
             f"Load before: `{load_before}`  ", f"Load after: `{load_after}`  ",
             f"{row['answered']} answers in {row['wall_s']:.1f} s ({row['rps']:.1f} req/s, {row['errors']} errors), "
             f"mean encoder batch {m['mean_batch'] or 0:.1f}; the load's own process: "
             f"{row['client_cpu_ms']:.2f} CPU ms per answer.", "",
             f"Server process: **{m['process_ms']:.2f} CPU ms per answer**. By thread:", "",
             "| thread | CPU ms / answer |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(th.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.005]
    lines += ["", "By stage (the thread's CPU inside each; calls per answer):", "",
              "| thread | stage | CPU ms / answer | calls / answer |", "| --- | --- | ---: | ---: |"]
    for k in ("http parse", "multipart", "respond", "json", "http write", "metrics"):
        if k in st:
            lines.append(f"| event loop | {k} | {st[k][0]:.2f} | {st[k][1]:.2f} |")
    lines.append(f"| event loop | loop, other (routing, FastAPI/Starlette, guard, asyncio, queues) | "
                 f"{th.get('event loop', 0.0) - loop_known:.2f} | |")
    if "decode" in st:
        lines.append(f"| decode pool | decode | {st['decode'][0]:.2f} | {st['decode'][1]:.2f} |")
    inner = 0.0
    for k in ("preprocess", "encoder run", "system 1"):
        if k in st:
            inner += st[k][0]
            lines.append(f"| encoder worker | {k} | {st[k][0]:.2f} | {st[k][1]:.2f} |")
    if "batch" in st:
        lines.append(f"| encoder worker | batch, other | {st['batch'][0] - inner:.2f} | {st['batch'][1]:.2f} |")
    lines.append(f"| other threads | the runtimes' own pools (ONNX Runtime's intra-op threads) | "
                 f"{th.get('other threads (runtime pools)', 0.0):.2f} | |")
    if cprofile_text:
        lines += ["", "The event loop thread under cProfile (a second run of the same load; own time, top 30; "
                      "cProfile inflates Python code, so read it for where, the table above for how much):", "",
                  "```", cprofile_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=Path, help="A knowledge base (e.g. the demo's).")
    ap.add_argument("--images", required=True, type=Path, help="A folder of query images (searched recursively).")
    ap.add_argument("--runtime", choices=["auto", "torch", "onnx"], default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=800, help="Answers measured (default 800).")
    ap.add_argument("--seconds", type=float, default=120.0, help="Time cap of the measured load.")
    ap.add_argument("--cprofile", action="store_true", help="Then the event loop thread under cProfile.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_profile.md")
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)  # the child: run the load against URL
    a = ap.parse_args()
    if a.load:
        return load_main(a)
    if a.kb is None:
        ap.error("--kb is required")
    os.environ.pop("FGVR_RUNTIME", None)
    instrument()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict = {}

    def control() -> None:
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            load(url, a.images, a.clients, 4 * a.clients, 120)  # warm-up: full micro-batches, every path
            result["load_before"] = uptime()
            result["m"] = measure(url, a, threading.get_native_id())
            result["load_after"] = uptime()
            if a.cprofile and LOOP:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                LOOP[0].call_soon_threadsafe(prof.enable)
                load(url, a.images, a.clients, a.requests // 2, a.seconds)
                done = threading.Event()
                LOOP[0].call_soon_threadsafe(lambda: (prof.disable(), done.set()))
                done.wait(30)
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
                text = buf.getvalue()
                result["cprofile"] = text[text.find("   ncalls"):] if "   ncalls" in text else text
        except BaseException as e:  # noqa: BLE001 - reported after the server stops
            result["error"] = e
        finally:
            os.kill(os.getpid(), 2)  # SIGINT: uvicorn shuts down

    threading.Thread(target=control, daemon=True).start()
    from fgvr.cli import cli

    args = [*(["--runtime", a.runtime] if a.runtime else []), "serve", str(a.kb), "--port", str(port)]
    try:
        cli.main(args=args, prog_name="fgvr")
    except (SystemExit, KeyboardInterrupt):  # uvicorn re-raises the SIGINT that stopped it
        pass
    if "error" in result:
        raise result["error"]
    text = report(a, result["m"], result["load_before"], result["load_after"], result.get("cprofile"))
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({k: v for k, v in result.items() if k != "cprofile"},
                                                     indent=2, default=str))


if __name__ == "__main__":
    main()
