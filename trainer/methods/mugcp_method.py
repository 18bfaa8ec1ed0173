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
  the "topological consistency" of the paper, read as KgCoOp / PromptSRC-style terms. The
  hand-crafted prompts are CoOp's zero-shot table (`template_table = "coop"`): the paper
  publishes no template table, and this is the one its zero-shot baseline uses.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.methods.coop import ContextConfig
from mugcp.trainer.surgery import PromptedText, encode_image, init_context


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
    class Config(ContextConfig):
        depth: int = Field(9, ge=1, description="prompted layers in both towers (capped at the model's depth)")
        n_vcp: int = Field(4, ge=1, description="visual conditional prompt tokens per layer")
        heads: int = Field(8, ge=1, description="heads of the AMG cross-attention")
        fusion: Literal["feature", "input"] = Field("feature", description="feature (fast, default) or input "
                                                    "(faithful, one text pass per image x class)")
        w_text: float = Field(8.0, ge=0, description="weight of 1 - cos(class features, frozen hand-crafted ones)")
        w_image: float = Field(1.0, ge=0, description="weight of 1 - cos(image features, frozen image features)")

    # prompt depth and lr as MaPLe's, the method it extends; a reference-style short schedule
    schedule = {"epochs": 5, "lr": 0.0035, "batch_size": 4}
    reads = ("scp",)
    template_table = "coop"

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        d_t, d_v, embed = clip.text_width, clip.vision_width, clip.embed_dim
        self.depth, self.fusion = min(config.depth, clip.depth), config.fusion
        heads = config.heads if d_v % config.heads == 0 else 1
        ctx, suffix = init_context(clip, config.n_ctx, config.ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(clip, classnames, config.n_ctx, suffix)
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(config.n_ctx, d_t) * 0.02) for _ in range(self.depth - 1)])
        self.amg = AMG(embed, d_v, self.depth, config.n_vcp, heads)
        self.fuse = nn.Sequential(nn.Linear(2 * d_v, d_v), nn.GELU(),
                                  nn.Linear(d_v, d_t if config.fusion == "input" else embed))
        self.fuse_gate = nn.Parameter(torch.zeros(1))

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

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
        image, instance = self.encode_image(images, scp, scp_mask)
        return image, self.class_features(instance, shared)

    def forward(self, images, *, scp, scp_mask):
        image, text = self.features(images, scp, scp_mask)
        return self.cosine_logits(image, text)

    def loss(self, images, labels, *, scp, scp_mask):
        # One pass over the C shared prompts serves both the feature-level fusion and the text term.
        w_text, w_image = self.config.w_text, self.config.w_image
        shared = self.shared_class_features() if self.fusion == "feature" or w_text else None
        image, text = self.features(images, scp, scp_mask, shared)
        logits = self.cosine_logits(image, text)
        loss = F.cross_entropy(logits, labels)
        if w_text:
            shared = F.normalize(shared.float(), dim=-1)
            loss = loss + w_text * (1 - (shared * self.handcrafted).sum(-1)).mean()
        if w_image:
            frozen = self.frozen_image_features(images)
            loss = loss + w_image * (1 - (F.normalize(image.float(), dim=-1) * frozen).sum(-1)).mean()
        return loss, logits
