"""Stage one: MLLM descriptions of every image, encoded into SCP tensors and cached in Parquet."""
