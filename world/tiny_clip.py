"""Tiny random-weight models for tests and the demo: nothing is downloaded.

`write_tiny_clip` writes an open_clip config JSON plus a safetensors checkpoint, loaded with
`--clip DIR/mugcp-tiny-clip.json --pretrained DIR/mugcp-tiny-clip.safetensors`. With
`pretrain_steps`, the random model is first trained contrastively for a few seconds on freshly
drawn synthetic textures captioned "<class> texture.", so the demo's numbers mean something
(80 steps: ~60% zero-shot on synthetic DTD, like a real CLIP that knows the classes roughly).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mugcp.world.synth import DTD_CLASSES, draw_texture

TINY_CLIP_NAME = "mugcp-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def pretrain_on_textures(model, steps: int, seed: int = 0, batch_size: int = 96) -> None:
    """A few contrastive steps on synthetic textures (jitter seed unlike the demo data's) with class captions."""
    rng = np.random.default_rng(10_000 + seed)
    per_class = 24
    pixels = np.stack([draw_texture(c, rng, 32) for c in range(len(DTD_CLASSES)) for _ in range(per_class)])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    labels = torch.arange(len(DTD_CLASSES)).repeat_interleave(per_class)
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)([f"{c} texture." for c in DTD_CLASSES])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:batch_size]
        x = images[idx].flip(-1) if step % 2 else images[idx]
        image = F.normalize(model.encode_image(x), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def write_tiny_clip(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 0) -> tuple[Path, Path]:
    """Write the tiny CLIP's config and weights (random from `seed`, optionally pre-trained); return (config, checkpoint)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: intended here
    try:
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    if pretrain_steps:
        pretrain_on_textures(model, pretrain_steps, seed)
    ckpt = out / f"{TINY_CLIP_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config, ckpt
