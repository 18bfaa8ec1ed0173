"""The method interface: what a prompt method supplies, and the hooks the training loop calls.

A method is a small `nn.Module` of learnable prompt parameters around a frozen CLIP (held as a
plain attribute, so `parameters()` and checkpoints hold only what is trained). One file per method
in this folder defines a class decorated with `@register("<name>")` that declares:

- `Config`: its options, a typed model whose defaults are the reference code's (the only defaults);
- `schedule`: the reference's optimiser settings (epochs, lr, batch size; the rest are shared);
- `reads`: the per-image conditions it needs, by name (e.g. "scp": the stage-one tensors), which
  the runner passes to `forward` / `loss` as keyword arguments;
- `template_table`: which reference repository's hand-crafted prompts its `handcrafted` features
  use (`core/templates.py`: "coop", "kgcoop" or "imagenet60"); the factory passes that table's
  prompts for the dataset as `templates`;
- `trains`: False for methods with nothing to learn (zero-shot CLIP);
- `reference_code`, `reference_name`, `reference_config`: for a method with reference code, where its
  checkpoints come from and how their tensors map onto this method's (`mugcp import`).

and implements `forward(images, **conditions) -> logits`, optionally `loss`, and the hooks:
`on_train_start(shots)` (before the first epoch of a run or of a resume), `on_epoch_end(epoch,
epochs)`, `training_state()` / `load_training_state()` (extra state a resume must restore), and
`final_state_dict()` / `load_final_state()` (the weights a finished run keeps and `mugcp eval`
loads; by default the learnable parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mugcp.core.coop_datasets import Item, prompt_name
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip, encode_text
from mugcp.core.settings import Settings
from mugcp.trainer.surgery import PromptedText, init_context


class MethodConfig(Settings):
    """Base of every method's options."""


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # SGD applies its factors to float32 weights


