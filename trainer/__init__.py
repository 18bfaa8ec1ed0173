"""Stage two: prompt methods (one file each in methods/), the training loop, evaluation and the report."""
