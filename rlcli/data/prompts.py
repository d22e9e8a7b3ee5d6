"""Prompts for PPO: rows -> token ids (optionally a random-length prefix, optionally chat-templated)."""

from __future__ import annotations

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rlcli.config.errors import UserError
from rlcli.data.sources import require_columns, row_ref

CANDIDATES = ("prompt", "query", "text")


def prompt_column(columns: list[str], configured: str | None, path: str) -> str:
    if configured is not None:
        return configured
    for name in CANDIDATES:
        if name in columns:
            return name
    raise UserError(f"data {path}: no prompt column; expected one of {', '.join(CANDIDATES)} "
                    f"(or set data.prompt_field); the rows have {', '.join(columns)}")


def check_prompt_rows(rows: datasets.Dataset, column: str, path: str, *, messages: bool = False) -> None:
    """Every prompt is non-empty text (or, with ``messages``, a non-empty list of chat messages)."""
    require_columns(rows, [column], path, "PPO prompts")
    for i, value in enumerate(rows[column]):
        if isinstance(value, dict):
            keys = ", ".join(map(str, value)) or "none"
            raise UserError(f"data {row_ref(path, i)}: prompt column {column!r} holds a mapping (keys: {keys}), not "
                            f"text: name the text inside it with a dotted data.prompt_field, e.g. {column}.text")
        if messages and isinstance(value, list):
            if value and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value):
                continue
            raise UserError(f"data {row_ref(path, i)}: prompt column {column!r} holds a list that is not chat "
                            f"messages ({{role, content}} each): {value!r}")
        if not isinstance(value, str) or not value.strip():
            kind = "non-empty text or a list of chat messages" if messages else "non-empty text"
            raise UserError(f"data {row_ref(path, i)}: prompt column {column!r} must be {kind}, got {value!r}")


def load_prompt_rows(data, *, messages: bool = False) -> tuple[list[dict], str]:
    """Rows of a prompt dataset (any section with path / split / name / max_rows / prompt_field) as dicts, and
    the prompt column; every row checked. ``messages``: a prompt may be a list of chat messages (chat protocol)."""
    from rlcli.data.sources import load_rows

    if getattr(data, "reasoning_gym", None) is not None:
        from rlcli.tasks import reasoning_gym

        return reasoning_gym.load_rows(data)
    rows = load_rows(data.path, data.split, data.name, data.max_rows)
    column = prompt_column(rows.column_names, data.prompt_field, data.path)
    if column not in rows.column_names and "." in column:
        return nested_prompt_rows(rows, column, data.path), column
    check_prompt_rows(rows, column, data.path, messages=messages)
    return rows.to_list(), column


def nested_prompt_rows(rows: datasets.Dataset, field: str, path: str) -> list[dict]:
    """Rows whose prompt sits inside a column of mappings, named by a dotted path (``prompt.text`` in
    allenai/real-toxicity-prompts, where ``prompt`` is ``{text, toxicity, ...}``): each row as a dict with the text
    also under the dotted name itself, where the trainers read the prompt column (``datasets``' ``flatten()`` names
    nested columns the same way). The rest of the row, nested columns included, is kept as it was for reward
    functions."""
    head, *keys = field.split(".")
    if head not in rows.column_names:
        raise UserError(f"data {path}: no column {head!r} for data.prompt_field {field!r}; the rows have "
                        f"{', '.join(rows.column_names)}")
    out = []
    for i, row in enumerate(rows.to_list()):
        value, walked = row[head], head
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                found = f"keys: {', '.join(map(str, value))}" if isinstance(value, dict) else type(value).__name__
                raise UserError(f"data {row_ref(path, i)}: data.prompt_field {field!r}: {walked!r} has no key "
                                f"{key!r} ({found})")
            value, walked = value[key], f"{walked}.{key}"
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"data {row_ref(path, i)}: prompt {field!r} must be non-empty text, got {value!r}")
        row[field] = value
        out.append(row)
    return out


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase, *, chat_template: bool, max_length: int,
                  length: int | None) -> list[int]:
    """Token ids of one prompt: chat-templated if asked (``rlcli.chat_template.prompt_ids``, the rendering the chat
    protocol and SFT use), cut to ``length`` leading tokens (prefix sampling), then to the last ``max_length``
    tokens."""
    if chat_template:
        from rlcli.chat_template import prompt_ids

        ids = prompt_ids(tokenizer, text)
    else:
        ids = tokenizer(text)["input_ids"]
    if length is not None:
        ids = ids[:length]
    return ids[-max_length:]


def long_prompts(rows: list[dict], column: str, tokenizer: PreTrainedTokenizerBase, *, chat_template: bool,
                 limit: int, prefix: int | None = None) -> list[int]:
    """Indices of the rows whose prompt is longer than ``limit`` tokens (with prefix sampling, whose longest prefix,
    ``prefix`` tokens, is): the ones :func:`encode_prompt` cuts to their last ``limit``."""
    if prefix is not None and prefix <= limit:
        return []
    return [i for i, row in enumerate(rows)
            if len(encode_prompt(row[column], tokenizer, chat_template=chat_template, max_length=limit + 1,
                                 length=prefix)) > limit]


def sample_lengths(n: int, bounds: tuple[int, int] | None, generator: torch.Generator) -> list[int | None]:
    if bounds is None:
        return [None] * n
    low, high = bounds
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()
