"""GPT, Generalizable Prompt Tuning (arXiv, Oct 2024): two views of each class, kept informative of each other.

- Views: the soft prompt (CoOp context) and the dataset's hand-crafted prompt give two
  features per class. Training maximises their mutual information with a symmetric InfoNCE
  over classes (a class's soft feature must pick out its own hand-crafted feature among all
  classes', and vice versa), through an optional small learnable critic (a linear map on the
  soft view; identity when `critic: false`).
- Class-wise visual augmentation: each class c gets a condition vector injected into its soft
  prompt, ctx_c = ctx + proj(cond_c), with `proj` zero-initialised (training starts as CoOp).
  During training cond_c mixes the class prototype (mean frozen image feature of its training
  shots) with one random shot of the class, lambda ~ Beta(alpha, alpha) (mixup within a class).
  At test time cond_c is the prototype; a class without training images (novel classes) uses
  its hand-crafted text feature instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.method import PromptMethod, register
from trainer.surgery import PromptedText, init_context


@register("gpt")
class GPT(PromptMethod):
    needs_train_features = True

    def __init__(self, clip, classnames, template, n_ctx: int = 4, ctx_init: str = "a photo of a",
                 w_mi: float = 1.0, tau: float = 0.07, critic: bool = False, mixup_alpha: float = 1.0):
        super().__init__(clip, classnames, template)
        ctx, suffix = init_context(clip, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx)
        self.text = PromptedText(clip, classnames, n_ctx, suffix)
        embed = clip.embed_dim
        self.proj = nn.Linear(embed, ctx.shape[-1])
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.critic = nn.Linear(embed, embed, bias=False) if critic else None
        if self.critic is not None:
            nn.init.eye_(self.critic.weight)
        self.w_mi, self.tau, self.mixup_alpha = w_mi, tau, mixup_alpha
        self.register_buffer("frozen_text", self.handcrafted_features(), persistent=False)
        self.shots: dict[str, torch.Tensor] = {}  # class name -> frozen features of its training shots

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)
        self.frozen_text = self.handcrafted_features()

    def prepare(self, features: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> None:
        """Keep the frozen image features of the training shots, per class name."""
        features = F.normalize(features.float(), dim=-1)
        self.shots = {classnames[c]: features[labels == c] for c in labels.unique().tolist()}

    def conditions(self) -> torch.Tensor:
        """(C, D) condition per class: mixed-up shots when training, prototype or hand-crafted stand-in otherwise."""
        rows = []
        for c, name in enumerate(self.classnames):
            shots = self.shots.get(name)
            if shots is None or len(shots) == 0:
                rows.append(self.frozen_text[c])
                continue
            proto = shots.mean(0)
            if self.training and self.mixup_alpha > 0:
                lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample().to(proto.device)
                proto = lam * proto + (1 - lam) * shots[torch.randint(len(shots), (1,)).item()]
            rows.append(F.normalize(proto, dim=-1))
        return torch.stack(rows).to(self.ctx.device)

    def class_features(self) -> torch.Tensor:
        ctx = self.ctx[None] + self.proj(self.conditions())[:, None, :]  # (C, n_ctx, d_t)
        return self.text(ctx)

    def forward(self, images, scp=None, scp_mask=None):
        return self.cosine_logits(self.frozen_image_features(images), self.class_features())

    def loss(self, images, labels, scp=None, scp_mask=None):
        soft = self.class_features()
        logits = self.cosine_logits(self.frozen_image_features(images), soft)
        view = self.critic(soft.float()) if self.critic is not None else soft.float()
        sim = F.normalize(view, dim=-1) @ self.frozen_text.T / self.tau  # (C, C): own class on the diagonal
        target = torch.arange(sim.shape[0], device=sim.device)
        mi = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
        return F.cross_entropy(logits, labels) + self.w_mi * mi, logits
