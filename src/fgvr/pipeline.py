"""The dual system end to end for a batch of image files:

    decode (once) -> encode (once, batched) -> System 1 over all classes -> trigger
        -> System 2 on the triggered samples (batched, with the experience rules for their candidates)
        -> deterministic decision -> one `Result` per image

Each image is decoded once and the decoded image is what both the encoder and System 2 see. An unreadable
file gives an error `Result` and the batch goes on. Without a System 2 the pipeline still runs: samples the
trigger picks are marked `escalated-unavailable` and keep their fast answer, so a run without a VLM shows
how much work a VLM would have been given.

`slow_all=True` runs System 2 on every sample but still decides with the trigger. It costs System 2 on all
images, and buys the exact accuracy-vs-budget curve for every budget from one run (see `fgvr.report`).
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from fgvr.data import ImageError, load_image
from fgvr.decision import DEFAULT_WEIGHT, decide
from fgvr.defaults import DEFAULTS
from fgvr.fast_path import system1
from fgvr.models.spec import ModelSpec
from fgvr.open_set import unknown_scores
from fgvr.slow_path import SlowAnswer, SlowPath, SlowQuery
from fgvr.trigger import Trigger

if TYPE_CHECKING:
    from fgvr.backends import VlmBackend

log = logging.getLogger(__name__)

PATH_FAST = "fast"
PATH_SLOW = "slow"
PATH_UNAVAILABLE = "escalated-unavailable"  # the trigger fired, no System 2 configured: fast answer stands
PATH_SLOW_FAILED = "escalated-failed"  # the trigger fired, System 2 raised: fast answer stands, error logged
PATH_ERROR = "error"  # the image could not be read: no answer


def check_outcome(paths: dict[str, int], where: str) -> None:
    """Refuse a finished batch of answers that is not what was asked for, with its own exit code: nothing
    could be read (10), or System 2 was asked and failed for every image sent to it (9; the answers stored are
    System 1's). `paths` counts the answers by path taken; `where` says where they are."""
    from fgvr.errors import NothingDoneError, System2Error

    n, failed = sum(paths.values()), paths.get(PATH_SLOW_FAILED, 0)
    if n and paths.get(PATH_ERROR, 0) == n:
        raise NothingDoneError(f"none of the {n} image(s) could be read (the error of each is {where})")
    if failed and not paths.get(PATH_SLOW, 0):
        raise System2Error(f"System 2 failed for all {failed} image(s) sent to it; their answers are System 1's "
                           f"(the reason of each is {where}); fix the cause and run again with a new --out")


@dataclass
class Candidate:
    id: int
    name: str
    fast: float  # System 1's posterior, renormalised over the candidates
    slow: float | None = None  # System 2's probability (None when it did not run)
    final: float | None = None  # the decision's probability when it was used, else the fast one


@dataclass
class Result:
    """One image's answer and everything that produced it (`to_dict` is the JSON line)."""

    path: str
    path_taken: str
    prediction: int | None = None
    prediction_name: str | None = None
    confidence: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    fast_prediction: int | None = None  # System 1's top-1
    slow_prediction: int | None = None  # the decision's top-1 whenever System 2 ran (also when not used)
    slow_ran: bool = False
    slow_backend: str | None = None  # which System 2 answered, e.g. "openai:logprob_token_ids", "transformers:logits"
    rationale: str | None = None
    rules_used: list[str] = field(default_factory=list)
    slow_tokens_in: int = 0
    slow_tokens_out: int = 0
    trigger: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds; batched stages are shared equally
    error: str | None = None
    # open set (`fgvr.open_set`): unknown is True when the answer is "not a class of the base" (prediction
    # None then, the candidates still listed); the score is System 1's, recorded whether open set is on or
    # not; closed_prediction is the answer open set off would have given
    unknown: bool = False
    unknown_score: float | None = None
    closed_prediction: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EncodedBatch:
    """Files decoded and encoded once: error Results (None where readable), the readable indices, their
    embeddings (len(ok), D), the decoded images (or None), and per-image decode / encode seconds."""

    errors: list[Result | None]
    ok: list[int]
    embeddings: torch.Tensor
    images: list | None
    decode_s: float
    encode_s: float


class DualSystem:
    """System 1 + trigger + optional System 2 + decision over one knowledge base.

    `encoder` is a loaded `fgvr.encoder.Encoder` (leased from the registry by the caller, so the caller
    decides how long it stays loaded). `slow` is any `SlowPath` or None. `experience` is anything with
    `retrieve(candidate_ids, n) -> list[Rule]` (an `fgvr.rules.ExperienceLibrary`).
    The trigger is used as given: one with a budget needs its threshold before the first image, set by
    the caller (`Trigger.calibrated_on_support(kb)`, as `open_system` does, or by `run_evaluation`).
    `open_set` (`fgvr.open_set.OpenSet`) lets an answer be "unknown" (see there); None: closed set.
    """

    def __init__(
        self,
        kb: Any,
        encoder: Any,
        slow: SlowPath | None,
        trigger: Trigger,
        k: int = DEFAULTS.top_k,
        weight: float = DEFAULT_WEIGHT,
        experience: Any = None,
        *,
        n_rules: int = DEFAULTS.rules,
        w: float | None = None,
        tau: float | None = None,
        slow_all: bool = False,
        slow_batch: int = 8,
        encode_batch: int = 32,
        open_set: Any = None,
    ) -> None:
        from fgvr.knowledge_base.storage import check_encoder_behaviour

        check_encoder_behaviour(kb, encoder)  # the encoder gives the base's features, or one line says not
        self.kb, self.encoder, self.slow, self.trigger = kb, encoder, slow, trigger
        self.k, self.weight, self.experience, self.n_rules = k, weight, experience, n_rules
        self.w, self.tau = w, tau
        self.slow_all = slow_all and slow is not None
        self.open_set = open_set  # a `fgvr.open_set.OpenSet`, or None: every answer is a class of the base
        self.slow_batch, self.encode_batch = max(1, slow_batch), max(1, encode_batch)
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        if not (0.0 <= weight <= 1.0):
            raise ValueError(f"decision weight must lie in [0, 1], got {weight}")
        info = slow.describe() if slow is not None and hasattr(slow, "describe") else {}
        self.slow_backend = (f"{info['backend']}:{info['mode']}" if "backend" in info
                             else getattr(slow, "name", None) if slow is not None else None)

    def with_trigger(self, trigger: Trigger) -> "DualSystem":
        """The same system with another trigger (a shallow copy: this one is left as it is)."""
        other = copy.copy(self)
        other.trigger = trigger
        return other

    # ------------------------------------------------------------------------------------------------
    def classify_paths(self, paths: Sequence[str | Path]) -> list[Result]:
        """Classify image files; results in input order, one per path (error records included)."""
        enc = self.encode_paths(paths)
        results = list(enc.errors)
        done = self.classify_embeddings(enc.embeddings, [str(paths[i]) for i in enc.ok], enc.images,
                                        {"decode": enc.decode_s, "encode": enc.encode_s})
        for i, r in zip(enc.ok, done):
            results[i] = r
        return results  # type: ignore[return-value]

    def encode_paths(self, paths: Sequence[str | Path], keep_images: bool = True) -> "EncodedBatch":
        """Decode each file once and encode the readable ones in one batched pass."""
        t0 = time.perf_counter()
        errors: list[Result | None] = [None] * len(paths)
        images, ok = [], []
        for i, p in enumerate(paths):
            t = time.perf_counter()
            try:
                images.append(load_image(p))
                ok.append(i)
            except ImageError as e:
                dt = time.perf_counter() - t
                errors[i] = Result(path=str(p), path_taken=PATH_ERROR, error=e.reason,
                                   timings={"decode": dt, "total": dt})
        decode_s = (time.perf_counter() - t0) / max(1, len(ok))
        t = time.perf_counter()
        if images:
            with torch.inference_mode():
                emb = self.encoder.encode_images(images, batch_size=self.encode_batch)
        else:
            emb = torch.zeros(0, getattr(self.encoder, "embed_dim", self.kb.prototypes.shape[1]))
        encode_s = (time.perf_counter() - t) / max(1, len(ok))
        return EncodedBatch(errors, ok, emb, images if keep_images else None, decode_s, encode_s)

    def classify_images(self, images: list, paths: list[str]) -> list[Result]:
        """The same on already decoded RGB images."""
        t = time.perf_counter()
        with torch.inference_mode():
            emb = self.encoder.encode_images(images, batch_size=self.encode_batch)
        return self.classify_embeddings(emb, paths, images, {"encode": (time.perf_counter() - t) / max(1, len(images))})

    def classify_embeddings(self, emb: torch.Tensor, paths: list[str], images: list | None = None,
                            timings: dict[str, float] | None = None) -> list[Result]:
        """System 1, trigger, System 2, decision for already encoded images.

        `images`: the decoded images aligned with `emb`, or None: then only the images that go to System 2
        are decoded (again) here, which is what a run that encoded everything first needs.
        `timings`: per-image seconds of the stages already done (decode, encode), copied into each Result.
        """
        n = len(paths)
        if n == 0:
            return []
        t = time.perf_counter()
        fast = system1(self.kb, emb, w=self.w, tau=self.tau, k=self.k)
        unknown_score = unknown_scores(fast).tolist()
        fast_s = time.perf_counter() - t

        t = time.perf_counter()
        decisions = self.trigger.decide(fast, self.kb)
        trigger_s = time.perf_counter() - t

        escalate = [i for i, d in enumerate(decisions) if d.go_slow]
        run_slow = list(range(n)) if self.slow_all else (escalate if self.slow is not None else [])
        answers, slow_errors, slow_s = self._run_slow(images, paths, fast, run_slow)

        classes = self.kb.classes
        out = []
        t_dec = time.perf_counter()
        for i in range(n):
            ids = fast.topk_ids[i].tolist()
            fast_p = fast.candidates_probs(i)
            cands = [Candidate(c, classes[c], p) for c, p in zip(ids, fast_p)]
            r = Result(path=paths[i], path_taken=PATH_FAST, fast_prediction=ids[0], trigger=decisions[i].to_dict())
            ans = answers.get(i)
            final = fast_p
            if ans is not None:
                slow_p = decide(fast_p, ans.probs, self.weight)
                r.slow_ran = True
                r.slow_backend = self.slow_backend
                r.slow_prediction = ids[max(range(len(ids)), key=lambda j: slow_p[j])]
                r.rationale, r.rules_used = ans.rationale, list(ans.rules_used)
                r.slow_tokens_in, r.slow_tokens_out = int(ans.tokens_in), int(ans.tokens_out)
                for c, sp in zip(cands, ans.probs):
                    c.slow = float(sp)
                if decisions[i].go_slow:
                    final = slow_p
                    r.path_taken = PATH_SLOW
            elif decisions[i].go_slow:
                r.path_taken = PATH_SLOW_FAILED if i in slow_errors else PATH_UNAVAILABLE
                if i in slow_errors:
                    r.error = slow_errors[i]
            for c, fp in zip(cands, final):
                c.final = float(fp)
            best = max(range(len(ids)), key=lambda j: final[j])
            r.prediction, r.prediction_name, r.confidence = ids[best], classes[ids[best]], float(final[best])
            r.candidates = cands
            r.unknown_score, r.closed_prediction = float(unknown_score[i]), r.prediction
            if self.open_set is not None:
                chose_none = final is not fast_p and ans is not None and _picks_none(ans)
                if self.open_set.rejects(r.unknown_score) or chose_none:
                    r.unknown, r.prediction, r.prediction_name = True, None, None
            r.timings = {**(timings or {}), "fast": fast_s / n, "trigger": trigger_s / n, "slow": slow_s.get(i, 0.0)}
            out.append(r)
        decide_s = (time.perf_counter() - t_dec) / n
        for r in out:
            r.timings["decide"] = decide_s
            r.timings["total"] = sum(r.timings.values())
        return out

    # ------------------------------------------------------------------------------------------------
    def _rules(self, candidates: list[int]) -> list:
        if self.experience is None or self.n_rules <= 0:
            return []
        return list(self.experience.retrieve(candidates, self.n_rules))

    def _run_slow(self, images: list | None, paths: list[str], fast, idx: list[int]
                  ) -> tuple[dict[int, SlowAnswer], dict[int, str], dict[int, float]]:
        """System 2 on samples `idx`, in batches of `slow_batch`. A batch that raises is logged per sample
        (its samples keep the fast answer) and the run goes on; a malformed answer counts as a failure."""
        answers: dict[int, SlowAnswer] = {}
        errors: dict[int, str] = {}
        seconds: dict[int, float] = {}
        if self.slow is None:
            return answers, errors, seconds
        for start in range(0, len(idx), self.slow_batch):
            chunk = idx[start:start + self.slow_batch]
            queries = []
            for i in list(chunk):
                try:
                    image = images[i] if images is not None else load_image(paths[i])
                except ImageError as e:  # readable when encoded, not now (file changed or removed)
                    errors[i] = f"cannot decode the image again for System 2: {e.reason}"
                    chunk.remove(i)
                    continue
                cands = fast.topk_ids[i].tolist()
                queries.append(SlowQuery(image=image, candidates=cands, rules=self._rules(cands), path=paths[i]))
            if not queries:
                continue
            t = time.perf_counter()
            try:
                got = self.slow.rank(queries)
                if len(got) != len(queries):
                    raise RuntimeError(f"System 2 returned {len(got)} answers for {len(queries)} queries")
            except Exception as e:  # noqa: BLE001 - one failing batch must not end a long run
                msg = f"System 2 ({getattr(self.slow, 'name', type(self.slow).__name__)}) failed: {type(e).__name__}: {e}"
                log.warning("%s; the fast answers stand for %d image(s)", msg, len(chunk))
                for i in chunk:
                    errors[i] = msg
                continue
            share = (time.perf_counter() - t) / len(chunk)
            for i, q, a in zip(chunk, queries, got):
                p = list(a.probs)
                if getattr(a, "error", None) is not None:
                    errors[i] = f"System 2 ({getattr(self.slow, 'name', type(self.slow).__name__)}) failed: {a.error}"
                    continue
                if len(p) != len(q.candidates) or any(not (x >= 0) for x in p) or sum(p) <= 0:
                    errors[i] = f"System 2 gave {len(p)} probabilities for {len(q.candidates)} candidates: {p}"
                    continue
                answers[i] = a
                seconds[i] = a.seconds if a.seconds > 0 else share
        return answers, errors, seconds


def _picks_none(answer: SlowAnswer) -> bool:
    """System 2's own pick was its "none of these" option (a VLM asked with one, `fgvr.open_set`)."""
    none = getattr(answer, "none_prob", None)
    return none is not None and none > max(answer.probs, default=0.0)


# ----------------------------------------------------------------------------------------------------------
# assembling a system from a knowledge base on disk (what `fgvr classify` and `fgvr evaluate` do)


@contextmanager
def open_system(
    kb_path: str | Path,
    *,
    encoder: str | None = None,
    vlm: "VlmBackend | None" = None,
    reranker: bool = False,
    budget: float | None = None,
    threshold: float | None = None,
    k: int = DEFAULTS.top_k,
    weight: float = DEFAULT_WEIGHT,
    device: str = "cpu",
    rationale: bool = False,
    n_rules: int = DEFAULTS.rules,
    slow_all: bool = False,
    slow_batch: int = 8,
    debias: str | None = None,
    unknown_rate: float | None = None,
    unknown_threshold: float | None = None,
) -> Iterator[DualSystem]:
    """Load the base, lease its encoder from the registry for the duration, and wire up System 2.

    `encoder` defaults to the one the base was built with; naming another one is refused by
    `load_knowledge_base` (embeddings of different encoders are not comparable). `vlm` (an open backend,
    `fgvr.backends.get_backend`) or `reranker` picks System 2; neither means none (escalations are
    marked unavailable). The trigger uses `threshold` when given, else `budget` (default 0.3) calibrated on
    the base's support set. `debias` ('cyclic' or 'prior') wraps System 2 in `fgvr.debias` (option-order
    debiasing; off by default). `unknown_rate` (a share of known images allowed to be answered unknown,
    calibrated on the base's support set) or `unknown_threshold` turns open set on (`fgvr.open_set`).
    """
    from fgvr.knowledge_base import load_knowledge_base
    from fgvr.models import registry
    from fgvr.models.spec import parse_spec

    if vlm and reranker:
        raise ValueError("choose one System 2: --vlm SPEC or --reranker, not both")
    if threshold is not None and budget is not None:
        raise ValueError("give --threshold or --slow-budget, not both")
    if threshold is None and budget is None:
        budget = DEFAULTS.slow_budget
    backend = vlm
    if backend is not None and not hasattr(backend, "score_options"):
        raise TypeError(f"open_system(vlm=...) takes an open backend (fgvr.backends.get_backend), not {vlm!r}")
    if encoder is not None:
        spec = parse_spec(encoder, device=device, role="image-encoder")
        kb = load_knowledge_base(kb_path, encoder=spec)  # refuses another encoder's base
    else:
        kb = load_knowledge_base(kb_path)
        spec = ModelSpec(**kb.encoder_spec).replace(device=device)
    from fgvr.open_set import OpenSet

    open_set = OpenSet.from_options(kb, unknown_rate, unknown_threshold)
    slow: SlowPath | None = None
    if vlm:
        from fgvr.slow_path import VlmReasoner

        slow = VlmReasoner(backend, kb.classes, kb.descriptions, rationale=rationale, max_rules=n_rules,
                           none_option=open_set is not None and open_set.none_option)
        # a served backend answers `concurrency` requests at once: give it at least that many per call
        slow_batch = max(slow_batch, getattr(backend, "concurrency", 0))
    elif reranker:
        from fgvr.reranker import VisualReranker

        slow = VisualReranker.from_knowledge_base(kb, device=device)
    if debias not in (None, "none"):
        from fgvr.debias import debiased

        slow = debiased(slow, debias)
    experience = None
    if slow is not None and kb.path is not None:
        from fgvr.rules import ExperienceLibrary

        lib = ExperienceLibrary.load(kb.path, classes=kb.classes)
        experience = lib if lib.rules else None
    trigger = Trigger(threshold=threshold, budget=budget if threshold is None else None)
    if trigger.threshold is None:  # a budget: the threshold from the support set (`fgvr evaluate` may redo it)
        trigger = trigger.calibrated_on_support(kb)
    with registry.use(spec) as enc:
        yield DualSystem(kb, enc, slow, trigger, k=k, weight=weight, experience=experience, n_rules=n_rules,
                         slow_all=slow_all, slow_batch=slow_batch, open_set=open_set)
