"""MuGCP (arXiv 2507.08410): prompts conditioned on what an MLLM says about each image.

Inputs per image: SCP, K phrase features from stage one (frozen CLIP text encoder), and a mask.

- **SCP projector**: Linear(D -> d_v) maps phrase features into the vision width.
- **AMG** at each of the first `depth` vision layers j (capped at the tower's depth):
  1. grounding: semantic tokens attend to layer j's visual tokens (the image grounds the text);
  2. guidance: `n_vcp` learnable queries of layer j attend to the grounded semantic tokens
     (plus one always-valid learnable null token, so an image with no usable phrase still works);
  VCP_j = queries_j + gate_j * guidance. VCP_j replaces layer j-1's prompt tokens (deep prompts).
  Choice where the paper is open: the two attention blocks are shared across layers (each layer
  has its own queries and gate), which keeps AMG at ~2 attention blocks of parameters.
- **MPF**: learnable context (n_ctx, init "a photo of a") + deep text prompts for layers
  1..depth-1; the image's pooled grounded SCP and mean VCP (last prompted layer) are fused by
  an MLP into an instance shift, scaled by a zero-initialised gate. Two modes:
  - `fusion: input` (faithful): the shift is added to every context token, so each image gets
    its own prompts: one text pass over B x C sequences with gradients through every text
    layer (ViT-B/16, 1,000 classes, batch 4: 4,000 sequences; time and memory in bench/RESULTS.md);
  - `fusion: feature` (fast, default): class features are computed once per step from the
    shared prompts and the shift is added in the joint space, (B, C, D) at no text-encoder cost:
    1,000 classes at batch 4 cost one text pass of 1,000 sequences, as in CoOp/MaPLe; that
    pass also serves the text consistency term, and in eval it is computed once per split.
- **Zero initialisation**: every gate starts at 0, so at step 0 the model is the plain
  context-prompt model (learnable text context and deep prompts, static visual queries) and its
  output does not depend on SCP; training opens the gates.
- **Losses**: CE on scaled cosine logits + `w_text` x (1 - cos(prompted class features,
  frozen hand-crafted ones)) + `w_image` x (1 - cos(prompted image features, frozen ones)):
  the "topological consistency" of the paper, read as KgCoOp / PromptSRC-style terms.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.method import PromptMethod, register
from trainer.surgery import PromptedText, encode_image, init_context


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: queries attend to keys (padding mask True = ignore)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        kv = self.ln_kv(kv)
        out, _ = self.attn(self.ln_q(q), kv, kv, key_padding_mask=pad, need_weights=False)
        return out


class AMG(nn.Module):
    """Attention mutual-guidance: per prompted layer, SCP <-> visual tokens, producing that layer's VCP."""

    def __init__(self, scp_dim: int, width: int, depth: int, n_vcp: int, heads: int):
        super().__init__()
        self.project = nn.Linear(scp_dim, width)
        self.ground = CrossAttention(width, heads)
        self.guide = CrossAttention(width, heads)
        self.queries = nn.Parameter(torch.randn(depth, n_vcp, width) * 0.02)
        self.null = nn.Parameter(torch.zeros(1, 1, width))
        self.gates = nn.Parameter(torch.zeros(depth))

    def layer(self, j: int, visual: torch.Tensor, semantic: torch.Tensor, pad: torch.Tensor):
        """(grounded semantic tokens, VCP) of layer j for visual tokens (B, L, w)."""
        grounded = semantic + self.ground(semantic, visual)
        keys = torch.cat([self.null.expand(grounded.shape[0], -1, -1), grounded], dim=1)
        keys_pad = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1)
        queries = self.queries[j].expand(visual.shape[0], -1, -1)
        vcp = queries + self.gates[j] * self.guide(queries, keys, keys_pad)
        return grounded, vcp


