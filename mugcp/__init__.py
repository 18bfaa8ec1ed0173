"""mugcp: adapt a frozen CLIP with prompts conditioned on what a multimodal LLM says about each image.

This package's own folder is the top floor (the `mugcp` command, the demo, the sweep); the floors
below are `mugcp.pipeline` and `mugcp.trainer` (the two stages), `mugcp.world` (the built-in demo
world) and `mugcp.core` (what they share). See ARCHITECTURE.md.
"""

__version__ = "0.2.0"
