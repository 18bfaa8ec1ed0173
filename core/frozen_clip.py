"""The frozen CLIP every stage uses: loading through open_clip, transforms, and the text tower cut at the EOT.

One place decides how a CLIP is named (`model_id`, written into caches and results), loaded
(open_clip model name or a config JSON; pretrained tag or a local checkpoint), checked and frozen.

Only open_clip's public surface is used: `create_model`, the towers' public modules
(`token_embedding`, `positional_embedding`, `transformer`, `ln_final`, `text_projection`,
`attn_mask`, `visual`) and `open_clip.transformer.text_global_pool`. Prompt code (trainer/surgery.py)
adds tokens with PyTorch forward hooks on those modules, so `load_clip` accepts only the models that
this works for: open_clip's `CLIP` class with a ViT image tower, class-token pooling and EOT text
pooling (ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ...). Anything else is refused on one line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mugcp.core.defaults import DEFAULT_CLIP, DEFAULT_PRETRAINED
from mugcp.core.errors import UserError
from mugcp.core.files import file_sha256

RANDOM_WEIGHTS = ("", "none", "random")


@dataclass
class FrozenClip:
    """A CLIP in eval mode with every parameter frozen, plus what is needed to feed it."""

    model: nn.Module
    tokenizer: object
    train_transform: object
    test_transform: object
    model_id: str  # "<name>@<pretrained>", the provenance key of caches and results
    image_size: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """float32, or float16 once a run in the references' half precision (`optim.precision=fp16`) halved it."""
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return int(proj.shape[-1]) if isinstance(proj, torch.Tensor) else int(proj.out_features)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    @property
    def depth(self) -> int:
        """Layers that both towers have (the most that deep prompts can reach in both)."""
        return min(len(self.model.visual.transformer.resblocks), len(self.model.transformer.resblocks))

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's tokens with SOT and EOT, uncut (a token holds at least one byte of UTF-8)."""
        if not texts:
            return []
        longest = max(len(t.encode()) for t in texts)
        return (self.tokenizer(texts, context_length=max(self.context_length, longest + 2)).argmax(dim=-1) + 1).tolist()

    def too_long(self, texts: list[str]) -> list[tuple[str, int]]:
        """(text, its tokens) for each text longer than CLIP's context. open_clip's tokenizer cuts such a text
        silently and ends it with EOT, so a prompt would lose its class name (OpenAI's clip.tokenize, which the
        reference code calls, refuses it)."""
        return [(t, n) for t, n in zip(texts, self.token_counts(texts)) if n > self.context_length]


def _resolve_model_name(clip: str) -> str:
    """An open_clip model name, or a path to a model config JSON registered under its file stem."""
    import open_clip  # here, not at the top: it takes seconds, and commands that load no CLIP skip it
    if clip.endswith(".json") or os.path.sep in clip:
        path = Path(clip)
        if not path.is_file():
            raise UserError(f"CLIP config not found: {clip} (give an open_clip model name or a config JSON path)")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"CLIP config {clip} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"CLIP config {clip} lacks embed_dim/vision_cfg/text_cfg: not an open_clip model config")
        open_clip.add_model_config(path)
        return path.stem
    if clip not in open_clip.list_models():
        raise UserError(f"unknown CLIP model '{clip}': use an open_clip model name (see open_clip.list_models()) "
                        f"or a config JSON path")
    return clip


def quick_gelu_forced(name: str, pretrained: str | None) -> bool:
    """Whether `pretrained` is a tag whose weights were trained with QuickGELU (OpenAI's, among others) on a model
    config without it. open_clip 3 then builds the config's GELU and only warns: `ViT-B-16` with `openai` would not
    be OpenAI's CLIP (every feature moves; the references all run QuickGELU). mugcp builds the activation the weights
    were trained with, as the config's `-quickgelu` twin does."""
    import open_clip
    if not pretrained or pretrained in RANDOM_WEIGHTS or Path(pretrained).is_file():
        return False
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    return bool(tag.get("quick_gelu")) and not (open_clip.get_model_config(name) or {}).get("quick_gelu")


def model_id_for(clip: str, pretrained: str | None) -> str:
    """Provenance id of a CLIP: name plus pretrained tag, or plus the checkpoint's content hash. A config built with
    QuickGELU for its tag's weights (`quick_gelu_forced`) is named as its `-quickgelu` twin, which it equals."""
    pretrained = None if pretrained in RANDOM_WEIGHTS else pretrained
    name = Path(clip).stem if clip.endswith(".json") else clip
    if pretrained and Path(pretrained).is_file():
        return f"{name}@file:{file_sha256(pretrained)[:16]}"
    if quick_gelu_forced(name, pretrained):
        name += "-quickgelu"
    return f"{name}@{pretrained or 'random'}"


