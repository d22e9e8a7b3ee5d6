"""bench/trl_compare.py's cheap parts: the TRL venv's pins, and the chat template TRL renders with, which must write
every SmolLM2 conversation (SFT rows, GRPO prompts with the tool) exactly as rlcli does, with TRL's assistant mask
on the tokens rlcli's SFT learns from."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.smollm2 import smollm2_dir  # noqa: F401  (a session fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trl_compare():
    saved = dict(os.environ)  # the module sets OMP_NUM_THREADS on import, as a benchmark should; a test should not
    try:
        spec = importlib.util.spec_from_file_location("trl_compare", REPO / "bench" / "trl_compare.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def test_torch_is_installed_alone_and_pinned_everywhere(trl_compare):
    pins = {**{name: "1.0" for name in trl_compare.PINNED}, "torch": "2.13.0"}
    first, second = trl_compare.install_commands("python", pins)
    assert first[-1:] == ["torch==2.13.0"]
    assert "torch==2.13.0" in second and f"trl=={trl_compare.TRL_VERSION}" in second
    assert {f"{name}==1.0" for name in trl_compare.PINNED} <= set(second)
    assert not any(arg.split("==")[0] in ("torch", *trl_compare.PINNED) and "==" not in arg for arg in second)


def test_template_renders_as_rlcli(trl_compare, smollm2_dir):  # noqa: F811
    from transformers import AutoTokenizer

    from rlcli.chat_template import ChatTemplate, conversation
    from rlcli.data.sft import IGNORE, _messages_example
    from rlcli.toolcalls import hermes_calls

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rlcli_side = ChatTemplate.of(tokenizer)
    trl_side = AutoTokenizer.from_pretrained(smollm2_dir)
    trl_side.chat_template = trl_compare.chat_template_with_tools()
    rows = [json.loads(line) for line in (REPO / "data" / "smollm2" / "sft.jsonl").read_text().splitlines()[:12]]
    assert any(len(r["messages"]) > 2 for r in rows) and any(len(r["messages"]) == 2 for r in rows)
    for row in rows:
        # TRL's SFT: the raw row, tokenised whole, the loss where {% generation %} marks it
        out = trl_side.apply_chat_template(row["messages"], tools=row["tools"], tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        ids, labels = _messages_example(row["messages"], tokenizer, "sft.jsonl", 0, row["tools"])
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == [int(t != IGNORE) for t in labels]
    # GRPO: the prompt with the tool described in the system message, and the generation prompt
    schema = rows[0]["tools"]
    messages, tools = rlcli_side.prepare(conversation("What is 12 times 34?"), schema, hermes_calls)
    expected = rlcli_side.render(messages, tools, add_generation_prompt=True)
    assert trl_side.apply_chat_template([{"role": "user", "content": "What is 12 times 34?"}], tools=schema,
                                        tokenize=False, add_generation_prompt=True) == expected
