"""mugcp: adapt a frozen CLIP with prompts conditioned on what a multimodal LLM says about each image."""

__version__ = "0.1.0"
