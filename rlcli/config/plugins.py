"""Resolve plug-in references: ``path/to/file.py:name`` or ``package.module:name``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from rlcli.config.errors import UserError


def _split(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise UserError(f"plug-in {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"plug-in {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'")
    return target, attr


def load_module_file(path: Path) -> ModuleType | None:
    """Import a Python file as a module under a stable name, or None when it cannot be imported as Python.

    The same file always gives the same module (loading a plug-in twice returns it, and functions defined in it
    pickle in forked tool workers). An exception raised by the file's own code propagates, with the half-made
    module removed from ``sys.modules``. Shared by reward / plug-in resolution and the text environment's tools.
    """
    name = "rlcli_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first so dataclasses / pickle inside the file can find it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_file(path: Path) -> ModuleType:
    try:
        module = load_module_file(path)
    except Exception as exc:  # the user's code failed at import: say where, keep it short
        raise UserError(f"plug-in file {path}: importing it raised {type(exc).__name__}: {exc}") from exc
    if module is None:
        raise UserError(f"plug-in file {path}: cannot be imported as Python")
    return module


def resolve_object(spec: str) -> Any:
    """Import and return the object named by ``spec``; raise ``UserError`` naming the spec on failure.

    ``path/to/file.py:name`` is loaded from a file (relative paths are relative to the working directory);
    anything else is imported as ``package.module:name``.
    """
    target, attr = _split(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"plug-in {spec!r}: file {target} does not exist (relative to {Path.cwd()})")
        module = _load_file(path)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"plug-in {spec!r}: cannot import module {target!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        # what a spec could name: the module's own callables (not its imports or `from __future__` features)
        names = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                       and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"plug-in {spec!r}: {target} has no attribute {attr!r} "
                        f"(it has: {', '.join(names[:20])})") from None
