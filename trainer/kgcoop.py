"""KgCoOp (Yao et al., CVPR 2023): CoOp kept close to the hand-crafted prompt's knowledge.

loss = CE + w * (1 - mean_c cos(learned class feature_c, frozen feature of the dataset's
hand-crafted prompt for c)); the context is CoOp's (n_ctx 4, init "a photo of a").
"""

from __future__ import annotations

import torch.nn.functional as F

from trainer.coop import CoOp
from trainer.method import register


@register("kgcoop")
class KgCoOp(CoOp):
    def __init__(self, clip, classnames, template, n_ctx: int = 4, ctx_init: str = "a photo of a", w: float = 8.0):
        super().__init__(clip, classnames, template, n_ctx=n_ctx, ctx_init=ctx_init)
        self.w = w
        self.register_buffer("frozen_text", self.handcrafted_features(), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.frozen_text = self.handcrafted_features()

    def loss(self, images, labels, scp=None, scp_mask=None):
        text = self.class_features()
        image = self.frozen_image_features(images)
        logits = self.cosine_logits(image, text)
        consistency = 1 - (F.normalize(text.float(), dim=-1) * self.frozen_text).sum(-1).mean()
        return F.cross_entropy(logits, labels) + self.w * consistency, logits
