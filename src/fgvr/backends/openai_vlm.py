"""The served System 2 backend: a VLM behind an OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang, ...).

The engine holds the model and the GPU; fgvr sends one chat request per question, several at once
(`concurrency`), so the engine's continuous batching and prefix cache do the work.

What is sent. The same question text as the in-process path, after the image, which goes as a PNG `data:`
URI already resized to the pixel cap (`fit_pixels`) on the served model's VLM family's grid: the served
model sees the pixels the local one would. Greedy (`temperature: 0`), one new token for scoring.

Which family (`choose_family`, decided once at start, logged in one line and kept in `describe()` and the
key): the one given (`--vlm-family`, `BackendOptions.family`), else the one whose declaration recognises the
served model (`fgvr.models.families.recognising_vlm_families`: the id `/v1/models` lists; its `root`, which
vLLM sets to the folder or hub id it loaded, so a `--served-model-name` alias is seen through; the `model`
its answers name), else the default VLM family with a warning. Two families recognising one id is an
error, not a guess.

How options are scored, decided once at start by probing the server (recorded in `describe()`, hence in the
run's summary and every result line):

* `logprob_token_ids` (vLLM with PR #43463, May 2026): `logprobs: true` + `logprob_token_ids: [ids of the
  letters]` returns exactly those tokens' log-probabilities at the first generated position, "the sampled
  token plus every explicitly requested token ID" (the PR's words). The letters' ids come from the server's
  own tokenizer (`POST /tokenize`, vLLM). Softmax over the letters = the local path's numbers.
* `top_logprobs`: `logprobs: true` + `top_logprobs: N` (OpenAI chat API; vLLM caps N at its
  `--max-logprobs`, default 20, and answers 400 above it; SGLang maps it to `top_logprobs_num`). Tokens are
  read as letters the way tokenizers render them: " A", "ĠA", "▁A", "a" all count for A (their
  probabilities summed). Chosen only when the probe's list holds a letter. A letter missing from the list
  gets an equal share of the probability the list leaves over (1 - the listed mass), never more than the
  list's smallest entry: it cannot be likelier than a token that made the list. A list with none of the
  letters is not an answer.
* `choice`: no log-probabilities: the answer is constrained to one of the letters (vLLM
  `structured_outputs: {"choice": [...]}`; SGLang `regex`; older vLLM `guided_choice`) and read as a
  one-hot distribution. The probe asks for a word and accepts the constraint only if a letter comes back.
* `letter`: nothing of the above: an unconstrained answer that must be exactly one option letter.

An answer counts only when it is one. A 200 reply that is not a chat completion (`{}`, no choices, an
`error` member, a `model` other than the one asked), has no usable log-probabilities or none of the
letters, or (for text) is empty, is a failed try: counted (`describe()["bad_answers"]`), retried like a
5xx, never cached; after the retries that image's System 2 fails alone (the pipeline gives it the
`escalated-failed` path with its fast answer) and the rest of its batch goes on.

Bounds. One deadline per try covers connect, headers and body (`timeout_s`; a watchdog shuts the socket
when it passes, so a server that trickles bytes cannot hold a thread past it), and a reply is refused once
it passes `max_reply_bytes` (at its Content-Length when it declares one), so memory stays bounded.
Answers streamed as server-sent events (`text/event-stream`) are read inside the same deadline and cap.
`transformers serve` (4.57), which streams every answer even with `stream: false` and ignores logprobs
and constraints, is refused at start with that reason.

Response fields read (OpenAI chat completion object, as vLLM's `ChatCompletionResponse` returns it):
`model`, `choices[0].logprobs.content[0].top_logprobs[*].token / .logprob`, `choices[0].message.content`
(SSE: `choices[0].delta.content`), `usage.prompt_tokens`, `usage.completion_tokens`; `GET /v1/models` ->
`data[*].id` (anything else there is one error) and `data[*].root` where given; vLLM `POST /tokenize` -> `tokens`.

Identity. `describe()["key"]` names the URL, the model asked for, the model the server answers as, the VLM
family its images are sized for and the pixel cap; runs bind to it, and the answer cache keys on it with the
request (each image as the digest of its PNG bytes), so a resumed run against another server, model or
family never reads this one's answers.
Answers are appended to `cache_dir/answers.jsonl`; a killed run that resumes sends no answered request again.

Credentials go only where the user named them: `$FGVR_VLM_API_KEY` (`api_key_env`), else
`$OPENAI_API_KEY` only with `openai_key` and an https URL; never written anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import math
import os
import random
import socket
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image

from fgvr.backends.base import (LETTERS, BackendError, BackendOptions, Generated, OptionScores, fit_pixels,
                                user_turn, with_pixels)
from fgvr.run_dir import Journal

NAME = "openai"
SERVED = True
MODES = ("logprob_token_ids", "top_logprobs", "choice", "letter")
CACHE_FILE = "answers.jsonl"
_PROBE = "Answer with one letter only: A or B?"
_CHOICE_PROBE = "Write the word hello."  # unconstrained, no model answers a letter: a letter means the constraint held
_CHOICE_FIELDS = (  # how each engine constrains the answer to a set of strings
    ("structured_outputs", lambda letters: {"choice": letters}),  # vLLM >= 0.12
    ("regex", lambda letters: "(" + "|".join(letters) + ")"),  # SGLang
    ("guided_choice", lambda letters: letters),  # vLLM < 0.12
)
_TOKEN_MARKS = " \t\n\u0120\u2581\u010a"  # space, Ġ (byte-level BPE), ▁ (SentencePiece), Ċ (newline)
_CHUNK = 64 * 1024
log = logging.getLogger(__name__)


def claims(text: str) -> bool:
    """An http(s) URL: the address of an OpenAI-compatible server."""
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


def open_backend(text: str, options: BackendOptions) -> "OpenAIVlm":
    """The server at `text`, probed now (model, letter tokens, answer mode); images are sized for the VLM
    family `options.family`, else the one the served model's id names, else the default one
    (`choose_family`), and the pixel cap is filled in on that family's grid."""
    return OpenAIVlm(text.strip(), options)


