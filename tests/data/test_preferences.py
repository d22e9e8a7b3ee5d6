"""Preference rows -> tokenized pairs: formats, truncation that keeps the end, identical pairs, bad rows."""

from __future__ import annotations

import datasets
import pytest
import torch

from rlcli.config.common import ModelConfig
from rlcli.config.errors import UserError
from rlcli.config.rm import RMData
from rlcli.data.preferences import collate_pairs, tokenize_pairs
from rlcli.models.loading import load_tokenizer


@pytest.fixture
def tok():
    return load_tokenizer(ModelConfig(architecture="gpt2"))  # byte-level: one token per ASCII character


def pairs_of(rows, tok, **cfg):
    return tokenize_pairs(datasets.Dataset.from_list(rows), RMData(path="pairs.jsonl", **cfg), tok, "pairs.jsonl")


def ids(tok, text):
    return tok(text)["input_ids"]


def test_text_pairs_start_with_the_prompt(tok):
    out = pairs_of([{"prompt": "sort: 2 1\n", "chosen": "1 2", "rejected": "2 1"}], tok)
    (pair,) = out.pairs
    assert pair.chosen_ids == ids(tok, "sort: 2 1\n1 2") and pair.rejected_ids == ids(tok, "sort: 2 1\n2 1")
    assert pair.margin == 0.0 and out.truncated == out.identical == 0 and out.notes == []


def test_without_a_prompt_column_the_texts_stand_alone(tok):
    (pair,) = pairs_of([{"chosen": "good", "rejected": "bad"}], tok).pairs
    assert pair.chosen_ids == ids(tok, "good") and pair.rejected_ids == ids(tok, "bad")


def test_truncation_keeps_the_end_of_the_response_and_is_counted(tok):
    rows = [
        {"prompt": "a long prompt that will not fit: ", "chosen": "yes", "rejected": "no"},  # prompt cut
        {"prompt": "p: ", "chosen": "0123456789abcdefXYZ", "rejected": "short"},              # response cut too
        {"prompt": "p: ", "chosen": "fits", "rejected": "fine"},
    ]
    out = pairs_of(rows, tok, max_length=12)
    assert out.pairs[0].chosen_ids == ids(tok, "ill not fit: yes")[-12:] and len(out.pairs[0].chosen_ids) == 12
    assert out.pairs[0].rejected_ids == ids(tok, "will not fit: no")[-12:]  # the end of each text is kept
    assert out.pairs[1].chosen_ids == ids(tok, "456789abcdefXYZ")[-12:]
    assert out.pairs[2].chosen_ids == ids(tok, "p: fits")
    assert (out.truncated, out.responses_cut) == (2, 1)
    assert any("2 of 3 pairs" in n and "max_length=12" in n and "1 of them had a response longer" in n
               for n in out.notes), out.notes


def test_identical_pairs_are_counted_and_dropped(tok):
    rows = [{"prompt": "q ", "chosen": "same", "rejected": "same"},
            {"prompt": "q ", "chosen": "abc", "rejected": "xbc"},   # differs only where truncation cuts
            {"prompt": "q ", "chosen": "right", "rejected": "wrong"}]
    out = pairs_of(rows, tok, max_length=2)
    assert len(out.pairs) == 1 and out.identical == 1 and out.identical_after_truncation == 1
    assert any("1 of 3 pairs" in n and "identical" in n and "dropped" in n for n in out.notes), out.notes
    with pytest.raises(UserError, match="none of its 1 pairs is usable"):
        pairs_of(rows[:1], tok)


def test_margin_column(tok):
    out = pairs_of([{"chosen": "a", "rejected": "b", "m": 2}, {"chosen": "c", "rejected": "d", "m": 0.5}], tok,
                   margin_field="m")
    assert [p.margin for p in out.pairs] == [2.0, 0.5]
    with pytest.raises(UserError, match=r"row 1: margin column 'm' must be a number"):
        pairs_of([{"chosen": "a", "rejected": "b", "m": "big"}], tok, margin_field="m")


def test_chat_pairs_render_with_the_template(tok):
    rows = [{"prompt": "sort: 2 1", "chosen": [{"role": "assistant", "content": "1 2"}],
             "rejected": [{"role": "assistant", "content": "2 1"}]}]
    (pair,) = pairs_of(rows, tok).pairs  # format auto-detected from the message lists
    user = {"role": "user", "content": "sort: 2 1"}
    expected = tok.apply_chat_template([user, {"role": "assistant", "content": "1 2"}], tokenize=False)
    assert pair.chosen_ids == tok(expected, add_special_tokens=False)["input_ids"]
    conversations = [{"chosen": [user, {"role": "assistant", "content": "1 2"}],
                      "rejected": [user, {"role": "assistant", "content": "2 1"}]}]
    assert pairs_of(conversations, tok).pairs[0].chosen_ids == pair.chosen_ids


@pytest.mark.parametrize("rows, cfg, fragments", [
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}], {},
     ["pairs.jsonl row 2: no value for 'rejected'"]),
    ([{"prompt": "p", "chosen": "a"}], {}, ["needs column(s) 'rejected'"]),
    ([{"chosen": "a", "rejected": 3}], {"format": "text"}, ["pairs.jsonl row 1: ", "'rejected' must be text"]),
    ([{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}], {},
     ["row 1: ", "message 1 needs 'role' and 'content'"]),
    ([{"chosen": "a", "rejected": "b"}], {"format": "messages"}, ["row 1: ", "must be a non-empty list"]),
])
def test_bad_rows_are_named(tok, rows, cfg, fragments):
    with pytest.raises(UserError) as err:
        pairs_of(rows, tok, **cfg)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_collate_puts_chosen_first_and_masks_by_length_when_pad_is_eos(tok):
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    out = pairs_of([{"chosen": "ab", "rejected": "c"}, {"chosen": "d", "rejected": "efg"}], tok)
    pairs = [type(p)(p.chosen_ids + [eos], p.rejected_ids + [eos], p.margin) for p in out.pairs]  # texts end in EOS
    batch = collate_pairs(pairs, pad_token_id=eos)
    assert batch.input_ids.shape == (4, 4) and batch.margin.tolist() == [0.0, 0.0]
    assert batch.input_ids[0, :3].tolist() == ids(tok, "ab") + [eos]
    assert batch.input_ids[3].tolist() == ids(tok, "efg") + [eos]
    assert batch.attention_mask.sum(1).tolist() == [3, 2, 2, 4]  # the real EOS keeps its 1
    assert batch.attention_mask.dtype == torch.long
