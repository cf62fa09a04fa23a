"""Optional dependencies of ``rapkern.build``, imported only when a step needs them.

``import rapkern`` and ``import rapkern.build`` never import them, so the kernels work without the extra.
"""

from __future__ import annotations

import importlib

_EXTRA = "pip install 'rapkern[build]'  (cutlass==0.9.0, pandas)"


def require(module: str):
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(f"rapkern.build needs the optional package {module!r}: {_EXTRA}") from e


def version_of(module: str) -> str | None:
    """The installed version of ``module`` or None, for the audit log."""
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None