class OptimConfig(Settings):
    """SGD with a cosine schedule after a constant warm-up, as every reference uses."""

    epochs: int = Field(ge=1, description="training epochs")
    lr: float = Field(gt=0, le=FLOAT32_MAX, description="SGD learning rate after warm-up")
    batch_size: int = Field(ge=1, description="images per step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, le=FLOAT32_MAX, description="SGD weight decay")
    warmup_epochs: int = Field(1, ge=0, description="epochs at the constant warm-up lr")
    warmup_lr: float = Field(1e-5, gt=0, le=FLOAT32_MAX, description="the constant warm-up lr")
    precision: str = Field("amp", pattern="^(amp|fp16|fp32)$",
                           description="amp (fp16 autocast, fp32 weights; on GPU), fp16 (the references' own: CLIP and "
                                       "prompts in half precision, SGD on half weights) or fp32")

    @model_validator(mode="after")
    def _fits_half_precision(self) -> "OptimConfig":
        """Under fp16 the learning rate multiplies half weights: it must be a half-precision number itself."""
        if self.precision == "fp16" and max(self.lr, self.warmup_lr) > torch.finfo(torch.float16).max:
            raise ValueError("optim.precision=fp16 holds numbers up to 65504: lower optim.lr and optim.warmup_lr")
        return self


@dataclass
class TrainingShots:
    """The few-shot training images of a run, for methods that look at them before training (GPT)."""

    items: list[Item]
    labels: torch.Tensor  # (N,) on the training device
    classnames: list[str]
    image_features: Callable[[], torch.Tensor]  # frozen CLIP features (N, D), test transform; computed on call


@torch.no_grad()
def handcrafted_text_features(clip: FrozenClip, classnames: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """(C, D) L2-normalised frozen features of the hand-crafted prompts of each class (its frozen "view").

    Several templates are averaged before normalising, as PromptSRC averages its ensemble; with one
    template this is that prompt's normalised feature.
    """
    feats = [encode_text(clip.model, clip.tokenize([t.format(prompt_name(c)) for c in classnames])).float()
             for t in templates]
    return F.normalize(torch.stack(feats, dim=1).mean(dim=1), dim=-1)


def check_handcrafted_fit(clip: FrozenClip, classnames: list[str], templates: tuple[str, ...]) -> None:
    """Refuse hand-crafted prompts longer than CLIP's context (`FrozenClip.too_long`), before any is encoded: the
    class name of most tokens under every template (CLIP's tokenizer splits words and punctuation apart, so a
    name's tokens add to a template's)."""
    names = [prompt_name(c) for c in classnames]
    if not names or not templates:
        return
    counts = clip.token_counts(names)
    name = names[counts.index(max(counts))]
    over = clip.too_long([t.format(name) for t in templates])
    if over:
        template = templates[[t.format(name) for t in templates].index(over[0][0])]
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UserError(f"class '{shown}' in the hand-crafted prompt '{template}' is {over[0][1]} tokens, more than "
                        f"CLIP's {clip.context_length}: it would lose its class name; give a shorter class name")


class PromptMethod(nn.Module):
    """Base of every method: frozen CLIP access, cosine logits, CE loss, the hooks, learnable-only weights."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    schedule: ClassVar[dict] = {}
    reads: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = True
    template_table: ClassVar[str] = "coop"
    # Under `optim.precision=fp16`, the learnt parts its reference's PREC "fp16" holds in half (parameter names or
    # their prefixes); the others stay fp32 and take fp32 SGD steps, as there. None: every part in half.
    reference_half: ClassVar[Optional[tuple[str, ...]]] = None

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.half()` and the like: features cached from the frozen CLIP are no module state, so they are
        dropped and computed again where, and in the precision that, the model now is."""
        self._handcrafted = self._eval_text = None
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def reads_scp(cls) -> bool:
        """Whether it reads SCP: stage one must describe its images first."""
        return "scp" in cls.reads

    @classmethod
    def reference_overrides(cls, protocol: str, dataset: str, shots: int) -> list[str]:
        """`section.key=value` overrides that turn the defaults (the reference's base-to-novel config) into
        its config for `protocol` ("fewshot", or "transfer": the ImageNet source run of cross-dataset and
        domain generalisation) on `dataset` with `shots`; applied before the user's own."""
        return []

    def __init__(self, clip: FrozenClip, classnames: list[str], templates: tuple[str, ...], config: MethodConfig):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # not a submodule: frozen, never checkpointed
        self.config = config
        self.templates = tuple(templates)
        self.classnames = list(classnames)
        self._eval_text: Optional[torch.Tensor] = None
        self._handcrafted: Optional[torch.Tensor] = None
        self.as_built: dict[str, int] = {}  # options the model could not follow as asked, and what it built
        self.weights_sha256: Optional[str] = None  # of the final weights loaded into it (`trained_method`)
        check_handcrafted_fit(clip, self.classnames, self.templates)

    def built_as(self, key: str, asked: int, built: int) -> int:
        """`built` for `method.<key>`; where it is not what was asked (a depth beyond a small CLIP's layers, heads
        that do not divide its width), it goes into `as_built`, which run.json records beside the asked config."""
        if built != asked:
            self.as_built[f"method.{key}"] = built
        return built

    def capped(self, key: str, asked: int, limit: int) -> int:
        return self.built_as(key, asked, min(asked, limit))

    # -- shared pieces -------------------------------------------------------------------------
    def learn_context(self, per_class: bool = False) -> None:
        """The learnable context `ctx` (from the `ctx_init` words, else random, as CoOp draws it) and the
        class prompts `text` it is spliced into; one context shared by the classes, or one per class."""
        ctx, suffix = init_context(self.clip, self.config.n_ctx, self.config.ctx_init,
                                   classes=len(self.classnames) if per_class else 0)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(self.clip, self.classnames, self.config.n_ctx, suffix)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.exp()

    @property
    def handcrafted(self) -> torch.Tensor:
        """(C, D) frozen features of the hand-crafted prompts of the current classes, computed once per class set."""
        if self._handcrafted is None:
            self._handcrafted = handcrafted_text_features(self.clip, self.classnames, self.templates)
        return self._handcrafted

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.model.encode_image(images).float(), dim=-1)

    def once_in_eval(self, compute) -> torch.Tensor:
        """Instance-independent class features: recomputed every step in training, once per split in eval.

        In eval mode without gradients the prompts cannot change, so the first batch computes the
        C class features and later batches reuse them; train(), set_classnames and loading
        weights clear them.
        """
        if self.training or torch.is_grad_enabled():
            return compute()
        if self._eval_text is None:
            self._eval_text = compute()
        return self._eval_text

    def train(self, mode: bool = True):
        self._eval_text = None
        return super().train(mode)

    def cosine_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarity; `text` is (C, D) shared or (B, C, D) per image."""
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        if text.dim() == 3:
            return self.logit_scale * torch.einsum("bd,bcd->bc", image, text)
        return self.logit_scale * image @ text.T

    # -- the interface -------------------------------------------------------------------------
    def set_classnames(self, classnames: list[str]) -> None:
        """Rebuild whatever depends on the class names (evaluation on novel or other classes)."""
        check_handcrafted_fit(self.clip, list(classnames), self.templates)
        self.classnames = list(classnames)
        self._eval_text = self._handcrafted = None

    def use_templates(self, templates: tuple[str, ...]) -> None:
        """Another dataset's hand-crafted prompts (evaluation on that dataset's classes)."""
        check_handcrafted_fit(self.clip, self.classnames, tuple(templates))
        self.templates = tuple(templates)
        self._eval_text = self._handcrafted = None

    def forward(self, images: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             **conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(images, **conditions)
        return F.cross_entropy(logits, labels), logits

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, shots: TrainingShots) -> None:
        """Called once before training starts or resumes."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after each epoch's last step (epoch counts from 0), before its checkpoint is written."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors a resumed run needs besides the learnable parameters and the optimiser."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UserError(f"checkpoint holds training state {sorted(state)[:3]} that method '{self.name}' "
                            f"does not keep")

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a finished run keeps (and `mugcp eval` loads with `load_final_state`)."""
        return self.learnable_state_dict()

    def load_final_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_learnable_state_dict(state)

    # -- weights -------------------------------------------------------------------------------
    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # -- checkpoints of the reference code (`mugcp import`) --------------------------------------
    reference_code: ClassVar[str] = ""  # "repository, file" of the reference trainer; "" for none
    reference_frozen: ClassVar[tuple[str, ...]] = ()  # key prefixes of what its checkpoints hold frozen
    reference_holds: ClassVar[tuple[str, ...]] = ()  # keys every one of its checkpoints holds besides the prompts

    @classmethod
    def reference_name(cls, key: str) -> Optional[str]:
        """This method's name for a learnt tensor of a reference checkpoint (None: not one of its prompts)."""
        return None

    @classmethod
    def reference_config(cls, weights: dict[str, torch.Tensor]) -> list[str]:
        """The `method.*` overrides that the imported weights' shapes imply (context length, depth)."""
        return []

    @classmethod
    def from_reference(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The learnt tensors of a reference checkpoint's state dict under this method's names, and the overrides
        their shapes imply; the frozen CLIP and the class-name token buffers it also holds are left out. A tensor
        that is neither is refused: the checkpoint is another method's."""
        if not cls.reference_code:
            raise UserError(f"method '{cls.name}' has no reference code whose checkpoints mugcp reads")
        weights, unknown = {}, []
        for key, value in state.items():
            name = cls.reference_name(key)
            if name is not None:
                weights[name] = value
            elif not key.startswith(cls.reference_frozen) or any(w in key for w in ("ctx", "VPT")):
                unknown.append(key)  # the references train every tensor named ctx or VPT: never frozen
        lacks = [k for k in cls.reference_holds if k not in state]
        if unknown or lacks or not weights:
            held = (f"it holds {', '.join(sorted(unknown)[:3])}" if unknown else
                    f"it lacks {', '.join(lacks)}" if lacks else "it holds none of its prompts")
            raise UserError(f"not a checkpoint of {cls.name}'s reference code ({cls.reference_code}): {held}")
        malformed = [k for k, v in weights.items() if not (v.dtype.is_floating_point and v.layout == torch.strided
                                                          and v.device.type == "cpu" and v.dim() >= 1)]
        if malformed:
            v = weights[malformed[0]]
            raise UserError(f"{malformed[0]} of this {cls.name} checkpoint is not a dense float tensor "
                            f"({v.dtype}, {tuple(v.shape)}, {v.layout}, {v.device.type})")
        try:
            return weights, cls.reference_config(weights)
        except KeyError as e:
            raise UserError(f"not a whole checkpoint of {cls.name}'s reference code ({cls.reference_code}): it lacks "
                            f"what becomes {e.args[0]}") from None
        except (IndexError, ZeroDivisionError):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(weights.items())[:3])
            raise UserError(f"the tensors of this {cls.name} checkpoint are not shaped as its reference code shapes "
                            f"them ({shapes})") from None

    def load_learnable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(f"weights do not fit method '{self.name}' as configured "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise UserError(f"weight {n} has shape {tuple(v.shape)}, the method expects "
                                    f"{tuple(params[n].shape)}: was it trained with another config or CLIP?")
                params[n].copy_(v)
        self._eval_text = None
