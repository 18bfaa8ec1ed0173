"""The MLLM backend interface: what every engine supplies, and the pieces they share.

A backend turns images into answers, one `Answer` per image (its text, or the reason it failed: a
corrupt image fails alone). The extract run awaits `start()` once, then consumes `stream(work)`:
the work is (content hash, file path) pairs and the stream yields batches of (hash, answer) as
they are ready, in any order, until every item has its answer; then `aclose()`. Most backends
answer chunks of encoded images (`describe`) and inherit the stream from `ChunkedBackend`, which
keeps enough chunks in flight to keep the engine busy; a backend that schedules the whole work
itself (Ray Data over a cluster) provides its own stream. Backends register under a name with
`@register_backend("name")` in their own module of this package; `make_backend(config)` builds one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, ClassVar, Optional, Protocol, runtime_checkable

from PIL import Image, UnidentifiedImageError

from mugcp.core.errors import UserError
from mugcp.core.files import IMAGE_DECODE_ERRORS
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import Prompt

RESAMPLE_TEMPERATURE = 0.7  # an unusable greedy answer is asked again, sampled (greedy would repeat it)


_UNPRINTABLE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with terminal escapes, control characters (but newlines and tabs) and lone surrogates as spaces:
    they are no visual fact, and a lone surrogate cannot be stored (UTF-8 has no such character)."""
    return _UNPRINTABLE.sub(" ", text)


@dataclass
class Answer:
    """One image's answer: the MLLM's text, or why there is none. Every backend's answer is made here, so
    its text is made printable here, before anything parses or stores it."""

    text: Optional[str] = None
    error: Optional[str] = None
    cut: bool = False  # the MLLM stopped at max_tokens, mid-answer: its last phrase is unfinished

    def __post_init__(self) -> None:
        self.text = None if self.text is None else printable(self.text)
        self.error = None if self.error is None else printable(self.error)


Work = list[tuple[str, Path]]  # (content hash, file to read it from)


@runtime_checkable
class Backend(Protocol):
    kind: ClassVar[str]
    model_id: str  # provenance: written into every cache row

    @classmethod
    def from_config(cls, config: BackendConfig, prompt: Prompt, k: int) -> "Backend": ...

    async def start(self) -> None: ...

    def stream(self, work: Work) -> AsyncIterator[list[tuple[str, Answer]]]: ...

    async def aclose(self) -> None: ...


_REGISTRY: dict[str, type] = {}
_BROKEN: dict[str, str] = {}  # kind -> why it cannot be used, told when it is asked for


