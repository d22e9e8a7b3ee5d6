"""SFT examples: rows -> token ids and labels (-100 where there is no loss), optional packing, padding."""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from rlcli.config.errors import UserError
from rlcli.config.sft import SFTData
from rlcli.data.sources import require_columns, row_ref

IGNORE = -100


@dataclass
class TokenizedSet:
    """Tokenized examples plus what happened on the way (for warnings)."""

    examples: list[dict[str, list[int]]]
    truncated: int = 0
    dropped_no_loss: int = 0
    notes: list[str] = field(default_factory=list)


def detect_format(cfg: SFTData, columns: list[str], path: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.segments_field in columns:
        return "segments"
    if cfg.messages_field in columns:
        return "messages"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    if cfg.text_field in columns:
        return "text"
    raise UserError(
        f"data {path}: cannot tell the format from the columns {columns}; expected '{cfg.messages_field}', "
        f"'{cfg.prompt_field}'+'{cfg.completion_field}' or '{cfg.text_field}' (or set data.format and the *_field keys)"
    )


def _required(cfg: SFTData, fmt: str) -> list[str]:
    return {
        "text": [cfg.text_field],
        "prompt_completion": [cfg.prompt_field, cfg.completion_field],
        "messages": [cfg.messages_field],
        "segments": [cfg.segments_field],
    }[fmt]


def _check_messages(messages, path: str, row: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"data {row_ref(path, row)}: 'messages' must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"data {row_ref(path, row)}: message {j + 1} needs 'role' and 'content' keys, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"data {row_ref(path, row)}: no assistant message, so nothing to learn from")


TOOLS_FIELD = "tools"
"""Column of OpenAI-style tool schemas that ``messages`` rows may carry (rendered with the template's ``tools``)."""


def _messages_example(messages, tokenizer: PreTrainedTokenizerBase, path: str, row: int,
                      tools=None) -> tuple[list[int], list[int]]:
    """Render with the chat template exactly as the chat protocol renders an episode (``rlcli.chat_template``): the
    text between assistant turns and each assistant turn (through its end-of-turn token) tokenised on their own,
    the loss on the assistant turns. Assistant ``tool_calls``, ``tool`` messages and a ``tools`` column are rendered
    by the template (tools in a system message when it has no tool support), so SFT sees the token layout of
    rollouts. A template whose end of turn is not a special token falls back to labelling by character offsets
    (conversations without tools only).
    """
    from rlcli.chat_template import ChatTemplate, ChatTemplateError

    _check_messages(messages, path, row)
    has_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    try:
        template = ChatTemplate.of(tokenizer)
    except ChatTemplateError as exc:
        if has_tools:
            raise UserError(f"data {row_ref(path, row)}: {exc}") from None
        return _messages_by_offsets(messages, tokenizer, path, row)
    try:
        messages, tools = template.prepare(messages, tools)
        ids, mask = template.tokens(template.spans(messages, tools))
    except ChatTemplateError as exc:
        raise UserError(f"data {row_ref(path, row)}: {exc}") from None
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def _messages_by_offsets(messages, tokenizer, path: str, row: int) -> tuple[list[int], list[int]]:
    """Label the tokens whose characters fall inside assistant turns (growing prefixes give the character spans,
    the fast tokenizer's offsets on the full text the tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    if not spans:
        raise UserError(f"data {row_ref(path, row)}: no assistant message, so nothing to learn from")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE
              for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


SOURCES = ("prompt", "model", "tool")


def _check_segments(segments, path: str, row: int) -> None:
    if not isinstance(segments, list) or not segments:
        raise UserError(f"data {row_ref(path, row)}: 'segments' must be a non-empty list of {{source, text}}")
    for j, seg in enumerate(segments):
        if not isinstance(seg, dict) or seg.get("source") not in SOURCES or not isinstance(seg.get("text"), str):
            raise UserError(f"data {row_ref(path, row)}: segment {j + 1} needs 'source' (one of {', '.join(SOURCES)}) "
                            f"and 'text'; got {seg!r}")


def _segments_example(segments, tokenizer: PreTrainedTokenizerBase, path: str, row: int) -> tuple[list[int], list[int]]:
    """Tokenise an episode segment by segment, exactly as the text environment does: the prompt with special
    tokens, model and tool text without; ``token_ids`` stored with a segment (``rlcli env-rollout`` output) are
    used as they are. The loss is on model segments only."""
    _check_segments(segments, path, row)
    ids, labels = [], []
    for seg in segments:
        tokens = seg.get("token_ids")
        if tokens is None:
            tokens = tokenizer(seg["text"], add_special_tokens=seg["source"] == "prompt")["input_ids"]
        ids += tokens
        labels += tokens if seg["source"] == "model" else [IGNORE] * len(tokens)
    return ids, labels


def check_rows(rows: datasets.Dataset, cfg: SFTData, path: str) -> None:
    """The format can be told and every row has its fields, of the right types (run before any shuffle, so errors
    name rows by their file and line)."""
    fmt = detect_format(cfg, rows.column_names, path)
    columns = _required(cfg, fmt)
    require_columns(rows, columns, path, f"format '{fmt}'")
    for i, row in enumerate(rows.select_columns(columns)):
        if fmt in ("text", "prompt_completion"):
            for column in columns:
                _text(row, column, path, i)
        elif fmt == "messages":
            _check_messages(row[cfg.messages_field], path, i)
        else:
            _check_segments(row[cfg.segments_field], path, i)


def tokenize_rows(rows: datasets.Dataset, cfg: SFTData, tokenizer: PreTrainedTokenizerBase, path: str) -> TokenizedSet:
    """Turn rows into ``{input_ids, labels}`` examples (truncated to ``max_length``, packed if asked)."""
    fmt = detect_format(cfg, rows.column_names, path)
    require_columns(rows, _required(cfg, fmt), path, f"format '{fmt}'")
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    out = TokenizedSet(examples=[])
    for i, row in enumerate(rows):
        if fmt == "text":
            ids = tokenizer(_text(row, cfg.text_field, path, i))["input_ids"] + eos
            labels = list(ids)
        elif fmt == "prompt_completion":
            prompt = tokenizer(_text(row, cfg.prompt_field, path, i))["input_ids"]
            text = _text(row, cfg.completion_field, path, i)
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion
        elif fmt == "segments":
            ids, labels = _segments_example(row[cfg.segments_field], tokenizer, path, i)
        else:
            ids, labels = _messages_example(row[cfg.messages_field], tokenizer, path, i, row.get(TOOLS_FIELD))
        if not cfg.packing and len(ids) > cfg.max_length:
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            out.truncated += 1
        if all(t == IGNORE for t in labels):
            out.dropped_no_loss += 1
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
    if cfg.packing:
        out.examples = pack(out.examples, cfg.max_length)
    if not out.examples:
        raise UserError(f"data {path}: no example has any token to learn from after truncation to "
                        f"max_length={cfg.max_length} (prompts too long?)")
    if out.truncated:
        out.notes.append(f"{out.truncated} of {len(rows)} examples were truncated to max_length={cfg.max_length}")
    if out.dropped_no_loss:
        out.notes.append(f"{out.dropped_no_loss} examples had no completion tokens left after truncation and were "
                         "dropped")
    return out


def _text(row: dict, column: str, path: str, i: int) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise UserError(f"data {row_ref(path, i)}: column {column!r} must be text, got {type(value).__name__} "
                        f"{value!r}")
    return value


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut the stream into rows of ``max_length`` (the last partial row is kept)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    chunks = []
    for start in range(0, len(ids), max_length):
        chunk_labels = labels[start : start + max_length]
        if any(t != IGNORE for t in chunk_labels[1:]):
            chunks.append({"input_ids": ids[start : start + max_length], "labels": chunk_labels})
    return chunks


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids`` / ``attention_mask`` / ``labels``, each [B, T]."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
