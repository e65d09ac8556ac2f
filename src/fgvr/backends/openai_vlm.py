"""The served System 2 backend: a VLM behind an OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang, ...).

The engine holds the model and the GPU; fgvr sends one chat request per question, several at once
(`concurrency`), so the engine's continuous batching and prefix cache do the work.

What is sent. The same question text as the in-process path, after the image, which goes as a PNG `data:`
URI already resized to the pixel cap (`fit_pixels`): the served model sees the pixels the local one would.
Greedy (`temperature: 0`), one new token for scoring.

How options are scored, decided once at start by probing the server (recorded in `describe()`, hence in the
run's summary and every result line):

* `logprob_token_ids` (vLLM with PR #43463, May 2026): `logprobs: true` + `logprob_token_ids: [ids of the
  letters]` returns exactly those tokens' log-probabilities at the first generated position, "the sampled
  token plus every explicitly requested token ID" (the PR's words). The letters' ids come from the server's
  own tokenizer (`POST /tokenize`, vLLM). Softmax over the letters = the local path's numbers.
* `top_logprobs`: `logprobs: true` + `top_logprobs: N` (OpenAI chat API; vLLM caps N at its
  `--max-logprobs`, default 20, and answers 400 above it; SGLang maps it to `top_logprobs_num`). A letter
  missing from the list gets an equal share of the probability the list leaves over (1 - the listed mass),
  never more than the list's smallest entry: it cannot be likelier than a token that made the list.
* `choice`: no log-probabilities (e.g. `transformers serve` rejects `logprobs`): the answer is constrained to
  one of the letters (vLLM `structured_outputs: {"choice": [...]}`; SGLang `regex`; older vLLM
  `guided_choice`) and read as a one-hot distribution.
* `letter`: nothing of the above: an unconstrained answer that must be exactly one option letter (else that
  image's System 2 fails and its fast answer stands; never a fuzzy match).

Response fields read (OpenAI chat completion object, as vLLM's `ChatCompletionResponse` returns it):
`choices[0].logprobs.content[0].top_logprobs[*].token / .logprob` (a `ChatCompletionLogProbsContent`),
`choices[0].message.content`, `usage.prompt_tokens`, `usage.completion_tokens`; `GET /v1/models` ->
`data[*].id`; vLLM `POST /tokenize` -> `tokens`.

Faults: 429, 5xx, time-outs and dropped connections are retried with exponential backoff (honouring
`Retry-After`); a question that still fails is returned as that row's error (the pipeline gives the image
the `escalated-failed` path and goes on). A server that does not answer at start is a `BackendError` naming
the URL, before any work. Answers are appended to `cache_dir/answers.jsonl` keyed by the digest of the
request with each image as the digest of its PNG bytes (model, image pixels, prompt, scoring parameters), so a killed run that resumes sends no answered
request again. The API key is read from the environment (`$FGVR_VLM_API_KEY`, else `$OPENAI_API_KEY`) and
never written anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import math
import os
import random
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from PIL import Image

from fgvr.backends import (LETTERS, BackendError, BackendOptions, Generated, OptionScores, fit_pixels, is_served,
                           user_turn)
from fgvr.run_dir import Journal

NAME = "openai"
MODES = ("logprob_token_ids", "top_logprobs", "choice", "letter")
CACHE_FILE = "answers.jsonl"
_PROBE = "Answer with one letter only: A or B?"
_CHOICE_FIELDS = (  # how each engine constrains the answer to a set of strings
    ("structured_outputs", lambda letters: {"choice": letters}),  # vLLM >= 0.12
    ("regex", lambda letters: "(" + "|".join(letters) + ")"),  # SGLang
    ("guided_choice", lambda letters: letters),  # vLLM < 0.12
)


def claims(spec: Any) -> bool:
    return is_served(spec)


def open_backend(spec: Any, options: BackendOptions) -> "OpenAIVlm":
    return OpenAIVlm(str(spec), options)


class HttpError(Exception):
    """One failed request: the status (None when there was no HTTP answer) and whether a retry may help."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retryable, self.retry_after = status, retryable, retry_after


