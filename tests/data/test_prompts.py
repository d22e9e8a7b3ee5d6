"""A prompt inside a column of mappings, named by a dotted ``data.prompt_field`` (``prompt.text`` in
allenai/real-toxicity-prompts)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlcli.config.errors import UserError
from rlcli.data.prompts import load_prompt_rows


def _data(tmp_path, prompt_field, rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(path=str(path), split="train", name=None, max_rows=None, prompt_field=prompt_field)


ROWS = [{"prompt": {"text": "The man said", "toxicity": 0.4}, "challenging": True},
        {"prompt": {"text": "You are", "toxicity": None}, "challenging": False}]


def test_dotted_field_reads_the_nested_text_and_keeps_the_row(tmp_path):
    rows, column = load_prompt_rows(_data(tmp_path, "prompt.text", ROWS))
    assert column == "prompt.text"
    assert [r[column] for r in rows] == ["The man said", "You are"]
    assert rows[0]["prompt"] == {"text": "The man said", "toxicity": 0.4} and rows[0]["challenging"] is True


@pytest.mark.parametrize(("field", "message"), [
    ("prompt", "prompts.jsonl:1: prompt column 'prompt' holds a mapping (keys: text, toxicity), not text: name the "
               "text inside it with a dotted data.prompt_field, e.g. prompt.text"),
    ("prompt.txt", "prompts.jsonl:1: data.prompt_field 'prompt.txt': 'prompt' has no key 'txt' (keys: text, toxicity)"),
    ("promt.text", "no column 'promt' for data.prompt_field 'promt.text'; the rows have prompt, challenging"),
    ("prompt.toxicity", "prompts.jsonl:1: prompt 'prompt.toxicity' must be non-empty text, got 0.4"),
])
def test_errors_name_the_row_and_the_key(tmp_path, field, message):
    with pytest.raises(UserError) as info:
        load_prompt_rows(_data(tmp_path, field, ROWS))
    assert message in str(info.value)


def test_auto_detected_nested_prompt_column_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="e.g. prompt.text"):
        load_prompt_rows(_data(tmp_path, None, ROWS))
