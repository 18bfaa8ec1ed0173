"""What every method file implements, and the one factory that builds a method by name.

A method is a small `nn.Module` of learnable prompt parameters around a frozen CLIP (held as a
plain attribute, so `parameters()` and checkpoints hold only what is trained). Files:
`trainer/<name>.py` define a class decorated with `@register("<name>")`; defaults live in
`trainer/configs/<name>.yaml` (section `method` is passed in as `cfg`).
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mugcp.clip import FrozenClip
from mugcp.errors import UserError

_REGISTRY: dict[str, type["PromptMethod"]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type["PromptMethod"]:
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"trainer.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _REGISTRY:
        from trainer.config import available_methods

        raise UserError(f"unknown method '{name}': choose one of {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_uses_scp(name: str) -> bool:
    return method_class(name).uses_scp


def build_method(name: str, clip: FrozenClip, classnames: list[str], template: str, cfg: dict) -> "PromptMethod":
    cls = method_class(name)
    try:
        return cls(clip, classnames, template, **cfg)
    except (TypeError, ValueError) as e:  # a config key the method does not take, or a bad value
        raise UserError(f"bad config for method '{name}': {e}") from None


class PromptMethod(nn.Module):
    """Base of every method: frozen CLIP access, cosine logits, CE loss, learnable-only checkpoints.

    Subclasses implement `class_features` / `forward` and may override `loss`. `uses_scp` says the
    method reads stage-one SCP tensors (forward gets `scp` (B, K, D) and `scp_mask` (B, K)).
    `needs_train_features` asks the runner for frozen image features of the training shots
    (`prepare(features, labels)`), e.g. GPT's class prototypes.
    """

    name: ClassVar[str]
    uses_scp: ClassVar[bool] = False
    needs_train_features: ClassVar[bool] = False

    def __init__(self, clip: FrozenClip, classnames: list[str], template: str):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # not a submodule: frozen, never checkpointed
        self.template = template
        self.classnames = list(classnames)
        self._eval_text: Optional[torch.Tensor] = None

    # -- shared pieces -------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.exp()

    @torch.no_grad()
    def handcrafted_features(self, classnames: Optional[list[str]] = None) -> torch.Tensor:
        """Frozen CLIP features of the dataset's hand-crafted prompt per class, L2-normalised."""
        from trainer.evaluate import class_text_features

        return class_text_features(self.clip, classnames or self.classnames, self.template)

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
        """Rebuild whatever depends on the class names (evaluation on novel classes)."""
        self.classnames = list(classnames)
        self._eval_text = None

    def forward(self, images: torch.Tensor, scp: Optional[torch.Tensor] = None,
                scp_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, images: torch.Tensor, labels: torch.Tensor, scp: Optional[torch.Tensor] = None,
             scp_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(images, scp=scp, scp_mask=scp_mask)
        return F.cross_entropy(logits, labels), logits

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_learnable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(f"checkpoint does not fit method '{self.name}' as configured "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise UserError(f"checkpoint tensor {n} has shape {tuple(v.shape)}, the method expects "
                                    f"{tuple(params[n].shape)}: was it trained with another config or CLIP?")
                params[n].copy_(v)
        self._eval_text = None