class _Http:
    """JSON over HTTP/1.1 with one keep-alive connection per thread (stdlib only)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"--vlm {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")  # e.g. /v1
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=self.timeout_s)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def request(self, method: str, path: str, body: Any = None, root: bool = False) -> Any:
        """`path` under the URL's prefix (/v1/...), or under the server root when `root` (vLLM's /tokenize)."""
        full = (self.prefix.rsplit("/v1", 1)[0] if root else self.prefix) + path
        data = None if body is None else json.dumps(body).encode()
        try:
            conn = self._conn()
            conn.request(method, full, body=data, headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (socket.timeout, TimeoutError) as e:
            self._drop()
            raise HttpError(f"no answer within {self.timeout_s:g} s", retryable=True) from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            self._drop()
            raise HttpError(f"{type(e).__name__}: {e}", retryable=True) from e
        if resp.status >= 400:
            text = raw.decode(errors="replace")[:300]
            after = resp.getheader("Retry-After")
            raise HttpError(f"HTTP {resp.status}: {text}", status=resp.status,
                            retryable=resp.status == 429 or resp.status >= 500,
                            retry_after=float(after) if after and after.replace(".", "", 1).isdigit() else None)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise HttpError(f"the answer is not JSON: {raw[:200]!r}", retryable=False) from e


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
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Any:
        return self.answers.get(key)

    def put(self, key: str, response: Any) -> None:
        if self.path is None:
            return
        with self._lock:
            self.answers[key] = response
            self.journal.append([{"key": key, "response": response}], fsync=False)  # flushed: a kill -9 loses nothing sent


def image_data_uri(image: Image.Image, max_pixels: int, min_pixels: int) -> tuple[str, str]:
    """The image at the pixel cap as a lossless PNG data: URI, and the digest of its bytes (the cache key's
    part for it). Stored uncompressed: it is sent once over a fast link, and deflate would cost fgvr's
    process 2-3x the CPU time of everything else it does per request."""
    buf = io.BytesIO()
    fit_pixels(image, max_pixels, min_pixels).save(buf, format="PNG", compress_level=0)
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), hashlib.sha256(data).hexdigest()


def first_token_logprobs(response: dict) -> dict[str, float]:
    """{token text: log-probability} at the first generated position (the sampled token included)."""
    content = ((response.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
    if not content:
        return {}
    first = content[0]
    out = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or [] if "token" in t}
    if "token" in first and first.get("logprob") is not None:
        out.setdefault(first["token"], float(first["logprob"]))
    return out


def letter_logprob(tops: dict[str, float], letter: str, token_id: int | None) -> float | None:
    """A letter's log-probability in a top list: by its text, or by `token_id:N` (vLLM's
    --return-tokens-as-token-ids form)."""
    if letter in tops:
        return tops[letter]
    if token_id is not None:
        return tops.get(f"token_id:{token_id}")
    return None


def fill_missing(listed: dict[str, float], letter_lp: list[float | None]) -> list[float]:
    """Probabilities of the letters from a top-N list; a missing letter gets an equal share of the mass the
    list leaves over, capped at the list's smallest probability. Renormalised over the letters."""
    probs = [math.exp(lp) if lp is not None else None for lp in letter_lp]
    missing = sum(p is None for p in probs)
    if missing:
        mass = [math.exp(v) for v in listed.values()]
        leftover = max(0.0, 1.0 - sum(mass))
        share = min(min(mass) if mass else 1.0, leftover / missing)
        probs = [share if p is None else p for p in probs]
    total = sum(probs)
    if total <= 0:
        return [1.0 / len(probs)] * len(probs)
    return [p / total for p in probs]


