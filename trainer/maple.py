"""MaPLe (Khattak et al., CVPR 2023): coupled deep vision-language prompts.

Text context (n_ctx tokens, init from the first n_ctx words of ctx_init; the remaining words
stay as fixed text, the reference's quirk) and deep text prompts for layers 1..depth-1 replace
the previous layer's context tokens. Each layer's visual prompts are a linear map (d_t -> d_v)
of that layer's text prompts, appended to the vision sequence and replaced likewise.
`depth: 0` removes every prompt: the model is then zero-shot CLIP with the "ctx_init {class}." prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.method import PromptMethod, register
from trainer.surgery import PromptedText, encode_image, init_context


@register("maple")
class MaPLe(PromptMethod):
    def __init__(self, clip, classnames, template, n_ctx: int = 2, ctx_init: str = "a photo of a", depth: int = 9):
        super().__init__(clip, classnames, template)
        model = clip.model
        layers = min(len(model.visual.transformer.resblocks), len(model.transformer.resblocks))
        self.depth = min(depth, layers)
        ctx, suffix = init_context(clip, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(clip, classnames, n_ctx, suffix)
        d_t, d_v = ctx.shape[-1], model.visual.conv1.out_channels
        self.deep_text = nn.ParameterList([nn.Parameter(torch.randn(n_ctx, d_t) * 0.02)
                                           for _ in range(max(self.depth - 1, 0))])
        self.to_visual = nn.ModuleList([nn.Linear(d_t, d_v) for _ in range(self.depth)])

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def forward(self, images, scp=None, scp_mask=None):
        layer_ctx = [self.ctx, *self.deep_text]

        def hook(i, _tokens):
            return self.to_visual[i](layer_ctx[i])[None] if i < self.depth else None

        image = encode_image(self.clip, images, hook if self.depth else None)
        text = self.once_in_eval(lambda: self.text(self.ctx, list(self.deep_text)))
        return self.cosine_logits(image, text)
