"""A run's precision, in one place: what `optim.precision` means on a device, for training and evaluation alike.

- `amp` (the default): fp32 weights, the forward under fp16 autocast, gradients through a loss scaler. Autocast
  runs where its fp16 kernels pay, on GPU; on CPU an amp run computes in fp32.
- `fp16`: the references' own PREC "fp16": CLIP in half precision, and each prompt part in the precision its
  reference holds it in (`PromptMethod.reference_half`: MaPLe and PromptSRC keep their deeper prompts fp32), no
  scaler.
- `fp32`: fp32 throughout.
"""

from __future__ import annotations

import torch

AMP_DEVICES = ("cuda",)  # where amp's autocast is on; tests add "cpu" to run the GPU's mixed-precision path here


def amp_active(precision: str, device: torch.device) -> bool:
    """Whether this run's forward runs under fp16 autocast (and its backward through a loss scaler)."""
    return precision == "amp" and device.type in AMP_DEVICES


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: fp16 for amp where amp is active, off otherwise."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp_active(precision, device))


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """amp's loss scaler on the run's device; a pass-through where amp is off."""
    return torch.amp.GradScaler(device.type, enabled=amp_active(precision, device))


def to_half(clip_model: torch.nn.Module, method: torch.nn.Module) -> None:
    """The references' PREC "fp16": CLIP in half, and the method's learnt parts as its reference holds them (every
    part, or only those `method.reference_half` names; the others stay fp32 and are cast where they are used)."""
    clip_model.half()
    half = method.reference_half
    kept = {} if half is None else {name: p.data for name, p in method.named_parameters()
                                    if not any(name == h or name.startswith(h + ".") for h in half)}
    method.half()
    for name, p in method.named_parameters():
        if name in kept:  # its own fp32 values, never rounded through half
            p.data = kept[name]


def input_dtype(precision: str) -> torch.dtype:
    """The dtype images and conditions are fed in: half for fp16 runs, whose weights are half."""
    return torch.float16 if precision == "fp16" else torch.float32


def arithmetic(precision: str, device: torch.device) -> str:
    """What a run actually computed in (recorded with its results): amp where autocast is off is fp32."""
    return "fp32" if precision == "amp" and not amp_active(precision, device) else precision
