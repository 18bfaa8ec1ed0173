"""PromptSRC (Khattak et al., ICCV 2023): independent deep prompts that regularise themselves towards frozen CLIP.

- Prompts (the reference's independent vision-language design, no coupling between the towers):
  text context (n_ctx 4, init "a photo of a") plus deep text prompts that replace it before layers
  1..depth_text-1; visual prompts (n_ctx_vision 4) appended after the patch tokens before layer 0
  and replaced before layers 1..depth_vision-1. Deep prompts start as N(0, 0.02), drawn in the
  reference's order (vision layer 0, vision deeper layers, text deeper layers); the reference draws
  them while it builds its CLIP, so the same seed does not give its values.
- Loss, as the reference's `forward_backward`: CE on the prompted logits
  + w_text x L1(normalised prompted class features, frozen class features averaged over
    PromptSRC's 60 ImageNet templates, then normalised)
  + w_image x L1(normalised prompted image features, normalised frozen image features)
  + KL(zero-shot || prompted) over the classes, summed and divided by B x C, where the zero-shot
    logits are the frozen image features against those template-averaged text features.
  L1 is a mean over elements. The hand-crafted prompts are PromptSRC's `IMAGENET_TEMPLATES` for
  every dataset (`template_table = "imagenet60"`); they are encoded once per class set, in training only.
- Gaussian prompt aggregation (GPA): after epoch e (1-based) the learnable weights join a running
  sum with weight N(e; gpa_mean, gpa_std), normalised over the run's epochs; the finished run keeps
  the sum (prompt.safetensors, what `mugcp eval` loads). The sum is training state, checkpointed
  every epoch, so a resumed run ends with the same one. With fewer epochs than the reference's 20,
  the weights still follow the formula (most weight on the last epochs when gpa_mean is past the end).
  The reference sums its whole state dict, frozen CLIP included (weights summing to 1 leave it as it
  was, up to rounding); here only the prompts are summed.
- Defaults are the reference's base-to-novel config (`vit_b16_c2_ep20_batch4_4+4ctx.yaml`). Its
  other settings use other configs, which `mugcp sweep` and `mugcp train` (`--subsample all`, and
  `--transfer`) apply (`reference_overrides`): cross-dataset and domain generalisation
  (`..._cross_datasets.yaml`) `method.depth_text=3 method.depth_vision=3 method.gpa_mean=6
  method.gpa_std=10`; few-shot (`vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml`) `optim.epochs=50
  method.gpa_mean=30 method.gpa_std=30` (ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397)
  or `method.gpa_mean=45 method.gpa_std=5` (StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT).
- `depth_text: 1, depth_vision: 0` leaves only the text context, which at its initialisation is
  the prompt "a photo of a {class}.": the model is then zero-shot CLIP with that prompt.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mugcp.core.errors import UserError
from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod
from mugcp.trainer.methods.coop import ContextConfig
from mugcp.trainer.surgery import deep_prompts, encode_image


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """N(e; mean, std) for epochs e = 1..epochs, normalised to sum to 1. The exponents are exact (fractions of the
    floats given) and taken relative to the largest, so no mean or std overflows them or gives 0/0: a mean far
    past the end, or a std near 0, puts the weight on the nearest epoch, as the formula does in the limit."""
    m, s = Fraction(mean), Fraction(std)
    logs = [-(e - m) ** 2 / (2 * s * s) for e in range(1, epochs + 1)]
    top = max(logs)
    unnormalised = [math.exp(float(max(v - top, Fraction(-1000)))) for v in logs]  # exp(-1000) is 0.0
    total = sum(unnormalised)
    return [w / total for w in unnormalised]


@register("promptsrc")
class PromptSRC(PromptMethod):
    class Config(ContextConfig):
        n_ctx_vision: int = Field(4, ge=1, description="visual prompt tokens per layer")
        depth_text: int = Field(9, ge=1, description="text layers with prompts (1 = the context only)")
        depth_vision: int = Field(9, ge=0, description="vision layers with prompts (0 = none)")
        w_text: float = Field(25.0, ge=0, description="weight of L1(prompted, frozen template-averaged class features)")
        w_image: float = Field(10.0, ge=0, description="weight of L1(prompted, frozen image features)")
        gpa_mean: float = Field(15.0, description="mean epoch (1-based) of the Gaussian prompt aggregation")
        gpa_std: float = Field(1.0, gt=0, description="standard deviation (epochs) of the Gaussian prompt aggregation")

    schedule = {"epochs": 20, "lr": 0.0025, "batch_size": 4}
    template_table = "imagenet60"
    reference_half = ("ctx",)  # its vision prompts and deeper text prompts stay fp32, cast to half where used
    reference_code = "muzairkhattak/PromptSRC, trainers/promptsrc.py"
    # it saves its whole CustomCLIP: the frozen towers (its prompts live inside them), the class prompts'
    # embeddings and the frozen copy of the image tower its prompt learner keeps for the image L1 term
    reference_frozen = ("prompt_learner.token_prefix", "prompt_learner.token_suffix", "prompt_learner.ZS_image_encoder.",
                        "image_encoder.", "text_encoder.", "logit_scale")
    reference_holds = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")

    @classmethod
    def reference_name(cls, key):
        """`prompt_learner.ctx`; `image_encoder.VPT` (appended before layer 0) and `...resblocks.i.VPT_shallow`
        (replacing them before layer i) in each tower; the text tower's layer i prompts are our `deep_text.{i-1}`."""
        if key == "prompt_learner.ctx":
            return "ctx"
        if key == "image_encoder.VPT":
            return "vision_prompts.0"
        if m := re.fullmatch(r"(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", key):
            return f"vision_prompts.{m[2]}" if m[1] == "image" else f"deep_text.{int(m[2]) - 1}"
        return None

    @classmethod
    def reference_config(cls, weights):
        vision = [k for k in weights if k.startswith("vision_prompts.")]
        width = [f"method.n_ctx_vision={weights['vision_prompts.0'].shape[0]}"] if "vision_prompts.0" in weights else []
        return [f"method.n_ctx={weights['ctx'].shape[-2]}", *width, f"method.depth_vision={len(vision)}",
                f"method.depth_text={1 + sum(k.startswith('deep_text.') for k in weights)}"]

    @classmethod
    def reference_overrides(cls, protocol: str, dataset: str, shots: int) -> list[str]:
        if protocol == "transfer":
            return ["method.depth_text=3", "method.depth_vision=3", "method.gpa_mean=6", "method.gpa_std=10"]
        if protocol == "fewshot":
            narrow = dataset in ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")
            return ["optim.epochs=50", *(["method.gpa_mean=45", "method.gpa_std=5"] if narrow else
                                         ["method.gpa_mean=30", "method.gpa_std=30"])]
        return []

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        self.learn_context()
        depth_vision = self.capped("depth_vision", config.depth_vision, clip.depth)
        depth_text = self.capped("depth_text", config.depth_text, clip.depth)
        self.vision_prompts = nn.ParameterList(deep_prompts(depth_vision, config.n_ctx_vision, clip.vision_width))
        self.deep_text = nn.ParameterList(deep_prompts(depth_text - 1, config.n_ctx, clip.text_width))
        self._gpa: dict[str, torch.Tensor] | None = None  # the running Gaussian-weighted sum of the prompts

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.vision_prompts:
            return encode_image(self.clip, images)
        depth = len(self.vision_prompts)
        return encode_image(self.clip, images, lambda i, _tokens: self.vision_prompts[i][None] if i < depth else None)

    def class_features(self) -> torch.Tensor:
        return self.text(self.ctx, list(self.deep_text))

    def forward(self, images):
        return self.cosine_logits(self.image_features(images), self.once_in_eval(self.class_features))

    def loss(self, images, labels):
        image = F.normalize(self.image_features(images).float(), dim=-1)
        text = F.normalize(self.class_features().float(), dim=-1)
        logits = self.logit_scale * image @ text.T
        frozen_text, frozen_image = self.handcrafted, self.frozen_image_features(images)
        zero_shot = self.logit_scale * frozen_image @ frozen_text.T
        kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(zero_shot, dim=-1), reduction="sum",
                      log_target=True) / logits.numel()
        loss = (F.cross_entropy(logits, labels) + self.config.w_text * F.l1_loss(text, frozen_text)
                + self.config.w_image * F.l1_loss(image, frozen_image) + kl)
        return loss, logits

    # -- Gaussian prompt aggregation ---------------------------------------------------------------
    def on_epoch_end(self, epoch, epochs):
        weight = gpa_weights(epochs, self.config.gpa_mean, self.config.gpa_std)[epoch]
        current = self.learnable_state_dict()
        if epoch == 0:
            self._gpa = {k: weight * v for k, v in current.items()}
        elif self._gpa is None:
            raise RuntimeError(f"epoch {epoch + 1} ended without the aggregate of the epochs before it")
        else:
            self._gpa = {k: self._gpa[k] + weight * v for k, v in current.items()}

    def training_state(self):
        return {f"gpa.{k}": v for k, v in (self._gpa or {}).items()}

    def load_training_state(self, state):
        gpa = {k.removeprefix("gpa."): v for k, v in state.items()}
        expected = self.learnable_state_dict()
        if set(gpa) != set(expected) or any(not k.startswith("gpa.") for k in state):
            raise UserError("checkpoint does not hold PromptSRC's prompt aggregate for these prompts: "
                            "was it written by another method or config?")
        self._gpa = {k: v.to(expected[k].device, expected[k].dtype) for k, v in gpa.items()}

    def final_state_dict(self):
        """The Gaussian-weighted aggregate of the epochs' prompts (the last epoch's before any epoch ended)."""
        return dict(self._gpa) if self._gpa is not None else self.learnable_state_dict()
