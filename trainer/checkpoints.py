"""Checkpoints: what a resumed run needs to continue bit for bit, written so a kill never tears one.

`checkpoints/epoch-NNNN/` holds the learnable parameters, the SGD momentum, the loss scaler's
state and the method's own training state (safetensors / JSON); it is written under a temporary
name and renamed into place whole, and older epochs are removed after. Only the learnable
parameters are saved: the frozen CLIP is never copied.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as to_bytes

from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic, write_json_atomic
from mugcp.trainer.methods.base import PromptMethod


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: what a damaged file cannot keep."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Safetensors written whole (renamed into place), with the digest of their tensors in the metadata (none for
    no tensors: safetensors 0.4.3, the floor, cannot read metadata beside an empty table, and nothing can flip)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = {"sha256": tensors_digest(tensors)} if tensors else {}
    write_bytes_atomic(path, to_bytes(tensors, {**(metadata or {}), **digest} or None))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file `save_tensors` wrote; bytes changed since (on disk, by hand) raise
    ValueError. Files of earlier versions carry no digest and are read unchecked."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "sha256" in metadata and tensors_digest(tensors) != metadata["sha256"]:
        raise ValueError(f"{path.name}: its tensors do not match the checksum written with them")
    return tensors, metadata


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
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # a full disk (no inode left), a read-only run folder
        raise UserError(f"cannot write {tmp}: {e.strerror}") from None
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
        what = str(e)[:120] if isinstance(e, _Missing) else f"{type(e).__name__}: {str(e)[:120]}"
        raise UserError(f"cannot resume from {ckpt}: it is damaged ({what}); delete the run folder and train "
                        f"again") from None


class _Missing(ValueError):
    """A file every checkpoint of this method holds is not there."""


def _restore(ckpt: Path, method: PromptMethod, optimizer, scaler) -> int:
    keeps_state = type(method).training_state is not PromptMethod.training_state  # e.g. PromptSRC's aggregate
    needed = ["prompt.safetensors", "optim.safetensors", "scaler.json", *(["method.safetensors"] if keeps_state else [])]
    missing = [name for name in needed if not (ckpt / name).is_file()]
    if missing:
        raise _Missing(f"{', '.join(missing)} missing")
    prompts = load_tensors(ckpt / "prompt.safetensors")[0]
    params = dict(method.named_parameters())
    other = next((k for k, v in prompts.items() if k in params and v.dtype != params[k].dtype), None)
    if other:  # e.g. an earlier version's optim.precision=fp16 halved what this one keeps in fp32, as the reference
        raise ValueError(f"it holds {other} in {prompts[other].dtype}, which this run trains in {params[other].dtype}; "
                         f"train it again into another --output")
    method.load_learnable_state_dict(prompts)
    for name, buf in load_tensors(ckpt / "optim.safetensors")[0].items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device, params[name].dtype)
    if (ckpt / "method.safetensors").is_file():  # there whenever the method keeps a state (checked above)
        method.load_training_state(load_tensors(ckpt / "method.safetensors")[0])
    scaler_state = json.loads((ckpt / "scaler.json").read_text())  # {} where mixed precision was off
    if not isinstance(scaler_state, dict) or not all(isinstance(v, (int, float)) for v in scaler_state.values()):
        raise ValueError(f"scaler.json holds no loss scaler's state: {str(scaler_state)[:60]}")
    if scaler_state and scaler.is_enabled():  # {}: the run began where amp was off, and goes on with a fresh scaler
        if set(scaler_state) != set(scaler.state_dict()):
            raise ValueError(f"scaler.json holds {', '.join(sorted(scaler_state))}, not a loss scaler's state")
        scaler.load_state_dict(scaler_state)
    return int(ckpt.name.split("-")[1])
