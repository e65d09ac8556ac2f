"""The VLM's JSON, repaired where possible: quotes, bare words, trailing commas, what is left open; and a
proposed rule read out of it."""

from __future__ import annotations

import json
import re
from typing import Sequence

from fgvr.rules import normalise_name

_FENCE = re.compile(r"```[a-zA-Z]*")
_QUOTES_OPEN = "\"'“‘"
_WORD_END = ",}]:\n"


def _read_string(s: str, j: int, closer: str) -> tuple[str, int, bool]:
    """The string starting at s[j] (after its opening quote) as a JSON string literal; the index after it;
    whether it was closed. A single quote closes it only where JSON could go on ("the dog's ear")."""
    n = len(s)
    buf: list[str] = []
    while j < n:
        d = s[j]
        if d == "\\" and j + 1 < n:
            buf.append(s[j : j + 2])
            j += 2
            continue
        if d == closer or (closer == "\"" and d == "”"):
            rest = s[j + 1 :].lstrip(" \t")
            if closer == "'" and rest and rest[0] not in _WORD_END:
                buf.append("'")  # an apostrophe inside the text, not the end of the string
                j += 1
                continue
            return "\"" + "".join(buf) + "\"", j + 1, True
        buf.append({"\"": "\\\"", "\n": "\\n"}.get(d, d))
        j += 1
    return "\"" + "".join(buf) + "\"", j, False


def _repair(s: str) -> str:
    """Re-emit a JSON-ish object as JSON.

    Walks the text once, tracking strings and brackets: single or curly quotes become double quotes (a
    single quote closes a string only where JSON could go on, so "the dog's ear" survives), bare keys and
    bare words get quoted, Python's True/False/None become JSON's, trailing commas go, a missing comma
    between two strings is put in, and whatever is still open at the end (a string, brackets, a dangling
    key) is closed.
    """
    out: list[str] = []
    stack: list[str] = []
    i, n = 0, len(s)

    def last_sig() -> str:
        for ch in reversed(out):
            if not ch.isspace():
                return ch[-1]
        return ""

    while i < n:
        c = s[i]
        if c in _QUOTES_OPEN:
            closer = {"\"": "\"", "'": "'", "“": "”", "‘": "’"}[c]
            if last_sig() in ("\"", "]", "}") or (last_sig().isdigit() and stack):
                out.append(",")
            text, j, closed = _read_string(s, i + 1, closer)
            out.append(text)
            i = j
            if not closed:
                break
            continue
        if c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            while out and out[-1].strip() == "":
                out.pop()
            if last_sig() == ",":
                while out and out[-1].strip() in ("", ","):
                    out.pop()
            if stack:
                out.append(stack.pop())
            if not stack:
                break
        elif c.isalpha() or c == "_":
            j = i
            if stack and stack[-1] == "}" and last_sig() in ("{", ","):  # a bare key
                while j < n and (s[j].isalnum() or s[j] in "_-"):
                    j += 1
                out.append(json.dumps(s[i:j]))
            else:  # a bare value: a literal, or words up to the next delimiter
                while j < n and s[j] not in ",}]\n":
                    j += 1
                word = s[i:j].strip()
                literal = {"true": "true", "false": "false", "null": "null", "none": "null"}.get(word.lower())
                out.append(literal if literal else json.dumps(word))
            i = j
            continue
        else:
            out.append(c)
        i += 1

    text = "".join(out).rstrip()
    if stack:  # truncated answer: drop a dangling comma, give a dangling key a null, close what is open
        text = text.rstrip(",").rstrip()
        if text.endswith(":"):
            text += " null"
        text += "".join(reversed(stack))
    return text


def extract_json_object(text: str) -> dict | None:
    """The first JSON object in a model's free text, repaired if needed; None if there is none to be had."""
    if not text:
        return None
    s = _FENCE.sub("", text)
    start = s.find("{")
    if start < 0:
        return None
    s = s[start:]
    try:  # well-formed JSON first: raw_decode stops at the end of the first object
        obj, _ = json.JSONDecoder().raw_decode(s)
        if isinstance(obj, dict):
            return obj
    except json.JSONDecodeError:
        pass
    try:
        obj = json.loads(_repair(s))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_rule(text: str, candidate_names: Sequence[str]) -> tuple[dict | None, str]:
    """Turn a reflection answer into {"classes", "cue", "rule", "applies_when"}, or (None, why not).

    Class names are matched exactly after normalisation against the candidates the VLM was shown; unknown
    names are dropped (never fuzzy-matched onto some other class).
    """
    obj = extract_json_object(text)
    if obj is None:
        return None, "no JSON object in the answer"
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    rule_text = lower.get("rule") or lower.get("text") or lower.get("rule_text")
    if not isinstance(rule_text, str) or not rule_text.strip():
        return None, "no rule text"
    classes = lower.get("classes") or lower.get("class") or []
    if isinstance(classes, str):
        classes = [c for c in re.split(r",|/| vs\.? | and ", classes) if c.strip()]
    if not isinstance(classes, list):
        return None, "classes is not a list"
    by_norm = {normalise_name(c): c for c in candidate_names}
    kept: list[str] = []
    for c in classes:
        name = by_norm.get(normalise_name(str(c)))
        if name is not None and name not in kept:
            kept.append(name)
    if not kept:
        return None, f"none of the classes {classes!r} is a candidate"
    cue = lower.get("cue") or ""
    when = lower.get("applies_when") or lower.get("when") or ""
    return {
        "classes": kept,
        "cue": str(cue).strip() if cue else "",
        "rule": rule_text.strip(),
        "applies_when": str(when).strip() if when else "",
    }, ""
