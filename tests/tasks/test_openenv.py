"""OpenEnv environments (``env.environment: {spec: builtin:openenv, options: {...}}``), with an environment written
against OpenEnv's own base classes (``recipes/openenv_count.py``: count from 1 to a target), in-process and served on
loopback by OpenEnv's own server: actions built from the model's tool call or its text as the Action type requires,
the observation's ``done`` ends the episode, step rewards summed or last, one WebSocket session per episode, a cap
on sessions, and a server that dies mid-episode costs that episode only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO, invoke_cli, plain, read_metrics
from tests.helpers import save_tokenizer

pytest.importorskip("openenv", reason="the openenv extra: pip install 'rlcli[openenv]'")

RECIPE = "configs/foreign/openenv.yaml"
ENV_CLASS = "recipes/openenv_count.py:CountingEnv"
TINY = ["model.name_or_path=null", "model.gguf_file=null", "model.architecture=gpt2", "model.config.n_layer=1",
        "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=512"]


class Server:
    """``recipes/openenv_count.py`` served by OpenEnv's ``create_fastapi_app`` in a process of its own on 127.0.0.1."""

    def __init__(self, max_sessions: int = 4, crash: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), **({"OPENENV_TEST_CRASH": "1"} if crash else {})}
        self.proc = subprocess.Popen([sys.executable, "recipes/openenv_count.py", str(self.port), str(max_sessions)],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        import requests

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                requests.get(self.url + "/schema", timeout=1).raise_for_status()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError("the test server exited") from None
                time.sleep(0.2)
        raise RuntimeError("the test server did not start")

    def sessions(self) -> dict:
        import requests

        return requests.get(self.url + "/test/most_sessions", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server():
    s = Server(max_sessions=4)
    yield s
    s.stop()


def run_episodes(options: dict, rows: list[dict], plans: dict, *, protocol: str = "json", max_turns: int = 6):
    """Episodes of a scripted policy (turn t of episode k writes ``plans[k][t]``) through ``TextEnvironment`` and
    the built-in OpenEnv environment."""
    from rlcli.config.env import EnvConfig, ToolSpec
    from rlcli.env import TextEnvironment
    from rlcli.env.build import build_environments
    from rlcli.env.protocols import JsonProtocol, TagProtocol
    from rlcli.models.tokenizer import build_byte_tokenizer
    from rlcli.rl.sampling import SamplingRules
    from tests.helpers import ScriptedLM, tiny_gpt2

    tok = build_byte_tokenizer()
    envs = build_environments(EnvConfig(environment=ToolSpec(spec="builtin:openenv", options=options),
                                        tool_timeout_s=20))
    ids = {k: [tok(t, add_special_tokens=False)["input_ids"] + ([] if t.endswith("</tool_call>") else
                                                                 [tok.eos_token_id]) for t in turns]
           for k, turns in plans.items()}
    model = ScriptedLM(tiny_gpt2(tok, n_positions=2048), tok, ids).eval()
    env = TextEnvironment(model, tok, {}, JsonProtocol() if protocol == "json" else TagProtocol(),
                          max_turns=max_turns, max_new_tokens=96, max_length=2000, environments=envs,
                          tool_timeout_s=20, rules=SamplingRules(eos_ids=(tok.eos_token_id,)))
    return env.run([f"#{k}: Play." for k in range(len(rows))], rows, generator=torch.Generator().manual_seed(0))


def call(n: str) -> str:
    return '<tool_call>{"name": "act", "arguments": {"number": "%s"}}</tool_call>' % n


def test_in_process_tool_calls_are_actions_and_done_ends_the_episode():
    # seed s counts to s % 4 + 2: seed 0 -> 2, seed 1 -> 3
    plans = {0: [call("1"), call("2"), call("3")], 1: [call("1"), call("5"), call("3")]}
    for how, expected in (("sum", [2.0, 1.0]), ("last", [1.0, 0.0])):
        histories = run_episodes({"environment": ENV_CLASS, "reward": how}, [{"seed": 0}, {"seed": 1}], plans)
        assert [h.finish_reason for h in histories] == ["done", "done"] and [h.num_turns for h in histories] == [2, 2]
        assert [h.env_reward for h in histories] == expected
        assert [c.output for c in histories[0].tool_calls] == ["ok, 1", "done"]
        assert histories[1].tool_calls[1].output == "wrong: expected 2"
        assert "Count from 1 to 2" in histories[0].segments[0].text  # reset's observation ends the prompt


def test_the_tool_is_described_from_the_action_type_and_bad_arguments_are_the_models_mistake():
    from rlcli.tasks.openenv import OpenEnvEpisode
    from rlcli.toolcalls import tool_schema

    episode = OpenEnvEpisode(environment=ENV_CLASS)
    assert tool_schema(episode.act, "act")["function"] == {
        "name": "act", "description": "Say the next number.",
        "parameters": {"type": "object", "required": ["number"],
                       "properties": {"number": {"type": "string", "description": "the next number, in digits"}}}}
    # an argument the Action type refuses: an error text, the episode goes on (the next call counts)
    histories = run_episodes({"environment": ENV_CLASS},  [{"seed": 0}],
                             {0: ['<tool_call>{"name": "act", "arguments": {"numbr": "1"}}</tool_call>', call("1"),
                                  call("2")]})
    (h,) = histories
    assert h.tool_calls[0].status == "error" and h.env_error is None
    assert h.finish_reason == "done" and h.env_reward == 2.0


def test_text_actions_in_process_and_over_the_tag_protocol(server):
    histories = run_episodes({"environment": ENV_CLASS, "action": "text"}, [{"seed": 1}],
                             {0: ["1", "2", "3", "4"]}, protocol="tag")
    (h,) = histories
    assert h.finish_reason == "done" and h.num_turns == 3 and h.env_reward == 3.0
    assert "ok, 2" in "".join(s.text for s in h.segments if s.source == "tool")
    # the tag protocol's one-string call fills the action's one field, remotely too
    (h,) = run_episodes({"url": server.url}, [{"seed": 0}], {0: ["<request><act>1<call>", "<request><act>2<call>"]},
                        protocol="tag")
    assert h.finish_reason == "done" and h.env_reward == 2.0


def test_remote_one_session_per_episode_rewards_summed_or_last(server):
    plans = {0: [call("1"), call("2")], 1: [call("1"), call("2"), call("3")], 2: [call("2")]}
    rows = [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    histories = run_episodes({"url": server.url, "reward": "sum"}, rows, plans)
    assert [h.env_reward for h in histories] == [2.0, 3.0, 0.0]
    assert all(h.finish_reason == "done" and h.env_error is None for h in histories)
    last = run_episodes({"url": server.url, "reward": "last"}, rows, plans)
    assert [h.env_reward for h in last] == [1.0, 1.0, 0.0]
    seen = server.sessions()
    assert seen["most"] == 3 and seen["live"] == 0  # a session (an environment) per episode, each closed


def test_the_session_cap_fails_the_episodes_beyond_it_only(server):
    plans = {k: [call("1"), call("2")] for k in range(3)}
    histories = run_episodes({"url": server.url, "max_sessions": 2, "connect_timeout_s": 1}, [{"seed": 0}] * 3,
                             plans)
    assert [h.env_error is None for h in histories] == [True, True, False]
    assert "max_sessions=2" in histories[2].env_error and histories[2].finish_reason == "env_error"
    assert [h.env_reward for h in histories[:2]] == [2.0, 2.0]
    assert server.sessions()["most"] <= 2
    # the slots came back: the next batch has both
    again = run_episodes({"url": server.url, "max_sessions": 2, "connect_timeout_s": 1}, [{"seed": 0}] * 2,
                         {0: plans[0], 1: plans[1]})
    assert all(h.env_error is None and h.env_reward == 2.0 for h in again)


def test_a_server_that_dies_mid_episode_costs_that_episode_only():
    dying = Server(crash=True)
    try:
        # episode 0 finishes on its 2nd turn; episode 1's 2nd call kills the server (after episode 0's answer)
        plans = {0: [call("1"), call("2")], 1: [call("1"), call("crash"), call("2")]}
        histories = run_episodes({"url": dying.url, "message_timeout_s": 5}, [{"seed": 0}, {"seed": 1}], plans)
        assert dying.proc.wait(timeout=10) == -9
        assert histories[0].env_error is None and histories[0].env_reward == 2.0
        assert histories[1].finish_reason == "env_error" and "environment failed" in histories[1].env_error
    finally:
        dying.stop()
    fresh = Server()
    try:  # the run goes on: the next episodes play on a server that is up
        histories = run_episodes({"url": fresh.url}, [{"seed": 0}], {0: [call("1"), call("2")]})
        assert histories[0].env_error is None and histories[0].env_reward == 2.0
    finally:
        fresh.stop()


def test_a_server_that_stops_answering_costs_that_episode_only():
    """A step the server does not answer within message_timeout_s fails its episode; the episode beside it on the
    same server finishes with its reward, and the hung session is closed."""
    slow = Server(crash=True)
    try:
        plans = {0: [call("1"), call("2")], 1: [call("hang"), call("1")]}
        started = time.time()
        histories = run_episodes({"url": slow.url, "message_timeout_s": 2}, [{"seed": 0}, {"seed": 1}], plans)
        assert time.time() - started < 25  # the 2 s limit, not the server's 30 s stall
        assert histories[0].env_error is None and histories[0].env_reward == 2.0
        assert histories[1].finish_reason == "env_error" and "Timeout" in histories[1].env_error
    finally:
        slow.stop()


def test_bad_options_are_named_by_dry_run(monkeypatch):
    code, out, err = invoke_cli("ppo", RECIPE, "--dry-run", *TINY,
                                "env.environment={spec: builtin:openenv, options: {url: 'http://127.0.0.1:9'}}",
                                monkeypatch=monkeypatch)
    text = plain(out + err)
    assert code == 2 and "Traceback" not in text and "env.environment" in text and "/schema" in text
    code, out, err = invoke_cli("ppo", RECIPE, "--dry-run", *TINY,
                                "env.environment={spec: builtin:openenv, options: {reward: mean, environment: "
                                f"'{ENV_CLASS}'}}}}", monkeypatch=monkeypatch)
    assert code == 2 and "'sum' or 'last'" in plain(out + err)


def test_recipe_two_grpo_steps_on_a_tiny_model_against_a_served_environment(tmp_path, monkeypatch):
    """The shipped recipe with its environment served on loopback (options.url): 2 GRPO steps and the evaluation;
    every episode's score is the environment's reward (8 episodes at once: a server taking 8 sessions)."""
    server = Server(max_sessions=8)
    try:
        _two_steps(server, tmp_path, monkeypatch)
    finally:
        server.stop()


def _two_steps(server, tmp_path, monkeypatch):
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.trainers import ppo

    tok = save_tokenizer("chat_eot", tmp_path / "tok")
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    collected, collect = [], ppo.collect_episodes
    monkeypatch.setattr(ppo, "collect_episodes", lambda setup, step: collected.append(collect(setup, step))
                        or collected[-1])
    recipe = load_recipe(PPORecipe, RECIPE, [
        f"output_dir={out}", *TINY, f"model.tokenizer={tok}", "lora=null", "ppo.steps=2", "ppo.batch_size=8",
        "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "env.max_turns=3", "generation.max_new_tokens=4",
        f"env.environment={{spec: builtin:openenv, options: {{url: '{server.url}', action: text}}}}",
        "eval.max_prompts=4", "logging.progress=false"])
    ppo.train(recipe)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2] and "eval/pass@1" in metrics[-1]
    for ep in collected:
        for h, score in zip(ep.histories, ep.scores.tolist()):
            assert h.env_error is None and score == pytest.approx(h.env_reward)
            assert "Count from 1 to" in h.segments[0].text
    assert server.sessions()["live"] == 0 and server.sessions()["most"] <= 8


def test_recipe_dry_run(monkeypatch):
    code, stdout, stderr = invoke_cli("ppo", RECIPE, "--dry-run", monkeypatch=monkeypatch)
    assert code == 0, stdout + stderr
    assert "builtin:openenv" in stdout and "dry run OK" in plain(stdout)
