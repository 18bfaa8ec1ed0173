"""What the MLLM is asked, and how its answer becomes phrases. Versioned: the cache records the version.

The question never names the class (SCP must be label-free, so it works for unseen classes);
it asks for short visual facts as a JSON list, which servers with structured output enforce
with `json_schema(k)`. `parse_phrases` accepts anything: a JSON list (bare, fenced or inside
prose), else lines, bullets, sentences or commas; it never raises.
"""

from __future__ import annotations

import json
import re

PROMPT_VERSION = "scp-v1"
MAX_PHRASE_CHARS = 120  # CLIP reads ~77 tokens; a "phrase" longer than this is not one

_QUESTION = (
    "Describe the visual facts of this image as a JSON list of at most {k} short phrases "
    "(2 to 6 words each): the main object or surface, its parts, shape, colours, texture, material, "
    "pattern and the scene. Do not guess a category name. Answer with the JSON list only, "
    'e.g. ["red brick wall", "grey rough surface"].'
)


def question(k: int = 8) -> str:
    return _QUESTION.format(k=k)


def json_schema(k: int = 8) -> dict:
    return {"type": "array", "items": {"type": "string", "maxLength": MAX_PHRASE_CHARS}, "minItems": 1, "maxItems": k}


def _from_json(text: str) -> list | None:
    """The first JSON list in `text` (bare, in a code fence, or surrounded by prose)."""
    start = text.find("[")
    while start != -1:
        end = text.find("]", start)
        while end != -1:
            try:
                value = json.loads(text[start:end + 1])
                if isinstance(value, list):
                    return value
            except (json.JSONDecodeError, RecursionError):
                pass
            end = text.find("]", end + 1)
        start = text.find("[", start + 1)
    return None


_SPLIT = re.compile(r"[\n;]|(?<=[.!?])\s+|,\s*")
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s*")


def _clean(phrase: str) -> str:
    phrase = _BULLET.sub("", phrase)
    phrase = phrase.strip().strip("\"'`“”‘’[]{}").strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", phrase)[:MAX_PHRASE_CHARS].strip()


def parse_phrases(text: str | None, k: int = 8) -> list[str]:
    """At most k distinct non-empty phrases from an MLLM answer; [] when there is nothing usable."""
    if not text:
        return []
    items = _from_json(text)
    if items is None:
        items = _SPLIT.split(text)
    out, seen = [], set()
    for item in items:
        if not isinstance(item, (str, int, float)):
            continue
        phrase = _clean(str(item))
        if phrase and any(ch.isalnum() for ch in phrase) and phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
        if len(out) == k:
            break
    return out
