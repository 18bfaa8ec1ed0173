"""All CLIP surgery in one place: where prompts enter open_clip's (frozen) towers.

Every method builds on these two pieces instead of patching CLIP:

- `PromptedText` splices learnable context between the start token and the class-name suffix
  (CoOp's prefix / ctx / suffix split), optionally replaces the context with deep prompts
  before each of the first J layers (MaPLe), and runs the text tower only up to the longest
  EOT (the causal mask makes the rest moot). Context may be shared (n, d), per class (C, n, d),
  per instance (B, 1, n, d) or per instance and class (B, C, n, d): all are one batched pass.
- `encode_image` runs open_clip's own `visual` forward with prompt tokens appended after the
  patch tokens (after the positional embedding, before `ln_pre`, as MaPLe does), replaced before
  each of the first J blocks, and dropped before pooling. Prompts come from a per-layer hook that
  sees the layer's own hidden states, which is what AMG needs.

Both reach into the towers only through PyTorch forward hooks on open_clip's public modules
(`visual.patch_dropout`, `*.transformer.resblocks[i]`), registered for one call and removed after.
With no prompts both give exactly open_clip's `encode_text` / `encode_image` (tests assert it).
open_clip's transformers are batch-first, (N, L, D).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import nn

from mugcp.core.coop_datasets import prompt_name
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip, cut_length, text_tower

# hook(layer_index, visual_tokens (B, 1 + grid^2, w)) -> prompts (B or 1, n, w), or None to keep the previous ones
VisionHook = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


@contextmanager
def _hooked(*handles):
    """Keep forward hooks registered for the duration of one call."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_input(block: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]):
    """A pre-hook that maps a residual block's hidden states (its first argument) through `replace`."""
    return block.register_forward_pre_hook(lambda _m, args: (replace(args[0]), *args[1:]))


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
        over = self.clip.too_long(texts)
        if over:
            name = classnames[texts.index(over[0][0])]
            raise UserError(f"class '{name}' after {self.n_ctx} context tokens (method.n_ctx) is a prompt of "
                            f"{over[0][1]} tokens, more than CLIP's {self.clip.context_length}: it would lose its "
                            f"class name; give fewer context tokens or a shorter class name")
        tokens = self.clip.tokenize(texts)
        tokens = tokens[:, :cut_length(tokens)].to(model.token_embedding.weight.device)
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

        `ctx`: (n, d) shared, (C, n, d) per class, (B, 1, n, d) per instance, (B, C, n, d) per instance and class.
        `deep[j]`: context of the same kinds of shape that replaces the previous one before layer j + 1.
        """
        model, C = self.clip.model, self.num_classes
        batch = ctx.shape[0] if ctx.dim() == 4 else None
        lead = (batch, C) if batch is not None else (C,)
        ctx = ctx.expand(*lead, *ctx.shape[-2:])
        prefix = self.prefix.expand(*lead, *self.prefix.shape[1:])
        suffix = self.suffix.expand(*lead, *self.suffix.shape[1:])
        x = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=-2)
        x = x.reshape(-1, *x.shape[-2:]) + model.positional_embedding[: x.shape[-2]]
        tokens = self.tokens.repeat(batch or 1, 1)
        n = self.n_ctx
        handles = []
        for j, d in enumerate(deep or []):
            def replace(h: torch.Tensor, d=d) -> torch.Tensor:
                d = d.expand(*lead, n, h.shape[-1]).reshape(-1, n, h.shape[-1]).to(h.dtype)
                return torch.cat([h[:, :1], d, h[:, 1 + n:]], dim=1)

            handles.append(_replace_input(model.transformer.resblocks[j + 1], replace))
        with _hooked(*handles):
            feats = text_tower(model, x, tokens)
        return feats.reshape(*lead, -1)


def init_context(clip: FrozenClip, n_ctx: int, init: Optional[str], std: float = 0.02,
                 classes: int = 0) -> tuple[torch.Tensor, str]:
    """Context vectors from the embeddings of the first n_ctx words of `init`, and the suffix template.

    As in CoOp/MaPLe, init words beyond n_ctx stay in the prompt as fixed text: MaPLe's n_ctx 2 with
    "a photo of a" learns "a photo" and keeps "of a {class}.". Without `init`: N(0, std) and "{}.".
    With `classes`, one context per class, (classes, n_ctx, width): each a copy of the init words, or
    drawn at random in one (classes, n_ctx, width) draw, as CoOp draws its class-specific contexts.
    """
    model = clip.model
    words = init.split() if init else []
    if not words:
        return torch.randn(*([classes] if classes else []), n_ctx, clip.text_width) * std, "{}."
    if len(words) < n_ctx:
        raise UserError(f"method.ctx_init '{init}' has {len(words)} words, fewer than the {n_ctx} context tokens "
                        f"asked for: give as many words, fewer tokens, or ctx_init='' (a random start)")
    tokens = clip.tokenize([" ".join(words[:n_ctx])])[0]
    ids = tokens[1: int(tokens.argmax())]
    if len(ids) != n_ctx:
        raise UserError(f"method.ctx_init '{init}': its first {n_ctx} words are {len(ids)} tokens for this CLIP, "
                        f"not {n_ctx}: use words that are one token each, or ctx_init='' (a random start)")
    with torch.no_grad():
        ctx = model.token_embedding(ids.to(model.token_embedding.weight.device)).float().clone()
    kept = [w.replace("{", "{{").replace("}", "}}") for w in words[n_ctx:]]  # text, not format fields
    return ctx.repeat(classes, 1, 1) if classes else ctx, " ".join(kept + ["{}."])


def deep_prompts(count: int, n_ctx: int, width: int, std: float = 0.02) -> list[nn.Parameter]:
    """`count` prompts of (n_ctx, width), each drawn N(0, std) in order, as the reference code draws them."""
    prompts = [nn.Parameter(torch.empty(n_ctx, width)) for _ in range(count)]
    for p in prompts:
        nn.init.normal_(p, std=std)
    return prompts


def encode_image(clip: FrozenClip, images: torch.Tensor, hook: Optional[VisionHook] = None) -> torch.Tensor:
    """Projected image features through open_clip's `visual` forward, with deep visual prompts from `hook`.

    `hook(i, tokens)` is called before block i with the block's visual tokens (prompts removed; for
    i = 0, the embeddings before `ln_pre`); a tensor return replaces the prompt tokens, None keeps the
    previous ones (or none yet).
    """
    visual = clip.model.visual
    if hook is None:
        return visual(images)
    blocks = visual.transformer.resblocks
    n_visual = []

    def first(_m, _args, x: torch.Tensor) -> torch.Tensor:
        n_visual.append(x.shape[1])
        prompts = hook(0, x)
        return x if prompts is None else torch.cat([x, prompts.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)

    def later(i: int):
        def replace(x: torch.Tensor) -> torch.Tensor:
            new = hook(i, x[:, :n_visual[0]])
            return x if new is None else torch.cat([x[:, :n_visual[0]], new.expand(x.shape[0], -1, -1).to(x.dtype)], 1)

        return replace

    handles = [visual.patch_dropout.register_forward_hook(first)]
    handles += [_replace_input(blocks[i], later(i)) for i in range(1, len(blocks))]
    handles.append(blocks[-1].register_forward_hook(lambda _m, _a, x: x[:, :n_visual[0]]))
    with _hooked(*handles):
        out = visual(images)
    return out[0] if isinstance(out, tuple) else out
