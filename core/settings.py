"""Typed settings: one base class, one merge, one way to report a bad value.

Every configurable thing (a method's options, the optimiser, an extract run) is a pydantic model
whose field defaults are the only defaults. A user's YAML file and `--set key=value` overrides are
merged over them by OmegaConf (unknown keys refused), then pydantic checks every type, range and
choice before anything is written. A bad value becomes one `UserError` line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar, get_args

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from mugcp.core.errors import UserError

T = TypeVar("T", bound=BaseModel)


class Settings(BaseModel):
    """Base of every typed config: unknown keys are errors, numbers are finite, values are checked on
    assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        """pydantic reads true as 1: `--set optim.epochs=true` would train one epoch instead of being refused."""
        annotation = cls.model_fields[info.field_name].annotation
        if _holds_bool(value) and _names(annotation, (int, float)) and not _names(annotation, (bool,)):
            raise ValueError("wants a number, not true/false")
        return value


def _holds_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value))


def _names(annotation, types: tuple) -> bool:
    return annotation in types or any(_names(a, types) for a in get_args(annotation))


def describe_error(e: ValidationError, source: str, prefix: str = "") -> str:
    """The first problem of a pydantic error as one line: key, what was given, what is wanted."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    key = prefix + loc if loc else prefix.rstrip(".")
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) and given is not None else ""
    more = f"; {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
    message = err["msg"].removeprefix("Value error, ")
    return f"{source}: {key + ': ' if key else ''}{message}{shown}{more}"


def validate(model: type[T], data: dict, source: str, prefix: str = "") -> T:
    """`model(**data)`, with a validation failure turned into one UserError line (keys shown after `prefix`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_error(e, source, prefix)) from None


def _read_yaml(path: Path):
    if not path.is_file():
        raise UserError(f"config {path} is a folder, not a YAML file" if path.is_dir() else
                        f"config file not found: {path}")
    try:
        data = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not OmegaConf.is_dict(data):
        raise UserError(f"config {path} must be a mapping of sections (e.g. optim:, method:)")
    return data


def merged(defaults: dict, config_file: Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then a YAML file, then `section.key=value` overrides; a key the defaults lack is an error."""
    base = OmegaConf.create(defaults)
    OmegaConf.set_struct(base, True)
    layers = [(base, "defaults")]
    if config_file is not None:
        layers.append((_read_yaml(Path(config_file)), str(config_file)))
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set '{item}' must look like section.key=value, e.g. optim.lr=0.002")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"--set {item}"))
        except OmegaConfBaseException as e:
            raise UserError(f"--set '{item}' cannot be read: {str(e).splitlines()[0]}") from None
    result = base
    for layer, source in layers[1:]:
        try:
            result = OmegaConf.merge(result, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            if key and "Key" in type(e).__name__:
                raise UserError(f"unknown config key '{key}' in {source} (known: {_known(defaults, key)})") from None
            if not key:  # (OmegaConf 2.3.0 says so for a list merged onto a section; later ones raise TypeError)
                raise UserError(f"{source} does not fit the config's shape: {str(e).splitlines()[0]}") from None
            raise UserError(f"config key '{key}' in {source}: {str(e).splitlines()[0]}") from None
        except (TypeError, ValueError) as e:  # e.g. a list where the defaults hold a section
            raise UserError(f"{source} does not fit the config's shape: {str(e).splitlines()[0]}") from None
    try:  # OmegaConf's ${...} interpolations (${optim.lr}, ${oc.env:VAR}) resolve here
        return OmegaConf.to_container(result, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"config key '{getattr(e, 'full_key', None) or '?'}': {str(e).splitlines()[0]}") from None


def _known(defaults: dict, key: str) -> str:
    node, prefix = defaults, ""
    for part in key.split(".")[:-1]:
        if isinstance(node.get(part), dict):
            node, prefix = node[part], f"{prefix}{part}."
    return ", ".join(f"{prefix}{k}" for k in node)


def as_yaml(settings: BaseModel) -> str:
    """The settings as YAML, each key followed by its description as a comment."""
    lines: list[str] = []

    def emit(model: BaseModel, indent: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:" + (f"  # {field.description}" if field.description else ""))
                emit(value, indent + "  ")
                continue
            text = OmegaConf.to_yaml(OmegaConf.create({name: value})).strip()
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{indent}{text}{comment}")

    emit(settings, "")
    return "\n".join(lines) + "\n" if lines else "{}\n"