def family_key(family: str | None) -> str:
    """`|family=NAME` for a key, empty for the default VLM family: every served run, answer cache and base
    made before the family was chosen used the default family's pixels, and they stay valid."""
    from fgvr.models import families

    return "" if not family or family == families.default_vlm_family().name else f"|family={family}"


def choose_family(given: str | None, ids: Sequence[tuple[str, str | None]] = ()) -> tuple[str, str]:
    """The VLM family a served model's images are sized for, and why (the words of the log line): the one
    `given`, else the family whose declaration recognises the first of `ids` ((what it is, the id) pairs, in
    order: the id the server lists; its `root`, the folder or hub id the engine loaded, when the id is an
    alias; the `model` its answers name) that any family recognises, else the default VLM family. An id
    two families recognise is an error: sized on the wrong grid, every image would be resampled by the server."""
    from fgvr.models import families

    if given:
        try:
            return families.vlm_family(given).name, "given by --vlm-family"
        except ValueError as e:
            raise BackendError(f"--vlm-family {given}: {e}") from None
    seen = {}
    for what, model_id in ids:
        if isinstance(model_id, str) and model_id and model_id not in seen:
            seen[model_id] = what
    for model_id, what in seen.items():
        found = families.recognising_vlm_families(model_id)
        if len(found) > 1:
            raise BackendError(f"{what} {model_id!r} is recognised by several VLM families "
                               f"({', '.join(f.name for f in found)}); choose one with --vlm-family")
        if found:
            return found[0].name, f"inferred from {what} {model_id!r}"
    default = families.default_vlm_family()
    return default.name, (f"the default: no VLM family recognises {' / '.join(map(repr, seen)) or 'the served model'}"
                          f"; if it is another family, give --vlm-family")


class HttpError(Exception):
    """One failed try: the status (None when there was no HTTP answer) and whether a retry may help."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retryable, self.retry_after = status, retryable, retry_after


class BadAnswer(HttpError):
    """A reply that arrived but is not an answer (see the module docstring): retried, never cached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=200, retryable=True)


@dataclass
class Reply:
    """One HTTP answer's JSON, and whether it came as server-sent events (a stream) rather than one body."""

    data: Any
    streamed: bool = False


def api_key_for(url: str, options: BackendOptions, environ: dict | None = None) -> str | None:
    """The key the user named for this server: `$FGVR_VLM_API_KEY`, else `$OPENAI_API_KEY` only when they
    opted in and the URL is https (a key for OpenAI must not go to any host in clear)."""
    env = os.environ if environ is None else environ
    if env.get(options.api_key_env):
        return env[options.api_key_env]
    if options.openai_key and env.get("OPENAI_API_KEY"):
        if urlsplit(url).scheme != "https":
            raise BackendError(f"--vlm-openai-key sends $OPENAI_API_KEY only over https; {url} is not. Put the "
                               f"server's own key in ${options.api_key_env}")
        return env["OPENAI_API_KEY"]
    return None


