"""TextEnvironment: the token bookkeeping contract, every tool failure mode, limits, rollouts and stats."""

from __future__ import annotations

import random
import time

import pytest
import torch

from rlcli.config.errors import UserError
from rlcli.env import (
    JsonProtocol,
    TagProtocol,
    TextEnvironment,
    histories_to_rollout,
)
from tests.helpers import ids


def echo(text: str) -> str:
    return text[::-1] + "!"


def boom(text: str) -> str:
    raise ZeroDivisionError("division by zero, deliberately")


def hang(text: str) -> str:
    time.sleep(60)
    return "never"


def huge(text: str) -> str:
    return "y" * 5000


def number(text: str) -> int:
    return 42


TOOLS = {"Echo": echo, "Boom": boom, "Hang": hang, "Huge": huge, "Number": number}


KINDS = ["call", "unknown", "malformed", "boom", "bad", "huge", "submit", "eos", "free"]


def random_turn(rng: random.Random, tok, kind: str | None = None) -> list[int] | None:
    """One scripted turn: free text, then an action; or None (the random model writes freely)."""
    chatter = "".join(rng.choice("abc xyz ") for _ in range(rng.randint(0, 6)))
    kind = kind or rng.choice(KINDS + ["call", "call"])
    args = "".join(rng.choice("0123456789+é") for _ in range(rng.randint(0, 5)))
    text = {
        "call": f"{chatter}<request><Echo>{args}<call>",
        "unknown": f"{chatter}<request><Nope>{args}<call>",
        "malformed": f"{chatter}<request>no tool name<call>",
        "boom": f"<request><Boom>{args}<call>",
        "bad": f"<request><Number>{args}<call>",
        "huge": f"<request><Huge>{args}<call>",
        "submit": f"{chatter}answer {args}<submit>",
        "eos": f"{chatter}bye",
    }.get(kind)
    if text is None:
        return None
    return ids(tok, text) + ([tok.eos_token_id] if kind == "eos" else [])


