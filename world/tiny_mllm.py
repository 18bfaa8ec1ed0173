"""A tiny random-weight Qwen2-VL that transformers and vLLM both load: stage one with nothing downloaded.

Text: hidden 128, 2 layers, 2 heads (1 KV head, head dim 64), vocabulary 1,024; vision: width 64,
2 blocks; ~0.8 M parameters. The tokenizer is a byte-level BPE trained here on generated English
(Qwen2's pre-tokenizer split and special tokens), wrapped with a Qwen2-VL chat template and a
small pixel budget (a 64 x 64 image is 4 image tokens; 320 x 240 is 64). Answers are random text:
the point is the real code path, not the content.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

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


def _corpus(n_lines: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        yield json.dumps(words[: rng.randint(1, 6)]) + " " + " ".join(words) + "."


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
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


def write_tiny_mllm(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write the tiny Qwen2-VL (config, safetensors, tokenizer, processor, generation config); return its folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, vocab_size)
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
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": MIN_PIXELS,
                 "max_pixels": MAX_PIXELS, "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                 "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
