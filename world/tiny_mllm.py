"""The world's MLLM: a tiny Qwen2-VL that transformers and vLLM both load, random or trained to describe textures.

Text: hidden 128, 2 layers, 2 heads (1 KV head, head dim 64), vocabulary 1,024; vision: width 64,
2 blocks; ~0.8 M parameters. The tokenizer is a byte-level BPE trained here on generated English
(Qwen2's pre-tokenizer split and special tokens), wrapped with a Qwen2-VL chat template and a
small pixel budget (a 64 x 64 image is 4 image tokens; 320 x 240 is 64).

- `write_tiny_mllm`: random weights; answers are random text (the real code paths, no content).
- `train_describer`: the same architecture trained briefly to answer the stage-one question
  (passed in: it lives with the pipeline) with the attributes of a texture as a JSON list of
  phrases (`synth.describe`), from the pixels alone. Two stages, as real MLLMs are built: the
  vision tower first learns the attributes (a linear head per attribute on its pooled output:
  cheap, images only), then the whole model learns to say them (teacher forcing on the answer
  tokens; the question's ~120 tokens make each sample cost ~40x an image alone). It learns on
  images of random attribute combinations, never on the dataset's classes or their names, so
  its answers are label-free and as good for novel classes as for base ones. Its pixel budget is larger (a 64 x 64
  image is upscaled to 112 x 112: 16 image tokens), as real MLLMs see images at a higher
  resolution than CLIP. `world_describer(question)` builds it once per machine (`model_cache`).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import AutoProcessor, PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from mugcp.world import synth
from mugcp.world.model_cache import cached_build
from mugcp.world.synth import describe, draw, jpeg, random_attributes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 3136, 50176

_WORDS = ("red orange yellow green blue purple brown black white grey striped dotted checked woven knitted rough "
          "smooth shiny matte wooden metal stone brick fabric paper glass plastic leather fur feather scale "
          "surface texture pattern object part edge corner line stripe dot grid wave spiral ring crack hole "
          "bump fold wrinkle mesh lace pleat swirl vein stain blotch fleck speckle honeycomb waffle zigzag "
          "photo image picture scene indoor outdoor light dark bright pale large small round square flat "
          "curved thin thick soft hard wet dry old new a an the of with and on in is are this that").split()


def _corpus(n_lines: int = 3000, seed: int = 0, extra: tuple[str, ...] = ()):
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        yield json.dumps(words[: rng.randint(1, 6)]) + " " + " ".join(words) + "."
    yield from extra


def _write_tokenizer(out: Path, vocab_size: int, extra: tuple[str, ...] = ()) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(extra=extra), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # name the class as the Hub's Qwen2-VL checkpoints do, so every loader picks the Qwen2 tokenizer
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def write_tiny_mllm(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024, corpus: tuple[str, ...] = (),
                    min_pixels: int = MIN_PIXELS) -> Path:
    """Write the tiny Qwen2-VL (config, safetensors, tokenizer, processor, generation config); return its folder.

    `corpus`: more text for the tokenizer to learn from; `min_pixels`: smaller images are upscaled to this.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, vocab_size, corpus)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = {"vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}, "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False}
    config = Qwen2VLConfig(
        text_config=dict(text), **{k: v for k, v in text.items() if k != "rope_scaling"},
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    # Both key spellings of the pixel budget: transformers 5 reads `size`, older readers min/max_pixels.
    processor = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
                 "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": min_pixels,
                 "max_pixels": MAX_PIXELS, "size": {"shortest_edge": min_pixels, "longest_edge": MAX_PIXELS},
                 "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


# The world's describer: 1,500 vision steps (its build log scores the heads on held-out images: family 48%,
# still climbing slowly), 200 language steps; a build takes 2.5 minutes on a 2-core AVX-512 EPYC, 7 on a
# slower 2-core machine.
DESCRIBER_RECIPE = {"seed": 0, "vision_steps": 1500, "vision_batch_size": 64, "steps": 200, "batch_size": 16,
                    "pool": 3000, "lr": 2e-3, "min_pixels": 112 * 112}
VISION_HELD_OUT = 500  # random images the vision stage never trains on: its build log scores them
ATTRIBUTE_VALUES = {"family": list(synth.FAMILIES), "fg": list(synth.COLOURS), "bg": list(synth.COLOURS),
                    "scale": list(synth.SCALES), "orientation": [None, *synth.ORIENTATIONS]}


def _answer(attributes: synth.Attributes) -> str:
    return json.dumps(describe(attributes))


def _train_vision(model, pixels: torch.Tensor, grid: torch.Tensor, attrs: list, held_out: int, steps: int,
                  batch_size: int, lr: float, gen: torch.Generator, log) -> dict[str, float]:
    """Stage 1: the vision tower (with its merger) learns every attribute through linear heads on its mean output.

    The last `held_out` images are never trained on; returns the heads' accuracy on them per attribute.
    """
    visual, per_image = model.model.visual, int(grid[0].prod())
    width = model.config.text_config.hidden_size
    heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in ATTRIBUTE_VALUES.items()})
    targets = {k: torch.tensor([v.index(getattr(a, k)) for a in attrs]) for k, v in ATTRIBUTE_VALUES.items()}
    opt = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=lr, weight_decay=0.01)

    def pooled(pick: torch.Tensor) -> torch.Tensor:
        rows = (pick[:, None] * per_image + torch.arange(per_image)).flatten()
        return visual(pixels[rows], grid_thw=grid[pick]).pooler_output.view(len(pick), -1, width).mean(1)

    for step in range(steps):
        pick = torch.randint(len(attrs) - held_out, (batch_size,), generator=gen)
        features = pooled(pick)
        loss = sum(F.cross_entropy(heads[k](features), targets[k][pick]) for k in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"[world] describer vision step {step + 1}/{steps}: loss {loss.item():.3f}")
    with torch.no_grad():
        pick = torch.arange(len(attrs) - held_out, len(attrs))
        features = pooled(pick)
        return {k: (heads[k](features).argmax(1) == targets[k][pick]).float().mean().item() for k in heads}


