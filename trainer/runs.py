"""What a run is: its identity (`RunSpec`, written to run.json), its folder, and how a command finds it.

    runs/<dataset>/<method>/<setting>/seed<S>/
        run.json              what defines the run (dataset, method, shots, seed, subsample, CLIP, config, cache)
        fewshot.json          the drawn train/val lists (the protocol's audit trail)
        checkpoints/epoch-N/  learnable parameters + optimiser + method state, renamed into place whole
        prompt.safetensors    the final weights (the last epoch's, or the method's own final ones)
        results_<split>.json  accuracy on the base / novel / all test classes
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from mugcp.core.errors import UserError
from mugcp.trainer.config import TrainConfig, config_from_dict

LATEST = "latest-run.txt"
FINAL_WEIGHTS = "prompt.safetensors"


@dataclass
class RunSpec:
    """What defines a run; written to run.json and read back by `mugcp eval`."""

    dataset: str
    root: str
    method: str
    shots: int
    seed: int
    subsample: str
    clip: str
    pretrained: Optional[str]
    cache_dir: str
    mllm: Optional[str]
    config: dict  # TrainConfig.to_dict()

    @property
    def setting(self) -> str:
        return f"{'b2n' if self.subsample == 'base' else self.subsample}_shots{self.shots}"

    def run_dir(self, output: Path) -> Path:
        return Path(output) / self.dataset / self.method / self.setting / f"seed{self.seed}"

    def train_config(self) -> TrainConfig:
        return config_from_dict(self.method, self.config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "RunSpec":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__})


def read_run(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'run.json'} ({type(e).__name__}): is {run} a run folder?") from None


def resolve_run(run: Optional[Path], output: Path) -> Path:
    """The run folder to evaluate: the one given, or the latest one `mugcp train` wrote under `output`."""
    if run is None:
        marker = Path(output) / LATEST
        if not marker.is_file():
            raise UserError(f"no run given and no latest run under {output}: train one with `mugcp train` "
                            f"or pass --run DIR")
        run = Path(marker.read_text().strip())
    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a run folder (no run.json): pass the folder `mugcp train` printed")
    if not (run / FINAL_WEIGHTS).is_file():
        raise UserError(f"{run} has not finished training: finish it with `mugcp train ... --resume`")
    return run
