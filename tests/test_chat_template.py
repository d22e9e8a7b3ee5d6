"""The chat protocol: episodes rendered token for token by the model's own chat template.

Contract, for every episode over three templates with different tool conventions (SmolLM2's ChatML without tool
support, a Hermes/Qwen-style template, a Llama-3-style template): its token ids are the template's tokens of its
``messages`` with the model's sampled tokens kept as sampled; tool results are ``tool`` messages; the template's
own tokenization of the conversation reproduces scripted episodes exactly; the sampler's log-probs (continuing
from kept KV caches) equal a full forward pass's. Templates that cannot round-trip are refused.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlcli.chat_template import ChatTemplate, ChatTemplateError, normalise_messages
from rlcli.env import TextEnvironment, histories_to_rollout
from rlcli.env.builtin_tools import calculator
from rlcli.env.protocols import ChatProtocol, chat_token_ids
from rlcli.rl.sampling import SamplingRules
from rlcli.toolcalls import hermes_calls, llama3_json_calls, schemas_for
from tests.helpers import (
    DROPS_REASONING,
    HERMES_SPECIALS,
    SNEAKY,
    TRIMMING,
    ScriptedLM,
    byte_tokenizer_with,
    hermes_tokenizer,
    llama3_tokenizer,
    tiny_gpt2,
)


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return str(a + b)


TOOLS = {"calculator": calculator, "add": add}


# --- messages ------------------------------------------------------------------------------------------------------


def test_messages_from_a_json_lines_reader_are_normalised():
    # what datasets gives back for OpenAI-style rows: every key on every message, absent ones null; arguments as text
    rows = [{"role": "user", "content": "hi", "tool_calls": None, "tool_call_id": None},
            {"role": "assistant", "content": None, "tool_call_id": None,
             "tool_calls": [{"id": "c", "type": "function",
                             "function": {"name": "add", "arguments": '{"a": 1, "b": 2, "c": null}'}}]}]
    out = normalise_messages(rows)
    assert out[0] == {"role": "user", "content": "hi"}
    assert out[1] == {"role": "assistant", "content": "",
                      "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add",
                                                                                  "arguments": {"a": 1, "b": 2}}}]}


# --- what the template does -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


TEMPLATES = ["smollm2", "hermes", "llama3"]


@pytest.fixture(scope="module")
def tokenizers(smollm2_tok):
    return {"smollm2": smollm2_tok, "hermes": hermes_tokenizer(), "llama3": llama3_tokenizer()}


def test_templates_are_probed(tokenizers):
    smol, hermes, llama = (ChatTemplate(tokenizers[n]) for n in TEMPLATES)
    assert (smol.eot_text, smol.turn_suffix, smol.renders_tools, smol.renders_tool_calls) == ("<|im_end|>", "\n",
                                                                                             False, False)
    assert smol.eot_id == tokenizers["smollm2"].convert_tokens_to_ids("<|im_end|>")
    assert (hermes.eot_text, hermes.turn_suffix, hermes.renders_tools, hermes.renders_tool_calls) == (
        "<|im_end|>", "\n", True, True)
    assert hermes.eot_id != tokenizers["hermes"].eos_token_id  # a turn ends at <|im_end|>, not at EOS
    assert (llama.eot_text, llama.turn_suffix, llama.renders_tools) == ("<|eot_id|>", "", True)


@pytest.mark.parametrize("template, fragment", [(TRIMMING, "leading and trailing whitespace"), (DROPS_REASONING, "reasoning")])
def test_templates_that_rewrite_turns_are_refused_before_any_rollout(template, fragment):
    tok = byte_tokenizer_with(template, HERMES_SPECIALS)
    with pytest.raises(ChatTemplateError, match=f"rewrites assistant text \\({fragment}"):
        ChatTemplate(tok).check(schemas_for(TOOLS), hermes_calls)


def test_without_tool_support_the_tools_go_into_a_system_message(smollm2_tok):
    template = ChatTemplate(smollm2_tok)
    messages, tools = template.prepare([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hi"}], schemas_for(TOOLS))
    assert tools is None and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "add"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert template.prepare(messages, tools) == (messages, None)  # preparing again changes nothing


# --- episodes -----------------------------------------------------------------------------------------------------


def call_text(kind: str, name: str, arguments: dict) -> str:
    if kind == "llama3":
        return json.dumps({"name": name, "parameters": arguments})
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def plans_for(kind: str, tok, eot: int, n: int, rng: random.Random) -> dict[int, list[list[int] | None]]:
    """Scripted turns per episode: every kind of turn opens some episode; the rest is random."""

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [eot]

    def turn(what):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {
            "call": ids(call_text(kind, "calculator", {"expression": f"{a}*{b}"})),
            "add": ids(call_text(kind, "add", {"a": a, "b": b})),
            "two_calls": ids(call_text(kind, "add", {"a": a, "b": b}) + "\n"
                             + call_text(kind, "calculator", {"expression": f"{a}-{b}"})),
            "prose_then_call": ids(f"Let me compute {a}*{b}.\n" + call_text(kind, "calculator",
                                                                              {"expression": f"{a}*{b}"})),
            "squeezed_call": ids(f'<tool_call>{{"name":"add","arguments":{{"a":{a},"b":{b}}}}}</tool_call>'),
            "unknown": ids(call_text(kind, "nope", {"x": 1})),
            "malformed": ids("<tool_call>\n{not json}\n</tool_call>" if kind != "llama3" else "{not json"),
            "answer": ids(f"The answer is {a * b}."),
            "free": None,
        }[what]

    kinds = ["call", "add", "prose_then_call", "squeezed_call", "unknown", "malformed", "answer", "free"]
    if kind != "llama3":
        kinds.append("two_calls")
    return {k: [turn(kinds[k % len(kinds)])] + [turn(rng.choice(kinds + ["call", "answer"])) for _ in range(3)]
            for k in range(n)}


def make_env(kind, tok, model, **kwargs) -> TextEnvironment:
    template = ChatTemplate.of(tok)
    parser = llama3_json_calls if kind == "llama3" else hermes_calls
    template.check(schemas_for(TOOLS), parser)
    protocol = ChatProtocol(template, parser, schemas_for(TOOLS), system_message=kwargs.pop("system_message", None))
    byte_level = len(tok) < 1000  # one token per character: longer turns and prompts
    defaults = dict(max_turns=3, max_new_tokens=160 if byte_level else 48, max_tool_output_tokens=16,
                    max_length=2400 if byte_level else 900,
                    tool_isolation="inline", rules=SamplingRules(eos_ids=(template.eot_id,)))
    return TextEnvironment(model, tok, TOOLS, protocol, **{**defaults, **kwargs})


@pytest.mark.parametrize("kind", TEMPLATES)
def test_episodes_are_the_templates_tokens_of_their_messages(kind, tokenizers):
    tok = tokenizers[kind]
    template = ChatTemplate.of(tok)
    rng = random.Random(kind)
    n = 24
    plans = plans_for(kind, tok, template.eot_id, n, rng)
    model = ScriptedLM(tiny_gpt2(tok, n_positions=2400), tok, plans).eval()
    env = make_env(kind, tok, model)
    prompts = [f"#{k}: what is {rng.randint(2, 99)} times {rng.randint(2, 99)}?" for k in range(n)]
    histories = env.run(prompts, generator=torch.Generator().manual_seed(0))

    reasons = {h.finish_reason for h in histories}
    assert reasons <= {"eos", "max_turns", "max_length", "max_new_tokens"} and "eos" in reasons
    assert sum(len(h.tool_calls) for h in histories) >= n // 2 and env.last_stats.reused_positions > 0
    for k, h in enumerate(histories):
        messages, tools = h.messages, h.tools
        assert (tools is None) == (kind == "smollm2")  # SmolLM2's template ignores tools: a system message has them
        full_text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        # the episode's text is the template's text of its messages (all of it but what follows the last token)
        assert full_text.startswith(h.text)
        # ids: the template's tokens with the model's tokens as sampled; whole when the episode ended cleanly
        expected = chat_token_ids(template, h)
        assert h.token_ids == expected[: len(h.token_ids)]
        rest = template.decode(expected[len(h.token_ids):])
        if h.finish_reason == "eos":
            # after the end-of-turn token, the template's suffix; a turn ended by another EOS token (a free turn)
            # is closed by the template's end of turn first
            closing = "" if h.segments[-1].token_ids[-1] == template.eot_id else template.eot_text
            assert rest == closing + template.turn_suffix
        elif h.finish_reason == "max_turns":
            assert rest == "" and messages[-1]["role"] == "tool"
        # the prompt is apply_chat_template of the leading messages with the generation prompt
        n_lead = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert h.segments[0].token_ids == tok.apply_chat_template(messages[:n_lead], tools=tools,
                                                                  add_generation_prompt=True, return_dict=False)
        # each model segment is one assistant message; each tool segment is the template's text for the tool
        # message(s) after it, ending with the next generation prompt while the episode goes on
        assert [s.source for s in h.segments][1::2] == ["model"] * h.num_turns
        assert sum(m["role"] == "assistant" for m in messages) == h.num_turns
        tool_segments = [s for s in h.segments if s.source == "tool"]
        tool_messages = [m for m in messages if m["role"] == "tool"]
        assert len(tool_messages) == sum(1 for c in h.tool_calls) or h.finish_reason == "max_length"
        for m in tool_messages:
            assert any(m["content"] in s.text for s in tool_segments)
        generation_prompt = (tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
                             [len(tok.apply_chat_template(messages[:1], tokenize=False)):])
        for i, s in enumerate(tool_segments):
            if i < len(tool_segments) - 1 or h.finish_reason != "max_turns":
                assert s.text.endswith(generation_prompt)
        # scripted turns were kept exactly as sampled; with canonical tokens, the template's own tokenization of
        # the conversation reproduces the episode
        scripted = all(p is not None for p in plans[k][: h.num_turns])
        for t, s in enumerate(s for s in h.segments if s.source == "model"):
            if plans[k][t] is not None:
                assert s.token_ids == plans[k][t][: len(s.token_ids)]
        if scripted and h.finish_reason in ("eos", "max_turns"):
            whole = tok.apply_chat_template(messages, tools=tools, return_dict=False)
            assert whole[: len(h.token_ids)] == h.token_ids
    # calls the template renders canonically are stored OpenAI style; a squeezed call is kept as the model wrote it
    assistants = [m for h in histories for m in h.messages if m["role"] == "assistant"]
    assert any(m.get("tool_calls") for m in assistants)
    if kind == "hermes":
        squeezed = [m for m in assistants if '<tool_call>{"name":"add"' in m["content"]]
        assert squeezed and all("tool_calls" not in m for m in squeezed)

    # PPO gets exactly these ids; the sampler's log-probs (continuing from kept caches) are the full forward's
    rollout = histories_to_rollout(histories, tok.pad_token_id)
    input_ids, attention_mask, positions = rollout.full_sequences()
    with torch.no_grad():
        logits = model.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    q = rollout.query_ids.shape[1]
    logp = torch.log_softmax(logits[:, q - 1:-1].float(), dim=-1).gather(-1, rollout.response_ids[..., None])[..., 0]
    free = torch.tensor([[all(p is None for p in plans[k][: h.num_turns])] for k, h in enumerate(histories)])
    mask = rollout.model_mask.bool() & free  # scripted tokens had their logits overridden
    assert mask.any()
    assert torch.allclose(logp[mask], rollout.sampler_logprobs[mask], atol=1e-5)


def test_a_template_that_rewrites_a_turn_mid_episode_is_reported(tokenizers):
    tok = byte_tokenizer_with(SNEAKY, HERMES_SPECIALS)
    template = ChatTemplate(tok)
    ids = tok(call_text("hermes", "add", {"a": 1, "b": 2}) + " rewrite me", add_special_tokens=False)["input_ids"]
    model = ScriptedLM(tiny_gpt2(tok, n_positions=2400), tok, {0: [ids + [template.eot_id]]}).eval()
    env = make_env("hermes", tok, model)
    with pytest.raises(ChatTemplateError, match="renders an episode.s earlier turns"):
        env.run(["#0: add 1 and 2"], generator=torch.Generator().manual_seed(0))


def test_sft_renders_an_episodes_messages_into_the_same_tokens(tokenizers):
    """SFT on the messages of an episode sees the rollout's token layout, with the loss on the model's tokens."""
    import datasets

    from rlcli.config.sft import SFTData
    from rlcli.data.sft import IGNORE, tokenize_rows

    for kind in TEMPLATES:
        tok = tokenizers[kind]
        template = ChatTemplate.of(tok)
        text = call_text(kind, "add", {"a": 2, "b": 3})
        plans = {0: [tok(text, add_special_tokens=False)["input_ids"] + [template.eot_id],
                     tok("It is 5.", add_special_tokens=False)["input_ids"] + [template.eot_id]]}
        env = make_env(kind, tok, ScriptedLM(tiny_gpt2(tok, n_positions=2400), tok, plans).eval(),
                       system_message="You are terse.")
        (h,) = env.run(["#0: add 2 and 3"], generator=torch.Generator().manual_seed(0))
        assert h.finish_reason == "eos" and h.tool_calls[0].output == "5"
        row = json.loads(json.dumps({"messages": h.messages, "tools": h.tools}))  # as a jsonl file holds it
        rows = datasets.Dataset.from_list([row])
        (example,) = tokenize_rows(rows, SFTData(path="x.jsonl", max_length=4096), tok, "x.jsonl").examples
        n = len(h.token_ids)
        assert example["input_ids"][:n] == h.token_ids, kind
        assert [int(t != IGNORE) for t in example["labels"][:n]] == h.token_mask, kind


def test_ppo_and_env_prompts_render_the_same_way(tokenizers):
    from rlcli.data.prompts import encode_prompt

    for kind in TEMPLATES:
        tok = tokenizers[kind]
        protocol = ChatProtocol(ChatTemplate.of(tok), hermes_calls)
        text = protocol.start("#3: what is 2+2?").text
        assert encode_prompt("#3: what is 2+2?", tok, chat_template=True, max_length=4096, length=None) == \
            tok(text, add_special_tokens=False)["input_ids"]


def test_a_tool_turn_that_fills_max_length_exactly_still_ends_on_a_message(tokenizers):
    """The tool turn ends with the next generation prompt, so the episode cannot end there: the model gets its turn
    with no tokens left, and the episode ends as max_length with tokens that are its messages' rendering."""
    tok = tokenizers["hermes"]
    template = ChatTemplate.of(tok)
    call = tok(call_text("hermes", "add", {"a": 1, "b": 2}), add_special_tokens=False)["input_ids"] + [template.eot_id]

    def run(**kwargs):
        model = ScriptedLM(tiny_gpt2(tok, n_positions=2400), tok, {0: [call, call, call]}).eval()
        (h,) = make_env("hermes", tok, model, **kwargs).run(["#0: add 1 and 2"],
                                                            generator=torch.Generator().manual_seed(0))
        return h

    filled = sum(len(s.token_ids) for s in run().segments[:3])  # prompt, the call, its answer
    h = run(max_length=filled)
    assert h.finish_reason == "max_length" and len(h.token_ids) == filled
    assert [s.source for s in h.segments][:3] == ["prompt", "model", "tool"] and h.messages[2]["role"] == "tool"
    assert h.token_ids == chat_token_ids(template, h)[:filled]