def register_backend(kind: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        missing = [m for m in ("from_config", "start", "stream", "aclose") if not callable(getattr(cls, m, None))]
        if missing:
            _BROKEN[kind] = (f"--backend {kind} ({cls.__module__}) lacks {', '.join(missing)} of the Backend protocol: "
                             f"subclass ChunkedBackend and implement describe, or implement stream")
            return cls
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def backend_class(kind: str) -> type:
    if kind in _BROKEN:
        raise UserError(_BROKEN[kind])
    if kind not in _REGISTRY:
        raise UserError(f"unknown --backend '{kind}': choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def make_backend(config: BackendConfig, prompt: Prompt, k: int) -> Backend:
    """Build the backend `config.kind` asking `prompt` for at most k phrases; `start()` before `describe`."""
    return backend_class(config.kind).from_config(config, prompt, k)


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def check_image(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(MIME type, None) for a decodable image, else (None, reason)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
        return Image.MIME.get(fmt, "image/png"), None
    except UnidentifiedImageError:
        return None, f"unreadable image: {len(data)} bytes in no image format PIL knows"
    except IMAGE_DECODE_ERRORS as e:
        return None, f"unreadable image: {type(e).__name__}: {e}"


def read_image(path: Path, sha256: str) -> bytes | Answer:
    """The file's bytes, or a failed answer saying why it could not be read (it vanished, no permission) or
    that it no longer holds the content `sha256` it was selected as: an answer is stored under the hash of
    the bytes the MLLM saw, or not at all (the next extract hashes the new bytes and describes them)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Answer(error=f"cannot read {path}: {e.strerror}")
    if hashlib.sha256(data).hexdigest() != sha256:
        return Answer(error=f"{path} changed while this extract ran: run `mugcp extract` again to describe it")
    return data


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def answer_text(body: str) -> Answer:
    """The assistant message of an OpenAI chat-completion body (its content a string, or a list of text parts),
    marked cut when max_tokens stopped it; ValueError saying what is wrong when the body is malformed."""
    try:
        choice = json.loads(body)["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"no choices[0].message in {body[:80]!r}") from None
    if not isinstance(message, dict):
        raise ValueError(f"the message is of type {type(message).__name__}, not an object")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    if not isinstance(content, (str, type(None))):
        raise ValueError(f"the message's content is of type {type(content).__name__}, not text")
    return Answer(text=(content or "").strip(), cut=choice.get("finish_reason") == "length")


class ChunkedBackend:
    """A backend that answers chunks of encoded images (`describe`); the stream keeps `in_flight` chunks
    being answered at once, so the engine never waits on the reading of files."""

    chunk: int = 32
    in_flight: int = 2

    async def describe(self, images: list[bytes]) -> list[Answer]:
        raise NotImplementedError

    async def stream(self, work: Work) -> AsyncIterator[list[tuple[str, Answer]]]:
        chunks = [work[i:i + self.chunk] for i in range(0, len(work), self.chunk)]
        pending: asyncio.Queue = asyncio.Queue()
        for c in chunks:
            pending.put_nowait(c)
        done: asyncio.Queue = asyncio.Queue()

        async def worker() -> None:
            try:
                while not pending.empty():
                    part = pending.get_nowait()
                    blobs = await asyncio.to_thread(lambda: [read_image(path, sha) for sha, path in part])
                    readable = [i for i, b in enumerate(blobs) if isinstance(b, bytes)]
                    replies = dict(zip(readable, await self.describe([blobs[i] for i in readable])))
                    await done.put([(sha, replies.get(i) or blobs[i]) for i, (sha, _) in enumerate(part)])
            except Exception as e:  # handed to the consumer, which raises it: nothing waits forever
                await done.put(e)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.in_flight, len(chunks)))]
        try:
            for _ in chunks:
                batch = await done.get()
                if isinstance(batch, Exception):
                    raise batch
                yield batch
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


class LocalBackend(ChunkedBackend):
    """Shared by the in-process engines: images decoded here, generation a batch at a time in a thread.

    Subclasses implement `_generate(images, seed)`, an `Answer` per image (cut when it stopped at max
    tokens), greedy when `seed` is None; images whose answer has no usable phrase are generated again,
    sampled with seeds 1..retries, as the server backend does.
    """

    kind: ClassVar[str]

    def __init__(self, prompt: Prompt, k: int, retries: int):
        self.prompt, self.k, self.retries = prompt, k, retries
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[Answer]:
        raise NotImplementedError

    async def describe(self, images: list[bytes]) -> list[Answer]:
        answers: list[Optional[Answer]] = [None] * len(images)
        good = []
        for i, data in enumerate(images):
            mime, error = check_image(data)
            if error:
                answers[i] = Answer(error=error)
            else:
                good.append((i, data, mime))
        for attempt in range(self.retries + 1):
            if not good:
                break
            async with self._lock:  # one batch on the device at a time
                replies = await asyncio.to_thread(self._generate, [(d, m) for _, d, m in good], attempt or None)
            again = []
            for (i, d, m), reply in zip(good, replies):
                if self.prompt.parse(reply.text, self.k):
                    answers[i] = reply
                else:
                    again.append((i, d, m))
                    answers[i] = Answer(error=f"failed after {attempt + 1} attempts: no usable phrase in the "
                                              f"answer {(reply.text or '')[:60]!r}")
            good = again
        return answers


def load_error(mllm: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load MLLM '{mllm}' ({first[:200]}): give a Hugging Face model id or a local model folder")
