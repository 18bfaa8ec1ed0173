"""`mugcp sweep`: the whole base-to-novel benchmark as one restartable command.

For each dataset x method x seed: stage one if the method reads SCP and the cache lacks images
(extraction skips what is cached), train (skipped when finished, resumed when partial), eval on
base and novel (skipped when the results exist), then the report. Safe to kill and start again.
Top floor, like the CLI: it only calls the stages' public functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mugcp.errors import UserError


def run_sweep(datasets: list[str], methods: list[str], seeds: list[int], root: Path, *, shots: int = 16,
              output: Path = Path("runs"), cache_dir: Path = Path("cache"), clip: str, pretrained: str | None,
              device: torch.device, extract_options: dict | None = None, overrides: list[str] = (),
              workers: int | None = None, log=print) -> tuple[str, list[Path]]:
    from trainer.config import load_config
    from trainer.method import method_uses_scp
    from trainer.report import write_report
    from trainer.results import results_path
    from trainer.run import RunSpec, run_eval, run_train

    failures = []
    for dataset in datasets:
        if any(m != "zeroshot" and method_uses_scp(m) for m in methods) and extract_options is not None:
            from pipeline.extract import run_extract

            summary = run_extract(dataset, root, clip=clip, pretrained=pretrained, cache_dir=cache_dir,
                                  **extract_options)
            if summary.failed:
                failures.append(f"{dataset}: {summary.failed} image(s) failed in stage one")
        for method in methods:
            if method == "zeroshot":
                from trainer.zeroshot import run_zeroshot

                for split in ("base", "novel"):
                    if not results_path(Path(output) / dataset / "zeroshot" / "seed1", split).is_file():
                        run_zeroshot(dataset, root, split=split, clip=clip, pretrained=pretrained, device=device,
                                     output=output, workers=workers)
                continue
            config = load_config(method, None, overrides)
            for seed in seeds:
                spec = RunSpec(dataset, str(Path(root).resolve()), method, shots, seed, "base", clip, pretrained,
                               str(Path(cache_dir).resolve()), (extract_options or {}).get("mllm"), config)
                run_dir = spec.run_dir(output)
                try:
                    if not (run_dir / "prompt.safetensors").is_file():
                        run_train(dataset, root, method=method, shots=shots, seed=seed, overrides=overrides,
                                  output=output, cache_dir=cache_dir, mllm=spec.mllm, clip=clip,
                                  pretrained=pretrained, device=device, resume=run_dir.exists(), workers=workers,
                                  log=log)
                    for split in ("base", "novel"):
                        if not results_path(run_dir, split).is_file():
                            for line in run_eval(run=run_dir, output=output, split=split, root=root, device=device,
                                                 workers=workers):
                                log(line)
                except UserError as e:  # one broken run must not stop the benchmark
                    failures.append(f"{dataset} {method} seed {seed}: {e}")
                    log(f"[sweep] skipped {dataset} {method} seed {seed}: {e}")
    md, paths = write_report(output)
    if failures:
        md += "\nSweep failures:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    return md, paths
