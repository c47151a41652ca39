"""Run a function once a module is imported: now if it already is, else right after its import.

hfcompress teaches peft about its layers (:func:`hfcompress.integrations.peft.install`) without
importing peft, which takes a second, in processes that never use it.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable

__all__ = ["when_imported"]

logger = logging.getLogger(__name__)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of each spec found for ``name`` so that executing the module calls
    ``callback``. It stays on ``sys.meta_path`` until then: ``importlib.util.find_spec(name)``
    alone (transformers' "is peft available" checks) finds a spec without executing it."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_call(module) -> None:
            exec_module(module)
            if self in sys.meta_path:  # once
                sys.meta_path.remove(self)
                _call(self.callback, self.name)

        loader.exec_module = exec_then_call
        return spec


def _call(callback: Callable[[], None], name: str) -> None:
    try:
        callback()
    except Exception as exc:  # an incompatible version must not break the user's import
        logger.warning("hfcompress could not hook into %s (%s: %s)", name, type(exc).__name__, exc)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once the top-level module ``name`` is imported (now, if it is)."""
    if name in sys.modules:
        _call(callback, name)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
