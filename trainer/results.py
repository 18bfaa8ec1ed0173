"""Results JSON: one file per (run, evaluated dataset, split), the unit that `mugcp report` aggregates.

The keys CLIP users know from LAION's CLIP_benchmark come first (`dataset`, `model`, `pretrained`,
`task`, `metrics` with `acc1`, `acc5`, `mean_per_class_recall` as fractions); mugcp's own follow
(`method`, `setting`, `source` (the dataset trained on), `split`, `seed`, `accuracy` in percent, ...).
"""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from mugcp.core.files import write_json_atomic


def results_path(run_dir: str | Path, split: str, dataset: Optional[str] = None, test_scp: Optional[str] = None) -> Path:
    """`results_<split>.json` for the run's own dataset, `results_<dataset>_<split>.json` for another one;
    `..._scp-<control>.json` for an evaluation with a test-time SCP control (`mugcp eval --scp`)."""
    name = f"results_{split}" if dataset is None else f"results_{dataset}_{split}"
    return Path(run_dir) / f"{name}{f'_scp-{test_scp}' if test_scp else ''}.json"


def write_results(path: Path, *, dataset: str, model: str, pretrained: Optional[str], task: str, metrics: dict,
                  method: str, setting: str, source: Optional[str], split: str, seed: int, accuracy: float,
                  num_images: int, **extra) -> Path:
    """Write the record atomically; the keys every reader relies on come first."""
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "method": method, "setting": setting, "source": source, "split": split, "seed": seed,
              "accuracy": round(accuracy, 4), "num_images": num_images, **extra,
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
    write_json_atomic(path, record)
    return path


def read_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# The keys every reader relies on, with their types.
CORE_KEYS = {"dataset": str, "method": str, "split": str, "seed": int, "accuracy": (int, float)}


def readable_results(path: str | Path) -> Optional[dict]:
    """The record at `path`, or None when it is missing or damaged (not JSON, a core key missing or mistyped, an
    accuracy that is no percentage or disagrees with its `metrics.acc1`): a reader leaves such a file out and says
    so, a sweep evaluates again and rewrites it."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), t) and not isinstance(record.get(k), bool) for k, t in CORE_KEYS.items()):
        return None
    accuracy, acc1 = record["accuracy"], (record.get("metrics") or {}).get("acc1")
    if not (math.isfinite(accuracy) and 0 <= accuracy <= 100):
        return None
    if isinstance(acc1, (int, float)) and abs(acc1 * 100 - accuracy) > 1e-3:  # both written from one count
        return None
    return record
