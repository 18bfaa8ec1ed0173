"""What a run is: its identity (`RunSpec`, written to run.json), its folder, and how a command finds it.

    runs/<dataset>/<method>/<setting>/seed<S>/     setting: b2n_shots16, all_shots4, transfer_shots16 ...
        run.json              what defines the run (dataset, method, shots, seed, subsample, CLIP, config, cache)
        fewshot.json          the drawn train/val lists (the protocol's audit trail)
        checkpoints/epoch-N/  learnable parameters + optimiser + method state, renamed into place whole
        prompt.safetensors    the final weights (the last epoch's, or the method's own final ones)
        results_<split>.json  accuracy on the base / novel / all test classes

A run imported from a reference trainer's checkpoint (`mugcp import`) holds run.json and prompt.safetensors only;
run.json's `imported` names the file and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Optional, get_type_hints

from pydantic import TypeAdapter, ValidationError

from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic
from mugcp.trainer.config import TrainConfig, config_from_dict

LATEST = "latest-run.txt"
FINAL_WEIGHTS = "prompt.safetensors"
HISTORY = "history.json"  # per epoch: lr, training loss and accuracy on the augmented shots


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
    # "transfer": the ImageNet source run of cross-dataset and domain generalisation, when the method's
    # reference config for it differs from its few-shot one (its own folder); "" otherwise
    protocol: str = ""

    @property
    def setting(self) -> str:
        kind = self.protocol or ("b2n" if self.subsample == "base" else self.subsample)
        return f"{kind}_shots{self.shots}"

    def run_dir(self, output: Path) -> Path:
        return Path(output) / self.dataset / self.method / self.setting / f"seed{self.seed}"

    def train_config(self) -> TrainConfig:
        return config_from_dict(self.method, self.config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict, where: Path) -> "RunSpec":
        missing = [k for k, f in cls.__dataclass_fields__.items() if k not in record and f.default is MISSING]
        if missing:
            raise UserError(f"{where / 'run.json'} lacks {', '.join(missing)}: not a run folder this mugcp wrote")
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        for name, kind in get_type_hints(cls).items():  # each of the type this mugcp writes: a hand-edited record
            try:                                          # fails here, on one line
                TypeAdapter(kind).validate_python(fields.get(name, ""), strict=True)
            except ValidationError as e:
                raise UserError(f"{where / 'run.json'}: {name}: {e.errors()[0]['msg'].lower()}: not a run record this "
                                f"mugcp wrote") from None
        return cls(**fields)


# What defines a run's weights: a resumed run may change none of it, and the final weights carry its hash.
IDENTITY = ("dataset", "method", "shots", "seed", "subsample", "clip_model_id", "conditions", "config", "split",
            "imported",  # imported: the reference checkpoint a run's weights were read from (`mugcp import`)
            "draw")  # the sha256 of the reference's own few-shot draw it trained on (ImageNet's), or None


def identity(record: dict) -> dict:
    """The record's part that defines its weights; a key a record of an earlier version lacks (the split,
    recorded since runs carry it) is left out, so those runs keep their weights' hash."""
    return {k: record[k] for k in IDENTITY if k in record}


def identity_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(identity(record), sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def recorded_differences(held: dict, asked: dict) -> list[str]:
    """`differences` over the keys of `asked` that `held` records: what an earlier version did not record (a
    run's or a result's split) is not compared."""
    return differences({k: held[k] for k in asked if k in held}, {k: asked[k] for k in asked if k in held})


def finished_differently(run_dir: Path, spec: RunSpec, clip_model_id: str, split_digest: Optional[str]) -> list[str]:
    """How the finished run in `run_dir` differs from the run `spec` asks for (its config, CLIP weights and
    the split of its data): a sweep that skipped it would report weights trained otherwise than asked."""
    record = read_run(run_dir)
    held = {"config": record.get("config"), "clip": record.get("clip_model_id"),
            "imported from": (record.get("imported") or {}).get("file"),
            **({"split": record["split"]} if "split" in record else {})}
    return recorded_differences(held, {"config": spec.config, "clip": clip_model_id, "split": split_digest,
                                       "imported from": None})


def read_run(run: Path) -> dict:
    try:
        record = json.loads((run / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'run.json'} ({type(e).__name__}): is {run} a run folder?") from None
    if not isinstance(record, dict):
        raise UserError(f"{run / 'run.json'} is not a run record: is {run} a run folder?")
    return record


def finish_hint(record: dict, trained: str = "finish it with `mugcp train ... --resume`") -> str:
    """What to do about a run's missing or damaged weights: `trained`, or for an imported run (nothing to train)
    import it again."""
    source = (record.get("imported") or {}).get("file")
    return f"import it again (`mugcp import {source} ...`)" if source else trained


def mark_latest(output: Path, run_dir: Path) -> None:
    """Record `run_dir` as the latest run under `output`, relative to it: a tree copied or moved whole keeps
    pointing at its own run."""
    relative = os.path.relpath(os.path.abspath(run_dir), os.path.abspath(output))  # unresolved: a linked folder
    write_bytes_atomic(Path(output) / LATEST, (relative + "\n").encode())          # under output stays under it


def resolve_run(run: Optional[Path], output: Path) -> Path:
    """The run folder to evaluate: the one given, or the latest one `mugcp train` or `mugcp import` wrote under
    `output` (never one outside it: an earlier version recorded absolute paths, which a copied tree still holds)."""
    if run is None:
        marker = Path(output) / LATEST
        if not marker.is_file():
            raise UserError(f"no run given and no latest run under {output}: train one with `mugcp train` "
                            f"or pass --run DIR")
        named = marker.read_text(errors="replace").strip()
        run = Path(output) / named
        lexical = Path(os.path.normpath(os.path.join(os.path.abspath(output), named)))
        inside = lexical.is_relative_to(os.path.abspath(output)) or (  # earlier versions wrote resolved paths
            Path(named).is_absolute() and Path(named).resolve().is_relative_to(Path(output).resolve()))
        if not named or not inside:
            raise UserError(f"{marker} names {named or 'no run'}, not a run under {output} (a tree copied from "
                            f"elsewhere?): pass --run DIR")
    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a run folder (no run.json): pass the folder `mugcp train` printed")
    if not (run / FINAL_WEIGHTS).is_file():
        raise UserError(f"{run} has not finished training: {finish_hint(read_run(run))}")
    return run
