"""CoCoOp (Zhou et al., CVPR 2022): context conditioned on each image through a small meta-net.

meta-net: Linear(D -> D/16) -> ReLU -> Linear(D/16 -> d_t) maps the normalised frozen image
feature to a bias pi added to every context token, so every image has its own prompts. The
reference loops over images in Python (one text pass per image); here all B x C prompts of a
batch go through the text tower in one batched pass, cut at the longest EOT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.method import PromptMethod, register
from trainer.surgery import PromptedText, init_context


@register("cocoop")
class CoCoOp(PromptMethod):
    def __init__(self, clip, classnames, template, n_ctx: int = 4, ctx_init: str = "a photo of a",
                 meta_ratio: int = 16):
        super().__init__(clip, classnames, template)
        ctx, suffix = init_context(clip, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(clip, classnames, n_ctx, suffix)
        embed, width = clip.embed_dim, ctx.shape[-1]
        self.meta_net = nn.Sequential(nn.Linear(embed, embed // meta_ratio), nn.ReLU(inplace=True),
                                      nn.Linear(embed // meta_ratio, width))

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def forward(self, images, scp=None, scp_mask=None):
        with torch.no_grad():
            image = F.normalize(self.clip.model.encode_image(images).float(), dim=-1)
        bias = self.meta_net(image)  # (B, d_t)
        ctx = self.ctx[None, None] + bias[:, None, None, :]  # (B, 1, n_ctx, d_t)
        return self.cosine_logits(image, self.text(ctx))  # text: (B, C, D), one batched pass
