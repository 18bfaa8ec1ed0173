"""All CLIP surgery in one place: where prompts enter open_clip's (frozen) towers.

Every method builds on these two functions instead of patching CLIP:

- `PromptedText` splices learnable context between the start token and the class-name suffix
  (CoOp's prefix / ctx / suffix split), optionally replaces the context with deep prompts
  before each of the first J layers (MaPLe), and runs the text tower only up to the longest
  EOT (the causal mask makes the rest moot). Context may be shared (n, d), per class (C, n, d),
  per instance (B, n, d) or per instance and class (B, C, n, d): all are one batched pass.
- `encode_image` appends visual prompt tokens after the patch tokens (after the positional
  embedding, before `ln_pre`, as MaPLe does), replaces them before each of the first J blocks,
  and drops them before pooling. Prompts come from a per-layer hook that sees the layer's own
  hidden states, which is what AMG needs.

With no prompts both give exactly open_clip's `encode_text` / `encode_image` (tests assert it).
open_clip's transformers are batch-first, (N, L, D).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from mugcp.clip import FrozenClip, cut_length, eot_index, text_features_from_embeddings
from mugcp.datasets import prompt_name

# hook(layer_index, visual_tokens (B, 1 + grid^2, w)) -> prompts (B or 1, n, w), or None to keep the previous ones
VisionHook = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


class PromptedText(nn.Module):
    """Class-name token buffers for prompts "<SOT> ctx_1..ctx_n <class name>. <EOT>" of a frozen CLIP text tower.

    The buffers hold no learnable state: `set_classnames` rebuilds them (base -> novel classes).
    """

    def __init__(self, clip: FrozenClip, classnames: list[str], n_ctx: int, suffix_template: str = "{}."):
        super().__init__()
        self.clip = clip
        self.n_ctx = n_ctx
        self.suffix_template = suffix_template
        self.set_classnames(classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        model = self.clip.model
        placeholder = " ".join(["X"] * self.n_ctx)
        texts = [f"{placeholder} {self.suffix_template.format(prompt_name(c))}" for c in classnames]
        tokens = self.clip.tokenize(texts)
        length = cut_length(tokens)
        tokens = tokens[:, :length].to(model.token_embedding.weight.device)
        with torch.no_grad():
            emb = model.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.classnames = list(classnames)

    @property
    def num_classes(self) -> int:
        return self.tokens.shape[0]

    def forward(self, ctx: torch.Tensor, deep: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Projected EOT features for every class: (C, D) for shared or per-class context, (B, C, D) per instance.

        `ctx`: (n, d) | (C, n, d) | (B, n, d) with `instance=True` semantics when 3-D and B != C is
        ambiguous, so per-instance context is passed as (B, 1, n, d) and per instance and class as (B, C, n, d).
        `deep[j]`: (n, d) or (B, 1, n, d) / (B, C, n, d) context that replaces the previous one before layer j + 1.
        """
        model, C = self.clip.model, self.num_classes
        batch = ctx.shape[0] if ctx.dim() == 4 else None
        lead = (batch, C) if batch is not None else (C,)
        ctx = ctx.expand(*lead, *ctx.shape[-2:])
        prefix = self.prefix.expand(*lead, *self.prefix.shape[1:])
        suffix = self.suffix.expand(*lead, *self.suffix.shape[1:])
        x = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=-2)
        x = x.reshape(-1, *x.shape[-2:]) + model.positional_embedding[: x.shape[-2]]
        eot = eot_index(self.tokens).repeat(batch or 1)
        hook = None
        if deep:
            n = self.n_ctx

            def hook(i: int, h: torch.Tensor) -> torch.Tensor:
                if i == 0 or i > len(deep):
                    return h
                d = deep[i - 1].expand(*lead, n, h.shape[-1]).reshape(-1, n, h.shape[-1]).to(h.dtype)
                return torch.cat([h[:, :1], d, h[:, 1 + n:]], dim=1)

        feats = text_features_from_embeddings(model, x, eot, layer_hook=hook)
        return feats.reshape(*lead, -1)


def init_context(clip: FrozenClip, n_ctx: int, init: Optional[str], std: float = 0.02) -> tuple[torch.Tensor, str]:
    """Context vectors from the embeddings of the first n_ctx words of `init`, and the suffix template.

    As in CoOp/MaPLe, init words beyond n_ctx stay in the prompt as fixed text: MaPLe's n_ctx 2 with
    "a photo of a" learns "a photo" and keeps "of a {class}.". Without `init`: N(0, std) and "{}.".
    """
    model = clip.model
    width = model.token_embedding.weight.shape[1]
    words = init.split() if init else []
    if not words:
        return torch.randn(n_ctx, width) * std, "{}."
    if len(words) < n_ctx:
        raise ValueError(f"ctx_init '{init}' has fewer than n_ctx={n_ctx} words")
    tokens = clip.tokenize([" ".join(words[:n_ctx])])[0]
    ids = tokens[1: int(eot_index(tokens[None])[0])]
    if len(ids) != n_ctx:
        raise ValueError(f"ctx_init '{init}': its first {n_ctx} words are {len(ids)} tokens, not {n_ctx}")
    with torch.no_grad():
        ctx = model.token_embedding(ids.to(model.token_embedding.weight.device)).float().clone()
    return ctx, " ".join(words[n_ctx:] + ["{}."])


def visual_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's `VisionTransformer._embeds` up to (not including) `ln_pre`: patches + class token + positions."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def encode_image(clip: FrozenClip, images: torch.Tensor, hook: Optional[VisionHook] = None,
                 return_tokens: bool = False):
    """Projected image features with deep visual prompts from `hook` (see module docstring).

    `hook(i, tokens)` is called before block i with the block's visual tokens (prompts removed);
    a tensor return replaces the prompt tokens, None keeps the previous ones (or none yet).
    """
    visual = clip.model.visual
    x = visual_embeddings(visual, images)
    n_visual = x.shape[1]
    prompts = hook(0, x) if hook is not None else None
    if prompts is not None:
        x = torch.cat([x, prompts.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if i > 0 and hook is not None:
            new = hook(i, x[:, :n_visual])
            if new is not None:
                x = torch.cat([x[:, :n_visual], new.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        x = block(x)
    pooled, tokens = visual._pool(x[:, :n_visual])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return (pooled, tokens) if return_tokens else pooled
