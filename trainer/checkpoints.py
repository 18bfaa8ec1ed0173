"""Checkpoints: what a resumed run needs to continue bit for bit, written so a kill never tears one.

`checkpoints/epoch-NNNN/` holds the learnable parameters, the SGD momentum, the loss scaler's
state and the method's own training state (safetensors / JSON); it is written under a temporary
name and renamed into place whole, and older epochs are removed after. Only the learnable
parameters are saved: the frozen CLIP is never copied.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as to_bytes

from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic, write_json_atomic
from mugcp.trainer.methods.base import PromptMethod


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    write_bytes_atomic(path, to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (a folder still being written is named `epoch-NNNN.tmp`)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("epoch-*") if re.fullmatch(r"epoch-\d{4}", p.name))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    done = finished_checkpoints(run_dir)
    return done[-1] if done else None


def remove_unfinished(run_dir: Path) -> None:
    """Drop what a killed run left half-written: checkpoint folders, hidden temporary files (the caller
    holds the run's lock)."""
    for tmp in (run_dir / "checkpoints").glob("epoch-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, epoch: int, method: PromptMethod, optimizer, scaler) -> None:
    """Write epoch N's state into a folder renamed into place whole, then drop older epochs."""
    final = run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "prompt.safetensors", method.learnable_state_dict())
    names = {id(p): n for n, p in method.named_parameters()}
    momentum = {names[id(p)]: s["momentum_buffer"] for group in optimizer.param_groups for p in group["params"]
                if (s := optimizer.state.get(p)) and s.get("momentum_buffer") is not None}
    save_tensors(tmp / "optim.safetensors", momentum)
    save_tensors(tmp / "method.safetensors", method.training_state())
    write_json_atomic(tmp / "scaler.json", scaler.state_dict())  # empty when mixed precision is off
    tmp.rename(final)
    for old in finished_checkpoints(run_dir)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, method: PromptMethod, optimizer, scaler) -> int:
    """Restore a checkpoint into `method`, `optimizer` and `scaler`; return the number of epochs done. A
    checkpoint damaged after it was written (it is renamed into place whole) is refused on one line."""
    try:
        return _restore(ckpt, method, optimizer, scaler)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"cannot resume from {ckpt}: it is damaged ({type(e).__name__}: {str(e)[:120]}); delete the "
                        f"run folder and train again") from None


def _restore(ckpt: Path, method: PromptMethod, optimizer, scaler) -> int:
    method.load_learnable_state_dict(load_file(str(ckpt / "prompt.safetensors")))
    params = dict(method.named_parameters())
    for name, buf in load_file(str(ckpt / "optim.safetensors")).items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device)
    if (ckpt / "method.safetensors").is_file():
        method.load_training_state(load_file(str(ckpt / "method.safetensors")))
    scaler_state = json.loads((ckpt / "scaler.json").read_text()) if (ckpt / "scaler.json").is_file() else {}
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    return int(ckpt.name.split("-")[1])
