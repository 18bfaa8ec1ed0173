"""GPT, Generalizable Prompt Tuning (arXiv, Oct 2024): two views of each class, kept informative of each other.

- Views: the soft prompt (CoOp context) and the dataset's hand-crafted prompt give two
  features per class. Training maximises their mutual information with a symmetric InfoNCE
  over classes (a class's soft feature must pick out its own hand-crafted feature among all
  classes', and vice versa).
- MI estimator: the paper's estimator is learnable, so by default (`critic: true`) the InfoNCE
  scores pairs with a learnable critic, s(u, v) = cos(W u, v) / tau, W a linear map on
  the soft view initialised to the identity (at step 0 it equals the fixed estimator) and trained
  with the prompts. The soft view carries the injected visual condition (below), so the
  estimator's gradient also shapes how the augmented visual features join the prompt.
  `critic: false` keeps the fixed estimator, s(u, v) = cos(u, v) / tau.
- Class-wise visual augmentation: each class c gets a condition vector injected into its soft
  prompt, ctx_c = ctx + proj(cond_c), with `proj` zero-initialised (training starts as CoOp).
  During training cond_c mixes the class prototype (mean frozen image feature of its training
  shots) with one random shot of the class, lambda ~ Beta(alpha, alpha) (mixup within a class).
  At test time cond_c is the prototype; a class without training images (novel classes) uses
  its hand-crafted text feature instead. The prototypes are part of the run's final weights, so
  evaluation needs no training image.
- Hand-crafted view: the paper publishes no code or template table, so the view is CoOp's
  zero-shot prompt per dataset (`template_table = "coop"`), the table zero-shot CLIP uses here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from mugcp.core.errors import UserError
from mugcp.trainer.methods import register
from mugcp.trainer.methods.base import PromptMethod, TrainingShots
from mugcp.trainer.methods.coop import ContextConfig


@register("gpt")
class GPT(PromptMethod):
    class Config(ContextConfig):
        w_mi: float = Field(1.0, ge=0, description="weight of the symmetric InfoNCE between soft and hand-crafted views")
        tau: float = Field(0.07, gt=0, description="InfoNCE temperature")
        critic: bool = Field(True, description="learnable MI estimator: a linear critic on the soft view (false: "
                                               "fixed cosine)")
        mixup_alpha: float = Field(1.0, ge=0, description="Beta(alpha, alpha) of the class-wise mixup (0 = prototypes)")

        @field_validator("mixup_alpha")
        @classmethod
        def _a_float32_beta(cls, alpha: float) -> float:
            """torch draws Beta(alpha, alpha) in float32: a positive alpha below its smallest normal number is 0
            there (a traceback mid-run) or a degenerate draw, neither the mixup asked for."""
            if 0 < alpha < torch.finfo(torch.float32).tiny:
                raise ValueError(f"give 0 (prototypes, no mixup) or at least {torch.finfo(torch.float32).tiny:.3g}, "
                                 f"the smallest normal float32 (Beta is drawn in float32)")
            return alpha

    schedule = {"epochs": 50, "lr": 0.002, "batch_size": 32}  # the paper publishes no code: CoOp-style
    template_table = "coop"

    def __init__(self, clip, classnames, templates, config: Config):
        super().__init__(clip, classnames, templates, config)
        self.learn_context()
        embed = clip.embed_dim
        self.proj = nn.Linear(embed, self.ctx.shape[-1])
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.critic = nn.Linear(embed, embed, bias=False) if config.critic else None
        if self.critic is not None:
            nn.init.eye_(self.critic.weight)
        self.train_classnames = list(classnames)
        # (C_train, D) normalised mean shot feature per training class; a zero row: no shot seen
        self.register_buffer("prototypes", torch.zeros(len(classnames), embed), persistent=False)
        self._bank = None  # training only: (shots (C, S, D) zero-padded, counts (C,))

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def on_train_start(self, shots: TrainingShots) -> None:
        """Keep the frozen image features of the training shots per class, and their prototypes."""
        features = F.normalize(shots.image_features().float(), dim=-1)
        per_class = [features[shots.labels == c] for c in range(len(self.train_classnames))]
        bank = nn.utils.rnn.pad_sequence(per_class + [features.new_zeros(1, features.shape[-1])], batch_first=True)
        counts = torch.tensor([len(x) for x in per_class], device=features.device)
        self._bank = (bank[:-1], counts)
        mean = bank[:-1].sum(1) / counts.clamp(min=1)[:, None]
        self.prototypes = torch.where((counts > 0)[:, None], F.normalize(mean, dim=-1), torch.zeros_like(mean))
        self._eval_text = None

    def conditions(self) -> torch.Tensor:
        """(C, D) condition per class: mixed-up shots when training, prototype or hand-crafted stand-in otherwise."""
        if self.training and self._bank is not None and self.config.mixup_alpha > 0:
            bank, counts = self._bank
            c = len(counts)
            proto = bank.sum(1) / counts.clamp(min=1)[:, None]
            alpha = self.config.mixup_alpha
            lam = torch.distributions.Beta(alpha, alpha).sample((c, 1)).to(proto.device)
            pick = (torch.rand(c, device=proto.device) * counts.clamp(min=1)).long()
            mixed = lam * proto + (1 - lam) * bank[torch.arange(c, device=proto.device), pick]
            return torch.where((counts > 0)[:, None], F.normalize(mixed, dim=-1), self.handcrafted)
        row = {name: i for i, name in enumerate(self.train_classnames)}
        index = torch.tensor([row.get(n, -1) for n in self.classnames], device=self.prototypes.device)
        proto = torch.where((index >= 0)[:, None], self.prototypes[index.clamp(min=0)], 0.0)
        return torch.where((proto.norm(dim=-1) > 0)[:, None], proto, self.handcrafted)

    def class_features(self) -> torch.Tensor:
        ctx = self.ctx[None] + self.proj(self.conditions().to(self.ctx.dtype))[:, None, :]  # (C, n_ctx, d_t)
        return self.text(ctx)

    def forward(self, images):
        return self.cosine_logits(self.frozen_image_features(images), self.once_in_eval(self.class_features))

    def loss(self, images, labels):
        soft = self.class_features()
        logits = self.cosine_logits(self.frozen_image_features(images), soft)
        view = (self.critic(soft.to(self.ctx.dtype)) if self.critic is not None else soft).float()
        sim = F.normalize(view, dim=-1) @ self.handcrafted.T / self.config.tau  # (C, C): own class on the diagonal
        target = torch.arange(sim.shape[0], device=sim.device)
        mi = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
        return F.cross_entropy(logits, labels) + self.config.w_mi * mi, logits

    def final_state_dict(self):
        return {**self.learnable_state_dict(), "prototypes": self.prototypes.detach()}

    def load_final_state(self, state):
        state = dict(state)
        prototypes = state.pop("prototypes", None)
        if prototypes is None or prototypes.shape != self.prototypes.shape:
            raise UserError(f"weights do not fit method 'gpt': no prototypes of shape {tuple(self.prototypes.shape)} "
                            f"(one per training class)")
        self.load_learnable_state_dict(state)
        self.prototypes = prototypes.to(self.prototypes.device)
