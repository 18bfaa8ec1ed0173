"""Method configs are data: `trainer/configs/<method>.yaml`, optionally a user YAML, then `--set` overrides.

Each file has two sections: `optim` (SGD + cosine schedule, shared by all methods) and `method`
(the method's own options). Only keys the default file defines can be set, so a typo is an
error, not a silently ignored option.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from mugcp.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


def available_methods() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping with 'optim' and 'method' sections")
    return data


def _merge(base: dict, update: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        if key not in base:
            known = ", ".join(f"{prefix}{k}" for k in base)
            raise UserError(f"unknown config key '{prefix}{key}' in {source} (known: {known})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key '{prefix}{key}' in {source} must be a mapping")
            _merge(base[key], value, source, f"{prefix}{key}.")
        else:
            base[key] = value


def load_config(method: str, config_file: Path | None = None, overrides: list[str] = ()) -> dict:
    """The method's defaults, updated by a user YAML, then by `key.sub=value` overrides."""
    default = CONFIG_DIR / f"{method}.yaml"
    if not default.is_file():
        raise UserError(f"unknown method '{method}': choose one of {', '.join(available_methods())}")
    config = copy.deepcopy(_read_yaml(default))
    if config_file is not None:
        if not Path(config_file).is_file():
            raise UserError(f"config file not found: {config_file}")
        _merge(config, _read_yaml(Path(config_file)), str(config_file))
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"--set '{item}' must look like section.key=value, e.g. optim.lr=0.002")
        update: dict = {}
        node = update
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
        _merge(config, update, f"--set {item}")
    return config
