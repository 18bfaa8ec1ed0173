"""`--backend server`: any OpenAI-compatible server (`vllm serve` on this or another node).

Many requests are kept in flight (bounded by `concurrency`) and vLLM's continuous batching
batches them. Per-request timeout; retries with exponential backoff on connection errors and
429/5xx; an empty or unusable answer is asked again at once, sampled at temperature 0.7 (greedy
decoding would repeat it). Structured output (a JSON list) is asked for and dropped if the server
refuses it. `start()` checks the server is up and serves the model before any work.
"""

from __future__ import annotations

import asyncio
import random
from typing import Optional

import aiohttp

from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import (
    RESAMPLE_TEMPERATURE,
    Answer,
    answer_text,
    chat_messages,
    check_image,
    data_url,
    register_backend,
    structured_schema,
)
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import parse_phrases


class _Retry(Exception):
    def __init__(self, reason: str, resample: bool = False):
        super().__init__(reason)
        self.resample = resample  # the server is fine, the answer was not: ask again at once, sampling


@register_backend("server")
class ServerBackend:
    """Client of an OpenAI-compatible server (aiohttp: at 64 requests in flight httpx's pool cost ~10 ms of
    CPU per request, aiohttp's under 1 ms; the client must outrun the GPU)."""

    def __init__(self, url: str, mllm: Optional[str], *, max_tokens: int = 128, concurrency: int = 64,
                 timeout: float = 120.0, retries: int = 3, k: int = 8, structured: bool = True,
                 backoff: float = 0.5):
        self.url, self.requested = url.rstrip("/"), mllm
        self.max_tokens, self.timeout, self.retries, self.k = max_tokens, timeout, retries, k
        self.structured, self.backoff, self.concurrency = structured, backoff, concurrency
        self.model_id = mllm or ""
        self._client: Optional[aiohttp.ClientSession] = None
        self._sem: Optional[asyncio.Semaphore] = None

    @classmethod
    def from_config(cls, config: BackendConfig, k: int) -> "ServerBackend":
        return cls(config.server_url, config.mllm, max_tokens=config.max_tokens, concurrency=config.concurrency,
                   timeout=config.timeout, retries=config.retries, k=k, structured=config.structured)

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             connector=aiohttp.TCPConnector(limit=self.concurrency + 4))
        self._sem = asyncio.Semaphore(self.concurrency)
        try:
            async with self._client.get(f"{self.url}/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=min(self.timeout, 10.0))) as r:
                r.raise_for_status()
                served = [m["id"] for m in (await r.json(content_type=None)).get("data", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            await self.aclose()
            raise UserError(f"cannot reach an OpenAI-compatible MLLM server at {self.url} ({type(e).__name__}): "
                            f"start one with `vllm serve MODEL` or pass the right --server-url") from None
        if not served:
            await self.aclose()
            raise UserError(f"the server at {self.url} serves no model")
        if self.requested and self.requested not in served:
            await self.aclose()
            raise UserError(f"the server at {self.url} serves {', '.join(served)}, not --mllm {self.requested}")
        self.model_id = self.requested or served[0]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _payload(self, url: str, seed: Optional[int] = None) -> dict:
        """Greedy without a seed; sampled at RESAMPLE_TEMPERATURE with one (a re-ask after an unusable answer)."""
        payload = {"model": self.model_id, "messages": chat_messages(url, self.k), "max_tokens": self.max_tokens,
                   "temperature": 0.0}
        if seed is not None:
            payload.update(temperature=RESAMPLE_TEMPERATURE, seed=seed)
        if self.structured:
            payload["response_format"] = structured_schema(self.k)
        return payload

    async def _one(self, data: bytes) -> Answer:
        mime, error = await asyncio.to_thread(check_image, data)  # decoding stays off the event loop
        if error:
            return Answer(error=error)
        url = data_url(data, mime)
        last, resample = "no attempt", False
        async with self._sem:
            for attempt in range(self.retries + 1):
                if attempt and not resample:
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random()))
                try:
                    payload = self._payload(url, attempt if resample else None)
                    async with self._client.post(f"{self.url}/v1/chat/completions", json=payload) as r:
                        status, body = r.status, await r.text()
                    if status == 400 and self.structured and "format" in body.lower():
                        self.structured = False  # this server has no structured output: parse free text
                        raise _Retry("structured output refused")
                    if status == 429 or status >= 500:
                        raise _Retry(f"HTTP {status}: {body[:120]}")
                    if status >= 400:
                        return Answer(error=f"HTTP {status}: {body[:200]}")
                    text = answer_text(body)
                    if not parse_phrases(text, self.k):
                        raise _Retry(f"no usable phrase in the answer {text[:60]!r}", resample=True)
                    return Answer(text=text)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    last, resample = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__), False
                except _Retry as e:
                    last, resample = str(e), e.resample
                except (ValueError, KeyError, IndexError, TypeError) as e:  # a malformed response body
                    last, resample = f"malformed response: {e}", False
        return Answer(error=f"failed after {self.retries + 1} attempts: {last}")

    async def describe(self, images: list[bytes]) -> list[Answer]:
        return list(await asyncio.gather(*(self._one(b) for b in images)))
