"""MLLM backends, one module each; importing this package registers every one of them.

Adding a backend is one file here that defines a class decorated with `@register_backend("name")`
(see base.py for the interface); `--backend name` then works everywhere.
"""

import importlib
import pkgutil

from mugcp.pipeline.backends.base import Answer, Backend, available_backends, backend_class, make_backend

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Answer", "Backend", "available_backends", "backend_class", "make_backend"]
