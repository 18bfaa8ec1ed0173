"""CoCoOp (Zhou et al., CVPR 2022): context conditioned on each image through a small meta-net.

meta-net: Linear(D -> D/16) -> ReLU -> Linear(D/16 -> d_t) maps the normalised frozen image
feature to a bias pi added to every context token, so every image has its own prompts. The
reference loops over images in Python (one text pass per image); here all B x C prompts of a
batch go through the text tower in one batched pass, cut at the longest EOT. No hand-crafted
feature enters CoCoOp (its `template_table` names CoOp's zero-shot table, which it never reads).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mugcp.core.errors import UserError
from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.methods.coop import ContextConfig


@register("cocoop")
class CoCoOp(PromptMethod):
    class Config(ContextConfig):
        meta_ratio: int = Field(16, ge=1, description="meta-net hidden width = D / meta_ratio")

    schedule = {"epochs": 10, "lr": 0.002, "batch_size": 1}  # reference; batching makes larger batches cheap
    template_table = "coop"
    reference_code = "KaiyangZhou/CoOp, trainers/cocoop.py"
    reference_frozen = reference_holds = ("token_prefix", "token_suffix")

    @classmethod
    def reference_name(cls, key):
        """Its `prompt_learner`: `ctx`, and `meta_net.linear1` / `linear2` around the ReLU (our Sequential's 0 and 2)."""
        if key == "ctx":
            return key
        m = re.fullmatch(r"meta_net\.linear([12])\.(weight|bias)", key)
        return f"meta_net.{0 if m[1] == '1' else 2}.{m[2]}" if m else None

    @classmethod
    def reference_config(cls, weights):
        hidden = weights["meta_net.0.weight"]  # (D / meta_ratio, D)
        return [f"method.n_ctx={weights['ctx'].shape[-2]}", f"method.meta_ratio={max(1, hidden.shape[1] // hidden.shape[0])}"]

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        self.learn_context()
        embed, hidden = clip.embed_dim, clip.embed_dim // config.meta_ratio
        if hidden < 1:
            raise UserError(f"method.meta_ratio={config.meta_ratio} leaves the meta-net no hidden unit: its width is "
                            f"CLIP's {embed} divided by it; give at most {embed}")
        self.meta_net = nn.Sequential(nn.Linear(embed, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.ctx.shape[-1]))

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def forward(self, images):
        with torch.no_grad():
            image = F.normalize(self.clip.model.encode_image(images).float(), dim=-1)
        bias = self.meta_net(image.to(self.ctx.dtype))  # (B, d_t)
        ctx = self.ctx[None, None] + bias[:, None, None, :]  # (B, 1, n_ctx, d_t)
        return self.cosine_logits(image, self.text(ctx))  # text: (B, C, D), one batched pass
