"""Loads the compiled extension pyllm._C with a clear error when the package was not built."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401
    _import_error = None
except ImportError as e:  # pragma: no cover - only on a broken install
    _C = None
    _import_error = e


def C():
    """The extension module, or a one-line error saying how to build it."""
    if _C is None:
        raise ImportError(f"pyllm._C is not built ({_import_error}); run `pip install -e . --no-build-isolation`")
    return _C
