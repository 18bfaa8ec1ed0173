"""CoOp (Zhou et al., IJCV 2022): learnable context vectors shared by all classes.

Prompt = "<SOT> ctx_1..ctx_n <class name>. <EOT>"; class features come from the frozen text
encoder; logits are scaled cosine similarities with the frozen image features. With
`ctx_init: "a photo of a"` and n_ctx 4, the untrained model equals zero-shot CLIP with that
prompt. `csc: true` learns one context per class (CoOp's class-specific variant), each class
starting from its own copy of the init words or from its own random draw (drawn as CoOp draws
them); CoOp's code applies CSC to a random start only and keeps one shared context when init
words are given, so its published CSC runs (random start, COOP.md) are the same here. The class
token sits at the end (CoOp's default position). No hand-crafted feature enters CoOp (its
`template_table` names CoOp's zero-shot table, which it never reads).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mugcp.core.errors import UserError
from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import MethodConfig, PromptMethod


class ContextConfig(MethodConfig):
    """The learnable text context every CoOp-style method starts from."""

    n_ctx: int = Field(4, ge=1, description="context tokens")
    ctx_init: str = Field("a photo of a", description="words that initialise the context ('' = random N(0, 0.02))")


@register("coop")
class CoOp(PromptMethod):
    class Config(ContextConfig):
        csc: bool = Field(False, description="class-specific context (cannot transfer to novel classes)")

    schedule = {"epochs": 200, "lr": 0.002, "batch_size": 32}  # `vit_b16_ctxv1.yaml` (ImageNet: 50, below)
    template_table = "coop"
    reference_code = "KaiyangZhou/CoOp, trainers/coop.py"
    # its `prompt_learner` also saves the embeddings of the class prompts it was trained with (checked on import)
    reference_frozen = reference_holds = ("token_prefix", "token_suffix")

    @classmethod
    def reference_name(cls, key):
        return "ctx" if key == "ctx" else None

    @classmethod
    def reference_config(cls, weights):
        """The context's length, and whether it is one per class ((classes, n_ctx, d): csc)."""
        ctx = weights["ctx"]
        return [f"method.n_ctx={ctx.shape[-2]}", f"method.csc={str(ctx.dim() == 3).lower()}"]

    @classmethod
    def reference_overrides(cls, protocol: str, dataset: str, shots: int) -> list[str]:
        """ImageNet trains 50 epochs in every setting (base-to-novel: `scripts/cocoop/base2new_train.sh`
        names `vit_b16_ep50_ctxv1` for CoOp on ImageNet; the transfer source run: `scripts/cocoop/xd_train.sh`).
        Few-shot elsewhere: COOP.md's 50 epochs for 1 shot, 100 for 2 and 4, the default 200 for 8 and 16,
        with COOP.md's context (`scripts/coop/main.sh DATASET CFG end 16 SHOTS False`: 16 vectors drawn at
        random, no init words); the other settings keep "a photo of a"."""
        if protocol == "b2n":
            return ["optim.epochs=50"] if dataset == "imagenet" else []
        epochs = 50 if dataset == "imagenet" or shots == 1 else 100 if shots in (2, 4) else None
        context = ["method.n_ctx=16", "method.ctx_init=''"] if protocol == "fewshot" else []
        return ([f"optim.epochs={epochs}"] if epochs else []) + context

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        self.learn_context(per_class=config.csc)
        self.trained_classnames = list(classnames)

    def set_classnames(self, classnames):
        if self.ctx.dim() == 3 and list(classnames) != self.trained_classnames:  # one context per trained class
            raise UserError("CoOp with class-specific context (csc) cannot be evaluated on other classes than it "
                            "was trained on, in their order")
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def class_features(self) -> torch.Tensor:
        return self.text(self.ctx)

    def forward(self, images):
        with torch.no_grad():
            image = self.clip.model.encode_image(images)
        return self.cosine_logits(image, self.once_in_eval(self.class_features))
