"""`--backend hf`: transformers `generate`, batched with left padding, greedy; for machines without vLLM.

Unusable answers are generated again, sampled, like every backend (`LocalBackend`).
"""

from __future__ import annotations

import io
from typing import Optional

import torch
from PIL import Image

from mugcp.core.defaults import DEFAULT_MLLM
from mugcp.core.errors import UserError
from mugcp.pipeline.backends.base import RESAMPLE_TEMPERATURE, Answer, LocalBackend, load_error, register_backend
from mugcp.pipeline.config import BackendConfig
from mugcp.pipeline.prompts import Prompt


@register_backend("hf")
class HfBackend(LocalBackend):
    def __init__(self, mllm: str, prompt: Prompt, *, max_tokens: int = 128, batch_size: int = 8, k: int = 8,
                 device: str = "auto", retries: int = 3, revision: Optional[str] = None):
        super().__init__(prompt, k, retries)
        from transformers import AutoModelForImageTextToText, AutoProcessor  # heavy: only when this backend runs

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but no CUDA device is available: use --device cpu")
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(mllm, revision=revision)
            self.model = AutoModelForImageTextToText.from_pretrained(mllm, dtype=dtype, revision=revision)
            self.model = self.model.to(self.device).eval()
        except (OSError, ValueError, KeyError) as e:  # no such model / folder, or not an image-text model
            raise load_error(mllm, e) from None
        self.processor.tokenizer.padding_side = "left"
        self.model_id, self.max_tokens, self.batch_size = mllm, max_tokens, batch_size
        self.chunk = batch_size

    @classmethod
    def from_config(cls, config: BackendConfig, prompt: Prompt, k: int) -> "HfBackend":
        return cls(config.mllm or DEFAULT_MLLM, prompt, max_tokens=config.max_tokens, batch_size=config.batch_size, k=k,
                   device=config.device, retries=config.retries, revision=config.revision)

    def _generate(self, images: list[tuple[bytes, str]], seed: Optional[int] = None) -> list[Answer]:
        sampling = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": RESAMPLE_TEMPERATURE}
        out = []
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.prompt.question(self.k)}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        for start in range(0, len(images), self.batch_size):
            chunk = [Image.open(io.BytesIO(d)).convert("RGB") for d, _ in images[start:start + self.batch_size]]
            inputs = self.processor(text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True)
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_tokens, **sampling)
            new = ids[:, inputs["input_ids"].shape[1]:]
            texts = self.processor.batch_decode(new, skip_special_tokens=True)
            for row, text in zip(new.tolist(), texts):  # cut: max_tokens generated and no end of sequence
                out.append(Answer(text=text, cut=bool(eos) and len(row) >= self.max_tokens and not eos & set(row)))
        return out