class OpenAIVlm:
    """A served VLM (see the module docstring)."""

    name = NAME

    def __init__(self, url: str, options: BackendOptions) -> None:
        self.url = url.rstrip("/")
        self.options = options
        self.concurrency = max(1, int(options.concurrency))
        self.retries = max(0, int(options.retries))
        api_key = os.environ.get(options.api_key_env) or os.environ.get("OPENAI_API_KEY")
        self.http = _Http(self.url, api_key, options.timeout_s)
        self.cache = AnswerCache(options.cache_dir)
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fgvr-vlm")
        self.requests_sent = 0
        self.cache_hits = 0
        # (prepare, wait for the server, parse) of the latest requests, for benchmarks/served_vlm.py
        self.timings: deque[tuple[float, float, float]] = deque(maxlen=100_000)
        self._count_lock = threading.Lock()
        self.model = self._pick_model(options.model)
        self.letter_ids = self._letter_ids()
        self.mode, self.top_n, self.choice_field = self._detect_mode()

    # --- start: model, letters, mode ---------------------------------------------------------------
    def _pick_model(self, wanted: str | None) -> str:
        try:
            listed = self.http.request("GET", "/models")
        except HttpError as e:
            if e.status in (401, 403):
                raise BackendError(f"the VLM server at {self.url} refused the request ({e}); put its API key "
                                   f"in ${self.options.api_key_env}") from None
            raise BackendError(f"the VLM server at {self.url} does not answer ({e}). Start it (README: "
                               "'System 2 on a served VLM') or fix --vlm; nothing was run.") from None
        ids = [m.get("id") for m in (listed.get("data") or []) if isinstance(m, dict)]
        if wanted:
            if wanted not in ids:
                raise BackendError(f"--vlm-model {wanted!r} is not served at {self.url}; it serves: {', '.join(ids) or 'nothing'}")
            return wanted
        if len(ids) != 1:
            raise BackendError(f"the server at {self.url} serves {len(ids)} models ({', '.join(ids) or 'none'}): "
                               "choose one with --vlm-model")
        return ids[0]

    def _letter_ids(self) -> dict[str, int] | None:
        """Each letter's token id from the server's tokenizer (vLLM `POST /tokenize`), or None where the
        server has no such route: then the letters are found by their text in the top-N list."""
        def one(letter: str) -> int | None:
            try:
                got = self.http.request("POST", "/tokenize", {"model": self.model, "prompt": letter,
                                                              "add_special_tokens": False}, root=True)
            except HttpError:
                return None
            toks = got.get("tokens") if isinstance(got, dict) else None
            return toks[0] if isinstance(toks, list) and len(toks) == 1 else None

        ids = list(self.pool.map(one, LETTERS))
        return dict(zip(LETTERS, ids)) if all(isinstance(i, int) for i in ids) else None

    def _probe(self, extra: dict) -> dict | None:
        body = {"model": self.model, "messages": [{"role": "user", "content": _PROBE}], "max_tokens": 1,
                "temperature": 0, **extra}
        try:  # straight to the server: a probe is never cached (the server may have changed since)
            return self.http.request("POST", "/chat/completions", body)
        except HttpError as e:
            if e.status is not None and 400 <= e.status < 500:
                return None  # the server does not take this parameter
            raise BackendError(f"the VLM server at {self.url} failed while fgvr probed it: {e}") from None

    def _detect_mode(self) -> tuple[str, int | None, str | None]:
        if self.letter_ids:
            ids = [self.letter_ids["A"], self.letter_ids["B"]]
            got = self._probe({"logprobs": True, "top_logprobs": 2, "logprob_token_ids": ids})
            if got is not None:
                tops = first_token_logprobs(got)
                if all(letter_logprob(tops, c, i) is not None for c, i in zip("AB", ids)):
                    return "logprob_token_ids", None, None
        for n in sorted({min(self.options.max_top_logprobs, 20), 20, 10, 5, 1}, reverse=True):
            if n > self.options.max_top_logprobs:
                continue
            got = self._probe({"logprobs": True, "top_logprobs": n})
            if got is not None and first_token_logprobs(got):
                return "top_logprobs", n, None
        for name, make in _CHOICE_FIELDS:
            got = self._probe({name: make(["A", "B"])})
            if got is not None and self._text(got).strip() in ("A", "B"):
                return "choice", None, name
        return "letter", None, None

    # --- requests -------------------------------------------------------------------------------------
    def _send(self, body: dict, keyed: dict | None = None) -> dict:
        """POST a chat completion with retries and backoff; from the cache when it was answered before.
        `keyed`: the body with each image replaced by its digest (the cache key; cheaper than the body)."""
        key = AnswerCache.key(keyed or body)
        cached = self.cache.get(key)
        if cached is not None:
            with self._count_lock:
                self.cache_hits += 1
            return cached
        for attempt in range(self.retries + 1):
            try:
                with self._count_lock:
                    self.requests_sent += 1
                response = self.http.request("POST", "/chat/completions", body)
                break
            except HttpError as e:
                if not e.retryable or attempt == self.retries:
                    raise
                wait = e.retry_after if e.retry_after is not None else self.options.backoff_s * 2**attempt
                time.sleep(min(30.0, wait * (1 + 0.25 * random.random())))
        self.cache.put(key, response)
        return response

    @staticmethod
    def _text(response: dict) -> str:
        return (((response.get("choices") or [{}])[0].get("message") or {}).get("content")) or ""

    @staticmethod
    def _usage(response: dict) -> tuple[int, int]:
        u = response.get("usage") or {}
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)

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
                        uri, digest = image_data_uri(next(it), self.options.max_pixels, self.options.min_pixels)
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

    def _read_scores(self, response: dict, k: int) -> OptionScores:
        n_in, n_out = self._usage(response)
        letters = LETTERS[:k]
        if self.mode in ("logprob_token_ids", "top_logprobs"):
            tops = first_token_logprobs(response)
            lps = [letter_logprob(tops, c, (self.letter_ids or {}).get(c)) for c in letters]
            if self.mode == "logprob_token_ids":
                if any(lp is None for lp in lps):
                    missing = [c for c, lp in zip(letters, lps) if lp is None]
                    return OptionScores(error=f"the server left out the log-probabilities of {missing}", tokens_in=n_in)
                m = max(lps)
                e = [math.exp(lp - m) for lp in lps]
                return OptionScores([x / sum(e) for x in e], n_in, n_out)
            return OptionScores(fill_missing(tops, lps), n_in, n_out)
        answer = self._text(response).strip()
        if self.mode == "letter":
            answer = answer.rstrip(".):").strip()
        if answer not in letters:
            return OptionScores(error=f"the answer {answer[:40]!r} is not one of the letters {letters}", tokens_in=n_in)
        return OptionScores([1.0 if c == answer else 0.0 for c in letters], n_in, n_out)

    def _score_one(self, question: str, image: Image.Image, k: int) -> OptionScores:
        t0 = time.perf_counter()
        try:
            body, keyed = self._score_body(question, image, k)
            t1 = time.perf_counter()
            response = self._send(body, keyed)
            t2 = time.perf_counter()
            scores = self._read_scores(response, k)
        except HttpError as e:
            return OptionScores(error=f"{self.url}: {e} (after {self.retries} retries)" if e.retryable else f"{self.url}: {e}")
        except (ValueError, KeyError, TypeError, IndexError) as e:  # a malformed answer: this row fails alone
            return OptionScores(error=f"{self.url}: unreadable answer: {type(e).__name__}: {e}")
        self.timings.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return scores

    def score_options(self, questions: Sequence[str], images: Sequence[Image.Image],
                      n_options: Sequence[int]) -> list[OptionScores]:
        return list(self.pool.map(self._score_one, questions, images, n_options))

    def _generate_one(self, conversation: list[dict], images: Sequence[Image.Image], max_new_tokens: int) -> Generated:
        messages, keyed = self._messages(conversation, images)
        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
        try:
            response = self._send(body, {**body, "messages": keyed})
        except HttpError as e:
            return Generated(error=f"{self.url}: {e}")
        return Generated(self._text(response).strip(), *self._usage(response))

    def generate(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Image.Image]],
                 max_new_tokens: int) -> list[Generated]:
        return list(self.pool.map(lambda c, ims: self._generate_one(c, ims, max_new_tokens), conversations, images))

    def describe(self) -> dict[str, Any]:
        missing_rule = ("a letter outside the top list gets an equal share of the mass the list leaves over, "
                        "at most the list's smallest probability") if self.mode == "top_logprobs" else None
        return {"backend": NAME, "mode": self.mode, "key": f"{NAME}|{self.url}|{self.model}|maxpx={self.options.max_pixels}",
                "url": self.url, "model": self.model, "top_logprobs": self.top_n,
                "choice_field": self.choice_field, "missing_letter_rule": missing_rule,
                "concurrency": self.concurrency, "timeout_s": self.options.timeout_s, "retries": self.retries,
                "max_pixels": self.options.max_pixels, "cache": str(self.cache.path) if self.cache.path else None,
                "requests_sent": self.requests_sent, "cache_hits": self.cache_hits}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