@register("mugcp")
class MuGCP(PromptMethod):
    uses_scp = True

    def __init__(self, clip, classnames, template, n_ctx: int = 4, ctx_init: str = "a photo of a",
                 depth: int = 9, n_vcp: int = 4, heads: int = 8, fusion: str = "feature",
                 w_text: float = 8.0, w_image: float = 1.0):
        super().__init__(clip, classnames, template)
        if fusion not in ("feature", "input"):
            raise ValueError(f"fusion must be 'feature' or 'input', not {fusion!r}")
        if depth < 1:
            raise ValueError("MuGCP needs at least one prompted layer (depth >= 1)")
        model = clip.model
        d_t = model.token_embedding.weight.shape[1]
        d_v = model.visual.conv1.out_channels
        embed = clip.embed_dim
        layers = min(len(model.visual.transformer.resblocks), len(model.transformer.resblocks))
        self.depth, self.fusion, self.w_text, self.w_image = min(depth, layers), fusion, w_text, w_image
        heads = heads if d_v % heads == 0 else 1
        ctx, suffix = init_context(clip, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(clip, classnames, n_ctx, suffix)
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, d_t) * 0.02) for _ in range(self.depth - 1)])
        self.amg = AMG(embed, d_v, self.depth, n_vcp, heads)
        self.fuse = nn.Sequential(nn.Linear(2 * d_v, d_v), nn.GELU(), nn.Linear(d_v, d_t if fusion == "input" else embed))
        self.fuse_gate = nn.Parameter(torch.zeros(1))
        self.register_buffer("frozen_text", self.handcrafted_features(), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)
        self.frozen_text = self.handcrafted_features()

    # -- vision side: AMG inside the frozen ViT ----------------------------------------------------
    def encode_image(self, images, scp, scp_mask):
        semantic = self.amg.project(scp.to(images.dtype))
        pad = ~scp_mask.bool()
        state = {}

        def hook(i, visual):
            if i >= self.depth:
                return None
            state["grounded"], state["vcp"] = self.amg.layer(i, visual, semantic, pad)
            return state["vcp"]

        feats = encode_image(self.clip, images, hook)
        valid = scp_mask.float().unsqueeze(-1)
        pooled_scp = (state["grounded"] * valid).sum(1) / valid.sum(1).clamp(min=1)
        return feats, torch.cat([pooled_scp, state["vcp"].mean(1)], dim=-1)

    # -- text side: MPF -----------------------------------------------------------------------------
    def shared_class_features(self) -> torch.Tensor:
        """(C, D) features of the shared prompts (context + deep text prompts), one text pass."""
        return self.text(self.ctx, list(self.deep_text))

    def class_features(self, instance: Optional[torch.Tensor] = None,
                       shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, D) without an instance; (B, C, D) with one. `shared`: already computed shared features."""
        if self.fusion == "input" and instance is not None:
            shift = self.fuse_gate * self.fuse(instance)  # (B, d_t)
            ctx = self.ctx + shift[:, None, None, :]  # (B, 1, n_ctx, d_t)
            return self.text(ctx, [d[None, None] for d in self.deep_text])
        feats = self.once_in_eval(self.shared_class_features) if shared is None else shared
        if instance is None:
            return feats
        shift = self.fuse_gate * self.fuse(instance)  # (B, D)
        return F.normalize(feats, dim=-1)[None] + shift[:, None, :]

    def features(self, images, scp, scp_mask, shared: Optional[torch.Tensor] = None):
        if scp is None:
            raise ValueError("MuGCP needs the stage-one SCP tensors of every image")
        image, instance = self.encode_image(images, scp, scp_mask)
        return image, self.class_features(instance, shared)

    def forward(self, images, scp=None, scp_mask=None):
        image, text = self.features(images, scp, scp_mask)
        return self.cosine_logits(image, text)

    def loss(self, images, labels, scp=None, scp_mask=None):
        # One pass over the C shared prompts serves both the feature-level fusion and the text term.
        shared = self.shared_class_features() if self.fusion == "feature" or self.w_text else None
        image, text = self.features(images, scp, scp_mask, shared)
        logits = self.cosine_logits(image, text)
        loss = F.cross_entropy(logits, labels)
        if self.w_text:
            shared = F.normalize(shared.float(), dim=-1)
            loss = loss + self.w_text * (1 - (shared * self.frozen_text).sum(-1)).mean()
        if self.w_image:
            frozen = self.frozen_image_features(images)
            loss = loss + self.w_image * (1 - (F.normalize(image.float(), dim=-1) * frozen).sum(-1)).mean()
        return loss, logits
