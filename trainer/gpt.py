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
        self._bank = None  # (shots (C, S, D) zero-padded, counts (C,)) for the current classes

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)
        self.frozen_text = self.handcrafted_features()
        self._bank = None

    def prepare(self, features: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> None:
        """Keep the frozen image features of the training shots, per class name."""
        features = F.normalize(features.float(), dim=-1)
        self.shots = {classnames[c]: features[labels == c] for c in labels.unique().tolist()}
        self._bank = self._eval_text = None

    def _shot_bank(self):
        """The current classes' shots as one zero-padded tensor, so conditions are computed without a loop."""
        if self._bank is None:
            empty = self.frozen_text.new_zeros(0, self.frozen_text.shape[-1])
            per_class = [self.shots.get(n, empty).to(self.frozen_text.device) for n in self.classnames]
            bank = nn.utils.rnn.pad_sequence(per_class + [empty[:0].new_zeros(1, empty.shape[-1])], batch_first=True)
            counts = torch.tensor([len(x) for x in per_class], device=bank.device)
            self._bank = (bank[:-1], counts)
        return self._bank

    def conditions(self) -> torch.Tensor:
        """(C, D) condition per class: mixed-up shots when training, prototype or hand-crafted stand-in otherwise."""
        bank, counts = self._shot_bank()
        proto = bank.sum(1) / counts.clamp(min=1)[:, None]
        if self.training and self.mixup_alpha > 0:
            c = len(counts)
            lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample((c, 1)).to(proto.device)
            pick = (torch.rand(c, device=proto.device) * counts.clamp(min=1)).long()
            proto = lam * proto + (1 - lam) * bank[torch.arange(c, device=proto.device), pick]
        return torch.where((counts > 0)[:, None], F.normalize(proto, dim=-1), self.frozen_text)

    def class_features(self) -> torch.Tensor:
        ctx = self.ctx[None] + self.proj(self.conditions())[:, None, :]  # (C, n_ctx, d_t)
        return self.text(ctx)

    def forward(self, images, scp=None, scp_mask=None):
        return self.cosine_logits(self.frozen_image_features(images), self.once_in_eval(self.class_features))

    def loss(self, images, labels, scp=None, scp_mask=None):
        soft = self.class_features()
        logits = self.cosine_logits(self.frozen_image_features(images), soft)
        view = self.critic(soft.float()) if self.critic is not None else soft.float()
        sim = F.normalize(view, dim=-1) @ self.frozen_text.T / self.tau  # (C, C): own class on the diagonal
        target = torch.arange(sim.shape[0], device=sim.device)
        mi = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
        return F.cross_entropy(logits, labels) + self.w_mi * mi, logits
