"""Prompt methods, one module each; importing this package registers every one of them.

Adding a method is one file here that defines a `PromptMethod` subclass decorated with
`@register("name")` (see base.py for what it declares); `--method name`, `mugcp config show name`
and the sweep then know it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import FrozenClip
from mugcp.core.templates import templates_for
from mugcp.trainer.methods.base import MethodConfig, PromptMethod

_REGISTRY: dict[str, type[PromptMethod]] = {}


def register(name: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PromptMethod]:
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


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
