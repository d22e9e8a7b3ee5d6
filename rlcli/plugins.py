"""Import what a recipe names with a string: ``path/to/file.py:name`` or ``package.module:name``.

Reward functions, tools and tool-call parsers are plug-ins of this kind; this module is the one place that imports
them (``rlcli.rewards.sources``, ``rlcli.env.tools``, ``rlcli.toolcalls``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from rlcli.config.errors import UserError, error_text


def load_module_file(path: Path) -> ModuleType | None:
    """Import a Python file as a module under a stable name, or None when it cannot be imported as Python.

    The same file always gives the same module (loading a plug-in twice returns it, and functions defined in it
    pickle in forked tool workers). An exception raised by the file's own code propagates, with the half-made
    module removed from ``sys.modules``.
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


def resolve_object(spec: str, what: str = "plug-in") -> Any:
    """Import and return the object named by ``spec``; raise ``UserError`` naming it (``{what} {spec!r}: ...``).

    ``path/to/file.py:name`` (a target that ends in ``.py`` or has a ``/``) is loaded from that file (relative paths
    are relative to the working directory); anything else is imported as ``package.module:name``. ``name`` may be
    dotted (``module:Class.attribute``).
    """
    where = f"{what} {spec!r}"
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"{where}: expected 'path/to/file.py:name' or 'package.module:name'")
    module = _import_target(target, where)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{where}: {target} has no attribute {attr!r}{_listing(module, obj)}") from None
    return obj


def _import_target(target: str, where: str) -> ModuleType:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise UserError(f"{where}: file {target} does not exist{relative}")
        try:
            module = load_module_file(path)
        except Exception as exc:  # the user's code failed at import: say where, keep it short
            raise UserError(f"{where}: importing {target} failed: {error_text(exc)}") from exc
        if module is None:
            raise UserError(f"{where}: {target} cannot be imported as Python")
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001 - a missing module or one whose own code fails
        raise UserError(f"{where}: cannot import module {target!r} ({error_text(exc)})") from None


def _listing(module: ModuleType, missed_in: Any) -> str:
    """What a spec could name, when the module itself lacks the name: its own callables (not its imports or
    ``from __future__`` features)."""
    if missed_in is not module:
        return ""
    names = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                   and getattr(v, "__module__", None) == module.__name__)
    return f" (it has: {', '.join(names[:20])})"
