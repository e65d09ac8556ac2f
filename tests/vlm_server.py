"""A small OpenAI-compatible VLM server for tests and benchmarks: the tiny Qwen2.5-VL answering from its REAL
next-token logits, in the response shape vLLM documents. No engine that serves images with
log-probabilities runs in CI here (vLLM's CPU build does, in its own 3.5 GB environment: tests/test_real_vllm.py),
so this stands in for one, over real HTTP on loopback, in its own process. It also plays the hostile server:
one that answers the start-up probes right and misbehaves only on real questions (those with an image).

    python tests/vlm_server.py --model DIR [--port 0] [--ready-file F] [--max-batch 8] [--max-pixels N]
    python tests/vlm_server.py --scripted [--port 0] [--ready-file F]   # no model: canned letter answers

Every behaviour the client must cope with can be switched at start (flags) or at run time (POST /admin with
a JSON object of the same names), and every chat request is logged (GET /stats):

    token_ids     true: honour `logprob_token_ids` (vLLM with PR #43463); false: ignore it as older vLLM does
    logprobs      false: answer 400 to `logprobs` / `top_logprobs` (as a server without them may)
    ignore_logprobs  true: answer 200 without log-probabilities (as `transformers serve` 4.57 does)
    stream_always true: every chat answer as server-sent events, even with stream: false (`transformers serve`)
    token_style   how letter tokens are rendered in log-probabilities: "plain" "A", "space" " A", "lower" "a",
                  "both" (" A" and "a" listed besides "A", mass split 0.5 / 0.3 / 0.2)
    letter_boost  nats added to the logits of A..E (a model that answers letters, as a trained VLM does)
    models_shape  "list": /v1/models answers a bare JSON list instead of {"data": [...]}
    misbehave     on real questions only: "empty" {}, "no_choices", "error_member" (200 with an error),
                  "no_letters" (logprobs with no option letter), "empty_text", "wrong_model", "trickle" (the
                  body a byte every 0.2 s), "huge" (a declared 1.5 GB body), "huge_chunked" (chunked, no
                  length, endless), "sse" (the real answer as server-sent events), "bad_json", "raw" (`reply`)
    constraints   false: ignore `structured_outputs` (as a server without constrained decoding does)
    misbehave_n   that many real questions misbehave, then it answers right (null: all of them)
    reply         the JSON value sent as the body for misbehave "raw" (the property tests' answers)
    models_reply  if set, the JSON value /v1/models answers
    served_name   the id it serves under (vLLM's --served-model-name; null: the model folder's name)
    root          /v1/models' `root` of that id (vLLM: the folder or hub id it loaded; null: left out)
    answer_name   the `model` its answers carry (null: the served name), as a proxy naming the model behind it
Each chat request's log entry also says whether it carried an Authorization header ("auth") and the
(width, height) of each image it carried ("image_sizes").
    max_logprobs  the `--max-logprobs` cap: `top_logprobs` above it is a 400 (vLLM's default 20)
    fail_503      the next N chat requests get 503
    hang_after    after N answered chat requests with an image, further ones hang (until set back to null)
    delay_s       extra seconds per batch (a slower "GPU")

Fields, as vLLM's OpenAI protocol (vllm/entrypoints/openai/protocol.py) defines them:
  request  ChatCompletionRequest: model, messages (content parts `text` / `image_url.url` data URIs),
           max_tokens, temperature, logprobs, top_logprobs, logprob_token_ids, structured_outputs.choice
  response ChatCompletionResponse: id, object="chat.completion", created, model,
           choices[i].message.{role, content}, choices[i].logprobs.content[j].{token, logprob, bytes,
           top_logprobs[*].{token, logprob, bytes}}, choices[i].finish_reason, usage.{prompt_tokens,
           completion_tokens, total_tokens}
  GET /v1/models  {"object": "list", "data": [{"id", "object": "model", "owned_by", "max_model_len"}]}
  POST /tokenize  {"model", "prompt", "add_special_tokens"} -> {"count", "max_model_len", "tokens"}
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATE = {"token_ids": True, "logprobs": True, "max_logprobs": 20, "fail_503": 0, "hang_after": None,
         "delay_s": 0.0, "ignore_logprobs": False, "stream_always": False, "token_style": "plain",
         "letter_boost": 0.0, "models_shape": "dict", "misbehave": None, "misbehave_n": None, "reply": None,
         "constraints": True, "models_reply": None, "served_name": None, "root": None, "answer_name": None}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOG: list[dict] = []  # one entry per chat request: digest, has_image, status
LOCK = threading.Lock()
ANSWERED = [0, 0]  # chat requests answered: all, with an image


class Model:
    """The tiny Qwen2.5-VL and its processor, run by one worker thread that batches queued requests."""

    def __init__(self, folder: Path, max_pixels: int, max_batch: int) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        # the image-only processor: the stock one needs torchvision, which does not import here
        from fgvr.models.families.qwen_vl import image_only_processor

        torch.set_num_threads(1)
        self.torch = torch
        self.name = folder.name
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ip = Qwen2VLImageProcessor.from_pretrained(folder)
        ip.max_pixels, ip.min_pixels = max_pixels, 4 * 28 * 28  # like vLLM's --mm-processor-kwargs
        ip.size = {"shortest_edge": ip.min_pixels, "longest_edge": ip.max_pixels}
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        self.processor = image_only_processor(ip, tok, chat_template=template)
        self.tok = tok
        self.stop = tok.convert_tokens_to_ids("<|im_end|>")
        self.letter_ids = tok.convert_tokens_to_ids(list(LETTERS[:5]))
        self.max_batch = max_batch
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._worker, daemon=True).start()

    def submit(self, job: dict) -> dict:
        job["done"] = threading.Event()
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["result"]

    def _worker(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch:  # whatever else is already waiting joins this forward
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            if STATE["delay_s"]:
                time.sleep(float(STATE["delay_s"]))
            scoring = [j for j in batch if j["max_tokens"] == 1]
            for group in ([scoring] if scoring else []) + [[j] for j in batch if j["max_tokens"] != 1]:
                try:
                    self._run(group)
                except Exception as e:  # noqa: BLE001 - reported to the request, the worker lives on
                    for j in group:
                        j["error"] = e
                for j in group:
                    j["done"].set()

    def _inputs(self, jobs: list[dict]):
        texts = [self.processor.apply_chat_template(j["messages"], tokenize=False, add_generation_prompt=True)
                 for j in jobs]
        images = [im for j in jobs for im in j["images"]]
        return self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                              return_tensors="pt")

    def _run(self, jobs: list[dict]) -> None:
        torch = self.torch
        inputs = self._inputs(jobs)
        n_in = inputs["attention_mask"].sum(1).tolist()
        if jobs[0]["max_tokens"] == 1:
            with torch.inference_mode():
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
                if STATE["letter_boost"]:
                    logits[:, self.letter_ids] += float(STATE["letter_boost"])
            # raw log-probabilities, before any constraint: vLLM's default --logprobs-mode raw_logprobs
            logp = torch.log_softmax(logits, dim=-1)
            for row, j in enumerate(jobs):
                allowed = j.get("choice_ids")
                if allowed:
                    token = allowed[int(torch.argmax(logits[row, allowed]))]
                else:
                    token = int(torch.argmax(logits[row]))
                j["result"] = {"tokens": [token], "logp": [logp[row]], "n_in": int(n_in[row])}
            return
        j = jobs[0]
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=j["max_tokens"], do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, eos_token_id=[self.stop])
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if self.stop in new:
            new = new[: new.index(self.stop)]
        j["result"] = {"tokens": new, "logp": None, "n_in": int(n_in[0])}


def _decode_image(url: str):
    from PIL import Image

    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only data: URIs are served here")
    return Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))).convert("RGB")


def _image_sizes(req: dict) -> list[list[int]]:
    """[width, height] of every image a chat request carries, read from the images' headers."""
    from PIL import Image

    sizes = []
    for m in req.get("messages", []):
        for c in m.get("content") if isinstance(m.get("content"), list) else []:
            url = (c.get("image_url") or {}).get("url", "") if c.get("type") == "image_url" else ""
            if ";base64," in url:
                try:
                    sizes.append(list(Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))).size))
                except Exception:  # noqa: BLE001 - not an image: logged as such, the request goes on
                    sizes.append(None)
    return sizes


