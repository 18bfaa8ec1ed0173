"""Results JSON: one file per (run, split), the unit that `mugcp report` aggregates."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from mugcp.core.files import write_json_atomic


def results_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"results_{split}.json"


def write_results(run_dir: str | Path, split: str, *, dataset: str, method: str, seed: int, accuracy: float,
                  num_images: int, **extra) -> Path:
    """Write the record atomically; the keys every reader relies on come first."""
    record = {"dataset": dataset, "method": method, "split": split, "seed": seed,
              "accuracy": round(accuracy, 4), "num_images": num_images, **extra,
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
    path = results_path(run_dir, split)
    write_json_atomic(path, record)
    return path


def read_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