def train_describer(out_dir: str | Path, question: str, steps: int = 200, batch_size: int = 16, pool: int = 3000,
                    lr: float = 2e-3, seed: int = 0, min_pixels: int = 112 * 112, vision_steps: int = 300,
                    vision_batch_size: int = 64, log=lambda _: None) -> Path:
    """Write the tiny Qwen2-VL trained to answer `question` about a texture image with its attributes."""
    rng = np.random.default_rng(20_000 + seed)
    attrs = [random_attributes(rng) for _ in range(pool + VISION_HELD_OUT)]
    answers = [_answer(a) for a in attrs]
    corpus = tuple([question] * 50 + answers[:500])
    out = write_tiny_mllm(out_dir, seed=seed, corpus=corpus, min_pixels=min_pixels)
    processor = AutoProcessor.from_pretrained(out)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    images = [Image.open(io.BytesIO(jpeg(draw(a, rng, 64)))).convert("RGB") for a in attrs]
    vision = processor.image_processor(images=images, return_tensors="pt")
    pixels, grid = vision["pixel_values"], vision["image_grid_thw"]
    per_image = int(grid[0].prod())
    if not bool((grid == grid[0]).all()):
        raise ValueError("the describer's training images must share one size")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[prompt], images=images[:1], return_tensors="pt")
    prompt_ids, prompt_types = encoded["input_ids"][0], encoded["mm_token_type_ids"][0]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    held_out = _train_vision(model, pixels, grid, attrs, VISION_HELD_OUT, vision_steps, vision_batch_size, lr, gen,
                             log)
    log("[world] describer vision heads on held-out images: " +
        ", ".join(f"{k} {100 * v:.0f}%" for k, v in held_out.items()))
    tok = processor.tokenizer
    answer_ids = [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers]
    pad = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for step in range(steps):
        pick = torch.randint(pool, (batch_size,), generator=gen).tolist()
        longest = max(len(answer_ids[i]) for i in pick)
        ids = torch.full((batch_size, len(prompt_ids) + longest), pad)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(pick):
            n = len(answer_ids[i])
            ids[row, :len(prompt_ids)] = prompt_ids
            ids[row, len(prompt_ids):len(prompt_ids) + n] = torch.tensor(answer_ids[i])
            labels[row, len(prompt_ids):len(prompt_ids) + n] = ids[row, len(prompt_ids):len(prompt_ids) + n]
        mask = (labels != -100) | (torch.arange(ids.shape[1]) < len(prompt_ids))
        types = torch.zeros_like(ids)
        types[:, :len(prompt_ids)] = prompt_types
        rows = (torch.tensor(pick)[:, None] * per_image + torch.arange(per_image)).flatten()
        hidden = model.model(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels[rows],
                             image_grid_thw=grid[pick], mm_token_type_ids=types).last_hidden_state
        target = labels[:, 1:]
        scored = target != -100  # the vocabulary head runs on the answer's positions only
        loss = F.cross_entropy(model.lm_head(hidden[:, :-1][scored]), target[scored])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(f"[world] describer language step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out)
    return out


def world_describer(question: str, log=lambda _: None) -> Path:
    """Folder of the world's describer MLLM for `question`, built once per machine (2.5-7 minutes)."""
    return cached_build("describer", {**DESCRIBER_RECIPE, "question": question}, [Path(__file__), Path(synth.__file__)],
                        "mugcp.world.tiny_mllm:build_world_describer", log=log)


def build_world_describer(folder: Path, recipe: dict, log) -> None:
    """`world_describer`'s build, run by `model_cache` in its pinned child process."""
    train_describer(folder, log=log, **recipe)
