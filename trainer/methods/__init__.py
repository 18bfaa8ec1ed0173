"""Prompt methods, one module each; importing this package registers every one of them.

Adding a method is one file here that defines a `PromptMethod` subclass decorated with
`@register("name")` (see base.py for what it declares); `--method name`, `mugcp config show name`
and the sweep then know it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable, Optional

from pydantic import ValidationError

from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip
from mugcp.core.templates import TABLES, templates_for
from mugcp.trainer.conditions import SOURCES  # it imports no method: no cycle
from mugcp.trainer.methods.base import MethodConfig, OptimConfig, PromptMethod

_REGISTRY: dict[str, type[PromptMethod]] = {}
_BROKEN: list[str] = []  # method files that cannot be used, and why: told on one line by any command that needs methods


def _invalid(e: Exception) -> tuple[str, str]:
    """(the options a validation error names, else "", its first message), each on one line."""
    if not isinstance(e, ValidationError):
        return "", (str(e).splitlines() or [type(e).__name__])[0]
    return ", ".join(str(err["loc"][0]) for err in e.errors() if err["loc"]), e.errors()[0]["msg"]


def _declaration_problem(name: str, cls: type) -> Optional[str]:
    """What is wrong with a method's class-level declarations, found when it registers (not mid-run)."""
    known = _REGISTRY.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        return f"the name '{name}' is registered twice (also by {known.__module__})"
    if not (isinstance(cls, type) and issubclass(cls, PromptMethod)):
        return "@register decorates a PromptMethod subclass"
    if cls.template_table not in TABLES:
        return f"template_table '{cls.template_table}' is none of {', '.join(TABLES)}"
    if not (isinstance(cls.reads, tuple) and all(isinstance(r, str) for r in cls.reads)):
        return f"reads must be a tuple of condition names, e.g. (\"scp\",), not {cls.reads!r}"
    unknown = [r for r in cls.reads if r not in SOURCES]
    if unknown:
        return f"it reads '{unknown[0]}', which is no condition (known: {', '.join(SOURCES)})"
    try:
        cls.Config()
    except ValidationError as e:
        named, message = _invalid(e)
        return (f"every option of its Config needs a default (the reference's): {named}" if named else
                f"its Config's defaults fail its own check: {message}")
    try:
        if cls.trains:
            OptimConfig(**cls.schedule)
    except (ValidationError, TypeError) as e:
        named, message = _invalid(e)
        return f"its schedule must give the reference's epochs, lr and batch_size ({named or message})"
    return None


def register(name: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        problem = _declaration_problem(name, cls)
        if problem:
            where = getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__
            _BROKEN.append(f"method '{name}' ({where}): {problem}")
            return cls
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _usable() -> None:
    if _BROKEN:
        raise UserError(f"{_BROKEN[0]}{f' (and {len(_BROKEN) - 1} more)' if len(_BROKEN) > 1 else ''}")


def available_methods() -> list[str]:
    _usable()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PromptMethod]:
    _usable()
    if name not in _REGISTRY:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(available_methods())}")
    return _REGISTRY[name]


def build_method(name: str, clip: FrozenClip, classnames: list[str], dataset: str,
                 config: MethodConfig) -> PromptMethod:
    """The one factory: a method by name, for these classes of `dataset`, with its (already validated) options.

    The method gets the hand-crafted prompts of its own reference's table for the dataset.
    """
    cls = method_class(name)
    return cls(clip, classnames, templates_for(cls.template_table, dataset), config)


def _import_method_file(name: str) -> None:
    """Import one method file; one that fails is recorded, so commands that need no method still work."""
    try:
        importlib.import_module(f"{__name__}.{name}")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _BROKEN.append(f"method file trainer/methods/{name}.py cannot be imported: {type(e).__name__}"
                       f"{': ' + first[:200] if first else ''}")


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        _import_method_file(_module.name)
