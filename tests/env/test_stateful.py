"""Stateful environments (``rlcli.env.stateful``): TRL's ``environment_factory`` contract in the turn loop."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from rlcli.chat_template import ChatTemplate
from rlcli.config.env import EnvConfig
from rlcli.config.errors import UserError
from rlcli.config.reward import RewardConfig
from rlcli.env import ChatProtocol, JsonProtocol, TagProtocol, TextEnvironment
from rlcli.env.build import build_environments, check_env, prompt_notes
from rlcli.env.environment import histories_to_rollout
from rlcli.env.sandbox import sandbox_problem
from rlcli.env.stateful import EnvironmentKind, Environments, public_methods
from rlcli.rewards.scoring import score_episodes
from rlcli.toolcalls import hermes_calls, schemas_for
from tests.helpers import ScriptedLM, hermes_tokenizer, ids, tiny_gpt2

# --- a class written to TRL's documented environment_factory contract (docs/source/grpo_trainer.md, "Environments":
# reset(**kwargs) -> str | None, public methods are tools, optional get_reward() -> float, sync or async) ---------

class IncrementEnv:
    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        self.target = kwargs["target"]
        return f" Reach {self.target}."

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += int(step)
        return self.counter

    async def peek(self) -> str:
        """Look at the counter without changing it."""
        await asyncio.sleep(0)
        return f"counter={self.counter}"


def kinds(*classes, names=(None,)) -> dict:
    return {n: EnvironmentKind.probe_factory(n, c, key="env.environment") for n, c in zip(names, classes)}


def call(name: str, **arguments) -> str:
    import json

    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def json_env(tok, plans, env_classes, names=(None,), **kwargs):
    envs = Environments(kinds(*env_classes, names=names), "environment", kwargs.pop("timeout_s", 5.0))
    model = ScriptedLM(tiny_gpt2(tok), tok, plans).eval()
    return TextEnvironment(model, tok, {}, JsonProtocol(), max_turns=kwargs.pop("max_turns", 4), max_new_tokens=80,
                           max_length=500, environments=envs, **kwargs)


def test_a_trl_environment_class_runs_unchanged(tok):
    assert set(public_methods(IncrementEnv())) == {"increment", "peek"}
    plans = {0: [ids(tok, call("increment", step=2)), ids(tok, call("peek")), ids(tok, call("increment", step=1)),
                 ids(tok, "3") + [tok.eos_token_id]],
             1: [ids(tok, call("increment", step=5)), ids(tok, "5") + [tok.eos_token_id]]}
    env = json_env(tok, plans, [IncrementEnv])
    rows = [{"prompt": "#0: count", "target": 3}, {"prompt": "#1: count", "target": 4}]
    h0, h1 = env.run([r["prompt"] for r in rows], rows)
    # reset's text is appended to the prompt; each episode has its own instance (its own counter)
    assert h0.segments[0].text == "#0: count Reach 3." and h1.segments[0].text == "#1: count Reach 4."
    assert [(c.name, c.output, c.status) for c in h0.tool_calls] == [
        ("increment", "2", "ok"), ("peek", "counter=2", "ok"), ("increment", "3", "ok")]
    assert [c.output for c in h1.tool_calls] == ["5"]
    # get_reward scored each episode from its own state when it ended
    assert (h0.env_reward, h1.env_reward) == (1.0, 0.0)
    assert h0.finish_reason == h1.finish_reason == "eos" and h0.env_error is None
    # tool answers are forced tokens (mask 0), as for any tool
    assert sum(h0.tool_mask) > 0 and all(m == 0 for m, t in zip(h0.token_mask, h0.tool_mask) if t)


def test_scores_combine_the_source_and_the_environment_and_failures_score_as_failed(tok):
    plans = {k: [ids(tok, call("increment", step=3)), ids(tok, "ok") + [tok.eos_token_id]] for k in range(3)}

    class Fragile(IncrementEnv):
        def get_reward(self) -> float:
            if self.target == 99:
                raise RuntimeError("the board is corrupt")
            return super().get_reward()

    env = json_env(tok, plans, [Fragile])
    rows = [{"prompt": f"#{k}: go", "target": t} for k, t in enumerate((3, 4, 99))]
    histories = env.run([r["prompt"] for r in rows], rows)
    assert [h.finish_reason for h in histories] == ["eos", "eos", "env_error"]
    assert "get_reward: Error: RuntimeError: the board is corrupt" in histories[2].env_error
    rollout = histories_to_rollout(histories, tok.pad_token_id)

    def length(prompts, responses, rows, **_):
        return torch.tensor([10.0] * len(responses))

    cfg = RewardConfig(function="x.py:f", weight=0.1, environment_weight=2.0, failure_score=-1.0)
    scored = score_episodes(length, cfg, rollout, tok, prompts=[r["prompt"] for r in rows], rows=rows,
                            histories=histories)
    assert scored.scores.tolist() == pytest.approx([0.1 * 10 + 2.0 * 1.0, 0.1 * 10 + 0.0, -1.0])
    # the environment alone owns the reward: no source
    only_env = score_episodes(None, RewardConfig(), rollout, tok, prompts=[""] * 3, rows=rows, histories=histories)
    assert only_env.scores.tolist() == [1.0, 0.0, 0.0]


class Game:
    """Ends the episode itself (``done``) and answers plain turns (``_respond``)."""

    made = 0

    def __init__(self):
        type(self).made += 1
        self.moves = []  # per-instance state: a leak between episodes would show up here

    def reset(self, **row) -> None:
        self.goal = row["goal"]
        self.done = False

    def move(self, where: str) -> str:
        """Move a piece.

        Args:
            where: the square.
        """
        self.moves.append(where)
        if where == self.goal:
            self.done = True
            return "won"
        return f"moves so far: {','.join(self.moves)}"

    def _respond(self, text: str) -> str | None:
        return None if "bye" in text else "Your move, please.\n"

    def get_reward(self) -> float:
        return float(self.done)


def test_the_environment_ends_episodes_and_answers_plain_turns_and_state_is_per_episode(tok):
    move = "<request><move>{}<call>"
    plans = {0: [ids(tok, move.format("a1")), ids(tok, move.format("b2")), ids(tok, move.format("x"))],
             1: [ids(tok, "hmm") + [tok.eos_token_id], ids(tok, move.format("a1")), ids(tok, "bye") + [tok.eos_token_id]],
             2: [ids(tok, move.format("c3"))] * 4}
    Game.made = 0
    envs = Environments(kinds(Game), "environment", 5.0)
    env = TextEnvironment(ScriptedLM(tiny_gpt2(tok), tok, plans).eval(), tok, {}, TagProtocol(), max_turns=4,
                          max_new_tokens=40, max_length=400, environments=envs)
    rows = [{"goal": "b2"}, {"goal": "zz"}, {"goal": "zz"}]
    h0, h1, h2 = env.run([f"#{k}: play" for k in range(3)], rows)
    # won on its second move: the environment ended it after answering (a third planned turn never ran)
    assert h0.finish_reason == "done" and h0.num_turns == 2 and h0.env_reward == 1.0
    assert [c.output for c in h0.tool_calls] == ["moves so far: a1", "won"]
    assert h0.segments[-1].source == "tool" and h0.segments[-1].text == "won<response>"
    # a plain turn got the environment's observation (forced text, mask 0); "bye" let the episode end
    assert [s.source for s in h1.segments] == ["prompt", "model", "tool", "model", "tool", "model"]
    assert h1.segments[2].text == "Your move, please.\n" and h1.finish_reason == "eos"
    assert [c.output for c in h1.tool_calls] == ["moves so far: a1"]  # not a1 of episode 0: its own instance
    assert h2.finish_reason == "max_turns" and h2.env_reward == 0.0
    assert h2.tool_calls[-1].output == "moves so far: c3,c3,c3,c3"
    assert Game.made == 1 + 3  # the probe, then one per episode
    assert env.last_stats.finish_reasons == {"done": 1, "eos": 1, "max_turns": 1}


class Broken(IncrementEnv):
    def reset(self, **kwargs):
        if kwargs["target"] == 1:
            raise KeyError("no such level")
        if kwargs["target"] == 2:
            time.sleep(30)
        return super().reset(**kwargs)

    def stall(self) -> str:
        """Never answers."""
        time.sleep(30)
        return "late"


def test_an_environment_that_raises_or_hangs_fails_its_episode_only(tok):
    plans = {k: [ids(tok, call("stall")), ids(tok, call("increment", step=1)), ids(tok, "1") + [tok.eos_token_id]]
             for k in range(3)}
    env = json_env(tok, plans, [Broken], tool_timeout_s=0.5, timeout_s=0.5)
    rows = [{"prompt": "#0: a", "target": 1}, {"prompt": "#1: b", "target": 2}, {"prompt": "#2: c", "target": 5}]
    start = time.monotonic()
    h0, h1, h2 = env.run([r["prompt"] for r in rows], rows)
    assert time.monotonic() - start < 10
    assert h0.finish_reason == "env_error" and "reset: Error: KeyError: 'no such level'" in h0.env_error
    assert h1.finish_reason == "env_error" and "reset: did not finish within 0.5 s" in h1.env_error
    assert h0.num_turns == h1.num_turns == 1 and not h0.tool_calls  # one turn for the rollout's sake, no tools
    # a hanging tool method is answered like a hanging tool; the episode goes on
    assert [c.status for c in h2.tool_calls] == ["timeout", "ok"] and h2.finish_reason == "eos"
    assert h2.env_error is None and h2.env_reward == 0.0


class Coding:
    def reset(self, **row) -> str:
        assert "environment" not in row  # the selecting column is the trainer's, not the environment's
        return " (coding)"

    def run_code(self, code: str) -> str:
        """Run code.

        Args:
            code: the code.
        """
        return "ran"


def test_several_environments_are_chosen_per_row_with_their_own_tools(tok):
    plans = {0: [ids(tok, call("run_code", code="1")), ids(tok, "x") + [tok.eos_token_id]],
             1: [ids(tok, call("run_code", code="1")), ids(tok, "x") + [tok.eos_token_id]]}
    env = json_env(tok, plans, [Coding, IncrementEnv], names=("code", "count"))
    rows = [{"prompt": "#0: a", "environment": "code"}, {"prompt": "#1: b", "environment": "count", "target": 1}]
    h0, h1 = env.run([r["prompt"] for r in rows], rows)
    assert h0.segments[0].text.endswith("(coding)") and h0.tool_calls[0].output == "ran"
    assert h1.tool_calls[0].status == "unknown_tool" and "increment, peek" in h1.tool_calls[0].output
    with pytest.raises(UserError, match="env.environments: a row's 'environment' is 'chess'"):
        env.run(["#0: a"], [{"environment": "chess"}])


def test_chat_protocol_renders_observations_as_user_turns(tok):
    hermes = hermes_tokenizer()
    template = ChatTemplate.of(hermes)
    envs = Environments(kinds(Game), "environment", 5.0)
    schemas = schemas_for(envs.kinds[None].tools())
    template.check(schemas, hermes_calls)
    protocol = ChatProtocol(template, hermes_calls, schemas)
    move = '<tool_call>\n{"name": "move", "arguments": {"where": "b2"}}\n</tool_call>'
    plans = {0: [ids(hermes, "let me think") + [template.eot_id], ids(hermes, move) + [template.eot_id]]}
    model = ScriptedLM(tiny_gpt2(hermes, n_positions=2400), hermes, plans).eval()
    from rlcli.rl.sampling import SamplingRules

    env = TextEnvironment(model, hermes, {}, protocol, max_turns=4, max_new_tokens=120, max_length=2400,
                          environments=envs, rules=SamplingRules(eos_ids=(template.eot_id,)))
    [h] = env.run(["#0: play"], [{"goal": "b2"}])
    assert [m["role"] for m in h.messages] == ["user", "assistant", "user", "assistant", "tool"]
    assert h.messages[2] == {"role": "user", "content": "Your move, please.\n"}
    assert h.finish_reason == "done" and h.env_reward == 1.0
    # the episode's tokens are the template's rendering of its messages (checked at its end, and here)
    whole = hermes.apply_chat_template(h.messages, tools=h.tools, tokenize=False)
    assert whole.startswith(h.text)


def test_chat_observation_after_a_turn_cut_at_its_budget(tok):
    """A chat turn that ran out of tokens (no end-of-turn token sampled) and is answered by ``_respond`` does not fail
    the rollout: the template closes that turn with its end-of-turn token, which the episode holds as forced text, so
    the check of the episode's tokens must accept forced text after the model's tokens there."""
    hermes = hermes_tokenizer()
    template = ChatTemplate.of(hermes)
    envs = Environments(kinds(Game), "environment", 5.0)
    schemas = schemas_for(envs.kinds[None].tools())
    protocol = ChatProtocol(template, hermes_calls, schemas)
    move = ids(hermes, '<tool_call>\n{"name": "move", "arguments": {"where": "b2"}}\n</tool_call>') + [template.eot_id]
    rambling = ids(hermes, "let me think " * 40)  # longer than a turn's budget
    model = ScriptedLM(tiny_gpt2(hermes, n_positions=2400), hermes, {0: [rambling, move]}).eval()
    from rlcli.rl.sampling import SamplingRules

    env = TextEnvironment(model, hermes, {}, protocol, max_turns=4, max_new_tokens=len(move), max_length=2400,
                          environments=envs, rules=SamplingRules(eos_ids=(template.eot_id,)))
    [h] = env.run(["#0: play"], [{"goal": "b2"}])
    assert h.finish_reason == "done" and h.env_reward == 1.0 and h.env_error is None
    assert [m["role"] for m in h.messages] == ["user", "assistant", "user", "assistant", "tool"]
    cut, observation = h.segments[1], h.segments[2]
    assert cut.source == "model" and cut.token_ids == rambling[: len(move)]
    # the template's end of turn closes the cut turn: forced text (mask 0), not a token the model chose
    assert observation.source == "tool" and observation.token_ids[0] == template.eot_id
    assert observation.text.startswith(template.eot_text) and "Your move, please." in observation.text
    whole = hermes.apply_chat_template(h.messages, tools=h.tools, tokenize=False)
    assert whole.startswith(h.text)


def test_recipe_section_is_checked_before_any_rollout(tmp_path):
    envfile = tmp_path / "envs.py"
    envfile.write_text("class NoReset:\n    def go(self) -> str:\n        return 'x'\n\n"
                       "class Clash:\n    def reset(self, **row):\n        pass\n    def Calc(self, e: str) -> str:\n"
                       "        return e\n\nclass Boom:\n    def __init__(self):\n        raise OSError('no board')\n")
    assert check_env(EnvConfig(environment=f"{envfile}:NoReset"))[0].message.startswith("NoReset has no reset")
    [p] = check_env(EnvConfig(environment=f"{envfile}:Clash", tools={"Calc": "calculator"}))
    assert p.key == "env.environment" and "Calc" in p.message
    [p] = check_env(EnvConfig(environments={"a": f"{envfile}:Boom"}))
    assert p.key == "env.environments.a" and "OSError: no board" in p.message
    [p] = check_env(EnvConfig(environment=f"{envfile}:Missing"))
    assert p.key == "env.environment" and "Missing" in p.message
    [p] = check_env(EnvConfig(environment="builtin:chess"))
    assert "builtin:python_session" in p.message
    with pytest.raises(ValueError, match="either 'environment' or 'environments'"):
        EnvConfig(environment="a.py:A", environments={"b": "b.py:B"})
    with pytest.raises(ValueError, match="at least one tool"):
        EnvConfig()


@pytest.mark.skipif(sandbox_problem() is not None, reason="needs bubblewrap")
def test_python_session_keeps_variables_within_an_episode_only(tok):
    cfg = EnvConfig(environment="builtin:python_session", tool_isolation="inline")
    envs = build_environments(cfg)
    assert envs.kinds[None].tool_names == ("python",)
    code = "<request><python>{}<call>"
    plans = {0: [ids(tok, code.format("x = 6 * 7")), ids(tok, code.format("print(x)")), ids(tok, "42<submit>")],
             1: [ids(tok, code.format("print(x)")), ids(tok, code.format("open('/etc/hostname').read()")),
                 ids(tok, "?<submit>")]}
    env = TextEnvironment(ScriptedLM(tiny_gpt2(tok), tok, plans).eval(), tok, {}, TagProtocol(), max_turns=4,
                          max_new_tokens=60, max_length=500, environments=envs, max_tool_output_tokens=200)
    h0, h1 = env.run(["#0: compute", "#1: compute"], [{}, {}])
    assert [c.output for c in h0.tool_calls] == ["(no output)", "42\n"]
    assert "NameError: name 'x' is not defined" in h1.tool_calls[0].output  # a fresh interpreter per episode
    assert "FileNotFoundError" in h1.tool_calls[1].output  # the sandbox has no /etc
    assert h0.finish_reason == h1.finish_reason == "submit"


def test_dry_run_says_when_a_chat_prompt_names_no_tool():
    """Chat protocol without env.describe_tools: the template is given no tools, so the prompt names none (SmolLM2
    then never calls the guess tool); --dry-run says so, and not when the tools are described."""
    game = {"environment": "recipes/guess_number.py:GuessNumber"}
    [note] = prompt_notes(EnvConfig(protocol="chat", **game))
    assert "env.describe_tools is false" in note and "name no tool" in note
    assert prompt_notes(EnvConfig(protocol="chat", describe_tools=True, **game)) == []
    assert prompt_notes(EnvConfig(protocol="tag", **game)) == []