@pytest.mark.parametrize("kv_reuse", [True, False], ids=["kv-reuse", "prefill-every-turn"])
def test_bookkeeping_property_over_random_episodes(tok, scripted, kv_reuse):
    """What the model was fed == the history's segments == what PPO's forward pass gets; mask 1 on model tokens.
    With kv_reuse, later turns continue from each row's kept cache and are fed only the new tokens."""
    rng = random.Random(0)
    n = 40
    # every kind of turn opens some episode; the rest is random
    plans = {k: [random_turn(rng, tok, KINDS[k % len(KINDS)])] + [random_turn(rng, tok) for _ in range(3)]
             for k in range(n)}
    prompts = [f"#{k}:" + "".join(rng.choice("qwerty uiop ü€\n") for _ in range(rng.randint(1, 30))) for k in range(n)]
    model = scripted(plans)
    env = TextEnvironment(model, tok, TOOLS, TagProtocol(), max_turns=3, max_new_tokens=40,
                          max_tool_output_tokens=16, max_length=300, tool_timeout_s=5.0, kv_reuse=kv_reuse)
    histories = env.run(prompts, rows=[{"k": k} for k in range(n)], generator=torch.Generator().manual_seed(0))
    later_turns = sum(max(h.num_turns - 1, 0) for h in histories)
    assert later_turns > 0
    if kv_reuse:  # every later turn continued from its kept cache; the prompts were never computed again
        assert model.continued_rows == later_turns
        assert env.last_stats.reused_positions >= sum(len(h.prompt_ids) for h in histories if h.num_turns > 1)
    else:
        assert model.continued_rows == 0 and env.last_stats.reused_positions == 0

    assert [h.meta["k"] for h in histories] == list(range(n))
    for k, (prompt, h) in enumerate(zip(prompts, histories)):
        assert h.finish_reason in {"submit", "eos", "no_call", "max_turns", "max_length"}
        assert len(h.token_ids) <= 300
        assert h.segments[0].source == "prompt" and h.segments[0].token_ids == tok(prompt)["input_ids"]
        spans = h.token_spans
        model_turns = [i for i, s in enumerate(h.segments) if s.source == "model"]
        assert len(model_turns) == h.num_turns == len(model.prefills[k])
        for t, seg_index in enumerate(model_turns):
            # each turn's prefill context == every segment before this model segment, concatenated
            assert model.prefills[k][t] == h.token_ids[: spans[seg_index].start]
            # the model segment holds exactly the sampled tokens (the whole script when one was forced)
            script, got = plans[k][t], h.segments[seg_index].token_ids
            if script is not None:
                assert got == script[: len(got)]
                if len(got) < len(script):  # only a token budget cuts a script short
                    assert len(got) == 40 or spans[seg_index].end == 300
        # the last forward call saw everything up to the last model token (which was sampled, never fed)
        assert model.fed[k] == h.token_ids[: spans[model_turns[-1]].end - 1]
        # mask: 1 exactly on model tokens
        expected_mask = [int(s.source == "model") for s in h.segments for _ in s.token_ids]
        assert h.token_mask == expected_mask
        # tool segments are the formatted output tokenised on its own (unless cut at max_length)
        for s in h.segments:
            if s.source == "tool" and h.finish_reason != "max_length":
                assert s.token_ids == ids(tok, s.text)
        assert sum(s.source == "tool" for s in h.segments) <= len(h.tool_calls)

    # and PPO's forward pass sees exactly the same ids, with the model mask on the model tokens
    rollout = histories_to_rollout(histories, tok.pad_token_id)
    input_ids, attention_mask, _ = rollout.full_sequences()
    q = rollout.query_ids.shape[1]
    for row, h in enumerate(histories):
        assert input_ids[row][attention_mask[row] == 1].tolist() == h.token_ids
        n_prompt = len(h.prompt_ids)
        response_len = len(h.token_ids) - n_prompt
        assert rollout.model_mask[row, :response_len].tolist() == h.token_mask[n_prompt:]
        assert rollout.tool_mask[row, :response_len].tolist() == h.tool_mask[n_prompt:]
        assert rollout.response_mask[row].sum() == response_len
        assert rollout.query_mask[row, q - n_prompt:].all() and not rollout.query_mask[row, : q - n_prompt].any()

    stats = env.last_stats
    assert stats.episodes == n
    assert sum(stats.tool_outcomes.values()) == sum(len(h.tool_calls) for h in histories) > 0
    assert stats.generated_tokens == sum(sum(h.token_mask) for h in histories)
    assert 0.0 <= stats.pad_fraction < 1.0
    assert {"ok", "unknown_tool", "malformed_call", "error", "bad_output", "truncated"} <= set(stats.tool_outcomes)


def run_failure_case(tok, scripted, call_text: str, **env_kwargs):
    """Episode 0: a (failing) call, then a good call, then submit. Returns (history, env, seconds)."""
    plans = {0: [ids(tok, call_text), ids(tok, "<request><Echo>ok<call>"), ids(tok, "done<submit>")]}
    env = TextEnvironment(scripted(plans), tok, TOOLS, TagProtocol(), max_turns=4, max_new_tokens=40,
                          max_length=400, **env_kwargs)
    start = time.monotonic()
    [history] = env.run(["#0: go"])
    return history, env, time.monotonic() - start


@pytest.mark.parametrize(
    "call_text, status, error_fragment",
    [
        ("<request>oops<call>", "malformed_call", "Error: malformed tool call"),
        ("<request><Nope>1<call>", "unknown_tool", "Error: unknown tool 'Nope'"),
        ("<request><Boom>1<call>", "error", "Error: ZeroDivisionError: division by zero"),
        ("<request><Number>1<call>", "bad_output", "42\n[note: the tool returned int"),
        ("<request><Huge>1<call>", "truncated", "[truncated:"),
    ],
)
def test_failure_modes_become_text_and_the_run_goes_on(tok, scripted, call_text, status, error_fragment):
    history, env, _ = run_failure_case(tok, scripted, call_text, max_tool_output_tokens=64)
    first, second = history.tool_calls
    assert first.status == status and error_fragment in first.output
    tool_segments = [s for s in history.segments if s.source == "tool"]
    assert error_fragment in tool_segments[0].text and tool_segments[0].text.endswith("<response>")
    # the episode went on: a good call after the failure, then a submit
    assert second.status == "ok" and second.output == "ko!"
    assert history.finish_reason == "submit" and history.num_turns == 3
    assert env.last_stats.tool_outcomes == {status: 1, "ok": 1}
    assert env.runner.counts[status] == 1