def _served_name(model) -> str:
    return STATE["served_name"] or model.name


def _messages(raw: list[dict]) -> tuple[list[dict], list]:
    """OpenAI content parts -> the processor's message format, images decoded in order."""
    msgs, images = [], []
    for m in raw:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for c in content:
                if c.get("type") == "image_url":
                    images.append(_decode_image(c["image_url"]["url"]))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": c.get("text", "")})
            content = parts
        msgs.append({"role": m["role"], "content": content})
    return msgs, images


class Scripted:
    """No model: canned answers in the same shapes (letters' ids as in Qwen's vocabulary, A likeliest), so the
    hostile-server tests start in a blink and know every number they should read."""

    name = "scripted"
    TEXT = "a scripted description of the class"

    def tokenize(self, prompt: str) -> list[int]:
        return [32 + LETTERS.index(prompt)] if len(prompt) == 1 and prompt in LETTERS else [9707 + len(prompt)]

    def logp(self) -> dict[int, float]:
        """26 letters with mass 0.9 falling off by exp(-0.7) each, and "Hello" (id 9707) with 0.1."""
        import math

        w = [math.exp(-0.7 * i) for i in range(26)]
        out = {32 + i: math.log(0.9 * x / sum(w)) for i, x in enumerate(w)}
        return {**out, 9707: math.log(0.1)}


