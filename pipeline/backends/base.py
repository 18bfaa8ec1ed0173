"""The MLLM backend interface: what every engine supplies, and the pieces they share.

A backend turns encoded images into answers, one `Answer` per image (its text, or the reason it
failed: a corrupt image fails alone). The extract run awaits `start()` once, then `describe()` on
chunks of images (concurrently: a backend keeps its engine busy however it can), then `aclose()`.
Backends register under a name with `@register_backend("name")` in their own module of this
package; `make_backend(config)` builds one from the run's `BackendConfig`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol, runtime_checkable

from PIL import Image

from mugcp.core.errors import UserError
from mugcp.core.files import IMAGE_DECODE_ERRORS
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import json_schema, parse_phrases, question

RESAMPLE_TEMPERATURE = 0.7  # an unusable greedy answer is asked again, sampled (greedy would repeat it)


@dataclass
class Answer:
    text: Optional[str] = None
    error: Optional[str] = None


@runtime_checkable
class Backend(Protocol):
    kind: ClassVar[str]
    model_id: str  # provenance: written into every cache row

    @classmethod
    def from_config(cls, config: BackendConfig, k: int) -> "Backend": ...

    async def start(self) -> None: ...

    async def describe(self, images: list[bytes]) -> list[Answer]: ...

    async def aclose(self) -> None: ...


_REGISTRY: dict[str, type] = {}


def register_backend(kind: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def backend_class(kind: str) -> type:
    if kind not in _REGISTRY:
        raise UserError(f"unknown --backend '{kind}': choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def make_backend(config: BackendConfig, k: int) -> Backend:
    """Build the backend `config.kind`; await `start()` before `describe`, `aclose()` after."""
    return backend_class(config.kind).from_config(config, k)


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def check_image(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(MIME type, None) for a decodable image, else (None, reason)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
        return Image.MIME.get(fmt, "image/png"), None
    except IMAGE_DECODE_ERRORS as e:
        return None, f"unreadable image: {type(e).__name__}: {e}"


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_messages(url: str, k: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question(k)}]}]


def structured_schema(k: int) -> dict:
    """OpenAI's `response_format` for a JSON list of at most k phrases."""
    return {"type": "json_schema", "json_schema": {"name": "visual_phrases", "schema": json_schema(k)}}


def answer_text(body: str) -> str:
    """The assistant message of an OpenAI chat-completion body (raises KeyError/ValueError when malformed)."""
    return (json.loads(body)["choices"][0]["message"].get("content") or "").strip()


class LocalBackend:
    """Shared by the in-process engines: images decoded here, generation a batch at a time in a thread.

    Subclasses implement `_generate(images, seed)`, greedy when `seed` is None; images whose answer
    has no usable phrase are generated again, sampled with seeds 1..retries, as the server backend does.
    """

    kind: ClassVar[str]

    def __init__(self, k: int, retries: int):
        self.k, self.retries = k, retries
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[str]:
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
                texts = await asyncio.to_thread(self._generate, [(d, m) for _, d, m in good], attempt or None)
            again = []
            for (i, d, m), text in zip(good, texts):
                if parse_phrases(text, self.k):
                    answers[i] = Answer(text=text)
                else:
                    again.append((i, d, m))
                    answers[i] = Answer(error=f"failed after {attempt + 1} attempts: no usable phrase in the "
                                              f"answer {(text or '')[:60]!r}")
            good = again
        return answers


def load_error(mllm: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load MLLM '{mllm}' ({first[:200]}): give a Hugging Face model id or a local model folder")
