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

from safetensors import safe_open

from mugcp.core.files import write_json_atomic
from mugcp.trainer.runs import FINAL_WEIGHTS, recorded_differences

OWN_SPLITS = ("base", "novel", "all")  # a run's own evaluation: results_<split>.json


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


def weights_header(run_dir: str | Path) -> dict:
    """The metadata a run's final weights carry in their header (`save_tensors`: the sha256 of the tensors, the
    identity of the run they were trained for), read without their tensors; {} where there are none."""
    try:
        with safe_open(str(Path(run_dir) / FINAL_WEIGHTS), "numpy") as f:
            return f.metadata() or {}
    except Exception:  # missing or damaged: whatever safetensors raises for it, there are no weights to match
        return {}


def weights_digest(run_dir: str | Path) -> Optional[str]:
    """The sha256 of a run's final weights (None: none, or a file of an earlier version that carries none)."""
    return weights_header(run_dir).get("sha256")


def other_weights(record: dict, run: dict, digest: Optional[str]) -> list[str]:
    """How a results record differs from the run folder it lies in now (`run`: its run.json, `digest`: its final
    weights' `weights_digest`): results measured before the run was trained or imported again describe weights
    that are gone. What a record of an earlier version lacks is not compared ([] : it describes them)."""
    held = {"weights": (record.get("weights_sha256") or "")[:12] or None, "config": record.get("config"),
            "clip": record.get("clip"), "conditions": record.get("conditions"), "imported": record.get("imported")}
    asked = {"weights": (digest or "none")[:12], "config": run.get("config"),
             "clip": run.get("clip_model_id"), "conditions": run.get("conditions"), "imported": run.get("imported")}
    return recorded_differences({k: v for k, v in held.items() if v is not None}, asked)


def current_results(path: Path, run: dict, digest: Optional[str]) -> Optional[dict]:
    """The readable record at `path` if it describes the run's weights now (`other_weights`), else None."""
    record = readable_results(path)
    return record if record is not None and not other_weights(record, run, digest) else None
