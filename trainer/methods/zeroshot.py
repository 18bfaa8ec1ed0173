"""Zero-shot CLIP, the baseline every table starts from: the dataset's hand-crafted template, nothing learned."""

from __future__ import annotations

from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod


@register("zeroshot")
class ZeroShot(PromptMethod):
    trains = False

    def forward(self, images):
        return self.cosine_logits(self.frozen_image_features(images), self.handcrafted)