def test_huge_output_is_cut_to_the_token_cap(tok, scripted):
    history, _, _ = run_failure_case(tok, scripted, "<request><Huge>1<call>", max_tool_output_tokens=32)
    tool_segment = next(s for s in history.segments if s.source == "tool")
    cut_output = history.tool_calls[0].output
    assert cut_output.startswith("y" * 32) and not cut_output.startswith("y" * 33)
    assert cut_output.endswith("\n[truncated: 4064 tokens and 904 more characters cut]")
    marker = len(ids(tok, "\n[truncated: 4064 tokens and 904 more characters cut]<response>"))
    assert len(tool_segment.token_ids) == 32 + marker


def test_hanging_tool_is_killed_within_its_time_limit(tok, scripted):
    history, env, seconds = run_failure_case(tok, scripted, "<request><Hang>1<call>", tool_timeout_s=0.5)
    assert history.tool_calls[0].status == "timeout"
    assert "Error: TimeoutError" in history.tool_calls[0].output
    assert history.finish_reason == "submit"
    assert seconds < 5.0


def test_limits_max_turns_and_max_length(tok, scripted):
    call = ids(tok, "<request><Echo>abc<call>")
    plans = {0: [call] * 5, 1: [call] * 5}
    env = TextEnvironment(scripted(plans), tok, TOOLS, TagProtocol(), max_turns=2, max_new_tokens=30,
                          max_length=400)
    h0, h1 = env.run(["#0: a", "#1: b"])
    assert h0.finish_reason == h1.finish_reason == "max_turns"
    assert h0.num_turns == 2 and len(h0.tool_calls) == 2  # the call on the last turn is still answered
    assert h0.segments[-1].source == "tool"

    env = TextEnvironment(scripted(plans), tok, TOOLS, TagProtocol(), max_turns=9, max_new_tokens=30,
                          max_length=60)
    h0, _ = env.run(["#0: a", "#1: b"])
    assert h0.finish_reason == "max_length" and len(h0.token_ids) == 60

    with pytest.raises(UserError, match="prompt 0 has"):
        env.run(["#0:" + "x" * 80])


def test_free_running_random_model_and_determinism(tok, model):
    env = TextEnvironment(model, tok, {"Echo": echo}, TagProtocol(), max_new_tokens=12, max_length=64)
    prompts = ["hello", "a longer prompt", "x"]
    first = env.run(prompts, generator=torch.Generator().manual_seed(3))
    second = env.run(prompts, generator=torch.Generator().manual_seed(3))
    assert [h.token_ids for h in first] == [h.token_ids for h in second]
    for h in first:  # a random model neither calls nor submits: one turn each
        assert h.num_turns == 1 and h.finish_reason in {"no_call", "eos"}
    stats = env.last_stats.as_metrics()
    assert stats["env/episodes"] == 3 and stats["env/tokens_per_s"] > 0


def test_json_protocol_episode(tok, scripted):
    call = '<tool_call>{"name": "Echo", "arguments": {"text": "abc"}}</tool_call>'
    bad = '<tool_call>{"name": "Echo", "arguments": {"text": </tool_call>'
    plans = {0: [ids(tok, call), ids(tok, bad), ids(tok, "the answer") + [tok.eos_token_id]]}
    protocol = JsonProtocol()
    env = TextEnvironment(scripted(plans), tok, TOOLS, protocol, max_new_tokens=80, max_length=500,
                          system_prompt="<tools>Echo(text)</tools>\n")
    [h] = env.run(["#0: go"])
    assert "<tools>" in h.segments[0].text and h.segments[0].text.endswith("#0: go")
    assert [c.status for c in h.tool_calls] == ["ok", "malformed_call"]
    assert h.tool_calls[0].arguments == {"text": "abc"} and h.tool_calls[0].output == "cba!"
    assert h.segments[2].text == "<tool_response>\ncba!\n</tool_response>\n"
    assert h.finish_reason == "eos" and h.segments[-1].token_ids[-1] == tok.eos_token_id
