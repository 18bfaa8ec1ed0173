"""`--backend vllm`: vLLM's in-process engine (`vllm.LLM.chat`), a batch at a time, greedy.

vLLM is an optional dependency (`pip install 'mugcp[vllm]'`): it is imported when this backend is
built. Unusable answers are generated again, sampled, like every backend (`LocalBackend`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from mugcp.core.defaults import DEFAULT_MLLM
from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import (
    RESAMPLE_TEMPERATURE,
    Answer,
    LocalBackend,
    chat_messages,
    data_url,
    load_error,
    register_backend,
)
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import Prompt


@register_backend("vllm")
class VllmBackend(LocalBackend):
    def __init__(self, mllm: str, prompt: Prompt, *, max_tokens: int = 128, batch_size: int = 64, k: int = 8,
                 structured: bool = True, max_model_len: int = 4096, retries: int = 3,
                 revision: Optional[str] = None):
        super().__init__(prompt, k, retries)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vLLM: `pip install 'mugcp[vllm]'`, or use --backend hf "
                            "or --backend server") from None
        options = {"model": mllm, "max_model_len": max_model_len, "limit_mm_per_prompt": {"image": 1, "video": 0},
                   "revision": revision, "tokenizer_revision": revision}
        if not torch.cuda.is_available():  # vLLM's CPU build: fp32, no graph capture
            options.update(dtype="float32", enforce_eager=True)
        try:
            self.llm = vllm.LLM(**options)
        except (OSError, ValueError) as e:  # no such model / folder, or an architecture vLLM does not serve
            raise load_error(mllm, e) from None
        params = {"temperature": 0.0, "max_tokens": max_tokens}
        if structured and prompt.schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            params["structured_outputs"] = StructuredOutputsParams(json=prompt.schema(k))
        self.params, self.model_id, self.batch_size = params, mllm, batch_size
        self.chunk = batch_size
        self._vllm = vllm

    @classmethod
    def from_config(cls, config: BackendConfig, prompt: Prompt, k: int) -> "VllmBackend":
        return cls(config.mllm or DEFAULT_MLLM, prompt, max_tokens=config.max_tokens, batch_size=config.batch_size, k=k,
                   structured=config.structured, retries=config.retries, revision=config.revision)

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[Answer]:
        params = self.params if seed is None else {**self.params, "temperature": RESAMPLE_TEMPERATURE, "seed": seed}
        question = self.prompt.question(self.k)
        conversations = [chat_messages(data_url(d, m), question) for d, m in images]
        outputs = self.llm.chat(conversations, self._vllm.SamplingParams(**params), use_tqdm=False)
        return [Answer(text=o.outputs[0].text, cut=o.outputs[0].finish_reason == "length") for o in outputs]
