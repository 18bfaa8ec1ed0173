"""Stage one: MLLM descriptions of the images the protocol reads, encoded into SCP tensors and cached."""
