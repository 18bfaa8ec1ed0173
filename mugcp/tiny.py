"""Tiny random-weight models for tests and the demo: nothing is downloaded.

`write_tiny_clip` writes an open_clip config JSON plus a safetensors checkpoint, loaded with
`--clip DIR/mugcp-tiny-clip.json --pretrained DIR/mugcp-tiny-clip.safetensors`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

TINY_CLIP_NAME = "mugcp-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def write_tiny_clip(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny CLIP's config and random weights (fixed seed); return (config, checkpoint)."""
    import open_clip
    from safetensors.torch import save_file

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
    ckpt = out / f"{TINY_CLIP_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config, ckpt
