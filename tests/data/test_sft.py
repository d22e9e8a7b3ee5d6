"""SFT tokenization: where the loss goes for each format, truncation, packing, collation, bad rows."""

from __future__ import annotations

import datasets
import pytest

from rlcli.config.errors import UserError
from rlcli.config.sft import SFTData
from rlcli.data.sft import IGNORE, collate, pack, tokenize_rows
from rlcli.models.tokenizer import build_byte_tokenizer

TOK = build_byte_tokenizer()


def _decode_labels(ex):
    return TOK.decode([t for t in ex["labels"] if t != IGNORE])


def test_prompt_completion_loss_on_completion_only():
    rows = datasets.Dataset.from_list([{"prompt": "reverse: cat\n", "completion": "tac"}])
    ex = tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl").examples[0]
    assert TOK.decode(ex["input_ids"]) == "reverse: cat\ntac<eos>"
    assert _decode_labels(ex) == "tac<eos>"


def test_text_format_loss_everywhere():
    rows = datasets.Dataset.from_list([{"text": "hello"}])
    ex = tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl").examples[0]
    assert ex["labels"] == ex["input_ids"] and TOK.decode(ex["input_ids"]) == "hello<eos>"


def test_messages_loss_on_assistant_turns_only():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    rows = datasets.Dataset.from_list([{"messages": msgs}])
    ex = tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl").examples[0]
    learned = _decode_labels(ex)
    assert learned.startswith("yo<eos>") and "4<eos>" in learned
    assert "hi" not in learned and "be brief" not in learned and "2+2" not in learned


def test_truncation_counted_and_no_loss_rows_dropped():
    rows = datasets.Dataset.from_list([{"prompt": "p" * 50, "completion": "c" * 50}, {"prompt": "p" * 200, "completion": "c"}])
    out = tokenize_rows(rows, SFTData(path="x.jsonl", max_length=64), TOK, "x.jsonl")
    assert len(out.examples) == 1 and len(out.examples[0]["input_ids"]) == 64
    assert out.truncated == 2 and out.dropped_no_loss == 1 and len(out.notes) == 2


def test_packing_fills_rows():
    examples = [{"input_ids": [5] * 30, "labels": [5] * 30} for _ in range(5)]
    packed = pack(examples, 64)
    assert [len(p["input_ids"]) for p in packed] == [64, 64, 22]


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_missing_field_names_the_row():
    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    with pytest.raises(UserError, match="row 2: no value for 'completion'"):
        tokenize_rows(rows, SFTData(path="x.jsonl", format="prompt_completion"), TOK, "x.jsonl")


def test_unknown_columns_explained():
    rows = datasets.Dataset.from_list([{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match="cannot tell the format"):
        tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl")
    cfg = SFTData(path="x.jsonl", prompt_field="question", completion_field="answer")
    assert len(tokenize_rows(rows, cfg, TOK, "x.jsonl").examples) == 1


def test_segments_loss_on_model_text_only():
    segs = [{"source": "prompt", "text": "Q: 12*3\n"}, {"source": "model", "text": "<request><Calculator>12*3<call>"},
            {"source": "tool", "text": "36<response>"}, {"source": "model", "text": "36<submit>"}]
    rows = datasets.Dataset.from_list([{"segments": segs}])
    ex = tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl").examples[0]
    assert TOK.decode(ex["input_ids"]) == "Q: 12*3\n<request><Calculator>12*3<call>36<response>36<submit>"
    assert _decode_labels(ex) == "<request><Calculator>12*3<call>36<submit>"


def test_segments_bad_source_names_the_row():
    rows = datasets.Dataset.from_list([{"segments": [{"source": "user", "text": "hi"}]}])
    with pytest.raises(UserError, match="row 1: segment 1 needs 'source'"):
        tokenize_rows(rows, SFTData(path="x.jsonl"), TOK, "x.jsonl")
