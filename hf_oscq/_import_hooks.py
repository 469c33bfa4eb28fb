"""Running code when a module finishes importing (PEP 369's post-import hooks, as `wrapt` implements them).

`import hf_oscq` must register the "oscq" quantization method with transformers and hf_oscq's timm architectures
with timm, yet importing transformers' quantizer registry (or timm) costs seconds that a user who never loads such a
checkpoint should not pay. So the registrations run when those modules are imported, by whoever imports them, and
at once when they already are.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType

_HOOKS: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.RLock()


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Calls `hook(module)` once the module `name` is imported: now if it already is, else right after its import
    completes (before the importing statement returns)."""
    with _LOCK:
        module = sys.modules.get(name)
        if module is None:
            _HOOKS.setdefault(name, []).append(hook)
            if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds hooked modules through the other finders and wraps their loader."""

    def __init__(self):
        self._searching: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._searching.discard(fullname)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


class _HookedLoader(importlib.abc.Loader):
    """The original loader, followed by the hooks; everything else (resources, source) is the original's."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # from now on the module is an ordinary one
        with _LOCK:
            hooks = _HOOKS.pop(self._name, [])
        for hook in hooks:
            hook(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)
