"""KgCoOp (Yao et al., CVPR 2023): CoOp kept close to the hand-crafted prompt's knowledge.

loss = CE + w * (1 - mean_c cos(learned class feature_c, frozen feature of the dataset's
hand-crafted prompt for c)); the context is CoOp's (n_ctx 4, init "a photo of a").
The hand-crafted prompts are KgCoOp's own table (`CUSTOM_TEMPLATES` of its `trainers/kgcoop.py`),
not CoOp's zero-shot one: for DTD "a photo of a {}, a type of texture." rather than "{} texture.".
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from mugcp.trainer.methods import register
from mugcp.trainer.methods.coop import CoOp


@register("kgcoop")
class KgCoOp(CoOp):
    class Config(CoOp.Config):
        w: float = Field(8.0, ge=0, description="weight of 1 - cos(learned, hand-crafted class features)")

    schedule = {"epochs": 100, "lr": 0.002, "batch_size": 128}
    template_table = "kgcoop"
    reference_code = "htyao89/KgCoOp, KgCoOp/trainers/kgcoop.py"
    # its prompt learner also holds a `bias_vectors` and a `meta_net` that its forward never reads and its
    # trainer freezes (only names holding "ctx" train)
    reference_frozen = ("token_prefix", "token_suffix", "bias_vectors", "meta_net.linear1.")
    reference_holds = ("token_prefix", "token_suffix", "bias_vectors")  # bias_vectors: a CoOp checkpoint is not KgCoOp's

    @classmethod
    def reference_overrides(cls, protocol: str, dataset: str, shots: int) -> list[str]:
        """None: KgCoOp's own config serves every setting. Its repository's few-shot script
        (`scripts/xd_train.sh`: 4 shots, all classes) trains with the same config file as its
        base-to-novel runs (`vit_b16_ep100_ctxv1.yaml`: 100 epochs, lr 0.002, batch 128); CoOp's
        per-shot epochs are CoOp's own."""
        return []

    def loss(self, images, labels):
        text = self.class_features()
        logits = self.cosine_logits(self.frozen_image_features(images), text)
        consistency = 1 - (F.normalize(text.float(), dim=-1) * self.handcrafted).sum(-1).mean()
        return F.cross_entropy(logits, labels) + self.config.w * consistency, logits
