"""CoOp (Zhou et al., IJCV 2022): learnable context vectors shared by all classes.

Prompt = "<SOT> ctx_1..ctx_n <class name>. <EOT>"; class features come from the frozen text
encoder; logits are scaled cosine similarities with the frozen image features. With
`ctx_init: "a photo of a"` and n_ctx 4, the untrained model equals zero-shot CLIP with that
prompt. `csc: true` learns one context per class (CoOp's class-specific variant); the class
token sits at the end (CoOp's default position).
"""

from __future__ import annotations

import torch
from torch import nn

from mugcp.errors import UserError
from trainer.method import PromptMethod, register
from trainer.surgery import PromptedText, init_context


@register("coop")
class CoOp(PromptMethod):
    def __init__(self, clip, classnames, template, n_ctx: int = 4, ctx_init: str = "a photo of a",
                 csc: bool = False):
        super().__init__(clip, classnames, template)
        ctx, suffix = init_context(clip, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx.repeat(len(classnames), 1, 1) if csc else ctx)
        self.text = PromptedText(clip, classnames, n_ctx, suffix)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        if self.ctx.dim() == 3 and self.ctx.shape[0] != len(classnames):
            raise UserError("CoOp with class-specific context (csc) cannot be evaluated on other classes")
        self.text.set_classnames(classnames)

    def class_features(self) -> torch.Tensor:
        return self.text(self.ctx)

    def forward(self, images, scp=None, scp_mask=None):
        with torch.no_grad():
            image = self.clip.model.encode_image(images)
        return self.cosine_logits(image, self.once_in_eval(self.class_features))
