"""Zero-shot CLIP, the baseline every table starts from: the dataset's hand-crafted prompt, nothing learned.

The prompt is CoOp's zero-shot table (`trainers/zsclip.py` of KaiyangZhou/CoOp, which MaPLe's and
PromptSRC's repositories repeat): DTD "{} texture.", EuroSAT "a centered satellite photo of {}.", ...
"""

from __future__ import annotations

from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod


@register("zeroshot")
class ZeroShot(PromptMethod):
    trains = False
    template_table = "coop"

    def forward(self, images):
        return self.cosine_logits(self.frozen_image_features(images), self.handcrafted)
