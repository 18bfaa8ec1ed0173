"""Defaults that the command line and both stages share, in a module that imports nothing heavy."""

DEFAULT_CLIP = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
# An open 8B vision-language model that vLLM and transformers both serve, strong at short factual
# descriptions, and small enough (bf16) for one 24 GB GPU.
DEFAULT_MLLM = "Qwen/Qwen3-VL-8B-Instruct"
# Where a run's SCP comes from: as extracted, or a control (another image's SCP, zeros). A training config key
# (`conditions.scp`) and a test-time option (`mugcp eval --scp`, `mugcp sweep --test-scp`).
SCP_SOURCES = ("real", "shuffled", "zeros")
