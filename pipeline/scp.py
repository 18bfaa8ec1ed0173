"""SCP encoding: an image's phrases through the frozen CLIP text encoder, K x D float16 plus a mask.

Phrases of many images are tokenised and encoded together (one batched pass, cut at the longest
EOT), L2-normalised, and scattered back to their image's K slots; unused slots are zero and
masked out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mugcp.core.frozen_clip import FrozenClip, encode_text


@torch.no_grad()
def encode_scp(clip: FrozenClip, phrase_lists: list[list[str]], k: int, batch_size: int = 1024):
    """(scp (N, K, D) float16, mask (N, K) bool) for N images' phrase lists."""
    n, dim = len(phrase_lists), clip.embed_dim
    flat = [(i, j, p) for i, phrases in enumerate(phrase_lists) for j, p in enumerate(phrases[:k])]
    if not flat:
        return np.zeros((n, k, dim), np.float16), np.zeros((n, k), bool)
    tokens = clip.tokenize([p for _, _, p in flat])
    feats = F.normalize(encode_text(clip.model, tokens, batch_size=batch_size).float(), dim=-1).cpu()
    rows = torch.tensor([i for i, _, _ in flat])
    cols = torch.tensor([j for _, j, _ in flat])
    dense = torch.zeros(n, k, dim)
    dense[rows, cols] = feats
    valid = torch.zeros(n, k, dtype=torch.bool)
    valid[rows, cols] = True
    return dense.numpy().astype(np.float16), valid.numpy()
