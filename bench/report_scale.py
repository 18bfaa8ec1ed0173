"""What `mugcp report` costs over the papers' whole benchmark: every run folder of the b2n and few-shot settings.

A runs tree as `mugcp sweep --setting b2n,fewshot --datasets all` leaves it (7 trained methods x 3 seeds: 231 b2n
runs with Base and Novel results, 1,155 few-shot runs with an all-classes result, zero-shot beside them) is written
with real run records, final weights (safetensors of CoOp's 16 x 512 context, with their sha256: the report reads
their header only, so their size does not enter) and results that name those weights. The report is timed as a user runs it: every results file checked against the
weights its folder holds now (their header only) and the split of its dataset, then the tables and the figure.

    python bench/report_scale.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mugcp.core.coop_datasets import BASE_TO_NOVEL
from mugcp.core.files import write_json_atomic
from mugcp.trainer.checkpoints import save_tensors
from mugcp.trainer.config import load_config
from mugcp.trainer.report import write_report
from mugcp.trainer.results import results_path, weights_digest, write_results

METHODS = ("coop", "cocoop", "kgcoop", "maple", "promptsrc", "gpt", "mugcp")


def write_tree(root: Path, values: int) -> int:
    """The runs tree; returns how many results files it holds."""
    weights = {"ctx": torch.randn(values)}
    count = 0
    for dataset in BASE_TO_NOVEL:
        for method in METHODS:
            for shots, subsample, splits in [(16, "base", ("base", "novel"))] + [(k, "all", ("all",))
                                                                                for k in (1, 2, 4, 8, 16)]:
                protocol = "b2n" if subsample == "base" else "fewshot"
                config = load_config(method, None, protocol=protocol, dataset=dataset, shots=shots).to_dict()
                for seed in (1, 2, 3):
                    run = root / dataset / method / f"{'b2n' if subsample == 'base' else 'all'}_shots{shots}" / f"seed{seed}"
                    write_json_atomic(run / "run.json", {"dataset": dataset, "method": method, "seed": seed,
                                                         "shots": shots, "subsample": subsample, "config": config,
                                                         "clip_model_id": "ViT-B-16@openai", "split": "s" * 16})
                    save_tensors(run / "prompt.safetensors", weights)
                    for split in splits:
                        write_results(results_path(run, split), dataset=dataset, model="ViT-B-16", pretrained="openai",
                                      task="prompt_classification", metrics={"acc1": 0.5}, method=method,
                                      setting=protocol, source=dataset, split=split, seed=seed, accuracy=50.0,
                                      num_images=1000, shots=shots, subsample=subsample, config=config,
                                      clip="ViT-B-16@openai", split_digest="s" * 16,
                                      weights_sha256=weights_digest(run))
                        count += 1
        for split in ("base", "novel", "all"):
            write_results(results_path(root / dataset / "zeroshot" / "seed1", split), dataset=dataset,
                          model="ViT-B-16", pretrained="openai", task="zeroshot_classification", metrics={"acc1": 0.5},
                          method="zeroshot", setting="zeroshot", source=None, split=split, seed=1, accuracy=50.0,
                          num_images=1000, clip="ViT-B-16@openai", split_digest="s" * 16)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=16 * 512, help="values in each run's final weights")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        results = write_tree(root, args.values)
        built = time.perf_counter() - started
        started = time.perf_counter()
        md, _ = write_report(root)
        seconds = time.perf_counter() - started
        assert "Missing or incomplete" not in md, md.split("Missing or incomplete")[1][:500]
    print(f"{results} results files in {len(METHODS) * 11 * 18} run folders (tree written in {built:.0f} s): "
          f"mugcp report in {seconds:.1f} s")


if __name__ == "__main__":
    main()
