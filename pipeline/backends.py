"""MLLM backends: one interface, three engines, the same question and the same answers.

- `server`: any OpenAI-compatible server (`vllm serve` on this or another node). Many requests
  are kept in flight (bounded by `concurrency`) and vLLM's continuous batching batches them;
  per-request timeout, retries with exponential backoff on connection errors and 429/5xx; an
  empty or unusable answer is asked again at once, sampled at temperature 0.7 (greedy decoding
  would repeat it). Structured output (a JSON list) is asked for and dropped if the server refuses.
- `vllm`: vLLM's in-process engine (`vllm.LLM.chat`), a batch at a time, greedy.
- `hf`: transformers `generate`, batched with left padding, greedy: for machines without vLLM.
  Both re-generate unusable answers sampled, like the server backend.

`describe(images)` takes encoded image bytes and returns one `Answer` per image: its text, or
the reason it failed (a corrupt image fails alone). Nothing here imports torch or vLLM until a
local backend is built, so the server client runs anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

from mugcp.errors import UserError
from pipeline.prompt import json_schema, parse_phrases, question


@dataclass
class Answer:
    text: Optional[str] = None
    error: Optional[str] = None


def check_image(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(MIME type, None) for a decodable image, else (None, reason)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
        return Image.MIME.get(fmt, "image/png"), None
    except Exception as e:
        return None, f"unreadable image: {type(e).__name__}: {e}"


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_messages(url: str, k: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question(k)}]}]


RESAMPLE_TEMPERATURE = 0.7


class _Retry(Exception):
    def __init__(self, reason: str, resample: bool = False):
        super().__init__(reason)
        self.resample = resample  # the server is fine, the answer was not: ask again at once, sampling


class ServerBackend:
    """Client of an OpenAI-compatible server; `start()` checks it is up and serves the model."""

    kind = "server"

    def __init__(self, url: str, mllm: Optional[str], *, max_tokens: int = 128, concurrency: int = 64,
                 timeout: float = 120.0, retries: int = 3, k: int = 8, structured: bool = True,
                 backoff: float = 0.5):
        self.url, self.requested = url.rstrip("/"), mllm
        self.max_tokens, self.timeout, self.retries, self.k = max_tokens, timeout, retries, k
        self.structured, self.backoff = structured, backoff
        self.concurrency = concurrency
        self.model_id = mllm or ""
        self._client = None
        self._sem: Optional[asyncio.Semaphore] = None

    async def start(self) -> None:
        # aiohttp, not httpx: at 64 requests in flight httpx's connection pool costs ~10 ms of CPU
        # per request, aiohttp's under 1 ms (bench/RESULTS.md), and the client must outrun the GPU.
        import aiohttp

        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             connector=aiohttp.TCPConnector(limit=self.concurrency + 4))
        self._sem = asyncio.Semaphore(self.concurrency)
        try:
            async with self._client.get(f"{self.url}/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=min(self.timeout, 10.0))) as r:
                r.raise_for_status()
                served = [m["id"] for m in (await r.json(content_type=None)).get("data", [])]
        except Exception as e:
            await self.aclose()
            raise UserError(f"cannot reach an OpenAI-compatible MLLM server at {self.url} ({type(e).__name__}): "
                            f"start one with `vllm serve MODEL` or pass the right --server-url") from None
        if not served:
            raise UserError(f"the server at {self.url} serves no model")
        if self.requested and self.requested not in served:
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
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "visual_phrases", "schema": json_schema(self.k)}}
        return payload

    async def _one(self, data: bytes) -> Answer:
        import aiohttp

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
                    text = (json.loads(body)["choices"][0]["message"].get("content") or "").strip()
                    if not parse_phrases(text, self.k):
                        # greedy decoding would repeat the same answer: the retry samples instead
                        raise _Retry(f"no usable phrase in the answer {text[:60]!r}", resample=True)
                    return Answer(text=text)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    last, resample = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__), False
                except _Retry as e:
                    last, resample = str(e), e.resample
                except (ValueError, KeyError, IndexError) as e:  # a malformed response body
                    last, resample = f"malformed response: {e}", False
        return Answer(error=f"failed after {self.retries + 1} attempts: {last}")

    async def describe(self, images: list[bytes]) -> list[Answer]:
        return list(await asyncio.gather(*(self._one(b) for b in images)))


class _LocalBackend:
    """Shared by the in-process engines: images decoded here, generation a batch at a time in a thread.

    `_generate(images, seed)` decodes greedily when `seed` is None; images whose answer has no
    usable phrase are generated again, sampled with seeds 1..retries, as the server backend does.
    """

    def __init__(self, k: int, retries: int):
        self.k, self.retries = k, retries
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

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


def _load_error(mllm: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"cannot load MLLM '{mllm}' ({first[:200]}): give a Hugging Face model id or a local model folder")


class HfBackend(_LocalBackend):
    kind = "hf"

    def __init__(self, mllm: str, *, max_tokens: int = 128, batch_size: int = 8, k: int = 8, device: str = "auto",
                 retries: int = 3):
        super().__init__(k, retries)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(mllm)
            self.model = AutoModelForImageTextToText.from_pretrained(mllm, dtype=dtype).to(self.device).eval()
        except Exception as e:
            raise _load_error(mllm, e) from None
        self.processor.tokenizer.padding_side = "left"
        self.model_id, self.max_tokens, self.batch_size = mllm, max_tokens, batch_size

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[str]:
        import torch
        from PIL import Image

        sampling = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": RESAMPLE_TEMPERATURE}
        out = []
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(self.k)}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for start in range(0, len(images), self.batch_size):
            chunk = [Image.open(io.BytesIO(d)).convert("RGB") for d, _ in images[start:start + self.batch_size]]
            inputs = self.processor(text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_tokens, **sampling)
            out += self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return out


class VllmBackend(_LocalBackend):
    kind = "vllm"

    def __init__(self, mllm: str, *, max_tokens: int = 128, batch_size: int = 64, k: int = 8, structured: bool = True,
                 max_model_len: int = 4096, retries: int = 3):
        super().__init__(k, retries)
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vLLM: `pip install 'mugcp[vllm]'`, or use --backend hf "
                            "or --backend server") from None
        import torch

        options = {"model": mllm, "max_model_len": max_model_len, "limit_mm_per_prompt": {"image": 1, "video": 0}}
        if not torch.cuda.is_available():  # vLLM's CPU build: fp32, no graph capture
            options.update(dtype="float32", enforce_eager=True)
        try:
            self.llm = vllm.LLM(**options)
        except Exception as e:
            raise _load_error(mllm, e) from None
        params = {"temperature": 0.0, "max_tokens": max_tokens}
        if structured:
            try:
                from vllm.sampling_params import StructuredOutputsParams

                params["structured_outputs"] = StructuredOutputsParams(json=json_schema(k))
            except ImportError:
                pass
        self.params, self.model_id, self.batch_size = params, mllm, batch_size

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[str]:
        import vllm

        params = self.params if seed is None else {**self.params, "temperature": RESAMPLE_TEMPERATURE, "seed": seed}
        conversations = [chat_messages(data_url(d, m), self.k) for d, m in images]
        outputs = self.llm.chat(conversations, vllm.SamplingParams(**params), use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


def make_backend(kind: str, mllm: Optional[str], *, server_url: str = "http://127.0.0.1:8000",
                 max_tokens: int = 128, concurrency: int = 64, batch_size: int = 32, timeout: float = 120.0,
                 retries: int = 3, k: int = 8, structured: bool = True, device: str = "auto"):
    """Build the backend `kind`; await `start()` before `describe`, `aclose()` after."""
    if kind == "server":
        return ServerBackend(server_url, mllm, max_tokens=max_tokens, concurrency=concurrency, timeout=timeout,
                             retries=retries, k=k, structured=structured)
    if mllm is None:
        raise UserError(f"--backend {kind} needs --mllm (a Hugging Face id or a local model folder)")
    if kind == "hf":
        return HfBackend(mllm, max_tokens=max_tokens, batch_size=batch_size, k=k, device=device, retries=retries)
    if kind == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return VllmBackend(mllm, max_tokens=max_tokens, batch_size=batch_size, k=k, structured=structured,
                           retries=retries)
    raise UserError(f"unknown --backend '{kind}': choose server, vllm or hf")
