"""Guess the number with SmolLM2-135M-Instruct through its chat template (recipes/guess_number.py ``smollm2``,
configs/smollm2/guess_*.yaml): the chat-format demonstrations are the noisy player's games with the environment's
own answers and tool schema, ``rlcli sft`` renders them token for token as the chat protocol renders the same game
played through ``GuessNumber``, the recipes pass --dry-run, and the summary reads chat episodes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlcli.plugins import load_module_file
from tests.helpers import REPO, invoke_cli, run_cli

# ruff: noqa: F811  (the tests take the imported fixture as an argument)

recipe = load_module_file(REPO / "recipes" / "guess_number.py")


def test_chat_demonstrations_are_the_noisy_players_games():
    rows = recipe.chat_sft_rows(40, seed=11)
    wins = 0
    for row in rows:
        assert row["tools"] == recipe.guess_schemas()
        messages = row["messages"]
        assert messages[0] == {"role": "user", "content": recipe.PROMPT}
        # replayed through a fresh game, every answer is what GuessNumber.guess returns, and the game ends with
        # the conversation
        game = recipe.GuessNumber()
        target = None
        for call, answer in zip(messages[1::2], messages[2::2]):
            (c,) = call["tool_calls"]
            assert call["content"] == "" and c["function"]["name"] == "guess" and answer["role"] == "tool"
            assert answer["tool_call_id"] == c["id"] and answer["name"] == "guess"
            number = json.loads(c["function"]["arguments"])["number"]
            assert isinstance(number, int)
            if target is None:  # the game's target is what the last guess of a won game found; else, any consistent
                target = _target_of(messages)
                game.reset(target=target)
            assert game.guess(number) == answer["content"]
        assert game.done and len(messages) == 1 + 2 * game.tries
        wins += game.won
    assert 0.4 < wins / len(rows) < 0.95  # the noisy player wins some games, not all: RL has room
    # the same player as the tag-protocol demonstrations: its moves, rendered as chat turns
    rng_a, rng_b = random.Random(3), random.Random(3)
    tag = recipe.play(7, rng_a, 0.5)
    chat_moves = recipe.moves(7, rng_b, 0.5)
    assert [s["text"] for s in tag[1::2]] == [f"<request><guess>{g}<call>" for g, _ in chat_moves]
    # the shipped file is what `python recipes/guess_number.py data` writes
    shipped = (REPO / "data" / "guess_number" / "smollm2_sft.jsonl").read_text()
    assert shipped == "".join(json.dumps(r) + "\n" for r in recipe.chat_sft_rows(300, seed=5))


def _target_of(messages: list[dict]) -> int:
    """A target consistent with every answer of a conversation (the number a won game found)."""
    guesses = [json.loads(m["tool_calls"][0]["function"]["arguments"])["number"] for m in messages[1::2]]
    answers = [m["content"] for m in messages[2::2]]
    if answers[-1] == "correct":
        return guesses[-1]
    low, _ = map(int, answers[-1].split(": ")[1].split("-"))
    return low


def test_the_schema_is_the_one_rlcli_derives_for_the_environment():
    from rlcli.config.env import EnvConfig
    from rlcli.env.build import build_environments
    from rlcli.toolcalls import schemas_for

    envs = build_environments(EnvConfig(environment="recipes/guess_number.py:GuessNumber", protocol="chat"))
    (schema,) = recipe.guess_schemas()
    assert [schema] == schemas_for(envs.kinds[None].tools())
    assert schema["function"]["parameters"] == {"type": "object", "required": ["number"], "properties": {
        "number": {"type": "integer", "description": "your guess, a whole number."}}}


def test_sft_renders_a_demonstration_as_the_chat_protocol_renders_its_game(smollm2_dir):
    """A scripted policy plays each demonstration's guesses through GuessNumber with the chat protocol; SFT's
    tokens of the demonstration are the episode's tokens, and its loss mask is the episode's model mask."""
    import datasets
    from transformers import AutoTokenizer

    from rlcli.chat_template import ChatTemplate
    from rlcli.config.sft import SFTData
    from rlcli.data.sft import IGNORE, tokenize_rows
    from rlcli.env import TextEnvironment
    from rlcli.env.protocols import ChatProtocol
    from rlcli.env.stateful import EnvironmentKind, Environments
    from rlcli.rl.sampling import SamplingRules
    from rlcli.toolcalls import hermes_calls
    from tests.helpers import ScriptedLM, tiny_gpt2

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    template = ChatTemplate.of(tok)
    envs = Environments({None: EnvironmentKind.probe_factory(None, recipe.GuessNumber, key="env.environment")},
                        "environment", 5.0)
    schemas = recipe.guess_schemas()
    template.check(schemas, hermes_calls)
    protocol = ChatProtocol(template, hermes_calls, schemas)
    rows = recipe.chat_sft_rows(6, seed=2)
    assert {r["messages"][-1]["content"] == "correct" for r in rows} == {True, False}  # won and lost games
    # ScriptedLM tells episodes apart by "#k:" in the prompt: the demonstration gets the same prompt
    for k, row in enumerate(rows):
        row["messages"][0]["content"] = f"#{k}: {recipe.PROMPT}"
    rendered, _ = template.prepare(rows[0]["messages"], rows[0]["tools"])
    # each turn of the policy: the assistant message's text as the template writes it (the call in its content)
    plans = {k: [tok(m["content"], add_special_tokens=False)["input_ids"] + [template.eot_id]
                 for m in template.prepare(row["messages"], row["tools"])[0] if m["role"] == "assistant"]
             for k, row in enumerate(rows)}
    targets = [_target_of(row["messages"]) for row in rows]
    model = ScriptedLM(tiny_gpt2(tok, n_positions=1024), tok, plans).eval()
    env = TextEnvironment(model, tok, {}, protocol, max_turns=6, max_new_tokens=40, max_length=1024,
                          environments=envs, rules=SamplingRules(eos_ids=(template.eot_id,)))
    histories = env.run([row["messages"][0]["content"] for row in rows], [{"target": t} for t in targets],
                        generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_list([json.loads(json.dumps(r)) for r in rows])  # as the jsonl file holds them
    examples = tokenize_rows(data, SFTData(path="x.jsonl", format="messages", max_length=4096), tok,
                             "x.jsonl").examples
    for row, h, example in zip(rows, histories, examples):
        assert h.finish_reason == "done" and h.env_error is None
        assert [c.output for c in h.tool_calls] == [m["content"] for m in row["messages"] if m["role"] == "tool"]
        assert h.env_reward == pytest.approx(_reward(row["messages"]))
        assert example["input_ids"] == h.token_ids
        assert [int(t != IGNORE) for t in example["labels"]] == h.token_mask
    assert rendered[0]["role"] == "system" and '"name": "guess"' in rendered[0]["content"]


def _reward(messages: list[dict]) -> float:
    game = recipe.GuessNumber()
    game.reset(target=_target_of(messages))
    for m in messages[1::2]:
        game.guess(json.loads(m["tool_calls"][0]["function"]["arguments"])["number"])
    return game.get_reward()


def test_game_summary_reads_chat_episodes(tmp_path):
    calls = [{"name": "guess", "arguments": {"number": 16}, "output": "higher: 17-31", "status": "ok"},
             {"name": "guess", "arguments": {"number": 30}, "output": "lower: 17-29", "status": "ok"},
             {"name": "guess", "arguments": "x", "output": "error", "status": "malformed_call"},
             {"name": "guess", "arguments": {"number": 23}, "output": "correct", "status": "ok"}]
    lost = [{"name": "guess", "arguments": "16", "output": "lower: 1-15", "status": "ok"}]  # a tag episode's text
    episodes = tmp_path / "episodes.jsonl"

    def write():
        episodes.write_text(json.dumps({"tool_calls": calls, "num_turns": 4}) + "\n"
                            + json.dumps({"tool_calls": lost, "num_turns": 2}) + "\n")

    write()
    assert recipe.tries(calls) == [(16, 1, 31), (30, 17, 31), (23, 17, 29)] and recipe.tries(lost) == [(16, 1, 31)]
    summary = recipe.game_summary(episodes)
    assert summary == {"episodes": 2, "success_rate": 0.5, "turns_per_win": 4.0, "tries_per_win": 4.0,
                       "halving_share": 0.75, "ruled_out_share": 0.0}
    calls[1]["arguments"] = {"number": 12}  # after "higher: 17-31": a try wasted on a number ruled out
    calls[1]["output"] = "higher: 17-31"
    write()
    assert recipe.game_summary(episodes)["ruled_out_share"] == 0.25


def test_recipes_pass_dry_run(smollm2_dir, monkeypatch, tmp_path):
    model = f"model.name_or_path={smollm2_dir}"
    for args in (("sft", "configs/smollm2/guess_sft.yaml", f"output_dir={tmp_path / 'sft'}"),
                 ("ppo", "configs/smollm2/guess_ppo.yaml", model, f"output_dir={tmp_path / 'ppo'}"),
                 ("env-rollout", "configs/smollm2/guess_eval.yaml", model, f"output_dir={tmp_path / 'eval'}")):
        code, out, err = invoke_cli(*args, "--dry-run", monkeypatch=monkeypatch)
        assert code == 0 and "dry run OK" in out, (args, err[-2000:])


@pytest.mark.slow
def test_lora_sft_and_grpo_smoke(smollm2_dir, tmp_path):
    """2 LoRA SFT steps on the chat demonstrations, and 2 GRPO steps through GuessNumber with the chat protocol:
    the game's answers are masked tool turns and its get_reward() is the reward."""
    from tests.helpers import read_metrics

    sft = tmp_path / "sft"
    res = run_cli("sft", "configs/smollm2/guess_sft.yaml", f"output_dir={sft}", "train.max_steps=2",
                  "train.batch_size=2", "train.micro_batch_size=2", "data.max_rows=8", "logging.log_every=1",
                  "lora.merge_on_save=false", "logging.progress=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [m["step"] for m in read_metrics(sft) if "loss" in m] == [1, 2]

    ppo = tmp_path / "ppo"
    res = run_cli("ppo", "configs/smollm2/guess_ppo.yaml", f"model.name_or_path={smollm2_dir}", f"output_dir={ppo}",
                  "ppo.steps=2", "ppo.batch_size=4", "ppo.group_size=2", "ppo.mini_batch_size=4",
                  "ppo.micro_batch_size=2", "env.max_turns=2", "lora.merge_on_save=false", "logging.progress=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = read_metrics(ppo)
    assert len(metrics) == 2 and all(m["estimator"] == "grpo" and m["env_errors"] == 0 for m in metrics)
    assert all(0.0 <= m["reward_mean"] <= 1.0 for m in metrics)
    assert (ppo / "adapter_config.json").is_file()
