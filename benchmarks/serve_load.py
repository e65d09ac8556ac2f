"""How many requests per second does `fgvr serve` answer, and how fast, at 1, 4, 16 and 64 concurrent clients?

    .venv/bin/python benchmarks/serve_load.py --kb demo-output/kb-k5-seed0 \
        --images demo-output/images/test-n100-seed0 [--requests 96] [--seconds 90] [--levels 1,4,16,64] \
        [--runtime onnx]

Starts `fgvr serve KB` as its own process on a free 127.0.0.1 port (loopback only; nothing else is
contacted), waits for /healthz, warms up, then for each level runs that many client threads, each with its
own keep-alive connection, sending one image at a time (POST /v1/classify, multipart) and waiting for the
answer before sending the next. The clients are plain sockets sending requests prepared once per image
(`--client httpx`: httpx, as before, at several times the client CPU per request, which on a 2-core machine
is CPU the server does not get). A level stops after `--requests` answers or `--seconds`, whichever comes
first. The levels run in alternation, `--rounds` times (1, 4, 16, 1, 4, 16, ...), and each level's best
round is reported (its requests/s, with that round's latencies): on a shared machine the other processes'
load comes and goes, and alternating keeps it from favouring one level. Reported per level: requests/s
(answers / wall time), p50 and p99 latency seen by the clients, the encoder's mean micro-batch (from
/metrics), the CPU milliseconds per answer of the server process and of this process's clients (from /proc
and process_time), and the server's resident memory before and after.
`--reranker` adds System 2 (the CPU re-ranker); the trigger's threshold is calibrated on the base's support
set with `--slow-budget` as `fgvr serve` does.

`--hostile` runs hostile clients beside the normal ones at every level: slow bodies (a 4 MiB body promised,
1 KiB sent every 0.5 s), huge bodies (8 MiB sent as fast as possible, half of them declaring 40 MiB), invented methods
and paths, and half-open connections that send nothing; the server's peak resident memory is sampled every
0.1 s, and the hostile clients' answers are counted by status.

The bare encoder, in the same run (issue 21 item 3): before the server starts and again after it stops, this
process loads the base's encoder with the same runtime (`--runtime`, passed to `fgvr --runtime R serve` too;
default: what `fgvr serve` chooses) and the same thread count (`fgvr.threads`), and measures, with no HTTP:
its batched images/s on the query images' pixels (already decoded and preprocessed; at the server's micro-batch
and at 16, `encoder_runtime.images_per_s`), and the single-image latency of decode (the server's own
`decode_upload`) + preprocess + encode, one image at a time. The better of the two measurements of each is
kept (the stricter yardstick), and two ratios are printed: served images/s at 16 clients / bare batched
images/s (target >= 0.8), and one client's p50 latency / bare single-image latency (target <= 1.2).
`--no-bare` skips it.

The machine is shared: the load average (uptime) before and after is printed with the table. Goals: issue 14,
at 16 clients at least 2x the requests/s of one client, memory flat; issue 21, the two ratios above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's fgvr, here and in the CLI subprocesses (cli_env)
sys.path.insert(0, str(ROOT / "benchmarks"))  # encoder_runtime's helper, for the bare encoder


def cli_env() -> dict[str, str]:
    """The environment for a subprocess of the CLI: this checkout's src first on PYTHONPATH, and no runtime
    preference of its own (FGVR_RUNTIME dropped: the command line's --runtime decides)."""
    env = dict(os.environ)
    env.pop("FGVR_RUNTIME", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def batches(url: str) -> tuple[float, float]:
    t = httpx.get(url + "/metrics", timeout=30).text
    return metric(t, "fgvr_batches_total", 'queue="encoder"'), metric(t, "fgvr_batched_images_total", 'queue="encoder"')


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def bare_encoder(kb: Path, runtime: str | None, photos: list[tuple[str, bytes]], batches: list[int],
                 seconds: float) -> dict:
    """The base's encoder in this process, no HTTP: batched images/s per batch size on preprocessed pixels,
    and the median latency of decode + preprocess + encode of one image (see the module docstring)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `fgvr serve` sets it, before torch starts
    if runtime:
        os.environ["FGVR_RUNTIME"] = runtime
    import torch

    from encoder_runtime import images_per_s
    from fgvr.knowledge_base import load_knowledge_base
    from fgvr.models import registry
    from fgvr.models.spec import ModelSpec
    from fgvr.serve.settings import ServeSettings
    from fgvr.serve.upload import decode_upload
    from fgvr.threads import configure

    max_pixels = ServeSettings().max_pixels  # the server's default limit

    threads = configure()
    spec = ModelSpec(**load_knowledge_base(kb).encoder_spec).replace(device="cpu")
    with registry.use(spec) as enc, torch.inference_mode():
        images = [decode_upload(data, max_pixels) for _, data in photos]
        pixels = enc.preprocess(images)
        out = {"encoder": spec.key, "runtime": spec.runtime, "threads": threads, "batched": {}}
        for b in batches:
            batch = torch.cat([pixels] * (b // len(pixels) + 1))[:b]
            out["batched"][b] = images_per_s(enc, batch, seconds)
        lat: list[float] = []
        enc.encode_pixels(enc.preprocess(images[:1]))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(lat) < 5:
            _, data = photos[len(lat) % len(photos)]
            t = time.perf_counter()
            enc.encode_pixels(enc.preprocess([decode_upload(data, max_pixels)]))
            lat.append(time.perf_counter() - t)
        out["single_ms"] = 1000 * statistics.median(lat)
    return out


HOSTILE = {"slow_body": 40, "huge_body": 32, "bad_method": 4, "half_open": 600}


def _raw(port: int, head: bytes, timeout: float = 60) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head)
    return s


def _status(s: socket.socket) -> str:
    try:
        line = s.recv(64).split(b"\r\n", 1)[0].decode("latin-1")
        return line.split()[1] if line.startswith("HTTP/") else "closed"
    except OSError:
        return "closed"


def hostile(url: str, stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> list[threading.Thread]:
    """Start the hostile clients (HOSTILE: how many of each); they run until `stop` is set."""
    port = int(url.rsplit(":", 1)[1])
    h = b"Host: 127.0.0.1\r\n"

    def count(kind: str, status: str) -> None:
        with lock:
            counts[f"{kind} {status}"] = counts.get(f"{kind} {status}", 0) + 1

    def slow_body() -> None:
        while not stop.is_set():
            try:
                s = _raw(port, b"POST /v1/classify HTTP/1.1\r\n" + h + b"Content-Type: application/json\r\n"
                         b"Content-Length: 4194304\r\n\r\n", timeout=5)
                s.setblocking(False)
                while not stop.is_set():
                    try:
                        s.send(b"A" * 1024)
                        if s.recv(64):
                            count("slow_body", "answered")
                            break
                    except BlockingIOError:
                        pass
                    except OSError:
                        count("slow_body", "closed")
                        break
                    stop.wait(0.5)
                s.close()
            except OSError:
                count("slow_body", "refused")
                stop.wait(0.5)

    def huge_body(k: int) -> None:
        body = b"\0" * (8 * 2**20)
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                try:
                    if k % 2:
                        r = c.post("/v1/classify", content=body, headers={"content-type": "application/json"})
                        count("huge_body", str(r.status_code))
                    else:  # 40 MiB promised, 8 MiB sent, then the answer awaited
                        s = _raw(port, b"POST /v1/classify/batch HTTP/1.1\r\n" + h + b"Content-Type: "
                                 b"application/json\r\nContent-Length: 41943040\r\n\r\n", timeout=30)
                        try:
                            s.sendall(body)
                        except OSError:
                            pass
                        count("huge_body_40MiB", _status(s))
                        s.close()
                except Exception as e:  # noqa: BLE001 - a hostile client counts what it got and goes on
                    count("huge_body", type(e).__name__)

    def bad_method(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    count("bad_method", str(c.request(f"X{k}M{i}", f"/v1/nope/{i}").status_code))
                except Exception as e:  # noqa: BLE001
                    count("bad_method", type(e).__name__)

    def half_open() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            socks = [s for s in socks if s.fileno() >= 0]
            while len(socks) < HOSTILE["half_open"] and not stop.is_set():
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                    count("half_open", "opened")
                except OSError:
                    count("half_open", "refused")
                    break
            stop.wait(1.0)
            for s in list(socks):  # drop the ones the server closed (head deadline)
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        s.close()
                        count("half_open", "closed by server")
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
        for s in socks:
            s.close()

    threads = ([threading.Thread(target=slow_body) for _ in range(HOSTILE["slow_body"])]
               + [threading.Thread(target=huge_body, args=(k,)) for k in range(HOSTILE["huge_body"])]
               + [threading.Thread(target=bad_method, args=(k,)) for k in range(HOSTILE["bad_method"])]
               + [threading.Thread(target=half_open)])
    for t in threads:
        t.daemon = True
        t.start()
    return threads


def peak_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(rss_mib(pid))
        stop.wait(0.1)


BOUNDARY = b"fgvr-serve-load-7f3a9c"


def classify_request(port: int, name: str, data: bytes) -> bytes:
    """POST /v1/classify with `data` as the multipart field `image`, head and body as the bytes sent: built
    once per image, so what a raw client does per request is one send and one read."""
    if BOUNDARY in data:
        sys.exit(f"{name} contains the multipart boundary {BOUNDARY!r}; use other images")
    safe = name.replace('"', "_").encode()
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="' + safe
            + b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class RawClient:
    """One keep-alive HTTP/1.1 connection on a plain socket: sends prepared requests and reads the answer
    (status line, headers, a Content-Length body, or up to the close). A fraction of httpx's CPU per
    request, which on a 2-core machine is taken from the server being measured."""

    def __init__(self, port: int, timeout: float = 120) -> None:
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, request: bytes) -> tuple[int, bytes]:
        try:
            return self._send(request)
        except BaseException:
            self.close()  # the connection's state is unknown: the next request opens a fresh one
            raise

    def _send(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = self.sock
        s.sendall(request)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection before answering")
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip().lower() for k, _, v in (x.partition(":") for x in lines[1:])}
        body, length = buf[end + 4:], int(headers.get("content-length", -1))
        while length < 0 or len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                if length < 0:
                    break
                raise ConnectionError("the server closed the connection mid-answer")
            body += chunk
        if length < 0 or headers.get("connection") == "close":
            self.close()
        return status, body


def run_level(url: str, photos: list[tuple[str, bytes]], clients: int, n_requests: int, seconds: float,
              client_kind: str = "raw") -> dict:
    """`clients` threads, each on its own keep-alive connection, one request at a time. `client_kind`:
    "raw" (RawClient, prepared requests) or "httpx" (an httpx.Client each, the multipart built per request:
    what this benchmark used before, several times the CPU per request)."""
    latencies: list[float] = []
    server: list[tuple[float, float]] = []  # the server's own account: encode ms per image, queue ms
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    stop_at = time.perf_counter() + seconds
    port = int(url.rsplit(":", 1)[1])
    prepared = [classify_request(port, name, data) for name, data in photos] if client_kind == "raw" else []

    def client(k: int) -> None:
        raw = RawClient(port) if client_kind == "raw" else None
        hx = httpx.Client(base_url=url, timeout=120) if client_kind == "httpx" else None
        try:
            while time.perf_counter() < stop_at:
                with lock:
                    if sent[0] >= n_requests:
                        return
                    i = sent[0]
                    sent[0] += 1
                name, data = photos[i % len(photos)]
                t = time.perf_counter()
                try:
                    if raw is not None:
                        status, body = raw.send(prepared[i % len(prepared)])
                    else:
                        r = hx.post("/v1/classify", files={"image": (name, data, "image/png")})
                        status, body = r.status_code, r.content
                    dt = time.perf_counter() - t
                    with lock:
                        if status == 200:
                            latencies.append(dt)
                            tm = json.loads(body)["timings_ms"]
                            server.append((tm.get("encode", 0.0), tm.get("queue", 0.0)))
                        else:
                            errors.append(f"{status} {body[:80]!r}")
                except (OSError, ValueError, httpx.HTTPError) as e:
                    with lock:
                        errors.append(type(e).__name__)
        finally:
            if raw is not None:
                raw.close()
            if hx is not None:
                hx.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "answered": len(latencies), "errors": len(errors), "error_sample": errors[:3],
            "wall_s": wall, "rps": len(latencies) / wall if wall > 0 else 0.0,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
            "encode_ms_per_image": statistics.mean(e for e, _ in server) if server else None,
            "queue_ms": statistics.mean(q for _, q in server) if server else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", required=True, type=Path, help="A knowledge base (e.g. the demo's).")
    ap.add_argument("--images", required=True, type=Path, help="A folder of query images (searched recursively).")
    ap.add_argument("--requests", type=int, default=96, help="Answers per level (default 96).")
    ap.add_argument("--seconds", type=float, default=90.0, help="Time cap per level (default 90).")
    ap.add_argument("--levels", default="1,4,16,64", help="Concurrent clients per level (default 1,4,16,64).")
    ap.add_argument("--rounds", type=int, default=2, help="Times the levels are run, alternating (default 2).")
    ap.add_argument("--reranker", action="store_true", help="System 2 = the CPU re-ranker.")
    ap.add_argument("--slow-budget", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=None, help="The server's encoder micro-batch (its default: 4).")
    ap.add_argument("--runtime", choices=["auto", "torch", "onnx"], default=None,
                    help="fgvr --runtime for the server and the bare encoder (default: what fgvr chooses).")
    ap.add_argument("--bare-seconds", type=float, default=4.0, help="Seconds per bare-encoder measurement.")
    ap.add_argument("--no-bare", action="store_true", help="Skip the bare encoder (see above).")
    ap.add_argument("--hostile", action="store_true", help="Hostile clients beside the normal ones (see above).")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="The load clients: raw keep-alive sockets with prepared requests (default), or httpx "
                         "(what this benchmark used before; several times the client CPU per request).")
    ap.add_argument("--out", type=Path, default=None,
                    help="The table (default benchmarks/results/serve_load.md, serve_load_hostile.md with --hostile).")
    a = ap.parse_args()
    a.out = a.out or ROOT / "benchmarks" / "results" / ("serve_load_hostile.md" if a.hostile else "serve_load.md")

    files = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:64]
    if not files:
        sys.exit(f"no images under {a.images}")
    photos = [(p.name, p.read_bytes()) for p in files]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    from fgvr.serve.settings import ServeSettings

    server_batch = a.batch_size or ServeSettings().encode_batch
    bare_batches = sorted({server_batch, 16})
    bare_runs: list[dict] = []
    if not a.no_bare:
        bare_runs.append(bare_encoder(a.kb, a.runtime, photos, bare_batches, a.bare_seconds))
        print(f"bare encoder before the server: {bare_runs[-1]}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-c", "from fgvr.cli import main; main()",
           *(["--runtime", a.runtime] if a.runtime else []), "serve", str(a.kb), "--port", str(port),
           "--slow-budget", str(a.slow_budget), *(["--reranker"] if a.reranker else []),
           *(["--batch-size", str(a.batch_size)] if a.batch_size else [])]
    log = open(Path(tempfile.gettempdir()) / f"fgvr-serve-load-{port}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env())  # OMP_WAIT_POLICY as `fgvr serve` sets it
    rows = []
    load_before = uptime()
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"the server did not start; see {log.name}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        rss_ready = rss_mib(proc.pid)
        levels = [int(x) for x in a.levels.split(",")]
        run_level(url, photos, max(levels), 2 * max(levels), 120, a.client)  # warm-up: full micro-batches, every code path
        rss_start = rss_mib(proc.pid)
        for rnd, clients in [(r, c) for r in range(a.rounds) for c in levels]:
            b0, n0 = batches(url)
            before = rss_mib(proc.pid)
            stop, counts, samples = threading.Event(), {}, [before]
            extra = [threading.Thread(target=peak_rss, args=(proc.pid, stop, samples), daemon=True)]
            extra[0].start()
            if a.hostile:
                extra += hostile(url, stop, counts, threading.Lock())
                time.sleep(3)  # let them take their connections and bodies first
            s0, c0 = cpu_s(proc.pid), time.process_time()
            row = run_level(url, photos, clients, a.requests, a.seconds, a.client)
            s1, c1 = cpu_s(proc.pid), time.process_time()
            n = max(1, row["answered"])
            row.update(server_cpu_ms=1000 * (s1 - s0) / n, client_cpu_ms=1000 * (c1 - c0) / n)
            stop.set()
            for t in extra:
                t.join(10)
            b1, n1 = batches(url)
            row.update(round=rnd + 1, rss_before_mib=before, rss_after_mib=rss_mib(proc.pid),
                       rss_peak_mib=max(samples), hostile=dict(sorted(counts.items())),
                       mean_encoder_batch=(n1 - n0) / (b1 - b0) if b1 > b0 else None)
            rows.append(row)
            print(f"round {rnd + 1}, {clients:>3} clients: {row['rps']:.2f} req/s, p50 {row['p50_ms'] or 0:.0f} ms, "
                  f"p99 {row['p99_ms'] or 0:.0f} ms, {row['errors']} errors, RSS peak {row['rss_peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
        rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if not a.no_bare:
        bare_runs.append(bare_encoder(a.kb, a.runtime, photos, bare_batches, a.bare_seconds))
        print(f"bare encoder after the server: {bare_runs[-1]}", file=sys.stderr, flush=True)
    load_after = uptime()

    rss_max = max((r["rss_after_mib"] for r in rows), default=float("nan"))
    best = {}
    for r in rows:
        if r["clients"] not in best or r["rps"] > best[r["clients"]]["rps"]:
            best[r["clients"]] = r
    base = best[min(best)]["rps"] if best else 0.0
    lines = [f"# fgvr serve under load{' with hostile clients' if a.hostile else ''} "
             f"({'System 2 = re-ranker, ' if a.reranker else 'System 1 only, '}"
             f"threshold from a {a.slow_budget:g} budget on the support set)", "",
             f"Command: `{' '.join([Path(sys.executable).name, 'benchmarks/serve_load.py', *sys.argv[1:]])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}  ",
             f"Load before: `{load_before}`  ", f"Load after: `{load_after}`  ",
             f"Load clients: {'raw keep-alive sockets, requests prepared once' if a.client == 'raw' else 'httpx'}  ",
             f"{len(photos)} distinct query images; {a.rounds} round(s), levels alternating; best round per level:", "",
             "| clients | answered | errors | req/s | x one client | p50 ms | p99 ms | mean encoder batch | encode ms/image | queue ms "
             "| server CPU ms/req | client CPU ms/req | all rounds' req/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c, r in sorted(best.items()):
        every = ", ".join(f"{x['rps']:.2f}" for x in rows if x["clients"] == c)
        lines.append(f"| {c} | {r['answered']} | {r['errors']} | {r['rps']:.2f} | "
                     f"{r['rps'] / base if base else float('nan'):.2f} | {r['p50_ms'] or float('nan'):.0f} | "
                     f"{r['p99_ms'] or float('nan'):.0f} | "
                     f"{r['mean_encoder_batch'] or 0:.1f} | {r['encode_ms_per_image'] or 0:.0f} | {r['queue_ms'] or 0:.0f} | "
                     f"{r['server_cpu_ms']:.1f} | {r['client_cpu_ms']:.1f} | {every} |")
    if bare_runs:
        batched = {b: max(x["batched"][b] for x in bare_runs) for b in bare_batches}
        single = min(x["single_ms"] for x in bare_runs)
        best_b = max(batched, key=batched.get)
        lines += ["", f"Bare encoder in this process, no HTTP ({bare_runs[0]['encoder']}, runtime "
                      f"{bare_runs[0]['runtime']}, {bare_runs[0]['threads']} threads; better of the measurements before "
                      "and after the server): batched "
                      + ", ".join(f"{v:.1f} images/s at batch {b}" for b, v in batched.items())
                      + f"; one image decoded + preprocessed + encoded {single:.1f} ms (median). Every measurement: "
                      + "; ".join(", ".join(f"batch {b} {v:.1f}/s" for b, v in x["batched"].items())
                                  + f", single {x['single_ms']:.1f} ms" for x in bare_runs), ""]
        if 16 in best:
            r16 = best[16]["rps"] / batched[best_b]
            lines.append(f"- served images/s at 16 clients / bare batched images/s (batch {best_b}): "
                         f"{best[16]['rps']:.1f} / {batched[best_b]:.1f} = **{r16:.2f}** (target >= 0.8: "
                         f"{'met' if r16 >= 0.8 else 'not met'})")
        if 1 in best and best[1]["p50_ms"]:
            r1 = best[1]["p50_ms"] / single
            lines.append(f"- one client's p50 latency / bare single-image decode+encode: {best[1]['p50_ms']:.1f} / "
                         f"{single:.1f} ms = **{r1:.2f}** (target <= 1.2: {'met' if r1 <= 1.2 else 'not met'})")
    lines += ["", f"CPU per answered request: the server process (all its threads: HTTP, decoding, the encoder) and "
                  f"this process's client threads; req/s x their sum / 1000 is the cores the level used of "
                  f"{os.cpu_count()}, so the client's share is taken from the server on a machine this small."]
    lines += ["", f"Server resident memory: {rss_ready:.0f} MiB when ready, {rss_start:.0f} MiB after the warm-up "
                  f"(which runs full micro-batches), {rss_end:.0f} MiB at the end ({rss_end - rss_start:+.0f} MiB since "
                  f"the warm-up), {rss_max:.0f} MiB at most after any level; per level, before → after: "
                  + "; ".join(f"{r['clients']} clients (round {r['round']}) {r['rss_before_mib']:.0f} → "
                              f"{r['rss_after_mib']:.0f} (peak {r['rss_peak_mib']:.0f})" for r in rows)]
    if a.hostile:
        lines += ["", f"Hostile clients at every level ({', '.join(f'{n} {k}' for k, n in HOSTILE.items())}); their "
                      "answers, per round:", ""]
        lines += [f"- {r['clients']} clients (round {r['round']}): "
                  + ", ".join(f"{k}: {n}" for k, n in r["hostile"].items()) for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "load_before": load_before,
                                                      "load_after": load_after, "rss_ready_mib": rss_ready,
                                                      "rss_start_mib": rss_start, "rss_end_mib": rss_end,
                                                      "bare": bare_runs}, indent=2))


if __name__ == "__main__":
    main()
