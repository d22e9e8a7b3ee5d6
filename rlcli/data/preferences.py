"""Preference pairs: rows -> tokenized (chosen, rejected) texts, and batches that score both in one forward pass.

Truncation keeps the end of each text (``tokenizer.truncation_side = "left"``): a reward model reads its score at
the last token, and the end of the response is what is being judged. The prompt's start goes first; the
response's start is cut only when the response alone is longer than ``max_length``. ``RewardModelScorer`` uses
the same tokenizer setting, so texts are read the same way in training and in PPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rlcli.config.errors import UserError
from rlcli.config.rm import RMData
from rlcli.data.sources import require_columns, row_ref


@dataclass(frozen=True)
class PairExample:
    """One preference pair, tokenized: the chosen text scores higher than the rejected one (by ``margin``)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0


class PairBatch(NamedTuple):
    """B pairs as one classifier batch: rows ``0..B-1`` are the chosen texts, rows ``B..2B-1`` the rejected ones.

    input_ids:      [2B, T] right-padded with the pad token
    attention_mask: [2B, T] 1 on real tokens (built from lengths, so a pad token equal to EOS keeps its 1)
    margin:         [B] float32
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in self))


@dataclass
class PairSet:
    """Tokenized pairs plus what happened on the way (for notes)."""

    pairs: list[PairExample]
    rows: int = 0
    truncated: int = 0
    """Pairs with at least one text longer than ``max_length`` (its start was cut)."""
    responses_cut: int = 0
    """Pairs where a response alone was longer than ``max_length`` (the response's own start was cut)."""
    identical: int = 0
    """Pairs whose chosen and rejected texts are equal (dropped: they carry no preference)."""
    identical_after_truncation: int = 0
    """Pairs that became equal once truncated (dropped)."""
    notes: list[str] = field(default_factory=list)


def detect_format(cfg: RMData, rows: datasets.Dataset, path: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    first = rows[0][cfg.chosen_field] if cfg.chosen_field in rows.column_names else None
    return "messages" if isinstance(first, list) else "text"


def _messages(value: Any, column: str, path: str, row: int, *, string_role: str | None = None) -> list[dict]:
    if isinstance(value, str) and string_role is not None:
        return [{"role": string_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"data {row_ref(path, row)}: column {column!r} must be a non-empty list of {{role, content}} "
                        f"messages, got {type(value).__name__} {str(value)[:80]!r}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise UserError(f"data {row_ref(path, row)}: {column!r} message {j + 1} needs 'role' and 'content' keys, "
                            f"got {m!r}")
    return value


def _text(value: Any, column: str, path: str, row: int) -> str:
    if not isinstance(value, str):
        raise UserError(f"data {row_ref(path, row)}: column {column!r} must be text, "
                        f"got {type(value).__name__} {value!r}")
    return value


def _use_prompt(cfg: RMData, rows: datasets.Dataset) -> bool:
    return cfg.prompt_field is not None and cfg.prompt_field in rows.column_names


def _check_row(row: dict, cfg: RMData, fmt: str, use_prompt: bool, path: str, i: int) -> None:
    if fmt == "text":
        for column in ([cfg.prompt_field] if use_prompt else []) + [cfg.chosen_field, cfg.rejected_field]:
            _text(row[column], column, path, i)
    else:
        if use_prompt:
            _messages(row[cfg.prompt_field], cfg.prompt_field, path, i, string_role="user")
        _messages(row[cfg.chosen_field], cfg.chosen_field, path, i)
        _messages(row[cfg.rejected_field], cfg.rejected_field, path, i)
    _margin(row, cfg, path, i)


def check_pair_rows(rows: datasets.Dataset, cfg: RMData, path: str) -> str:
    """Check every row has the fields a pair needs, of the right types; return the format (``text`` / ``messages``).

    Raises ``UserError`` naming the first bad row (and the column).
    """
    fmt = detect_format(cfg, rows, path)
    use_prompt = _use_prompt(cfg, rows)
    needed = [cfg.chosen_field, cfg.rejected_field] + ([cfg.prompt_field] if use_prompt else [])
    needed += [cfg.margin_field] if cfg.margin_field else []
    require_columns(rows, needed, path, f"a preference pair ('{fmt}' format)")
    for i, row in enumerate(rows.select_columns(needed)):
        _check_row(row, cfg, fmt, use_prompt, path, i)
    return fmt


def pair_texts(row: dict, cfg: RMData, fmt: str, use_prompt: bool, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen text, rejected text) of a checked row; the two texts each start with the prompt."""
    if fmt == "text":
        prompt = row[cfg.prompt_field] if use_prompt else ""
        return prompt, prompt + row[cfg.chosen_field], prompt + row[cfg.rejected_field]
    prompt = row[cfg.prompt_field] if use_prompt else []
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    render = tokenizer.apply_chat_template
    prompt_text = render(prompt_msgs, tokenize=False, add_generation_prompt=True) if prompt_msgs else ""
    return (prompt_text, render(prompt_msgs + row[cfg.chosen_field], tokenize=False),
            render(prompt_msgs + row[cfg.rejected_field], tokenize=False))


def _margin(row: dict, cfg: RMData, path: str, i: int) -> float:
    if cfg.margin_field is None:
        return 0.0
    value = row[cfg.margin_field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"data {row_ref(path, i)}: margin column {cfg.margin_field!r} must be a number, got {value!r}")
    return float(value)


def tokenize_pairs(rows: datasets.Dataset, cfg: RMData, tokenizer: PreTrainedTokenizerBase, path: str) -> PairSet:
    """Rows -> ``PairExample``s. Raises ``UserError`` naming the row for a missing or ill-typed field.

    Sets ``tokenizer.truncation_side = "left"`` (the rule the scorer follows too). Chat-rendered texts are
    tokenized without adding special tokens (the template has them), plain texts with them.
    """
    fmt = check_pair_rows(rows, cfg, path)
    use_prompt = _use_prompt(cfg, rows)
    tokenizer.truncation_side = "left"
    specials = fmt == "text"
    out = PairSet(pairs=[], rows=len(rows))

    def encode(text: str) -> tuple[list[int], bool]:
        ids = tokenizer(text, add_special_tokens=specials)["input_ids"]
        if len(ids) <= cfg.max_length:
            return ids, False
        cut = tokenizer(text, add_special_tokens=specials, truncation=True, max_length=cfg.max_length)["input_ids"]
        return cut, True

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    for i, row in enumerate(rows):
        prompt, chosen, rejected = pair_texts(row, cfg, fmt, use_prompt, tokenizer)
        if chosen == rejected:
            out.identical += 1
            continue
        chosen_ids, cut_c = encode(chosen)
        rejected_ids, cut_r = encode(rejected)
        if cut_c or cut_r:
            out.truncated += 1
            if max(length(chosen), length(rejected)) - length(prompt) > cfg.max_length:
                out.responses_cut += 1
        if chosen_ids == rejected_ids:
            out.identical_after_truncation += 1
            continue
        out.pairs.append(PairExample(chosen_ids, rejected_ids, _margin(row, cfg, path, i)))

    if out.identical:
        out.notes.append(f"{out.identical} of {out.rows} pairs in {path} have the chosen text identical to the "
                         "rejected one; they carry no preference and were dropped")
    if out.truncated:
        cut = f"; {out.responses_cut} of them had a response longer than that on its own" if out.responses_cut else ""
        out.notes.append(f"{out.truncated} of {out.rows} pairs in {path} had a text longer than "
                         f"max_length={cfg.max_length} tokens: its start was cut so the end of the response stays "
                         f"visible{cut}")
    if out.identical_after_truncation:
        out.notes.append(f"{out.identical_after_truncation} pairs in {path} became identical after truncation to "
                         f"max_length={cfg.max_length} and were dropped (raise data.max_length?)")
    if not out.pairs:
        raise UserError(f"data {path}: none of its {out.rows} pairs is usable (chosen identical to rejected, "
                        f"{out.identical} before and {out.identical_after_truncation} after truncation)")
    return out


def collate_pairs(pairs: list[PairExample], pad_token_id: int) -> PairBatch:
    """Right-pad the chosen texts then the rejected texts of ``pairs`` into one ``PairBatch``."""
    texts = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width = max(len(t) for t in texts)
    input_ids = torch.full((len(texts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return PairBatch(input_ids, attention_mask, margin)
