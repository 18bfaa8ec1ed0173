"""MuGCP (arXiv 2507.08410): prompts conditioned on what an MLLM says about each image.

Inputs per image: SCP, K phrase features from stage one (frozen CLIP text encoder), and a mask.

- **SCP projector**: Linear(D -> d_v) maps phrase features into the vision width.
- **AMG** (`amg`) at each of the first `depth` vision layers j (capped at the tower's depth):
  1. grounding: semantic tokens attend to layer j's visual tokens (the image grounds the text);
  2. guidance: `n_vcp` learnable queries of layer j attend to the grounded semantic tokens
     (plus one always-valid learnable null token, so an image with no usable phrase still works);
  VCP_j = queries_j + gate_j * guidance. VCP_j replaces layer j-1's prompt tokens (deep prompts).
  Choice where the paper is open: the two attention blocks are shared across layers (each layer
  has its own queries and gate), which keeps AMG at ~2 attention blocks of parameters.
  `amg: false` (ablation): no attention; the VCP are the static queries and the semantic tokens
  stay ungrounded, so SCP reaches the model only through MPF.
- **MPF** (`mpf`): learnable context (n_ctx, init "a photo of a") + deep text prompts for layers
  1..depth-1. Each prompted layer j yields an instance vector m_j = [pooled grounded SCP_j,
  mean VCP_j]; one MLP (`fuse`) maps it to a shift, scaled by a per-layer gate. The guidance is
  mutual across both encoders: SCP guides the vision prompts (AMG), and the grounded SCP and VCP
  of vision layer j guide the text prompts. Two modes:
  - `fusion: input`: layer 0's shift is added to every context token and layer j's to the deep
    text prompts replacing layer j's, so the text tower reads the image at every prompted layer:
    one text pass over B x C instance prompts with gradients through every text layer (ViT-B/16,
    1,000 classes, batch 4: 4,000 sequences, cut at the longest EOT like every text pass here).
    `instance_chunk` > 0 runs them that many images at a time and recomputes their activations in
    the backward pass (torch checkpointing): activation memory of `instance_chunk` x C sequences
    instead of B x C, for about half again the text compute (the forward runs twice; the weights
    are frozen, so the backward costs about one forward).
  - `fusion: feature`: class features are computed once per step from the shared prompts and the
    last prompted layer's shift is added in the joint space, (B, C, D) at no text-encoder cost:
    1,000 classes at batch 4 cost one text pass of 1,000 sequences, as in CoOp/MaPLe; that pass
    also serves the text consistency term, and in eval it is computed once per split. The text
    tower itself never sees the image in this mode.
  Which is the default was decided on the built-in world and a worked cost estimate at ImageNet
  scale (README, "MuGCP's fusion: evidence and cost"). `mpf: false` (ablation): the class
  features are those of the shared prompts, and SCP reaches the model only through AMG.
- **Zero initialisation**: every gate starts at `gate_init` (0 by default), so at step 0 the
  model is the plain context-prompt model (learnable text context and deep prompts, static
  visual queries) and its output does not depend on SCP; training opens the gates. That takes
  training: on the built-in world with SCP of colours CLIP cannot see, MuGCP reads SCP after 20
  epochs and not after 5 (240 steps at batch 8, the gates starting at 0 or 0.1; 480 steps at the
  reference batch 4; world/README.md, "Why").
- **Losses**: CE on scaled cosine logits + `w_text` x (1 - cos(prompted class features,
  frozen hand-crafted ones)) + `w_image` x (1 - cos(prompted image features, frozen ones)):
  the "topological consistency" of the paper, read as KgCoOp / PromptSRC-style terms. The
  hand-crafted prompts are CoOp's zero-shot table (`template_table = "coop"`): the paper
  publishes no template table, and this is the one its zero-shot baseline uses.

With `amg: false` and `mpf: false` SCP is not read at all: the model is independent deep
vision-language prompts. The SCP controls (shuffled, zeros) are not options of the method but of
where its conditions come from (`conditions.scp`, trainer/conditions.py).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.methods.coop import ContextConfig
from mugcp.trainer.surgery import encode_image


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

    def __init__(self, scp_dim: int, width: int, depth: int, n_vcp: int, heads: int, attend: bool, gate_init: float):
        super().__init__()
        self.project = nn.Linear(scp_dim, width)
        self.queries = nn.Parameter(torch.randn(depth, n_vcp, width) * 0.02)
        self.attend = attend
        if attend:
            self.ground = CrossAttention(width, heads)
            self.guide = CrossAttention(width, heads)
            self.null = nn.Parameter(torch.zeros(1, 1, width))
            self.gates = nn.Parameter(torch.full((depth,), gate_init))

    def layer(self, j: int, visual: torch.Tensor, semantic: torch.Tensor, pad: torch.Tensor):
        """(grounded semantic tokens, VCP) of layer j for visual tokens (B, L, w)."""
        queries = self.queries[j].expand(visual.shape[0], -1, -1)
        if not self.attend:
            return semantic, queries
        grounded = semantic + self.ground(semantic, visual)
        keys = torch.cat([self.null.expand(grounded.shape[0], -1, -1), grounded], dim=1)
        keys_pad = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1)
        vcp = queries + self.gates[j] * self.guide(queries, keys, keys_pad)
        return grounded, vcp


@register("mugcp")
class MuGCP(PromptMethod):
    class Config(ContextConfig):
        depth: int = Field(9, ge=1, description="prompted layers in both towers (capped at the model's depth)")
        n_vcp: int = Field(4, ge=1, description="visual conditional prompt tokens per layer")
        heads: int = Field(8, ge=1, description="heads of the AMG cross-attention")
        amg: bool = Field(True, description="AMG: SCP and visual tokens guide each other per layer (false: static "
                                            "visual prompts)")
        mpf: bool = Field(True, description="MPF: grounded SCP and VCP fused into the text side (false: shared "
                                            "text prompts)")
        fusion: Literal["feature", "input"] = Field("feature", description="feature (shift in the joint space, one "
                                                    "text pass of C) or input (instance text prompts, B x C)")
        gate_init: float = Field(0.0, description="initial value of every gate (0: step 0 is the plain context-prompt "
                                                  "model)")
        instance_chunk: int = Field(0, ge=0, description="fusion input: images per text pass, activations "
                                                         "recomputed in backward (0: all at once)")
        w_text: float = Field(8.0, ge=0, description="weight of 1 - cos(class features, frozen hand-crafted ones)")
        w_image: float = Field(1.0, ge=0, description="weight of 1 - cos(image features, frozen image features)")

    # prompt depth and lr as MaPLe's, the method it extends; a reference-style short schedule
    schedule = {"epochs": 5, "lr": 0.0035, "batch_size": 4}
    reads = ("scp",)
    template_table = "coop"

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        d_t, d_v, embed = clip.text_width, clip.vision_width, clip.embed_dim
        self.depth, self.fusion = self.capped("depth", config.depth, clip.depth), config.fusion
        heads = self.built_as("heads", config.heads, config.heads if d_v % config.heads == 0 else 1)
        self.learn_context()
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(config.n_ctx, d_t) * 0.02) for _ in range(self.depth - 1)])
        self.amg = AMG(embed, d_v, self.depth, config.n_vcp, heads, config.amg, config.gate_init)
        if config.mpf:
            self.fuse = nn.Sequential(nn.Linear(2 * d_v, d_v), nn.GELU(),
                                      nn.Linear(d_v, d_t if config.fusion == "input" else embed))
            layers = self.depth if config.fusion == "input" else 1
            self.text_gates = nn.Parameter(torch.full((layers,), config.gate_init))

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    # -- vision side: AMG inside the frozen ViT ----------------------------------------------------
    def encode_image(self, images, scp, scp_mask):
        """(image features (B, D), instance vectors m_j (B, layers, 2 d_v)): of every prompted layer for input-level
        fusion, which shifts each layer's text prompts; of the last one only for feature-level fusion, all it reads."""
        semantic = self.amg.project(scp.to(images.dtype))
        pad = ~scp_mask.bool()
        valid = scp_mask.to(semantic.dtype).unsqueeze(-1)
        instance = []
        first = 0 if self.fusion == "input" else self.depth - 1

        def hook(i, visual):
            if i >= self.depth:
                return None
            grounded, vcp = self.amg.layer(i, visual, semantic, pad)
            if i >= first:
                pooled = (grounded * valid).sum(1) / valid.sum(1).clamp(min=1)
                instance.append(torch.cat([pooled, vcp.mean(1)], dim=-1))
            return vcp

        feats = encode_image(self.clip, images, hook)
        return feats, torch.stack(instance, dim=1)

    # -- text side: MPF -----------------------------------------------------------------------------
    def shared_class_features(self) -> torch.Tensor:
        """(C, D) features of the shared prompts (context + deep text prompts), one text pass."""
        return self.text(self.ctx, list(self.deep_text))

    def instance_class_features(self, instance: torch.Tensor) -> torch.Tensor:
        """(B, C, D): every layer's prompts shifted by its gated fused instance vector, one pass over B x C."""
        shift = self.text_gates[None, :, None] * self.fuse(instance)  # (B, depth, d_t)

        def run(shift: torch.Tensor) -> torch.Tensor:
            ctx = self.ctx + shift[:, 0, None, None, :]  # (b, 1, n_ctx, d_t)
            deep = [d[None, None] + shift[:, j + 1, None, None, :] for j, d in enumerate(self.deep_text)]
            return self.text(ctx, deep)

        chunk = self.config.instance_chunk
        if not chunk or chunk >= len(shift) or not torch.is_grad_enabled():
            return run(shift)
        return torch.cat([checkpoint(run, part, use_reentrant=False) for part in shift.split(chunk)])

    def class_features(self, instance: Optional[torch.Tensor] = None,
                       shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, D) without an instance or without MPF; (B, C, D) with one. `shared`: already computed."""
        if self.config.mpf and self.fusion == "input" and instance is not None:
            return self.instance_class_features(instance)
        feats = self.once_in_eval(self.shared_class_features) if shared is None else shared
        if instance is None or not self.config.mpf:
            return feats
        shift = self.text_gates * self.fuse(instance[:, -1])  # (B, D), from the last prompted layer
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
        needs_shared = self.fusion == "feature" or not self.config.mpf or w_text
        shared = self.shared_class_features() if needs_shared else None
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
