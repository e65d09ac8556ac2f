"""The API's records as pydantic models: what /openapi.json (and the /docs page) describe. Routes build
plain dicts (cheap, and the same shape `fgvr classify` writes); these models are their documented schema,
and the tests check the answers against them."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SupportImage(_Open):
    index: int = Field(description="index in the base's support list; the image is GET /v1/support/{index}")
    url: str
    similarity: Optional[float] = Field(None, description="cosine similarity to the query, where known")


class Candidate(_Open):
    id: int = Field(description="class id (index into /v1/classes)")
    name: str = Field(description="class name")
    score: float = Field(description="the final probability (System 2's decision where it ran, else System 1's)")
    fast: float = Field(description="System 1's probability")
    slow: Optional[float] = Field(None, description="System 2's probability, where it ran")
    support: list[SupportImage] = []


class TriggerInfo(_Open):
    score: Optional[float] = Field(None, description="the doubt score")
    threshold: Optional[float] = None
    go_slow: Optional[bool] = None
    inputs: dict[str, Optional[float]] = {}
    terms: Optional[dict[str, float]] = None


class System2Info(_Open):
    name: str
    ran: bool
    question: str
    answer: Optional[str] = Field(None, description="System 2's own pick: the candidate it gave the most probability")
    decision: Optional[str] = Field(None, description="the combined decision of System 1 and System 2")
    rationale: Optional[str] = None
    rules_used: list[str] = []
    tokens_in: int = 0
    tokens_out: int = 0
    error: Optional[str] = None


class ClassifyResult(_Open):
    """One image's answer: the CLI's record (`prediction` id, `prediction_name`, candidates with `id` and
    `name`) plus what the page shows."""

    schema_: str = Field(alias="schema", description="record version, e.g. fgvr.result/2")
    prediction: Optional[int] = Field(description="class id of the answer")
    prediction_name: Optional[str]
    confidence: Optional[float]
    path_taken: str = Field(description="fast, slow, escalated-unavailable, escalated-failed or error")
    why: str
    trigger: TriggerInfo
    candidates: list[Candidate]
    system2: Optional[System2Info] = None
    fast_prediction: Optional[int] = None
    fast_prediction_name: Optional[str] = None
    timings_ms: dict[str, float]
    error: Optional[str] = None
    unknown: bool = Field(default=False, description="open set: not a class of the base (prediction is null then)")
    unknown_score: Optional[float] = Field(default=None, description="System 1's top-1 fused similarity (low = unknown)")
    base_version: Optional[int] = Field(None, description="the version of the base that answered (it changes when "
                                                          "a correction is accepted)")


class BatchItem(ClassifyResult):
    name: str = Field(description="the upload's file name")


class BatchError(_Open):
    name: str
    error: str
    status: int


class BatchResult(BaseModel):
    results: list[BatchItem | BatchError]


class ClassInfo(_Open):
    id: int
    name: str
    description: Optional[str] = None
    support: list[SupportImage]


class Classes(BaseModel):
    classes: list[ClassInfo]


class Info(_Open):
    classes: int
    system2: Optional[str]
    threshold: float
    budget: Optional[float] = None
    top_k: int
    encoder: Optional[str]
    knowledge_base: str
    runs: bool
    base_version: Optional[int] = Field(None, description="the base version served (it changes when a correction is accepted)")


class RunHeadline(_Open):
    name: str
    n_images: Optional[int] = None
    accuracy: Optional[float] = None
    slow_rate: Optional[float] = None


class Runs(BaseModel):
    runs: list[RunHeadline]
    warnings: list[str] = Field([], description="runs skipped because their summary.json cannot be read")


class Refusal(BaseModel):
    detail: str = Field(description="why the request was refused, and what to do")


class Health(_Open):
    status: str = Field(description="ready, loading or failed")
    auth: bool
    uptime_s: float
    error: Optional[str] = None