def _decode(model, i: int) -> str:
    if isinstance(model, Scripted):
        return LETTERS[i - 32] if 32 <= i < 58 else "Hello"
    return model.tok.decode([i])


def _render(model, i: int, lp: float) -> list[dict]:
    """One token's logprob entries, letter tokens rendered per `token_style` (several entries for "both")."""
    t = _decode(model, i)
    style = STATE["token_style"] if len(t) == 1 and t in LETTERS else "plain"
    import math

    forms = {"plain": [(t, 1.0)], "space": [(" " + t, 1.0)], "lower": [(t.lower(), 1.0)],
             "both": [(t, 0.5), (" " + t, 0.3), (t.lower(), 0.2)]}[style]
    return [{"token": f, "logprob": lp + math.log(share), "bytes": list(f.encode())} for f, share in forms]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves vLLM
    model: "Model | Scripted"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, obj, content_type: str = "application/json") -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunked(self, pieces, content_type: str) -> None:
        """A chunked body (no Content-Length), as uvicorn streams; stops when the client goes away."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _sse(self, answer: dict) -> None:
        """The answer as chat.completion.chunk events, as `transformers serve` and vLLM stream them."""
        base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        choice = answer["choices"][0]
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
                  {**base, "choices": [{"index": 0, "delta": {"content": choice["message"]["content"]},
                                        "logprobs": choice["logprobs"]}]},
                  {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
                   "usage": answer["usage"]}]
        self._chunked([b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"],
                      "text/event-stream")

    def _error(self, status: int, message: str) -> None:
        # vLLM's ErrorResponse shape
        self._send(status, {"object": "error", "message": message, "type": "BadRequestError", "code": status})

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            listed = [{"id": _served_name(self.model), "object": "model", "owned_by": "fgvr-tests",
                       "max_model_len": 4096, **({"root": STATE["root"]} if STATE["root"] else {})}]
            if STATE["models_reply"] is not None:
                return self._send(200, STATE["models_reply"])
            self._send(200, listed if STATE["models_shape"] == "list" else {"object": "list", "data": listed})
        elif self.path == "/stats":
            with LOCK:
                self._send(200, {"requests": list(LOG), "answered": ANSWERED[0], "answered_images": ANSWERED[1],
                                 "state": dict(STATE)})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self._error(400, "body is not JSON")
        if self.path == "/admin":
            with LOCK:
                STATE.update(req)
            return self._send(200, dict(STATE))
        if self.path == "/tokenize":
            prompt, special = req.get("prompt", ""), bool(req.get("add_special_tokens", True))
            ids = (self.model.tokenize(prompt) if isinstance(self.model, Scripted)
                   else self.model.tok(prompt, add_special_tokens=special)["input_ids"])
            return self._send(200, {"count": len(ids), "max_model_len": 4096, "tokens": ids})
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        self._chat(req, hashlib.sha256(body).hexdigest())

    def _refusal(self, req: dict, entry: dict) -> tuple[int, str] | None:
        """The error a real server gives this request, if any (unknown model, logprobs off, over the cap)."""
        if req.get("model") != _served_name(self.model):
            return 404, f"The model `{req.get('model')}` does not exist."
        want_lp = bool(req.get("logprobs")) or req.get("top_logprobs") is not None
        if want_lp and not STATE["logprobs"]:
            return 400, "logprobs are not supported by this server"
        top_n = int(req.get("top_logprobs") or 0)
        if top_n > STATE["max_logprobs"]:
            return 400, f"top_logprobs ({top_n}) exceeds max_logprobs ({STATE['max_logprobs']})"
        return None

    def _chat(self, req: dict, digest: str) -> None:
        has_image = any(isinstance(m.get("content"), list) and any(c.get("type") == "image_url" for c in m["content"])
                        for m in req.get("messages", []))
        entry = {"digest": digest, "has_image": has_image, "status": None,
                 "auth": bool(self.headers.get("Authorization")), "image_sizes": _image_sizes(req)}
        with LOCK:
            LOG.append(entry)
            if STATE["fail_503"] > 0:
                STATE["fail_503"] -= 1
                entry["status"] = 503
        if entry["status"] == 503:
            return self._error(503, "overloaded (injected)")
        for _ in range(6000):  # hang (bounded: 10 minutes) while hang_after is reached
            with LOCK:
                hang = STATE["hang_after"] is not None and ANSWERED[1] >= STATE["hang_after"]
            if not hang:
                break
            time.sleep(0.1)
        refused = self._refusal(req, entry)
        if refused:
            entry["status"] = refused[0]
            return self._error(*refused)
        try:
            answer = self._answer(req, digest)
        except Exception as e:  # noqa: BLE001
            entry["status"] = 500
            return self._error(500, f"{type(e).__name__}: {e}")
        with LOCK:
            ANSWERED[0] += 1
            ANSWERED[1] += has_image
            entry["status"] = 200
            bad = has_image and STATE["misbehave"] and STATE["misbehave_n"] != 0
            if bad and STATE["misbehave_n"] is not None:
                STATE["misbehave_n"] -= 1
        if bad:
            entry["misbehaved"] = STATE["misbehave"]
            return self._misbehave(STATE["misbehave"], answer)
        if STATE["stream_always"]:
            return self._sse(answer)
        self._send(200, answer)

    def _answer(self, req: dict, digest: str) -> dict:
        """The chat completion a server gives: from the model's real logits, or canned (--scripted)."""
        top_n = int(req.get("top_logprobs") or 0)
        token_ids = req.get("logprob_token_ids") if STATE["token_ids"] else None
        choice = (req.get("structured_outputs") or {}).get("choice") if STATE["constraints"] else None
        max_tokens = 1 if choice else int(req.get("max_tokens") or 16)
        if isinstance(self.model, Scripted):
            table = self.model.logp()
            allowed = [32 + LETTERS.index(c) for c in choice] if choice else None
            scoring = max_tokens == 1
            asked = json.dumps(req.get("messages", [])).lower()
            tokens = [allowed[0] if allowed else 9707 if "hello" in asked else 32] if scoring else list(range(7))
            text = _decode(self.model, tokens[0]) if scoring else Scripted.TEXT
            n_in, lp_of = 20, table.get
            ranked = sorted(table, key=lambda i: -table[i])
        else:
            msgs, images = _messages(req.get("messages", []))
            choice_ids = [self.model.tok(c, add_special_tokens=False)["input_ids"][0] for c in choice] if choice else None
            out = self.model.submit({"messages": msgs, "images": images, "max_tokens": max_tokens,
                                     "choice_ids": choice_ids})
            tokens, n_in, scoring = out["tokens"], out["n_in"], out["logp"] is not None
            text = self.model.tok.decode(tokens, skip_special_tokens=True)
            if scoring:
                row = out["logp"][0]
                lp_of = lambda i: float(row[i])  # noqa: E731
                ranked = [int(i) for i in row.topk(max(top_n, 1)).indices]
        logprobs = None
        if req.get("logprobs") and scoring and not STATE["ignore_logprobs"]:
            sampled = tokens[0]
            # vLLM: with logprob_token_ids the list is the sampled token plus every requested id; otherwise
            # the natural top-N
            ids = list(token_ids) if token_ids else ranked[:top_n] if top_n else []
            tops = [e for i in dict.fromkeys(([sampled] if token_ids else []) + ids) for e in _render(self.model, i, lp_of(i))]
            logprobs = {"content": [{**_render(self.model, sampled, lp_of(sampled))[0], "top_logprobs": tops}]}
        n_out = len(tokens)
        return {
            "id": f"chatcmpl-{digest[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": STATE["answer_name"] or _served_name(self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": "length" if n_out >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    def _misbehave(self, how: str, answer: dict) -> None:
        """What a broken or hostile server sends instead of `answer` (see the module docstring)."""
        choice = answer["choices"][0]
        if how == "empty":
            return self._send(200, {})
        if how == "no_choices":
            return self._send(200, {**answer, "choices": []})
        if how == "error_member":
            return self._send(200, {"error": {"message": "upstream model crashed", "type": "server_error"}})
        if how == "no_letters":
            lp = {"content": [{"token": "Hello", "logprob": -0.1, "top_logprobs": [
                {"token": w, "logprob": v} for w, v in (("Hello", -0.1), ("the", -2.5), ("Banana", -4.0))]}]}
            return self._send(200, {**answer, "choices": [{**choice, "message": {"role": "assistant", "content": "Hello"},
                                                             "logprobs": lp}]})
        if how == "empty_text":
            return self._send(200, {**answer, "choices": [{**choice, "message": {"role": "assistant", "content": "  \n"}}]})
        if how == "wrong_model":
            return self._send(200, {**answer, "model": "some-other-model"})
        if how == "sse":
            return self._sse(answer)
        if how == "bad_json":
            return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
        if how == "raw":
            return self._send(200, json.dumps(STATE["reply"]).encode())
        if how == "trickle":
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(min(len(data), 300)):  # a byte every 0.2 s (bounded: 60 s)
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            self.close_connection = True
            return None
        if how == "huge":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(1_500_000_000))
            self.end_headers()
            try:
                for _ in range(1500):  # 1.5 GB of blanks, if anyone reads them
                    self.wfile.write(b" " * 1_000_000)
            except OSError:
                pass
            self.close_connection = True
            return None
        if how == "huge_chunked":
            return self._chunked((b" " * 1_000_000 for _ in range(1500)), "application/json")
        raise ValueError(f"unknown misbehave {how!r}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--scripted", action="store_true", help="no model: canned answers")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path, default=None, help="write the port here once serving")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    ap.add_argument("--no-token-ids", action="store_true")
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--max-logprobs", type=int, default=20)
    a = ap.parse_args(argv)
    if not a.scripted and a.model is None:
        ap.error("give --model DIR or --scripted")
    STATE.update(token_ids=not a.no_token_ids, logprobs=not a.no_logprobs, max_logprobs=a.max_logprobs)
    Handler.model = Scripted() if a.scripted else Model(a.model, a.max_pixels, a.max_batch)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    if a.ready_file:
        tmp = a.ready_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(a.ready_file)
    print(f"serving {Handler.model.name} on http://127.0.0.1:{port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
