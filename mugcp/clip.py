"""The frozen CLIP every stage uses: loading through open_clip, transforms, and fast text encoding.

One place decides how a CLIP is named (`model_id`, written into caches and results), loaded
(open_clip model name or a config JSON; pretrained tag or a local checkpoint) and frozen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mugcp.errors import UserError

DEFAULT_CLIP = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"


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
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if isinstance(
            self.model.text_projection, torch.Tensor
        ) else int(self.model.text_projection.out_features)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)


def _resolve_model_name(clip: str) -> str:
    """An open_clip model name, or a path to a model config JSON registered under its file stem."""
    import open_clip

    if clip.endswith(".json") or os.path.sep in clip:
        path = Path(clip)
        if not path.is_file():
            raise UserError(f"CLIP config not found: {clip} (give an open_clip model name or a config JSON path)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"CLIP config {clip} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"CLIP config {clip} lacks embed_dim/vision_cfg/text_cfg: not an open_clip model config")
        open_clip.add_model_config(path)
        return path.stem
    if clip not in open_clip.list_models():
        raise UserError(f"unknown CLIP model '{clip}': use an open_clip model name (see open_clip.list_models()) or a config JSON path")
    return clip


def model_id_for(clip: str, pretrained: str | None) -> str:
    """Provenance id of a CLIP: name plus pretrained tag, or plus the checkpoint's content hash."""
    pretrained = None if pretrained in ("", "none", "random") else pretrained
    name = Path(clip).stem if clip.endswith(".json") else clip
    if pretrained and Path(pretrained).is_file():
        h = hashlib.sha256()
        with open(pretrained, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"{name}@file:{h.hexdigest()[:16]}"
    return f"{name}@{pretrained or 'random'}"


def build_transforms(image_size: int, mean, std):
    """CoOp's transforms: train = random resized crop (0.08-1) + flip; test = resize + centre crop, bicubic."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    norm = T.Normalize(mean=mean, std=std)
    train = T.Compose([to_rgb, T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([to_rgb, T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size),
                      T.ToTensor(), norm])
    return train, test


def load_clip(clip: str = DEFAULT_CLIP, pretrained: str | None = DEFAULT_PRETRAINED,
              device: str | torch.device = "cpu") -> FrozenClip:
    """Load a CLIP through open_clip, put it in eval mode and freeze every parameter."""
    import open_clip

    name = _resolve_model_name(clip)
    if pretrained in ("", "none", "random"):  # the architecture with random weights (benchmarks, tests)
        pretrained = None
    if pretrained and (pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.sep in pretrained):
        if not Path(pretrained).is_file():
            raise UserError(f"CLIP checkpoint not found: {pretrained}")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(f"unknown pretrained tag '{pretrained}' for {name} (known: {tags}; or give a checkpoint file)")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
    except RuntimeError as e:  # a checkpoint for another architecture: strict load fails
        raise UserError(f"checkpoint {pretrained} does not fit CLIP {name}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a pretrained tag whose weights cannot be fetched offline
        raise UserError(f"cannot load CLIP {name} with pretrained '{pretrained}': {str(e).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    train_t, test_t = build_transforms(image_size, mean, std)
    return FrozenClip(model=model, tokenizer=open_clip.get_tokenizer(name), train_transform=train_t,
                      test_transform=test_t, model_id=model_id_for(clip, pretrained), image_size=image_size)


def eot_index(tokens: torch.Tensor) -> torch.Tensor:
    """Position of each sequence's end-of-text token (the largest id in CLIP's vocabulary)."""
    return tokens.argmax(dim=-1)


def cut_length(tokens: torch.Tensor) -> int:
    """Tokens needed so that every sequence still holds its EOT (the causal mask makes the rest moot)."""
    return int(eot_index(tokens).max().item()) + 1


def text_features_from_embeddings(model: nn.Module, x: torch.Tensor, eot: torch.Tensor,
                                  layer_hook=None) -> torch.Tensor:
    """Run token embeddings (N, L, d) through the frozen text tower; return projected EOT features.

    `x` must already hold positional embeddings. `layer_hook(i, x) -> x` runs before block i
    (deep prompts replace tokens there). L may be shorter than the context length: the causal
    mask is cut to match, which gives the same EOT features as the full length.
    """
    length = x.shape[1]
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    for i, block in enumerate(model.transformer.resblocks):
        if layer_hook is not None:
            x = layer_hook(i, x)
        x = block(x, attn_mask=mask)
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    return pooled @ proj if isinstance(proj, torch.Tensor) else proj(pooled)


@torch.no_grad()
def encode_text(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """open_clip's `encode_text`, cut after the longest EOT of each batch (same features, several times faster)."""
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        t = tokens[start:start + batch_size].to(model.token_embedding.weight.device)
        length = cut_length(t)
        t = t[:, :length]
        x = model.token_embedding(t) + model.positional_embedding[:length]
        out.append(text_features_from_embeddings(model, x, eot_index(t)))
    return torch.cat(out)
