"""`--backend server`: OpenAI-compatible servers (`vllm serve`, one per GPU or node), kept busy.

Each server gets up to `concurrency` requests in flight and vLLM's continuous batching batches
them; a request goes to the server with the fewest outstanding requests. A server that fails
(connection error, timeout, 429/5xx) is taken out for a back-off that doubles with each failure
(0.5 s to 30 s), or as long as a 429/503's Retry-After asks if longer (at most 30 s), and comes back
in by itself; the request is asked again at once on another server, so a server that dies mid-run
costs retries, not images. The requests already in flight to a server
that fails count as one failure, not many. When every server has failed GIVE_UP_AFTER times in a row
(about half a minute of back-off), the images still waiting are recorded as failed at once, so a run
whose only server died ends then, and its rerun does just those images. An empty or unusable answer
is asked again at once, sampled at temperature 0.7 (greedy decoding would repeat it). Structured output (the
prompt's JSON schema) is asked for and dropped if a server refuses it by name (a 400 naming
response_format, json_schema, guided or structured output: not any 400, such as an image format it cannot
read), which the run's summary says. An API key, if given, is sent with every request as a bearer token.
`start()` checks that the servers are up, accept the key and serve the same model before any work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

import aiohttp

from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import (
    RESAMPLE_TEMPERATURE,
    Answer,
    ChunkedBackend,
    answer_text,
    chat_messages,
    check_image,
    data_url,
    register_backend,
)
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import Prompt

MAX_BACKOFF = 30.0
GIVE_UP_AFTER = 6  # consecutive failures of every server: 0.5 + 1 + 2 + 4 + 8 + 16 s of back-off
STRUCTURED_WORDS = ("response_format", "json_schema", "guided", "structured")  # a 400 that refuses structured output


class _Refused(Exception):
    """The server refused the request itself (4xx): asking again would not help."""


class _AllDown(Exception):
    """No server has answered for a long while: fail what waits, the rerun does it."""


class _Retry(Exception):
    def __init__(self, reason: str, resample: bool = False, server_fault: bool = True, wait: float = 0.0):
        super().__init__(reason)
        self.resample = resample  # the server is fine, the answer was not: ask again at once, sampling
        self.server_fault = server_fault
        self.wait = wait  # seconds the server asked to be left alone (Retry-After)


def retry_after(value: Optional[str]) -> float:
    """The seconds of a Retry-After header (its HTTP-date form, rare from MLLM servers, counts as none)."""
    try:
        return max(0.0, float(value or 0))
    except ValueError:
        return 0.0


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    failures: int = 0
    down_until: float = 0.0  # time.monotonic(); out of rotation until then
    served: tuple[str, ...] = ()

    def up(self, now: float) -> bool:
        return self.down_until <= now

    def failed(self, backoff: float, wait: float = 0.0) -> None:
        """Out of rotation for the doubling back-off, or the `wait` the server asked for if longer."""
        now = time.monotonic()
        if self.down_until > now:  # a request sent before it went down: the same outage (a longer wait kept)
            self.down_until = max(self.down_until, now + min(MAX_BACKOFF, wait))
            return
        self.down_until = now + min(MAX_BACKOFF, max(wait, backoff * 2 ** self.failures))
        self.failures += 1


@register_backend("server")
class ServerBackend(ChunkedBackend):
    """Client of OpenAI-compatible servers (aiohttp: at 64 requests in flight httpx's pool cost ~10 ms of
    CPU per request, aiohttp's under 1 ms; the client must outrun the GPUs)."""

    def __init__(self, urls: list[str] | str, mllm: Optional[str], prompt: Prompt, *, max_tokens: int = 128,
                 concurrency: int = 64, timeout: float = 120.0, retries: int = 3, k: int = 8, structured: bool = True,
                 backoff: float = 0.5, api_key: Optional[str] = None):
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.endpoints = [Endpoint(u.rstrip("/")) for u in urls]
        self.requested, self.prompt, self.k = mllm, prompt, k
        self.max_tokens, self.timeout, self.retries = max_tokens, timeout, retries
        self.structured = structured and prompt.schema is not None
        self.backoff, self.concurrency, self.api_key = backoff, concurrency, api_key
        self.model_id = mllm or ""
        self.notes: list[str] = []  # what the run's summary should tell (a server refused structured output)
        self.in_flight = 2  # chunks; `from_config` sizes it to keep every server's slots full
        self._client: Optional[aiohttp.ClientSession] = None
        self._slots: Optional[asyncio.Semaphore] = None

    @classmethod
    def from_config(cls, config: BackendConfig, prompt: Prompt, k: int) -> "ServerBackend":
        backend = cls(list(config.server_urls), config.mllm, prompt, max_tokens=config.max_tokens,
                      concurrency=config.concurrency, timeout=config.timeout, retries=config.retries, k=k,
                      structured=config.structured,
                      api_key=config.api_key.get_secret_value() if config.api_key else None)
        backend.chunk = config.batch_size
        backend.in_flight = max(2, -(-config.concurrency * len(config.server_urls) // config.batch_size))
        return backend

    async def _served(self, ep: Endpoint) -> None:
        async with self._client.get(f"{ep.url}/v1/models",
                                    timeout=aiohttp.ClientTimeout(total=min(self.timeout, 10.0))) as r:
            r.raise_for_status()
            ep.served = tuple(m["id"] for m in (await r.json(content_type=None)).get("data", []))

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.concurrency * len(self.endpoints) + 4),
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else None)
        self._slots = asyncio.Semaphore(self.concurrency * len(self.endpoints))
        checks = await asyncio.gather(*(self._served(ep) for ep in self.endpoints), return_exceptions=True)
        refused = next(((ep, r) for ep, r in zip(self.endpoints, checks)
                        if isinstance(r, aiohttp.ClientResponseError) and r.status in (401, 403)), None)
        if refused:
            await self.aclose()
            what = "the API key" if self.api_key else "a request without an API key"
            raise UserError(f"the server at {refused[0].url} refused {what} (HTTP {refused[1].status}): give its "
                            f"key with --api-key or the OPENAI_API_KEY environment variable")
        for ep, result in zip(self.endpoints, checks):
            if isinstance(result, (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)):
                ep.failed(self.backoff)  # down now: back in rotation after its back-off
            elif isinstance(result, BaseException):
                raise result
        live = [ep for ep in self.endpoints if ep.failures == 0]
        if not live:
            await self.aclose()
            raise UserError(f"cannot reach an OpenAI-compatible MLLM server at {', '.join(e.url for e in self.endpoints)}"
                            f": start one with `vllm serve MODEL` or pass the right --server-url")
        if self.requested:
            wrong = [ep for ep in live if self.requested not in ep.served]
            problem = wrong and f"the server at {wrong[0].url} serves {', '.join(wrong[0].served) or 'no model'}, " \
                                f"not --mllm {self.requested}"
        else:
            wrong = [ep for ep in live if ep.served[:1] != live[0].served[:1]]
            problem = (not live[0].served and f"the server at {live[0].url} serves no model") or \
                      (wrong and f"the servers serve different models ({live[0].served[0]} at {live[0].url}, "
                                 f"{', '.join(wrong[0].served) or 'none'} at {wrong[0].url}): name one with --mllm")
        if problem:
            await self.aclose()
            raise UserError(problem)
        self.model_id = self.requested or live[0].served[0]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _payload(self, url: str, seed: Optional[int] = None) -> dict:
        """Greedy without a seed; sampled at RESAMPLE_TEMPERATURE with one (a re-ask after an unusable answer)."""
        payload = {"model": self.model_id, "messages": chat_messages(url, self.prompt.question(self.k)),
                   "max_tokens": self.max_tokens, "temperature": 0.0}
        if seed is not None:
            payload.update(temperature=RESAMPLE_TEMPERATURE, seed=seed)
        if self.structured:
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "visual_description",
                                                          "schema": self.prompt.schema(self.k)}}
        return payload

    async def _endpoint(self) -> Endpoint:
        """The server with the fewest outstanding requests among those in rotation (waits if none is)."""
        while True:
            now = time.monotonic()
            up = [ep for ep in self.endpoints if ep.up(now)]
            if up:
                return min(up, key=lambda ep: ep.outstanding)
            if all(ep.failures >= GIVE_UP_AFTER for ep in self.endpoints):
                raise _AllDown(f"every server failed {GIVE_UP_AFTER} times in a row")
            await asyncio.sleep(max(0.01, min(ep.down_until for ep in self.endpoints) - now))

    async def _ask(self, ep: Endpoint, payload: dict) -> Answer:
        async with self._client.post(f"{ep.url}/v1/chat/completions", json=payload) as r:
            status, body = r.status, await r.text()
            wait = retry_after(r.headers.get("Retry-After")) if status in (429, 503) else 0.0
        if status == 400 and "response_format" in payload and any(w in body.lower() for w in STRUCTURED_WORDS):
            if self.structured:  # this server has no structured output: parse free text (said once)
                self.structured = False
                self.notes.append(f"the server at {ep.url} refused structured output ({body[:120]}): answers were "
                                  f"parsed from free text")
            raise _Retry("structured output refused", server_fault=False)
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status} from {ep.url}: {body[:120]}", wait=wait)
        if status >= 400:
            raise _Refused(f"HTTP {status}: {body[:200]}")
        return answer_text(body)

    async def _one(self, data: bytes) -> Answer:
        mime, error = await asyncio.to_thread(check_image, data)  # decoding stays off the event loop
        if error:
            return Answer(error=error)
        url = data_url(data, mime)
        last, resample = "no attempt", False
        async with self._slots:
            for attempt in range(self.retries + 1):
                try:
                    ep = await self._endpoint()
                except _AllDown as e:
                    return Answer(error=f"{e}: {last}")
                ep.outstanding += 1
                try:
                    answer = await self._ask(ep, self._payload(url, attempt if resample else None))
                    ep.failures = 0
                    if self.prompt.parse(answer.text, self.k):
                        return answer
                    last, resample = f"no usable phrase in the answer {answer.text[:60]!r}", True
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    ep.failed(self.backoff)
                    last, resample = f"{ep.url}: {type(e).__name__}{': ' + str(e) if str(e) else ''}", False
                except _Retry as e:
                    if e.server_fault:
                        ep.failed(self.backoff, e.wait)
                    last, resample = str(e), False
                except _Refused as e:
                    return Answer(error=str(e))
                except (ValueError, KeyError, IndexError, TypeError) as e:  # a malformed response body
                    last, resample = f"malformed response: {e}", False
                finally:
                    ep.outstanding -= 1
        return Answer(error=f"failed after {self.retries + 1} attempts: {last}")

    async def describe(self, images: list[bytes]) -> list[Answer]:
        return list(await asyncio.gather(*(self._one(b) for b in images)))
