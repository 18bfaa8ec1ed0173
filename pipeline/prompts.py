"""What the MLLM is asked, and how its answer becomes phrases: a small registry of versioned prompts.

Every prompt is data: a name (`--prompt`), a version recorded with every answer in the cache, the
question (with `{k}`, the most phrases wanted), an optional JSON schema that servers with
structured output enforce, and a parser that turns any answer into at most k phrases that fit
CLIP's 77 tokens (it never raises). Changing a prompt's text means a new version.

Parsing takes a JSON list only if it holds a string (a list of objects gives their string values), else
splits free text at lines, bullets, sentences and commas (the fullwidth marks of CJK text too), leaving
out markdown emphasis, HTML entities and heading lines ("Visual facts:"). An answer that starts as a
refusal ("I'm sorry", "I can't", "As an AI", ...) gives no phrase: it is asked again, sampled, and
recorded as failed if it still refuses, so that no apology becomes an SCP token.

- `phrases` (default): label-free visual facts as a JSON list of short phrases. The class is never
  named, so SCP carries what the pixels show, for seen and unseen classes alike.
- `caption`: one or two sentences, as the MuGCP paper's "MLLM-generated captions"; the object may
  be named, so the MLLM's own recognition enters SCP. Each sentence is one SCP token (or several,
  when it is longer than CLIP's 77 tokens).
- `attributes`: a JSON object of named attributes (object, parts, shape, colours, texture,
  material, pattern, scene); each attribute is one SCP token ("colours: red and white").
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

from mugcp.core.errors import UserError

MAX_PHRASE_CHARS = 120  # a phrase longer than this is not one
MAX_SENTENCE_CHARS = 1000  # a runaway answer is cut; SCP encoding splits sentences to fit CLIP's 77 tokens

_DECODER = json.JSONDecoder()


def _strings(items: list) -> list[str]:
    """The phrases a JSON list holds: its strings, and the string values of its objects."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out += [v for v in item.values() if isinstance(v, str)]
    return out


def _first_json(text: str, kind: type) -> object | None:
    """The first JSON value of type `kind` in `text` (bare, in a code fence, or surrounded by prose); a list
    only if it holds a phrase, so that prose such as "up to [8] phrases" is not taken for the answer.
    One decode per opening bracket: linear in practice, where trying every closing bracket was quadratic."""
    opener = "[" if kind is list else "{"
    start = text.find(opener)
    while start != -1:
        try:
            value, _ = _DECODER.raw_decode(text, start)
            if isinstance(value, kind) and (kind is not list or _strings(value)):
                return value
        except (json.JSONDecodeError, RecursionError):
            pass
        start = text.find(opener, start + 1)
    return None


_SPLIT = re.compile(r"[\n;；，、。！？]|(?<=[.!?])\s+|,\s*")
_SENTENCES = re.compile(r"[\n]+|(?<=[.!?])\s+|(?<=[。！？])")
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s*")
_HEADING = re.compile(r"^[^\n]*:[ \t*_]*$", re.M)  # a line that only introduces what follows
_REFUSAL = re.compile(r"\s*(?:(?:I['’]m sorry|I am sorry|I can['’]t|I cannot|I am unable|I['’]m unable|As an AI)\b"
                      r"|Sorry,)", re.I)
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1")
_FINISHED = re.compile(r"[,;\n.!?\]}。！？，；、]")


def _clean(phrase: str, limit: int = MAX_PHRASE_CHARS) -> str:
    """One phrase without list marks, markdown emphasis and headings or quotes, cut at a word within `limit`."""
    phrase = re.sub(r"^#+\s+", "", _EMPHASIS.sub(r"\2", _BULLET.sub("", phrase)).replace("**", ""))
    phrase = phrase.strip().strip("\"'`“”‘’[]{}").strip().rstrip(".。").strip()
    phrase = re.sub(r"\s+", " ", phrase)
    if len(phrase) > limit:
        head = phrase[:limit + 1]
        phrase = head.rsplit(" ", 1)[0] if " " in head else phrase[:limit]
    return phrase.strip()


def _distinct(items, k: int, limit: int = MAX_PHRASE_CHARS, decoded: bool = False) -> list[str]:
    """At most k distinct phrases of `items`, cleaned; entities decoded unless the text already was."""
    out, seen = [], set()
    for item in items:
        if not isinstance(item, (str, int, float)):
            continue
        phrase = _clean(str(item) if decoded else html.unescape(str(item)), limit)
        if phrase and any(ch.isalnum() for ch in phrase) and phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
        if len(out) == k:
            break
    return out


