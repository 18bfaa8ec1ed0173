"""MaPLe (Khattak et al., CVPR 2023): coupled deep vision-language prompts.

Text context (n_ctx tokens, init from the first n_ctx words of ctx_init; the remaining words
stay as fixed text, the reference's quirk) and deep text prompts for layers 1..depth-1 replace
the previous layer's context tokens. Each layer's visual prompts are a linear map (d_t -> d_v)
of that layer's text prompts, appended to the vision sequence and replaced likewise.
`depth: 0` removes every prompt: the model is then zero-shot CLIP with the "ctx_init {class}." prompt.

Initialisation follows the reference's prompt learner draw for draw: the first layer's projection
(Linear), then the deep text prompts (N(0, 0.02) each, in layer order), then one Linear whose copies
project layers 1..depth-1, so those projections all start from the same weights. The same random
state at construction gives the reference's starting point. No hand-crafted feature enters MaPLe
(its `template_table` names the zero-shot table of its repository, CoOp's, which it never reads).
Defaults are the base-to-novel config; `mugcp sweep` gives the ImageNet source run of cross-dataset
and domain generalisation the reference's own (2 epochs, lr 0.0026, depth 3: `reference_overrides`).
"""

from __future__ import annotations

import copy
import re

from pydantic import Field
from torch import nn

from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.methods.coop import ContextConfig
from mugcp.trainer.surgery import deep_prompts, encode_image


@register("maple")
class MaPLe(PromptMethod):
    class Config(ContextConfig):
        n_ctx: int = Field(2, ge=1, description="learnable context tokens ('a photo' of 'a photo of a')")
        depth: int = Field(9, ge=0, description="prompted layers (0 removes every prompt)")

    schedule = {"epochs": 5, "lr": 0.0035, "batch_size": 4}
    template_table = "coop"
    reference_half = ("ctx", "to_visual.0")  # its `proj` is halved; the deeper prompts and projections stay fp32
    reference_code = "muzairkhattak/multimodal-prompt-learning, trainers/maple.py"
    # it saves its whole CustomCLIP: the frozen towers and the class prompts' embeddings beside the prompt learner
    reference_frozen = ("prompt_learner.token_prefix", "prompt_learner.token_suffix", "image_encoder.",
                        "text_encoder.", "logit_scale")
    reference_holds = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")

    @classmethod
    def reference_name(cls, key):
        """`prompt_learner.`: `ctx`, `proj` (layer 0's visual prompts), `compound_prompts_text.i` (layer i+1's text
        prompts) and `compound_prompt_projections.i` (layer i+1's visual prompts)."""
        if key == "prompt_learner.ctx":
            return "ctx"
        if m := re.fullmatch(r"prompt_learner\.proj\.(weight|bias)", key):
            return f"to_visual.0.{m[1]}"
        if m := re.fullmatch(r"prompt_learner\.compound_prompts_text\.(\d+)", key):
            return f"deep_text.{m[1]}"
        if m := re.fullmatch(r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)", key):
            return f"to_visual.{int(m[1]) + 1}.{m[2]}"
        return None

    @classmethod
    def reference_config(cls, weights):
        deeper = sum(k.startswith("deep_text.") for k in weights)
        return [f"method.n_ctx={weights['ctx'].shape[-2]}", f"method.depth={deeper + 1}"]

    @classmethod
    def reference_overrides(cls, protocol: str, dataset: str, shots: int) -> list[str]:
        """Cross-dataset and domain generalisation: `vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml`."""
        return ["optim.epochs=2", "optim.lr=0.0026", "method.depth=3"] if protocol == "transfer" else []

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        self.depth = self.capped("depth", config.depth, clip.depth)
        self.learn_context()
        d_t, d_v = clip.text_width, clip.vision_width
        self.deep_text = nn.ParameterList()
        self.to_visual = nn.ModuleList()
        if self.depth:
            first = nn.Linear(d_t, d_v)
            self.deep_text.extend(deep_prompts(self.depth - 1, config.n_ctx, d_t))
            deeper = nn.Linear(d_t, d_v)
            self.to_visual.extend([first, *(copy.deepcopy(deeper) for _ in range(self.depth - 1))])

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def forward(self, images):
        layer_ctx = [self.ctx, *self.deep_text]

        def hook(i, _tokens):
            return self.to_visual[i](layer_ctx[i])[None] if i < self.depth else None

        image = encode_image(self.clip, images, hook if self.depth else None)
        text = self.once_in_eval(lambda: self.text(self.ctx, list(self.deep_text)))
        return self.cosine_logits(image, text)
