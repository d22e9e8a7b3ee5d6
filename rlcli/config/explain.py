"""``rlcli explain``: the recipe schema's own documentation (the docstring under each field), from the command line.

    rlcli explain ppo                 # the sections of a ppo recipe
    rlcli explain ppo.kl              # a section: its keys, types, defaults, first lines of their docs
    rlcli explain ppo.kl.coef         # one key: type, default, constraints, the whole docstring
    rlcli explain ppo.coef            # a key named without its section, when only one section has it

The text is the schema's, so it cannot drift from what validation accepts.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rlcli.config.errors import Problem, RecipeError

COMMANDS = ("sft", "rm", "ppo", "env-rollout", "serve-reward")


def _error(key: str, message: str) -> RecipeError:
    return RecipeError([Problem(key, message, source="command line")], title="rlcli explain:")


def schema_for(command: str) -> type[BaseModel]:
    if command == "sft":
        from rlcli.config.sft import SFTRecipe as schema
    elif command == "rm":
        from rlcli.config.rm import RMRecipe as schema
    elif command == "ppo":
        from rlcli.config.ppo import PPORecipe as schema
    elif command == "env-rollout":
        from rlcli.config.env import EnvRolloutRecipe as schema
    elif command == "serve-reward":
        from rlcli.config.serve import ServeRewardRecipe as schema
    else:
        raise _error("", f"unknown command {command!r}; explain one of {', '.join(COMMANDS)}")
    return schema


def split_target(target: str, key: str | None) -> tuple[str, str]:
    """``ppo.kl.coef`` or (``ppo``, ``kl.coef``) -> (command, dotted key)."""
    for command in sorted(COMMANDS, key=len, reverse=True):
        if target == command or target.startswith(command + "."):
            rest = target[len(command) + 1:]
            return command, ".".join(part for part in (rest, key or "") if part)
    head, _, rest = target.partition(".")
    return head, ".".join(part for part in (rest, key or "") if part)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The section class an annotation holds (``X``, ``X | None``), else None."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    for arg in candidates:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in args)
        return text + (" (or null)" if len(args) < len(typing.get_args(annotation)) else "")
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        return "(a section with its own defaults)" if isinstance(value, BaseModel) else repr(value)
    if field.default is PydanticUndefined:
        return "required"
    return "null" if field.default is None else repr(field.default)


def _constraints(field: FieldInfo) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for item in field.metadata:
        for name, sign in words.items():
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _doc(field: FieldInfo | None, annotation_class: type[BaseModel] | None) -> str:
    """The field's docstring (else its section class's), with the source's hard line breaks undone: paragraphs
    become single lines for the terminal to wrap."""
    doc = (field.description or "") if field is not None else ""
    if not doc and annotation_class is not None:
        doc = inspect.getdoc(annotation_class) or ""
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in doc.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _summary(doc: str) -> str:
    """The first sentence of a docstring."""
    first = doc.split("\n\n")[0]
    end = first.find(". ")
    return first if end < 0 else first[: end + 1]


def _resolve_partial(schema: type[BaseModel], key: str, paths: list[str]) -> str:
    """A key given without its section (``advantage`` for ``ppo.advantage``, ``coef`` for ``kl.coef``) when exactly
    one full key path ends with it; otherwise the key as given."""
    head = key.split(".")[0]
    if not key or head in schema.model_fields:
        return key
    matches = [path for path in paths if path.endswith("." + key)]
    return matches[0] if len(matches) == 1 else key


def _close_full_path(name: str, paths: list[str]) -> str | None:
    """The one full key path whose last part is close to ``name`` (``advantag`` -> ``ppo.advantage``), if any."""
    leaves = {path.rsplit(".", 1)[-1] for path in paths if "." in path}
    close = difflib.get_close_matches(name, sorted(leaves), n=1, cutoff=0.8)
    matches = [path for path in paths if close and path.endswith("." + close[0])]
    return matches[0] if len(matches) == 1 else None


def explain(command: str, key: str = "") -> str:
    """The documentation of ``key`` (dotted, "" for the whole recipe) in ``command``'s recipe, as plain text."""
    from rlcli.config.loader import _key_paths, _suggest

    schema = schema_for(command)
    key = _resolve_partial(schema, key, _key_paths(schema))
    current: type[BaseModel] = schema
    field: FieldInfo | None = None
    walked: list[str] = []
    for part in [p for p in key.split(".") if p]:
        if current is None:
            raise _error(key, f"{'.'.join(walked)} is a value, not a section: it has no keys")
        field = current.model_fields.get(part)
        if field is None:
            here = list(current.model_fields)
            guess = (_close_full_path(part, _key_paths(schema)) if not walked else None) \
                or _suggest(part, here, _key_paths(schema))
            hint = f"; did you mean {guess!r}?" if guess else f"; the keys here are {', '.join(here)}"
            raise _error(".".join(walked + [part]), f"no such key in a {command} recipe{hint}")
        walked.append(part)
        current = _model_class(field.annotation)
    title = f"{command} {key}".strip()
    if current is not None:  # a section (or the whole recipe): its doc and its keys
        lines = [f"{title}: {_doc(field, current)}".rstrip(), ""]
        for name, sub in current.model_fields.items():
            section = _model_class(sub.annotation)
            first = _summary(_doc(sub, section))
            kind = "section" if section is not None else _type_name(sub.annotation)
            default = "" if section is not None else f" = {_default(sub)}"
            lines.append(f"  {name}: {kind}{default}")
            if first:
                lines.append(f"      {first}")
        lines.append("")
        lines.append(f"More on a key: rlcli explain {command}.{key + '.' if key else ''}KEY")
        return "\n".join(lines)
    assert field is not None
    lines = [title, f"  type: {_type_name(field.annotation)}", f"  default: {_default(field)}"]
    limits = _constraints(field)
    if limits:
        lines.append(f"  allowed: {limits}")
    doc = _doc(field, None)
    lines += ["", *(f"  {p}" for p in doc.split("\n\n"))] if doc else ["", "  (no description)"]
    return "\n".join(lines)