def _free_text(text: str) -> str:
    """The answer as prose: entities decoded (before "&amp;" could split at its ";"), heading lines left out."""
    return _HEADING.sub("", html.unescape(text))


def finished_part(text: str) -> str:
    """What an answer cut at max_tokens holds finished: up to its last separator or closing bracket (a JSON list
    cut mid-phrase loses that phrase, one closed before the cut keeps every phrase; "" if nothing ended)."""
    ends = [m.end() for m in _FINISHED.finditer(text)]
    return text[:ends[-1]] if ends else ""


def _is_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except (ValueError, RecursionError):
        return False


def parse_phrases(text: Optional[str], k: int = 8) -> list[str]:
    """At most k distinct non-empty phrases: a JSON list, else lines, bullets, sentences or commas."""
    if not text or _REFUSAL.match(text):
        return []
    items = _first_json(text, list)
    if items is not None:
        return _distinct(_strings(items), k)
    if _is_list(text):  # a JSON list of no phrase ([1, 2], [true]) is not prose
        return []
    return _distinct(_SPLIT.split(_free_text(text)), k, decoded=True)


def parse_sentences(text: Optional[str], k: int = 8) -> list[str]:
    """At most k sentences (SCP encoding splits one too long for CLIP's 77 tokens into runs of words)."""
    if not text or _REFUSAL.match(text):
        return []
    return _distinct(_SENTENCES.split(_free_text(text).strip()), k, limit=MAX_SENTENCE_CHARS, decoded=True)


ATTRIBUTES = ("object", "parts", "shape", "colours", "texture", "material", "pattern", "scene")


def parse_attributes(text: Optional[str], k: int = 8) -> list[str]:
    """At most k "name: value" phrases from a JSON object of attributes (lists joined with "and")."""
    if not text or _REFUSAL.match(text):
        return []
    found = _first_json(text, dict)
    if found is None:
        return parse_phrases(text, k)
    items = []
    for name, value in found.items():
        values = value if isinstance(value, list) else [value]
        words = " and ".join(str(v) for v in values if isinstance(v, (str, int, float)) and str(v).strip())
        if words:
            items.append(f"{name}: {words}")
    return _distinct(items, k)


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str  # the question; {k} is the most phrases wanted
    parse: Callable[[Optional[str], int], list[str]]
    schema: Optional[Callable[[int], dict]] = None  # JSON schema for structured output, if any

    def question(self, k: int) -> str:
        return self.text.format(k=k)


def _list_schema(k: int) -> dict:
    return {"type": "array", "items": {"type": "string", "maxLength": MAX_PHRASE_CHARS}, "minItems": 1,
            "maxItems": k}


def _attributes_schema(k: int) -> dict:
    return {"type": "object", "properties": {a: {"type": "string", "maxLength": MAX_PHRASE_CHARS} for a in ATTRIBUTES},
            "additionalProperties": False}


PROMPTS: dict[str, Prompt] = {p.name: p for p in [
    Prompt("phrases", "scp-v1", (
        "Describe the visual facts of this image as a JSON list of at most {k} short phrases "
        "(2 to 6 words each): the main object or surface, its parts, shape, colours, texture, material, "
        "pattern and the scene. Do not guess a category name. Answer with the JSON list only, "
        'e.g. ["red brick wall", "grey rough surface"].'), parse_phrases, _list_schema),
    Prompt("caption", "caption-v1", (
        "Describe this image in one or two sentences: what it shows, its parts, colours, texture, material "
        "and setting. Answer with the sentences only (at most {k} sentences)."), parse_sentences),
    Prompt("attributes", "attr-v1", (
        "List the visual attributes of this image as a JSON object with the keys object, parts, shape, colours, "
        "texture, material, pattern and scene (short values; leave out what you cannot see; at most {k} keys). "
        "Do not guess a category name. Answer with the JSON object only."), parse_attributes, _attributes_schema),
]}
DEFAULT_PROMPT = "phrases"


def get_prompt(name: str) -> Prompt:
    if name not in PROMPTS:
        raise UserError(f"unknown --prompt '{name}': choose one of {', '.join(PROMPTS)}")
    return PROMPTS[name]


# The default prompt's pieces, for callers that need no choice (tests, the world's describer).
def question(k: int = 8) -> str:
    return PROMPTS[DEFAULT_PROMPT].question(k)


def json_schema(k: int = 8) -> dict:
    return _list_schema(k)