TRAIN_CROP_SCALE = (0.08, 1.0)  # CoOp's random resized crop: a crop of 8% to all of the image's area


def build_transforms(image_size: int, mean, std):
    """CoOp's transforms: train = random resized crop (0.08-1) + flip; test = resize + centre crop, bicubic."""
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    norm = T.Normalize(mean=mean, std=std)
    train = T.Compose([to_rgb, T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([to_rgb, T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size),
                      T.ToTensor(), norm])
    return train, test


def drivable_problem(model: nn.Module) -> str | None:
    """Why the prompt surgery cannot drive `model`, or None when it can."""
    import open_clip
    from open_clip.transformer import VisionTransformer
    if not isinstance(model, open_clip.CLIP):
        return f"it is a {type(model).__name__}, not open_clip's CLIP class (its text tower is not CLIP's)"
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, not a ViT"
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        return "its image tower does not pool the class token"
    if model.text_pool_type != "argmax":
        return f"its text tower pools '{model.text_pool_type}', not the EOT token"
    if not (visual.transformer.batch_first and model.transformer.batch_first):
        return "its transformers are not batch-first"
    return None


def load_clip(clip: str = DEFAULT_CLIP, pretrained: str | None = DEFAULT_PRETRAINED,
              device: str | torch.device = "cpu") -> FrozenClip:
    """Load a CLIP through open_clip, check the surgery can drive it, put it in eval mode and freeze it."""
    import open_clip
    name = _resolve_model_name(clip)
    if pretrained in RANDOM_WEIGHTS:  # the architecture with random weights (benchmarks, tests)
        pretrained = None
    if pretrained and (pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.sep in pretrained):
        if not Path(pretrained).is_file():
            raise UserError(f"CLIP checkpoint not found: {pretrained}")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(f"unknown pretrained tag '{pretrained}' for {name} (known: {tags}; or give a checkpoint file)")
    logging.disable(logging.ERROR)  # open_clip logs its failures to the root logger; ours below say them once
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device,
                                       force_quick_gelu=quick_gelu_forced(name, pretrained))
    except Exception as e:  # open_clip says "bad weights" as RuntimeError, AssertionError, SafetensorError, OSError
        if not pretrained:
            raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if Path(pretrained).is_file():
            raise UserError(f"checkpoint {pretrained} cannot be loaded into CLIP {name}: {why}") from None
        wait = "" if os.environ.get("HF_HUB_OFFLINE") else "; offline, HF_HUB_OFFLINE=1 skips the ~1 min of retries"
        raise UserError(f"cannot get the '{pretrained}' weights of CLIP {name} (neither in the Hugging Face cache nor "
                        f"downloadable: offline?): give --pretrained a local checkpoint file{wait} ({why})") from None
    finally:
        logging.disable(logging.NOTSET)
    problem = drivable_problem(model)
    if problem:
        raise UserError(f"CLIP model '{name}' cannot carry prompts: {problem}; use a ViT CLIP such as ViT-B-16")
    model.eval()
    model.requires_grad_(False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    train_t, test_t = build_transforms(image_size, mean, std)
    return FrozenClip(model=model, tokenizer=open_clip.get_tokenizer(name), train_transform=train_t,
                      test_transform=test_t, model_id=model_id_for(clip, pretrained), image_size=image_size)


def cut_length(tokens: torch.Tensor) -> int:
    """Tokens needed so that every sequence still holds its EOT (the causal mask makes the rest moot)."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


def text_tower(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings with positions (N, L, d) through the frozen text tower: projected EOT features.

    `tokens` (N, L) locate each EOT (CLIP's largest token id). L may be shorter than the context
    length: the causal mask is cut to match, which gives the same features as the full length.
    """
    from open_clip.transformer import text_global_pool

    length = x.shape[1]
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    proj = model.text_projection
    return x @ proj if isinstance(proj, torch.Tensor) else proj(x)


@torch.no_grad()
def encode_text(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """open_clip's `encode_text`, cut after the longest EOT of each batch (same features, several times faster)."""
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        t = tokens[start:start + batch_size].to(model.token_embedding.weight.device)
        t = t[:, :cut_length(t)]
        x = model.token_embedding(t) + model.positional_embedding[:t.shape[1]]
        out.append(text_tower(model, x, t))
    return torch.cat(out)
