"""SCP encoding: an image's phrases through the frozen CLIP text encoder, K x D float16 plus a mask.

Each image's phrases are encoded in one pass of their own (cut at their longest EOT),
L2-normalised and placed in the image's K slots; unused slots are zero and masked out. Encoding
image by image rather than many images in one batch costs some speed, and buys this: an image's
SCP depends on its answer only, never on which other images shared its batch (matrix kernels
round differently for different batch shapes, enough to flip float16 bits), so a resumed,
sharded or repeated extract writes exactly the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mugcp.core.frozen_clip import FrozenClip, encode_text


def _fits(tokenize, text: str) -> bool:
    return int(tokenize([text]).argmax()) < 76  # the EOT sits inside the context


def _pieces(tokenize, word: str) -> list[str]:
    """A word too long for CLIP's context (a CJK sentence, a long URL) split by characters into pieces that fit:
    each the longest prefix of what is left that fits, found by bisection."""
    pieces = []
    while word:
        lo, hi = 1, len(word)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _fits(tokenize, word[:mid]) else (lo, mid - 1)
        pieces.append(word[:lo])
        word = word[lo:]
    return pieces


def fit_phrases(tokenize, phrases: list[str], k: int) -> list[str]:
    """At most k phrases, each short enough that CLIP's 77 tokens hold it whole: a longer one is split
    into runs of words (greedily, as many words as fit), and a word longer than the context into pieces
    of characters, so nothing is silently cut off."""
    out = []
    for phrase in phrases:
        if len(out) >= k:
            break
        if _fits(tokenize, phrase):
            out.append(phrase)
            continue
        run: list[str] = []
        for word in phrase.split():
            if run and _fits(tokenize, " ".join(run + [word])):
                run.append(word)
                continue
            if run:
                out.append(" ".join(run))
            pieces = [word] if _fits(tokenize, word) else _pieces(tokenize, word)
            out += pieces[:-1]
            run = pieces[-1:]
        if run:
            out.append(" ".join(run))
    return out[:k]


@torch.no_grad()
def encode_scp(clip: FrozenClip, phrase_lists: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scp (N, K, D) float16, mask (N, K) bool) for N images' phrase lists."""
    n, dim = len(phrase_lists), clip.embed_dim
    scp = np.zeros((n, k, dim), np.float16)
    mask = np.zeros((n, k), bool)
    for i, phrases in enumerate(phrase_lists):
        phrases = fit_phrases(clip.tokenize, phrases, k)
        if phrases:
            feats = F.normalize(encode_text(clip.model, clip.tokenize(phrases)).float(), dim=-1)
            scp[i, :len(phrases)] = feats.cpu().numpy().astype(np.float16)
            mask[i, :len(phrases)] = True
    return scp, mask
