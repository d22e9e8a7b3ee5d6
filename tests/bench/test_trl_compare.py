"""bench/trl_compare.py's cheap parts: the TRL venv's pins, and the chat template TRL renders with, which must write
every SmolLM2 conversation (SFT rows, GRPO prompts with the tool) exactly as rlcli does, with TRL's assistant mask
on the tokens rlcli's SFT learns from."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO, load_bench


@pytest.fixture(scope="module")
def trl_compare():
    return load_bench("trl_compare")


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


def test_reasoning_task_gives_trl_rlcli_prompts_order_and_reward(trl_compare, smollm2_dir, tmp_path):  # noqa: F811
    """The reasoning-gym side-by-side: TRL's data file holds the prompts rlcli draws, step by step, as chat messages
    its template renders to rlcli's prompt ids, and the driver's reward (the task file loaded as a plain module, as
    in the TRL venv) gives rlcli's scores."""
    pytest.importorskip("reasoning_gym")
    from transformers import AutoTokenizer

    from rlcli.seeds import index_stream
    from rlcli.tasks import reasoning_gym as task

    plan = trl_compare.reasoning_plan(trl_compare.RG_RECIPE, 2, str(smollm2_dir), tmp_path)
    recipe, spec = plan["recipe"], plan["spec"]
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    train, held = task.generate(recipe.data.reasoning_gym)
    per_step = recipe.ppo.batch_size // recipe.ppo.group_size
    order = [i for s in (1, 2) for i in index_stream(len(train), recipe.seed, (s - 1) * per_step, per_step)]
    assert [r["prompt"][0]["content"] for r in rows] == [train[i]["prompt"] for i in order]
    assert plan["held"] == held and not {r["question"] for r in held} & {train[i]["question"] for i in order}
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = (tmp_path / "template.jinja").read_text()
    assert tok.apply_chat_template(rows[0]["prompt"], tokenize=True, add_generation_prompt=True,
                                   return_dict=True)["input_ids"] == plan["reference"]["first_prompt_ids"]
    assert spec["trainer"]["num_generations"] == recipe.ppo.group_size
    assert spec["trainer"]["max_completion_length"] == recipe.generation.max_new_tokens
    plain = importlib.util.spec_from_file_location("plain_task", REPO / "rlcli" / "tasks" / "reasoning_gym.py")
    module = importlib.util.module_from_spec(plain)
    plain.loader.exec_module(module)
    answers = [f"It is {train[i]['answer']}." for i in order[:4]] + ["no idea"] * 4
    metas = [r["reasoning_gym"] for r in rows[:8]]
    assert [module.score_one(a, {"reasoning_gym": m}) for a, m in zip(answers, metas)] == \
        task.score(answers, [train[i] for i in order[:8]]) == [1.0] * 4 + [0.0] * 4
