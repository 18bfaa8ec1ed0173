"""`mugcp sweep`: the whole base-to-novel benchmark as one restartable command.

For each dataset x method x seed: stage one if a method reads SCP and an extract config is given
(extraction skips what is cached), train (skipped when finished, resumed when partial), eval on
base and novel (skipped when the results exist), then the report. Safe to kill and start again.
Top floor, like the CLI: it only calls the stages' public functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mugcp.core.errors import UserError
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.extract import run_extract
from mugcp.trainer.config import load_config
from mugcp.trainer.evaluation import run_eval, run_untrained
from mugcp.trainer.methods import method_class
from mugcp.trainer.report import write_report
from mugcp.trainer.results import results_path
from mugcp.trainer.runs import FINAL_WEIGHTS, RunSpec
from mugcp.trainer.train import run_train

B2N_SPLITS = ("base", "novel")


def train_and_evaluate(spec: RunSpec, output: Path, *, device: torch.device, workers: Optional[int] = None,
                       log=print) -> Path:
    """One base-to-novel run: train it (resumed when partial, skipped when finished), then evaluate what is missing."""
    run_dir = spec.run_dir(output)
    if not (run_dir / FINAL_WEIGHTS).is_file():
        run_train(spec, output=output, device=device, resume=run_dir.exists(), workers=workers, log=log)
    for split in B2N_SPLITS:
        if not results_path(run_dir, split).is_file():
            for line in run_eval(run=run_dir, output=output, split=split, root=Path(spec.root), device=device,
                                 workers=workers):
                log(line)
    return run_dir


def run_sweep(datasets: list[str], methods: list[str], seeds: list[int], root: Path, *, shots: int = 16,
              output: Path = Path("runs"), cache_dir: Path = Path("cache"), clip: str, pretrained: Optional[str],
              mllm: Optional[str] = None, device: torch.device, extract: Optional[ExtractConfig] = None,
              overrides: list[str] = (), workers: Optional[int] = None, log=print) -> tuple[str, list[Path]]:
    classes = {m: method_class(m) for m in methods}  # unknown names fail here, before any work
    configs = {m: load_config(m, None, overrides if cls.trains else []) for m, cls in classes.items()}
    failures = []
    for dataset in datasets:
        if extract is not None and any(cls.reads for cls in classes.values()):
            summary = run_extract(dataset, root, extract, log=log)
            if summary.failed:
                failures.append(f"{dataset}: {summary.failed} image(s) failed in stage one")
        for method, cls in classes.items():
            if not cls.trains:
                for split in B2N_SPLITS:
                    if not results_path(Path(output) / dataset / method / "seed1", split).is_file():
                        run_untrained(method, dataset, root, split=split, clip=clip, pretrained=pretrained,
                                      device=device, output=output, workers=workers, log=log)
                continue
            for seed in seeds:
                spec = RunSpec(dataset, str(Path(root).resolve()), method, shots, seed, "base", clip, pretrained,
                               str(Path(cache_dir).resolve()), mllm, configs[method].to_dict())
                try:
                    train_and_evaluate(spec, output, device=device, workers=workers, log=log)
                except UserError as e:  # one broken run must not stop the benchmark
                    failures.append(f"{dataset} {method} seed {seed}: {e}")
                    log(f"[sweep] skipped {dataset} {method} seed {seed}: {e}")
    md, paths = write_report(output)
    if failures:
        md += "\nSweep failures:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    return md, paths
