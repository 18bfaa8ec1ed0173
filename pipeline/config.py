"""What defines an extract run, typed: every value is checked before a file is written.

`BackendConfig` is what an MLLM backend reads (each backend takes the fields it needs);
`ExtractConfig` adds what the run itself needs (which images, the prompt, SCP size, CLIP, cache,
shards, flushing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from mugcp.core.defaults import DEFAULT_CLIP, DEFAULT_PRETRAINED
from mugcp.core.settings import Settings
from mugcp.pipeline.prompts import DEFAULT_PROMPT, PROMPTS

SPLITS = ("train", "test")  # what training and evaluation read: the val shots are never read (as in the reference)


class BackendConfig(Settings):
    kind: str = Field("server", description="server (OpenAI-compatible, e.g. vllm serve), vllm (in-process), hf "
                                            "(transformers) or ray (engines as Ray actors over a cluster)")
    mllm: Optional[str] = Field(None, description="Hugging Face id or local folder; server: the served model")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) of a Hugging Face id "
                                                      "to load in process (vllm, hf, ray; default: the Hub's main)")
    server_urls: tuple[str, ...] = Field(("http://127.0.0.1:8000",), min_length=1,
                                         description="base URLs of OpenAI-compatible servers (one per GPU or node)")
    api_key: Optional[SecretStr] = Field(None, description="server: the API key the servers ask for (sent as a "
                                                           "bearer token; never written anywhere)")
    max_tokens: int = Field(128, ge=1, description="most tokens the MLLM may answer with")
    concurrency: int = Field(64, ge=1, description="requests in flight per server")
    batch_size: int = Field(32, ge=1, description="images per batch (vllm, hf) and per SCP-encoding pass")
    timeout: float = Field(120.0, gt=0, description="seconds per request before a retry (server)")
    retries: int = Field(3, ge=0, description="retries per image")
    structured: bool = Field(True, description="ask for JSON-schema structured output")
    device: str = Field("auto", description="cuda, cpu or auto")
    ray_address: Optional[str] = Field(None, description="ray: the cluster to join ('auto', or ray://host:port); "
                                                         "none starts a local one")
    num_engines: int = Field(1, ge=1, description="ray: MLLM engines (actors), one per GPU")
    engine: Optional[Literal["vllm", "hf"]] = Field(None, description="ray: the engine inside each actor "
                                                                     "(default: vllm when installed, else hf)")
    gpus_per_engine: Optional[float] = Field(None, ge=0, description="ray: GPUs per engine (default: 1 when the "
                                                                     "cluster has GPUs, else 0)")

    @field_validator("server_urls")
    @classmethod
    def _http(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        """Base URLs, given either way OpenAI clients and vLLM's docs write them (`.../v1` or without)."""
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--server-url '{url}' is not an http(s) URL, e.g. http://127.0.0.1:8000")
        return tuple(url.rstrip("/").removesuffix("/v1") for url in urls)

    @model_validator(mode="after")
    def _revision_loaded_here(self):
        if self.revision is not None and self.kind == "server":  # it would change nothing: the server chose
            raise ValueError("--revision is for the in-process backends (vllm, hf, ray): a server serves the weights "
                             "it loaded (vllm serve --revision), leave it out")
        return self


class ExtractConfig(Settings):
    clip: str = Field(DEFAULT_CLIP, description="open_clip model name or config JSON")
    pretrained: Optional[str] = Field(DEFAULT_PRETRAINED, description="pretrained tag, checkpoint file, or none")
    cache_dir: Path = Field(Path("cache"), description="root of the Parquet SCP cache")
    splits: tuple[Literal["train", "val", "test"], ...] = Field(SPLITS, min_length=1, description="splits to describe")
    prompt: str = Field(DEFAULT_PROMPT, description=f"what the MLLM is asked: {', '.join(PROMPTS)}")
    k: int = Field(8, ge=1, le=64, description="most phrases per image (SCP tokens)")
    shots: tuple[int, ...] = Field((16,), min_length=1, description="shot counts whose few-shot draws are described")
    seeds: tuple[int, ...] = Field((1, 2, 3), min_length=1, description="seeds whose few-shot draws are described")
    train_classes: Literal["all", "base"] = Field("all", description="classes whose training shots are described: "
                                                                    "all (few-shot, transfer) or base (base-to-novel)")
    all_images: bool = Field(False, description="describe every image of the splits, not only what the protocol reads")
    num_shards: int = Field(1, ge=1, description="split the images into N disjoint shards")
    shard_index: int = Field(0, ge=0, description="the shard to describe (0-based)")
    flush_every: int = Field(256, ge=1, description="rows per Parquet part: at most this many are lost to a kill")
    backend: BackendConfig = Field(default_factory=BackendConfig)

    @model_validator(mode="after")
    def _consistent(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be below num_shards {self.num_shards}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt '{self.prompt}' is not one of {', '.join(PROMPTS)}")
        if min(self.shots) < 1 or min(self.seeds) < 0:
            raise ValueError("shots must be at least 1 and seeds not negative")
        return self