class _Watchdog:
    """Shuts a connection's socket when a try's deadline passes, so a blocked read (headers or body, however
    slowly the server trickles them) ends there. `stop()` first: a finished try is never cut."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn, self.fired, self._lock, self._done = conn, False, threading.Lock(), False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            sock = self.conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> bool:
        """Stop watching; True when the deadline had already passed."""
        with self._lock:
            self._done = True
        self._timer.cancel()
        return self.fired


class _Http:
    """JSON over HTTP/1.1 with one keep-alive connection per thread (stdlib only), every try bounded in time
    (`timeout_s`, connect to last byte) and in size (`max_bytes`)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float, max_bytes: int) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"--vlm {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
        self.https = parts.scheme == "https"
        try:
            self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        except ValueError as e:
            raise BackendError(f"--vlm {url!r}: {e}") from None
        self.prefix = parts.path.rstrip("/")  # e.g. /v1
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()  # every thread's, closed together by close()
        self._lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=self.timeout_s)
            with self._lock:
                self._all.add(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._all.discard(conn)
        self._local.conn = None

    def close(self) -> None:
        with self._lock:
            conns, self._all = list(self._all), set()
        for conn in conns:
            conn.close()

    def request(self, method: str, path: str, body: Any = None, root: bool = False) -> Reply:
        """`path` under the URL's prefix (/v1/...), or under the server root when `root` (vLLM's /tokenize)."""
        full = (self.prefix.rsplit("/v1", 1)[0] if root else self.prefix) + path
        data = None if body is None else json.dumps(body).encode()
        conn = self._conn()
        dog = _Watchdog(conn, self.timeout_s)
        try:
            conn.request(method, full, body=data, headers=self.headers)
            resp = conn.getresponse()
            raw = self._body(resp)
        except HttpError:
            dog.stop()
            self._drop()
            raise
        except (ConnectionError, http.client.HTTPException, OSError, ValueError) as e:
            fired = dog.stop()
            self._drop()
            if fired or isinstance(e, (socket.timeout, TimeoutError)):
                raise HttpError(f"no answer within {self.timeout_s:g} s", retryable=True) from e
            raise HttpError(f"{type(e).__name__}: {e}", retryable=True) from e
        if dog.stop():  # the socket was cut at the deadline: what came is not the whole answer
            self._drop()
            raise HttpError(f"no answer within {self.timeout_s:g} s", retryable=True)
        if resp.status >= 400:
            text = raw.decode(errors="replace")[:300].replace("\n", " ")
            after = resp.getheader("Retry-After")
            raise HttpError(f"HTTP {resp.status}: {text}", status=resp.status,
                            retryable=resp.status == 429 or resp.status >= 500,
                            retry_after=float(after) if after and after.replace(".", "", 1).isdigit() else None)
        return read_body(raw, resp.getheader("Content-Type") or "")

    def _body(self, resp: http.client.HTTPResponse) -> bytes:
        """The body, refused once it passes the cap (at once when its Content-Length says so)."""
        declared = resp.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise HttpError(f"the answer is {int(declared):,} bytes, over the {self.max_bytes:,}-byte cap; "
                            "refused unread")
        chunks, n = [], 0
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            n += len(chunk)
            if n > self.max_bytes:
                raise HttpError(f"the answer passed the {self.max_bytes:,}-byte cap; refused")
            chunks.append(chunk)


def read_body(raw: bytes, content_type: str) -> Reply:
    """A reply's JSON: one body, or server-sent events merged into one completion."""
    if "text/event-stream" in content_type.lower() or raw.lstrip().startswith(b"data:"):
        return Reply(merge_events(raw), streamed=True)
    try:
        return Reply(json.loads(raw))
    except (ValueError, RecursionError) as e:
        raise BadAnswer(f"the answer is not JSON: {raw[:120]!r}") from e


def merge_events(raw: bytes) -> dict:
    """Server-sent chat.completion.chunk events -> one chat completion (content joined, logprobs in order,
    the last usage); an event with an `error` member makes the whole an error."""
    text, lps, merged = [], [], {"object": "chat.completion"}
    seen = False
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise BadAnswer(f"a streamed event is not JSON: {payload[:120]!r}") from e
        if not isinstance(event, dict):
            raise BadAnswer(f"a streamed event is a JSON {type(event).__name__}, not an object")
        if event.get("error"):
            return {"error": event["error"]}
        for k in ("model", "usage"):
            if event.get(k) is not None:
                merged[k] = event[k]
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            seen = True
            part = choices[0].get("delta") or choices[0].get("message") or {}
            piece = part.get("content") if isinstance(part, dict) else None
            if isinstance(piece, str):
                text.append(piece)
            lp = choices[0].get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                lps.extend(lp["content"])
    if seen:
        merged["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                              "logprobs": {"content": lps} if lps else None}]
    return merged


# --- reading an answer: every shape a server can send is read right or refused as a BadAnswer ----------


def _error_text(err: Any) -> str:
    msg = err.get("message") if isinstance(err, dict) else err
    return " ".join(str(msg).split())[:200]


def first_choice(response: Any) -> dict:
    """choices[0] of a chat completion, or BadAnswer for anything that is not one."""
    if not isinstance(response, dict):
        raise BadAnswer(f"the answer is a JSON {type(response).__name__}, not a chat completion object")
    if response.get("error") or response.get("object") == "error":
        raise BadAnswer(f"the server answered with an error: {_error_text(response.get('error') or response)}")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadAnswer("the answer holds no choice")
    return choices[0]


def answer_text(response: Any) -> str:
    message = first_choice(response).get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def usage(response: Any) -> tuple[int, int]:
    u = response.get("usage") if isinstance(response, dict) else None
    u = u if isinstance(u, dict) else {}

    def count(v: Any) -> int:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 2**31 else 0

    return count(u.get("prompt_tokens")), count(u.get("completion_tokens"))


def first_token_logprobs(response: Any) -> dict[str, float]:
    """{token text: log-probability} at the first generated position (the sampled token included); entries
    that are not a string token with a finite log-probability <= 0 are left out."""
    lp = first_choice(response).get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return {}
    first = content[0]
    tops = first.get("top_logprobs")
    out: dict[str, float] = {}
    for t in [*(tops if isinstance(tops, list) else []), first]:
        if not isinstance(t, dict) or not isinstance(t.get("token"), str):
            continue
        v = t.get("logprob")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 1e-6:
            out.setdefault(t["token"], min(0.0, float(v)))
    return out


def letter_of(token: str) -> str | None:
    """The option letter a token stands for as tokenizers render it (" A", "ĠA", "▁A", "a"), or None."""
    t = token.lstrip(_TOKEN_MARKS).upper()
    return t if len(t) == 1 and t in LETTERS else None


def letter_logprob(tops: dict[str, float], letter: str, token_id: int | None) -> float | None:
    """A letter's log-probability by its exact token: its text, or `token_id:N` (vLLM's
    --return-tokens-as-token-ids form). The exact token, as the in-process path reads it."""
    if letter in tops:
        return tops[letter]
    if token_id is not None:
        return tops.get(f"token_id:{token_id}")
    return None


def letter_masses(tops: dict[str, float], letters: Sequence[str], ids: dict[str, int] | None = None) -> list[float | None]:
    """Each letter's log-probability in a top-N list, summed over every token that renders it (and its
    `token_id:N` entry when its id is known); None where no such token is listed."""
    mass: dict[str, float] = {}
    by_id = {f"token_id:{i}": c for c, i in (ids or {}).items()}
    for token, lp in tops.items():
        c = letter_of(token) or by_id.get(token)
        if c is not None and c in letters:
            mass[c] = mass.get(c, 0.0) + math.exp(lp)
    return [math.log(min(1.0, mass[c])) if mass.get(c, 0.0) > 0 else None for c in letters]


def fill_missing(listed: dict[str, float], letter_lp: list[float | None]) -> list[float]:
    """Probabilities of the letters from a top-N list; a missing letter gets an equal share of the mass the
    list leaves over, capped at the list's smallest probability. Renormalised over the letters. At least
    one letter must be listed: a list with none of them says nothing about them."""
    probs = [math.exp(lp) if lp is not None else None for lp in letter_lp]
    missing = sum(p is None for p in probs)
    if missing == len(probs):
        raise BadAnswer("none of the option letters is among the answer's listed tokens")
    if missing:
        mass = [math.exp(v) for v in listed.values()]
        leftover = max(0.0, 1.0 - sum(mass))
        share = min(min(mass) if mass else 1.0, leftover / missing)
        probs = [share if p is None else p for p in probs]
    total = sum(probs)
    if not total > 0:
        raise BadAnswer("the listed letters have no probability")
    return [p / total for p in probs]


def read_scores(response: Any, mode: str, k: int, letter_ids: dict[str, int] | None = None) -> list[float]:
    """The distribution over the first k letters an answer gives in a scoring mode, or BadAnswer."""
    letters = list(LETTERS[:k])  # a list: "" or "AB" is not a letter, though both are in the string "ABC"
    if mode == "logprob_token_ids":
        tops = first_token_logprobs(response)
        lps = [letter_logprob(tops, c, (letter_ids or {}).get(c)) for c in letters]
        if any(lp is None for lp in lps):
            raise BadAnswer(f"the server left out the log-probabilities of "
                            f"{[c for c, lp in zip(letters, lps) if lp is None]}")
        m = max(lps)
        e = [math.exp(lp - m) for lp in lps]
        return [x / sum(e) for x in e]
    if mode == "top_logprobs":
        tops = first_token_logprobs(response)
        if not tops:
            raise BadAnswer("the answer holds no log-probabilities")
        return fill_missing(tops, letter_masses(tops, letters, letter_ids))
    answer = answer_text(response).strip()
    if mode == "letter":
        answer = answer.rstrip(".):").strip()
    if answer not in letters:
        raise BadAnswer(f"the answer {answer[:40]!r} is not one of the letters {letters}")
    return [1.0 if c == answer else 0.0 for c in letters]


def model_roots(listed: Any, url: str) -> dict[str, str | None]:
    """{id: root} of a `GET /v1/models` answer ({"data": [{"id": ..., "root": ...}]}; anything else is one
    error): vLLM's and SGLang's model cards name in `root` the folder or hub id the engine serves (under
    `--served-model-name` the id is only an alias); None where not given."""
    data = listed.get("data") if isinstance(listed, dict) else None
    if not isinstance(data, list):
        raise BackendError(f"{url}/models answered a JSON {type(listed).__name__} without a \"data\" list, "
                           "not an OpenAI model list: is this an OpenAI-compatible server? Fix --vlm")
    return {m["id"]: m["root"] if isinstance(m.get("root"), str) else None
            for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)}


class AnswerCache:
    """Answers already received, appended one JSON line each to a `fgvr.run_dir.Journal` keyed by the
    request's digest (a torn last line after a kill is dropped; an answer is never stored twice)."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / CACHE_FILE
        self.answers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.journal = None if self.path is None else Journal(self.path, key=lambda r: r["key"],
                                                              valid=lambda r: "response" in r)
        if self.journal is not None:
            self.answers = {rec["key"]: rec["response"] for rec in self.journal.read()}

    @staticmethod
    def key(body: dict, identity: str = "") -> str:
        """The request (images as digests) and the server's identity (URL, model, pixel cap)."""
        return hashlib.sha256(json.dumps({"identity": identity, "body": body}, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Any:
        return self.answers.get(key)

    def put(self, key: str, response: Any) -> None:
        if self.path is None:
            return
        with self._lock:
            self.answers[key] = response
            self.journal.append([{"key": key, "response": response}], fsync=False)  # flushed: a kill -9 loses nothing sent


def image_data_uri(image: Image.Image, max_pixels: int, min_pixels: int,
                   family: str | None = None) -> tuple[str, str]:
    """The image at the pixel cap on VLM family `family`'s grid (the default family's when None) as a
    lossless PNG data: URI, and the digest of its bytes (the cache key's part for it). Stored uncompressed:
    it is sent once over a fast link, and deflate would cost fgvr's process 2-3x the CPU time of everything
    else it does per request."""
    buf = io.BytesIO()
    fit_pixels(image, max_pixels, min_pixels, family).save(buf, format="PNG", compress_level=0)
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()


class OpenAIVlm:
    """A served VLM (see the module docstring)."""

    name = NAME
    served = SERVED

    def __init__(self, url: str, options: BackendOptions) -> None:
        self.url = url.rstrip("/")
        self.opened_options = options  # as given: a pickled copy (a Ray actor's) opens and chooses from these
        self.options = options  # with the family and its pixel cap filled in once the server is probed
        self.concurrency = max(1, int(options.concurrency))
        self.retries = max(0, int(options.retries))
        self.http = _Http(self.url, api_key_for(self.url, options), options.timeout_s, options.max_reply_bytes)
        self.cache = AnswerCache(options.cache_dir)
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fgvr-vlm")
        # sockets and threads go with the backend, whoever forgets close()
        self._finalizer = weakref.finalize(self, _shut, self.pool, self.http)
        self.requests_sent = self.cache_hits = self.bad_answers = self.failed = 0
        self.streamed = False  # a probe came back as server-sent events
        # (prepare, wait for the server, parse) of the latest requests, for benchmarks/served_vlm.py
        self.timings: deque[tuple[float, float, float]] = deque(maxlen=100_000)
        self._count_lock = threading.Lock()
        try:
            if options.family:  # a misspelt --vlm-family fails before the server is asked anything
                choose_family(options.family)
            self.model, self.model_root = self._pick_model(options.model)
            self.answered_model: str | None = None  # the `model` the server's answers carry (the probe's)
            self.letter_ids = self._letter_ids()
            self.mode, self.top_n, self.choice_field = self._detect_mode()
            self.family, self.family_reason = choose_family(options.family, [
                ("the served model id", self.model), ("the root /v1/models lists", self.model_root),
                ("the model its answers name", self.answered_model)])
            self.options = with_pixels(replace(options, family=self.family))
        except BaseException:
            self.close()
            raise
        (log.warning if self.family_reason.startswith("the default") else log.info)(
            "%s: images sized for VLM family %s (%s)", self.url, self.family, self.family_reason)

    @property
    def key(self) -> str:
        """The served model's identity: what a run and the answer cache are bound to."""
        answered = f"|as={self.answered_model}" if self.answered_model not in (None, self.model) else ""
        return (f"{NAME}|{self.url}|{self.model}{answered}{family_key(self.family)}|maxpx={self.options.max_pixels}"
                f"|minpx={self.options.min_pixels}")

    def __reduce__(self) -> tuple[Any, tuple[str, BackendOptions]]:
        """Pickled (a Ray actor's copy) as the URL and the options as given: the other process opens its own
        connection pool and probes the server itself (choosing the family as this one did), rather than
        receiving threads and sockets."""
        return (open_backend, (self.url, self.opened_options))

    # --- start: model, letters, mode ---------------------------------------------------------------
    def _pick_model(self, wanted: str | None) -> tuple[str, str | None]:
        """(the model to ask, the folder or hub id the server says it serves under that name, if it says)."""
        try:
            listed = self.http.request("GET", "/models").data
        except HttpError as e:
            if e.status in (401, 403):
                raise BackendError(f"the VLM server at {self.url} refused the request ({e}); put its API key "
                                   f"in ${self.options.api_key_env}") from None
            raise BackendError(f"the VLM server at {self.url} does not answer ({e}). Start it (README: "
                               "'System 2 on a served VLM') or fix --vlm; nothing was run.") from None
        roots = model_roots(listed, self.url)
        ids = list(roots)
        if wanted:
            if wanted not in ids:
                raise BackendError(f"--vlm-model {wanted!r} is not served at {self.url}; it serves: "
                                   f"{', '.join(ids)[:300] or 'nothing'}")
            return wanted, roots[wanted]
        if len(ids) != 1:
            raise BackendError(f"the server at {self.url} serves {len(ids)} models ({', '.join(ids)[:300] or 'none'}): "
                               "choose one with --vlm-model")
        return ids[0], roots[ids[0]]

    def _letter_ids(self) -> dict[str, int] | None:
        """Each letter's token id from the server's tokenizer (vLLM `POST /tokenize`), or None where the
        server has no such route: then the letters are found by their text in the top-N list."""
        def one(letter: str) -> int | None:
            try:
                got = self.http.request("POST", "/tokenize", {"model": self.model, "prompt": letter,
                                                              "add_special_tokens": False}, root=True).data
            except HttpError:
                return None
            toks = got.get("tokens") if isinstance(got, dict) else None
            ok = isinstance(toks, list) and len(toks) == 1 and isinstance(toks[0], int) and not isinstance(toks[0], bool)
            return toks[0] if ok else None

        ids = list(self.pool.map(one, LETTERS))
        return dict(zip(LETTERS, ids)) if all(isinstance(i, int) for i in ids) else None

    def _probe(self, extra: dict, prompt: str = _PROBE) -> Reply | None:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                "temperature": 0, **extra}
        try:  # straight to the server: a probe is never cached (the server may have changed since)
            got = self.http.request("POST", "/chat/completions", body)
            first_choice(got.data)
        except HttpError as e:
            if e.status is not None and 400 <= e.status < 500:
                return None  # the server does not take this parameter
            raise BackendError(f"the VLM server at {self.url} failed while fgvr probed it: {e}") from None
        if self.answered_model is None and isinstance(got.data.get("model"), str):
            self.answered_model = got.data["model"]
        self.streamed = self.streamed or got.streamed
        return got

    def _detect_mode(self) -> tuple[str, int | None, str | None]:
        if self.letter_ids:  # four letters and a list of one: only a server honouring the field lists them all
            ids = [self.letter_ids[c] for c in "ABYZ"]
            got = self._probe({"logprobs": True, "top_logprobs": 1, "logprob_token_ids": ids})
            if got is not None:
                tops = first_token_logprobs(got.data)
                if all(letter_logprob(tops, c, i) is not None for c, i in zip("ABYZ", ids)):
                    return "logprob_token_ids", None, None
        for n in sorted({min(self.options.max_top_logprobs, 20), 20, 10, 5, 1}, reverse=True):
            if n > self.options.max_top_logprobs:
                continue
            got = self._probe({"logprobs": True, "top_logprobs": n})
            if got is None:
                continue  # over the server's cap: a smaller list
            tops = first_token_logprobs(got.data)
            if any(m is not None for m in letter_masses(tops, "AB", self.letter_ids)):
                return "top_logprobs", n, None
            if tops:
                log.warning("%s lists log-probabilities but neither letter among its top %d tokens; not "
                            "scoring by them", self.url, n)
            break
        for name, make in _CHOICE_FIELDS:
            got = self._probe({name: make(["A", "B"])}, _CHOICE_PROBE)
            if got is not None and answer_text(got.data).strip() in ("A", "B"):
                return "choice", None, name
        if self.streamed:
            raise BackendError(
                f"the server at {self.url} streams its answers (server-sent events) even with stream: false and "
                "ignores logprobs and constraints, as `transformers serve` does: System 2 cannot score options "
                "there. Serve the model with vLLM or SGLang (README: 'System 2 on a served VLM')")
        return "letter", None, None

    # --- requests -------------------------------------------------------------------------------------
    def _check_model(self, response: Any) -> None:
        said = response.get("model") if isinstance(response, dict) else None
        if isinstance(said, str) and said not in (self.model, self.answered_model):
            raise BadAnswer(f"the answer is from model {said[:80]!r}, not {self.model!r}")

    def _send(self, body: dict, keyed: dict, read: Callable[[Any], Any]) -> tuple[Any, Any]:
        """POST a chat completion, retried with backoff, and `read` it: (the reply, what `read` made of it).
        From the cache when answered before. A reply that `read` refuses (BadAnswer) is a failed try: retried,
        never cached. `keyed`: the body with each image replaced by its digest (the cache key)."""
        key = AnswerCache.key(keyed, self.key)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                got = read(cached)
                with self._count_lock:
                    self.cache_hits += 1
                return cached, got
            except BadAnswer:
                pass  # not an answer after all: asked again
        for attempt in range(self.retries + 1):
            try:
                with self._count_lock:
                    self.requests_sent += 1
                response = self.http.request("POST", "/chat/completions", body).data
                first_choice(response)
                self._check_model(response)
                got = read(response)
                break
            except HttpError as e:
                if isinstance(e, BadAnswer):
                    with self._count_lock:
                        self.bad_answers += 1
                if not e.retryable or attempt == self.retries:
                    with self._count_lock:
                        self.failed += 1
                    raise
                wait = e.retry_after if e.retry_after is not None else self.options.backoff_s * 2**attempt
                time.sleep(min(30.0, wait * (1 + 0.25 * random.random())))
        self.cache.put(key, response)
        return response, got

    def _messages(self, conversation: list[dict], images: Sequence[Image.Image]) -> tuple[list[dict], list[dict]]:
        """The processor-format conversation in OpenAI form: each {"type": "image"} becomes the next image as
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}. Also the same messages
        with each image's digest in place of its data (what the answer cache keys on)."""
        it = iter(images)
        out, keyed = [], []
        for m in conversation:
            content = kcontent = m["content"]
            if isinstance(content, list):
                content, kcontent = [], []
                for c in m["content"]:
                    if c.get("type") == "image":
                        uri, digest = image_data_uri(next(it), self.options.max_pixels, self.options.min_pixels,
                                                     self.family)
                        content.append({"type": "image_url", "image_url": {"url": uri}})
                        kcontent.append({"type": "image_url", "image_url": {"sha256": digest}})
                    else:
                        content.append({"type": "text", "text": c["text"]})
                        kcontent.append(content[-1])
            out.append({"role": m["role"], "content": content})
            keyed.append({"role": m["role"], "content": kcontent})
        return out, keyed

    def _score_body(self, question: str, image: Image.Image, k: int) -> tuple[dict, dict]:
        messages, keyed = self._messages([user_turn(question)], [image])
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0}
        letters = list(LETTERS[:k])
        if self.mode == "logprob_token_ids":
            body |= {"logprobs": True, "top_logprobs": min(k, 20),
                     "logprob_token_ids": [self.letter_ids[c] for c in letters]}
        elif self.mode == "top_logprobs":
            body |= {"logprobs": True, "top_logprobs": self.top_n}
        elif self.mode == "choice":
            body[self.choice_field] = dict(_CHOICE_FIELDS)[self.choice_field](letters)
        return body, {**body, "messages": keyed}

    def _failure(self, e: HttpError) -> str:
        tries = f" (after {self.retries} retries)" if e.retryable and self.retries else ""
        return f"{self.url}: {e}{tries}"

    def _score_one(self, question: str, image: Image.Image, k: int) -> OptionScores:
        """One image's answer; whatever goes wrong fails this image alone (its error), never its batch."""
        t0 = time.perf_counter()
        try:
            body, keyed = self._score_body(question, image, k)
            t1 = time.perf_counter()
            response, probs = self._send(body, keyed, lambda r: read_scores(r, self.mode, k, self.letter_ids))
            t2 = time.perf_counter()
        except HttpError as e:
            return OptionScores(error=self._failure(e))
        except Exception as e:  # noqa: BLE001 - an image this process cannot send: this row fails alone
            return OptionScores(error=f"{self.url}: {type(e).__name__}: {e}")
        self.timings.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return OptionScores(probs, *usage(response))

    def score_options(self, questions: Sequence[str], images: Sequence[Image.Image],
                      n_options: Sequence[int]) -> list[OptionScores]:
        return list(self.pool.map(self._score_one, questions, images, n_options))

    def _generate_one(self, conversation: list[dict], images: Sequence[Image.Image], max_new_tokens: int) -> Generated:
        def read(response: Any) -> str:
            text = answer_text(response).strip()
            if not text:
                raise BadAnswer("the answer's text is empty")
            return text

        try:
            messages, keyed = self._messages(conversation, images)
            body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
            response, text = self._send(body, {**body, "messages": keyed}, read)
        except HttpError as e:
            return Generated(error=self._failure(e))
        except Exception as e:  # noqa: BLE001 - this conversation fails alone
            return Generated(error=f"{self.url}: {type(e).__name__}: {e}")
        return Generated(text, *usage(response))

    def generate(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                 max_new_tokens: int) -> list[Generated]:
        return list(self.pool.map(lambda c, ims: self._generate_one(c, ims, max_new_tokens), conversations, images))

    def describe(self) -> dict[str, Any]:
        missing_rule = ("a letter outside the top list gets an equal share of the mass the list leaves over, "
                        "at most the list's smallest probability") if self.mode == "top_logprobs" else None
        return {"backend": NAME, "mode": self.mode, "key": self.key, "url": self.url, "model": self.model,
                "answered_model": self.answered_model, "model_root": self.model_root, "family": self.family,
                "family_reason": self.family_reason, "top_logprobs": self.top_n,
                "choice_field": self.choice_field, "missing_letter_rule": missing_rule,
                "concurrency": self.concurrency, "timeout_s": self.options.timeout_s, "retries": self.retries,
                "max_pixels": self.options.max_pixels, "min_pixels": self.options.min_pixels,
                "max_reply_bytes": self.options.max_reply_bytes,
                "cache": str(self.cache.path) if self.cache.path else None,
                "requests_sent": self.requests_sent, "cache_hits": self.cache_hits,
                "bad_answers": self.bad_answers, "failed_answers": self.failed}

    def close(self) -> None:
        self._finalizer()


def _shut(pool: ThreadPoolExecutor, http: _Http) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    http.close()
