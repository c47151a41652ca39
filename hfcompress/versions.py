"""The lowest versions of the libraries whose internals hfcompress reaches into, checked when
hfcompress is imported (transformers, accelerate) and when peft learns our layers (peft).

pip enforces them on install (pyproject.toml lists the same bounds); an environment assembled
otherwise (``--no-deps``, conda, an older pin elsewhere) gets this error at import instead of
an ``ImportError`` or ``TypeError`` from deep inside a loader or a cache. The bounds are the
lowest versions the test suite passed with: transformers 5.24 renamed ``past_key_values`` to
``cache`` and moved the cache layer table our KV cache builds on; peft 0.19 passes a LoRA
layer its config; transformers' Trainer fails on accelerate 1.1.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

__all__ = ["MINIMUM", "require"]

MINIMUM = {"transformers": "5.24", "accelerate": "1.4", "peft": "0.19"}


def require(package: str) -> None:
    """Raise ``ImportError`` naming the upgrade when the installed ``package`` is older than
    :data:`MINIMUM` says."""
    found = metadata.version(package)
    least = MINIMUM[package]
    if Version(found) < Version(least):
        raise ImportError(
            f"hfcompress needs {package}>={least}, and {package} {found} is installed; upgrade it: "
            f"pip install -U '{package}>={least}'"
        )


require("transformers")
require("accelerate")
