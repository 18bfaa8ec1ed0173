"""`--backend ray`: the images to describe as a Ray Dataset, MLLM engines as Ray actors, on any cluster.

The work (content hash, file path) becomes a Ray Dataset; `map_batches` runs it through
`--num-engines` actors, each holding one MLLM engine of mugcp's own (`vllm` on a GPU, else `hf`: the
same classes, prompt, parsing and re-asking as the single-process backends, so greedy answers are
the same), reading the images from the shared file system. Answers stream back to the driver as
batches finish and are written to the cache like any backend's. Ray Data restarts an actor that
dies and retries its in-flight batch, so a lost worker costs those images only; a killed driver
resumes from what the cache holds. Ray is an optional dependency (`pip install 'mugcp[ray]'`); on a
cluster every node needs mugcp installed and the dataset and cache folders mounted at the same paths.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path
from typing import AsyncIterator

from mugcp.core.defaults import DEFAULT_MLLM
from mugcp.core.errors import UserError
from mugcp.core.ray_cluster import check_gpus, join, valid_gpus
from mugcp.pipeline.backends.base import Answer, Work, make_backend, read_image, register_backend
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import Prompt, get_prompt

ENGINE_FAILED = "engine failed to start: "  # an answer's error that stops the run: no engine can answer


class Describer:
    """A Ray Data actor: one MLLM engine, built once, answering batches of (hash, path) rows. An engine that
    cannot start (a bad --mllm) says why in every answer (`ENGINE_FAILED`): a Ray actor that raised would reach
    the driver as a wrapped ActorDiedError, its reason buried in its traceback."""

    def __init__(self, config: dict, prompt: str, k: int):
        try:
            self.backend = make_backend(BackendConfig(**config), get_prompt(prompt), k)
            asyncio.run(self.backend.start())
            self.failed = None
        except UserError as e:
            self.backend, self.failed = None, str(e)

    def __call__(self, batch: dict) -> dict:
        if self.failed is not None:
            n = len(batch["sha256"])
            return {"sha256": list(batch["sha256"]), "text": [None] * n, "error": [ENGINE_FAILED + self.failed] * n,
                    "cut": [False] * n}
        blobs = [read_image(Path(path), sha) for path, sha in zip(batch["path"], batch["sha256"])]
        readable = [i for i, b in enumerate(blobs) if isinstance(b, bytes)]
        replies = dict(zip(readable, asyncio.run(self.backend.describe([blobs[i] for i in readable]))))
        answers = [replies.get(i) or blobs[i] for i in range(len(blobs))]
        return {"sha256": list(batch["sha256"]), "text": [a.text for a in answers], "error": [a.error for a in answers],
                "cut": [a.cut for a in answers]}


@register_backend("ray")
class RayBackend:
    def __init__(self, config: BackendConfig, prompt: Prompt, k: int):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("the ray backend needs Ray: `pip install 'mugcp[ray]'`") from None
        self.config, self.prompt, self.k = config, prompt, k
        self.model_id = config.mllm or DEFAULT_MLLM
        self.engine = config.engine or ("vllm" if importlib.util.find_spec("vllm") else "hf")

    @classmethod
    def from_config(cls, config: BackendConfig, prompt: Prompt, k: int) -> "RayBackend":
        return cls(config, prompt, k)

    async def start(self) -> None:
        import ray

        join(self.config.ray_address, "--ray-address")
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # mugcp's own progress bar says enough
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = valid_gpus(self.config.gpus_per_engine, "--gpus-per-engine")
        self.gpus = gpus if gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
        check_gpus(self.gpus, "--gpus-per-engine")

    async def stream(self, work: Work) -> AsyncIterator[list[tuple[str, Answer]]]:
        import ray

        inner = self.config.model_copy(update={"kind": self.engine, "mllm": self.model_id}).model_dump(
            mode="json", exclude={"api_key"})  # the engines are in process: no server, no key to hand them
        rows = ray.data.from_items([{"sha256": sha, "path": str(path)} for sha, path in work])
        answered = rows.map_batches(
            Describer, fn_constructor_kwargs={"config": inner, "prompt": self.prompt.name, "k": self.k},
            batch_size=self.config.batch_size, compute=ray.data.ActorPoolStrategy(size=self.config.num_engines),
            num_gpus=self.gpus, num_cpus=1)  # Ray Data restarts dead actors and retries their batches by default
        batches = iter(answered.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            while True:
                try:
                    batch = await asyncio.to_thread(next, batches, None)
                except ray.exceptions.RayError as e:  # the engines died past Ray's retries: one line, not Ray's traceback
                    last = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
                    raise UserError(f"the Ray engines failed ({type(e).__name__}: {last[-1][:300]})") from None
                if batch is None:
                    return
                rows = list(zip(*(batch.column(c).to_pylist() for c in ("sha256", "text", "error", "cut"))))
                stopped = next((error for _, _, error, _ in rows if error and error.startswith(ENGINE_FAILED)), None)
                if stopped is not None:  # before any of it is written
                    raise UserError(stopped[len(ENGINE_FAILED):])
                yield [(sha, Answer(text=text, error=error, cut=cut)) for sha, text, error, cut in rows]
        finally:  # ended here, inside the Ray session, however the stream ends (an error, a consumer that stops)
            batches.close()

    async def aclose(self) -> None:
        pass
