"""The world's CLIP: a tiny open_clip ViT, random or pre-trained contrastively on varied captions of synthetic textures.

`write_tiny_clip` writes an open_clip config JSON plus a safetensors checkpoint, loaded with
`--clip DIR/mugcp-tiny-clip.json --pretrained DIR/mugcp-tiny-clip.safetensors`; with random
weights (the tests of exactness and plumbing) or pre-trained (`pretrain_steps`).

Pre-training imitates how web captions vary. Each batch holds one freshly jittered image of
every one of the 47 classes (a pool drawn apart from any dataset's images) and images of random
attribute combinations that belong to no class. A class image is captioned by its name in one of
several templates ("a photo of a {}.", "{} texture.", ...), by its name and its attributes, by
all its attributes, or by some of them ("blue stripes, fine pattern."); a random image by its
attributes only. So zero-shot works with "a photo of a {}." and "{} texture." alike, class names
mean something, and the attribute phrases an MLLM answers with land near the images they
describe. Half the images are shown as the prompt-learning protocol's training transform shows
them (a random resized crop of 8% to all of the image, `frozen_clip.TRAIN_CROP_SCALE`), the way
web-scale CLIPs see objects at every framing; a crop's caption names the scale it appears at
(`synth.apparent_scale`). Without this the tiny CLIP knows only whole images, and every prompt
method trained through the protocol's crops learnt on views its CLIP never saw. The loss is CLIP's
symmetric InfoNCE, with identical captions counted as positives of each other, and a learnt
temperature (clamped at CLIP's 100; held fixed at 100, the tiny model does not learn: zero-shot
8% on 24 classes). The input is 64 pixels in 16-pixel patches: the dataset's images are not
downsampled, and a fine pattern's period stays several pixels wide. `world_clip()`
builds the world's model once per machine (`model_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import save_file

from mugcp.core.coop_datasets import prompt_name
from mugcp.core.frozen_clip import TRAIN_CROP_SCALE, cut_length, text_tower
from mugcp.world import synth
from mugcp.world.model_cache import cached_build
from mugcp.world.synth import DTD_CLASSES, apparent_scale, describe, draw, image_attributes, jpeg, random_attributes

TINY_CLIP_NAME = "mugcp-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
NAME_TEMPLATES = ["a photo of a {}.", "{} texture.", "a {} texture.", "a {} pattern.", "{}.",
                  "a close-up photo of a {} surface.", "this texture is {}.", "a photo of the {} texture."]
# The world's CLIP: batch and pools sized for a 2-core CPU; 1,800 steps (once per machine: 2 minutes on
# a 2-core AVX-512 EPYC, 6 on a slower 2-core machine) because at 600 its zero-shot on the world's test
# images was 25% (78% at 1,800).
WORLD_CLIP_RECIPE = {"config": TINY_CLIP_CONFIG, "seed": 0, "steps": 1800, "random_per_batch": 49,
                     "class_pool": 24, "random_pool": 2000, "lr": 2e-3, "weight_decay": 0.1, "crop_fraction": 0.5}


def caption(rng: np.random.Generator, attributes: synth.Attributes, classname: str | None = None) -> str:
    """One caption as the web might write it: the class name in a template, with or without attributes, or attributes."""
    phrases = describe(attributes)
    kind = rng.choice(["name", "name+attributes", "attributes", "some attributes"], p=[0.4, 0.2, 0.2, 0.2]) \
        if classname else rng.choice(["attributes", "some attributes"])
    if kind == "name":
        return NAME_TEMPLATES[rng.integers(len(NAME_TEMPLATES))].format(prompt_name(classname))
    if kind == "name+attributes":
        return f"a {prompt_name(classname)} texture: {', '.join(phrases)}."
    if kind == "some attributes":
        phrases = [phrases[i] for i in sorted(rng.choice(len(phrases), rng.integers(1, len(phrases)), replace=False))]
    return ", ".join(phrases) + "."


def caption_vocabulary(tokenizer) -> torch.Tensor:
    """Every token id a caption can contain (templates, class names, attribute words, punctuation)."""
    texts = [t.format(prompt_name(c)) for t in NAME_TEMPLATES + ["a {} texture: x, y."] for c in DTD_CLASSES]
    texts += [f"{c} {f}, {c} background, {s} pattern, {o} lines." for c in synth.COLOURS for f in synth.FAMILIES
              for s in synth.SCALES for o in synth.ORIENTATIONS]
    return torch.unique(tokenizer(texts))


def _decoded(images: list[np.ndarray]) -> list[Image.Image]:
    """Images as the datasets store them: through JPEG, decoded to RGB."""
    return [Image.open(io.BytesIO(jpeg(im))).convert("RGB") for im in images]


def _normalise(images: list[Image.Image]) -> torch.Tensor:
    x = torch.stack([TF.to_tensor(im) for im in images])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _whole(images: list[Image.Image], size: int) -> torch.Tensor:
    """Whole images through the datasets' test transform (bicubic resize), normalised."""
    return _normalise([im.resize((size, size), Image.BICUBIC) for im in images])


