"""A training run's configuration: the method's typed options, the optimiser, and where conditions come from.

Defaults come from the method's file only (its `Config` model and its reference `schedule`), and
from `ConditionsConfig` for the methods that read per-image conditions (the `conditions:` section,
where the SCP controls live); a
user's YAML (`--config`) and `--set section.key=value` override them, merged by OmegaConf and
checked by pydantic (unknown keys, types, ranges) before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mugcp.core.settings import as_yaml, merged, validate
from mugcp.trainer.conditions import ConditionsConfig
from mugcp.trainer.methods import method_class
from mugcp.trainer.methods.base import MethodConfig, OptimConfig


@dataclass(frozen=True)
class TrainConfig:
    method: MethodConfig
    optim: Optional[OptimConfig]  # None for methods that do not train (zero-shot)
    conditions: Optional[ConditionsConfig] = None  # None for methods that read no per-image condition

    def to_dict(self) -> dict:
        out = {"method": self.method.model_dump(mode="json")}
        if self.optim is not None:
            out["optim"] = self.optim.model_dump(mode="json")
        if self.conditions is not None:
            out["conditions"] = self.conditions.model_dump(mode="json")
        return out

    def to_yaml(self) -> str:
        parts = [(name, as_yaml(cfg)) for name, cfg in (("optim", self.optim), ("method", self.method),
                                                         ("conditions", self.conditions)) if cfg]
        return "".join(f"{name}: {{}}\n" if text == "{}\n" else
                       f"{name}:\n" + "".join(f"  {line}\n" for line in text.splitlines()) for name, text in parts)


def defaults(method: str) -> dict:
    cls = method_class(method)
    out = {"method": cls.Config().model_dump(mode="json")}
    if cls.trains:
        out["optim"] = OptimConfig(**cls.schedule).model_dump(mode="json")
    if cls.reads:
        out["conditions"] = ConditionsConfig().model_dump(mode="json")
    return out


def protocol_defaults(method: str, protocol: str = "b2n", dataset: str = "", shots: int = 16) -> dict:
    """The method's defaults for a protocol ("b2n", "fewshot", "transfer") on `dataset` with `shots`: its
    reference code's own config for that setting (`reference_overrides` in the method's file)."""
    cls = method_class(method)
    overrides = cls.reference_overrides(protocol, dataset, shots) if cls.trains else []
    return merged(defaults(method), None, overrides) if overrides else defaults(method)


def load_config(method: str, config_file: Optional[Path] = None, overrides: list[str] = (), *,
                protocol: str = "b2n", dataset: str = "", shots: int = 16) -> TrainConfig:
    """The method's defaults for `protocol`, updated by a user YAML, then by `section.key=value` overrides;
    all checked."""
    data = merged(protocol_defaults(method, protocol, dataset, shots), config_file, list(overrides))
    return config_from_dict(method, data, "config" if config_file is None else f"config ({config_file})")


def config_from_dict(method: str, data: dict, source: str = "run config") -> TrainConfig:
    """Typed config from its dict form (a merged config, or what a run.json recorded)."""
    cls = method_class(method)
    optim = validate(OptimConfig, data.get("optim", {}), source, "optim.") if cls.trains else None
    conditions = validate(ConditionsConfig, data.get("conditions", {}), source, "conditions.") if cls.reads else None
    return TrainConfig(method=validate(cls.Config, data.get("method", {}), source, "method."), optim=optim,
                       conditions=conditions)


def run_config(method: str, protocol: str, dataset: str, shots: int, config_file: Optional[Path] = None,
               overrides: list[str] = ()) -> tuple[TrainConfig, str]:
    """A run's config under `protocol`, and the protocol its `RunSpec` records for its folder: "transfer" when
    a transfer source run's config is not the few-shot one of the same dataset (so it cannot share that
    run's folder, `all_shots16`), else ""."""
    config = load_config(method, config_file, overrides, protocol=protocol, dataset=dataset, shots=shots)
    apart = protocol == "transfer" and config != load_config(method, config_file, overrides, protocol="fewshot",
                                                             dataset=dataset, shots=shots)
    return config, "transfer" if apart else ""