def _cropped(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    """A random resized crop as the protocol's training transform draws it (torch's RNG), and its magnification."""
    top, left, h, w = T.RandomResizedCrop.get_params(image, scale=TRAIN_CROP_SCALE, ratio=(3 / 4, 4 / 3))
    crop = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=T.InterpolationMode.BICUBIC)
    return crop, math.sqrt(image.width * image.height / (h * w))


def pretrain(model, steps: int, seed: int = 0, random_per_batch: int = 49, class_pool: int = 24,
             random_pool: int = 2000, lr: float = 2e-3, weight_decay: float = 0.1, crop_fraction: float = 0.0,
             log=lambda _: None) -> None:
    """Contrastive pre-training on the world's textures with varied captions (see the module docstring)."""
    rng = np.random.default_rng(10_000 + seed)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    class_attrs = [[image_attributes(c, rng) for _ in range(class_pool)] for c in DTD_CLASSES]
    class_decoded = _decoded([draw(a, rng, 64) for row in class_attrs for a in row])
    class_images = _whole(class_decoded, size).view(len(DTD_CLASSES), class_pool, 3, size, size)
    random_attrs = [random_attributes(rng) for _ in range(random_pool)]
    random_decoded = _decoded([draw(a, rng, 64) for a in random_attrs])
    random_images = _whole(random_decoded, size)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    vocab = caption_vocabulary(tokenizer)
    tokenize = functools.lru_cache(maxsize=None)(lambda text: tokenizer([text])[0])  # captions repeat
    row = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
    row[vocab] = torch.arange(len(vocab))
    table = torch.nn.Parameter(model.token_embedding.weight.detach()[vocab].clone())
    model.token_embedding.requires_grad_(False)
    params = [table] + [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    classes = np.arange(len(DTD_CLASSES))
    model.train()
    for step in range(steps):
        pick = rng.integers(class_pool, size=len(classes))
        extra = rng.integers(random_pool, size=random_per_batch)
        images = torch.cat([class_images[classes, pick], random_images[extra]])
        sources = [class_decoded[c * class_pool + p] for c, p in zip(classes, pick)]
        sources += [random_decoded[i] for i in extra]
        attrs = [class_attrs[c][p] for c, p in zip(classes, pick)] + [random_attrs[i] for i in extra]
        for i in np.flatnonzero(rng.random(len(images)) < crop_fraction):
            crop, zoom = _cropped(sources[i], size)
            images[i] = _normalise([crop])[0]
            attrs[i] = dataclasses.replace(attrs[i], scale=apparent_scale(attrs[i].scale, zoom))
        flip = torch.from_numpy(rng.random(len(images)) < 0.5)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        texts = [caption(rng, attrs[i], DTD_CLASSES[c]) for i, c in enumerate(classes)]
        texts += [caption(rng, a) for a in attrs[len(classes):]]
        tokens = torch.stack([tokenize(t) for t in texts])
        tokens = tokens[:, :cut_length(tokens)]
        x = table[row[tokens]] + model.positional_embedding[:tokens.shape[1]]
        text = F.normalize(text_tower(model, x, tokens), dim=-1)
        image = F.normalize(model.encode_image(images), dim=-1)
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        logits = model.logit_scale.exp() * image @ text.T
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 250 == 0:
            log(f"[world] tiny CLIP pre-training step {step + 1}/{steps}: loss {loss.item():.3f}")
    with torch.no_grad():
        model.token_embedding.weight[vocab] = table
    model.token_embedding.requires_grad_(True)
    model.eval()


def write_tiny_clip(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 0, log=lambda _: None,
                    **pretrain_options) -> tuple[Path, Path]:
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
        pretrain(model, pretrain_steps, seed, log=log, **pretrain_options)
    ckpt = out / f"{TINY_CLIP_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config, ckpt


def world_clip(log=lambda _: None) -> tuple[Path, Path]:
    """(config, checkpoint) of the world's pre-trained tiny CLIP, built once per machine (2-6 minutes)."""
    folder = cached_build("tiny-clip", WORLD_CLIP_RECIPE, [Path(__file__), Path(synth.__file__)],
                          "mugcp.world.tiny_clip:build_world_clip", log=log)
    return folder / f"{TINY_CLIP_NAME}.json", folder / f"{TINY_CLIP_NAME}.safetensors"


def build_world_clip(folder: Path, recipe: dict, log) -> None:
    """`world_clip`'s build, run by `model_cache` in its pinned child process."""
    options = {k: recipe[k] for k in ("random_per_batch", "class_pool", "random_pool", "lr", "weight_decay",
                                      "crop_fraction")}
    write_tiny_clip(folder, recipe["seed"], recipe["steps"], log=log, **options)
