"""A stateful environment under the combinations users run it in: PPO with a value head, GRPO
and RLOO through the tag, chat and JSON protocols, rollouts through another engine (the vLLM slot),
``rlcli env-rollout`` with ``accept_min_reward`` into ``rlcli sft``, ``--resume`` after a kill, and two processes.

The environment is ``tests/plugins.py:Tally`` (TRL's ``environment_factory`` contract): each episode's
count starts at its row's ``start`` and moves with each of the model's turns, which the environment answers with
the count so far (``_respond``: forced text, so an untrained model built from scratch gets environment tokens too);
its ``get_reward()`` is what this episode added, and every scored episode writes a line to a log. The tests check
outcomes: the reward the trainer used is the environment's, each episode's state is its own, the environment's
text is exactly the tokens with mask 0 (out of the policy loss, the value loss and the KL), and it stays out of SFT's
loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import REPO, accelerate_launch, invoke_cli, kill_when, plain, read_metrics, write_yaml
from tests.helpers import save_tokenizer

ENV = "tests/plugins.py:Tally"
PROMPTS = 16
MODEL = ["model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=256"]
TURNS = ["env.max_turns=4", "generation.max_new_tokens=6", "env.max_length=200"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Prompt rows whose ``start`` names the row (100 × its index): an episode's counts say whose state they are."""
    path = tmp_path_factory.mktemp("stateful") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Game {i}:", "start": 100 * i}) + "\n" for i in range(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    return save_tokenizer("chat_eot", tmp_path_factory.mktemp("tokenizer") / "chat_eot")


def environment(log: Path) -> str:
    return json.dumps({"spec": ENV, "options": {"log": str(log)}})


def ppo_overrides(out: Path, data: Path, log: Path, *, estimator: str = "gae", protocol: str = "tag",
                  tokenizer: Path | None = None, steps: int = 3, batch: int = 8) -> list[str]:
    critic_free = estimator != "gae"
    return [f"output_dir={out}", f"data.path={data}", "reward.function=null", f"env.environment={environment(log)}",
            f"env.protocol={protocol}", *TURNS, *MODEL, f"ppo.steps={steps}", f"ppo.batch_size={batch}",
            f"ppo.mini_batch_size={batch}", "ppo.epochs=2", f"ppo.advantage={estimator}",
            f"ppo.group_size={2 if critic_free else 1}", *(["kl.estimator=k3"] if critic_free else []),
            "logging.progress=false", "train.save_every=null", "train.sample_every=1",
            *([f"model.tokenizer={tokenizer}"] if tokenizer else [])]


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def check_own_state(episode: dict) -> None:
    """One logged episode: its counts start at its own row's start and move only by its own turns (1-3 each), and
    its reward is what it added."""
    counts = [int(o.removeprefix(" (count ").removesuffix(")")) for o in episode["observations"]]
    steps = [b - a for a, b in zip([episode["start"], *counts], counts)]
    assert all(1 <= s <= 3 for s in steps), episode
    assert episode["count"] == (counts[-1] if counts else episode["start"])
    assert episode["reward"] == pytest.approx((episode["count"] - episode["start"]) / 10)


def counts_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\(count (\d+)\)", text)]


def user_turns(messages: list[dict]) -> list[str]:
    """The user turns after the prompt: the environment's observations (chat)."""
    return [m["content"] for m in messages[1:] if m["role"] == "user"]


def by_step(lines: list[dict], per_step: int) -> list[list[dict]]:
    return [lines[i : i + per_step] for i in range(0, len(lines), per_step)]


def train_in_process(overrides: list[str], monkeypatch, engine=None) -> tuple[list[dict], list]:
    """``rlcli ppo`` in this process (configs/tiny/ppo.yaml + overrides); returns its metrics and, per step, the
    ``RolloutSetup`` and ``Episodes`` the learner got. ``engine``: a factory for another rollout engine."""
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.trainers import ppo

    collected, collect = [], ppo.collect_episodes

    def recording(setup, step):
        ep = collect(setup, step)
        collected.append((setup, ep, setup.env.last_stats))
        return ep

    monkeypatch.setattr(ppo, "collect_episodes", recording)
    if engine is not None:
        monkeypatch.setattr(ppo, "build_engine", engine)
    monkeypatch.chdir(REPO)
    recipe = load_recipe(PPORecipe, "configs/tiny/ppo.yaml", overrides)
    ppo.train(recipe)
    return read_metrics(recipe.output_dir), collected


CELLS = [("gae", "tag"), ("grpo", "tag"), ("gae", "chat"), ("grpo", "chat"), ("rloo", "json")]


@pytest.mark.parametrize("estimator, protocol", CELLS, ids=[f"{e}-{p}" for e, p in CELLS])
def test_estimators_and_protocols_train_on_the_environments_reward_with_its_tokens_masked(
        estimator, protocol, data, chat_tokenizer, tmp_path, monkeypatch):
    log = tmp_path / "episodes.log"
    tokenizer = chat_tokenizer if protocol == "chat" else None
    metrics, collected = train_in_process(ppo_overrides(tmp_path / "run", data, log, estimator=estimator,
                                                        protocol=protocol, tokenizer=tokenizer), monkeypatch)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["estimator"] == estimator for m in metrics)
    lines = read_log(log)
    assert len(lines) == 3 * 8 and len({x["serial"] for x in lines}) == 3 * 8  # one instance per episode
    for episode in lines:
        check_own_state(episode)
    # episodes are logged as they end, a step's after the step before: match them to the step's episodes by their
    # row and the counts the environment showed them
    for m, (setup, ep, stats), step_lines in zip(metrics, collected, by_step(lines, 8)):
        rollout, tok = ep.rollout, setup.tokenizer
        assert rollout.tool_mask.sum() > 0
        shown = []
        for i, h in enumerate(ep.histories):
            # the environment's text is exactly the tokens with mask 0 in the response; the model's, mask 1
            forced = rollout.response_ids[i][rollout.tool_mask[i].bool()].tolist()
            assert forced == [t for s in h.segments if s.source == "tool" for t in s.token_ids]
            chosen = rollout.response_ids[i][rollout.model_mask[i].bool()].tolist()
            assert chosen == [t for s in h.segments if s.source == "model" for t in s.token_ids]
            assert "(count" not in tok.decode(chosen)
            shown.append((h.meta["start"], tuple(counts_in(tok.decode(forced)))))
            if protocol == "chat":  # each observation a user turn, rendered by the template
                assert tuple(counts_in("".join(user_turns(h.messages)))) == shown[-1][1]
        logged = {(x["start"], tuple(counts_in("".join(x["observations"])))): x["reward"] for x in step_lines}
        assert sorted(shown) == sorted((x["start"], tuple(counts_in("".join(x["observations"])))) for x in step_lines)
        # the reward is get_reward(), episode by episode (no reward source)
        rewards = [logged[key] for key in shown]
        assert [h.env_reward for h in ep.histories] == rewards
        assert ep.scores.tolist() == pytest.approx(rewards)
        assert m["reward_mean"] == pytest.approx(sum(rewards) / 8) == pytest.approx(m["env_reward_mean"])
        assert m["env_errors"] == 0 and 0 < m["env_done_fraction"] <= 1
        # rlcli's sampler kept each episode's KV cache across turns, forced tokens fed in after the cache
        assert setup.env.kv_reuse and stats.reused_positions > 0
        # the learner's mask leaves every forced token out: their sampler log-prob is 0 and the policy's about
        # -log(vocabulary), so one forced token in the mask would move this by ~0.1 or more
        assert m["sampler_logprob_diff"] < 1e-4
        assert m["model_tokens"] + m["tool_tokens"] == pytest.approx(m["response_length"])
        assert m["tool_tokens"] > 0 and m["skipped_minibatches"] == 0
    first = metrics[0]
    assert first["kl"] == 0.0 and abs(first["ratio_first"] - 1.0) < 1e-5
    assert ("value_mean" in metrics[-1]) == (estimator == "gae")


def test_another_rollout_engine_gives_the_same_episodes_and_states(data, tmp_path, monkeypatch):
    """The slot vLLM fills (``generation.engine``), with a fake engine that holds its own copy of the model, synced
    once per step, and samples every turn from the episode's whole token ids (no KV cache kept): the same episodes,
    environment states and rewards as rlcli's own sampler with its cache kept across turns."""
    from rlcli.ppo.rollout import _lm
    from tests.helpers import FakeEngine

    engines = []

    def fake(recipe, par, policy, tokenizer, out):
        engines.append(FakeEngine(_lm(policy)))
        return engines[-1]

    local_log, engine_log = tmp_path / "local.log", tmp_path / "engine.log"
    local, _ = train_in_process(ppo_overrides(tmp_path / "local", data, local_log), monkeypatch)
    metrics, collected = train_in_process(ppo_overrides(tmp_path / "engine", data, engine_log), monkeypatch,
                                          engine=fake)
    assert len(engines[0].synced_names) == 3  # one sync per step, before its rollouts
    setup = collected[0][0]
    assert setup.env.engine is engines[0] and not setup.env.kv_reuse
    assert all(m["sampler_logprob_diff"] < 1e-4 and m["env_errors"] == 0 for m in metrics)

    def episodes(log):
        return [{k: x[k] for k in ("start", "count", "reward", "observations")} for x in read_log(log)]

    assert episodes(engine_log) == episodes(local_log) and len(episodes(local_log)) == 24
    assert [m["reward_mean"] for m in metrics] == [m["reward_mean"] for m in local]


def test_env_rollout_accepts_by_the_environments_reward_and_sft_trains_on_it(data, chat_tokenizer, tmp_path,
                                                                              monkeypatch):
    """``rlcli env-rollout`` (chat protocol) with ``accept_min_reward``: episodes.jsonl has every episode with its
    messages and the environment's reward; accepted.jsonl the ones that reached the threshold; ``rlcli sft`` trains
    on that file with the loss on the model's turns only."""
    log, out = tmp_path / "episodes.log", tmp_path / "rollout"
    model = {"architecture": "gpt2", "tokenizer": str(chat_tokenizer),
             "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}}
    recipe = write_yaml(tmp_path / "rollout.yaml", {
        "output_dir": str(out), "model": model, "data": {"path": str(data)},
        "env": {"environment": {"spec": ENV, "options": {"log": str(log)}}, "protocol": "chat", "max_turns": 4,
                "max_new_tokens": 6, "max_length": 200},
        "batch_size": 16, "show": 1, "accept_min_reward": 0.5})
    code, stdout, stderr = invoke_cli("env-rollout", str(recipe), monkeypatch=monkeypatch)
    assert code == 0, stderr[-3000:]
    shown = plain(stdout)  # show=1: the first episode rendered, the environment's answers in it
    assert "legend" in shown and "Count from 0." in shown and "(count" in shown
    assert "accepted" in shown and "env_reward_mean" in shown
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    logged = sorted(read_log(log), key=lambda x: x["start"])  # in the order the episodes ended
    assert len(episodes) == len(logged) == PROMPTS
    for e, x in zip(episodes, logged):
        check_own_state(x)
        assert e["meta"]["start"] == x["start"] and "env_error" not in e
        assert e["reward"] == pytest.approx(e["env_reward"]) == pytest.approx(x["reward"])
        # the conversation: the prompt with reset's text, then the model's turns and the environment's answers
        roles = [m["role"] for m in e["messages"]]
        assert roles[:2] == ["user", "assistant"] and roles.count("assistant") == e["num_turns"]
        assert e["messages"][0]["content"] == f"Game {x['start'] // 100}: Count from {x['start']}."
        assert user_turns(e["messages"]) == x["observations"]
    accepted = [json.loads(line) for line in (out / "accepted.jsonl").read_text().splitlines()]
    assert accepted == [e for e in episodes if e["reward"] >= 0.5]
    assert 0 < len(accepted) < len(episodes), [e["reward"] for e in episodes]

    # SFT data as it is: in the messages format the loss is on the assistant turns (and the end of turn the
    # template writes after each), never on the environment's user turns
    import datasets
    from transformers import AutoTokenizer

    from rlcli.config.sft import SFTData
    from rlcli.data.sft import IGNORE, tokenize_rows

    tok = AutoTokenizer.from_pretrained(chat_tokenizer)
    rows = datasets.Dataset.from_list(accepted)
    for fmt in ("messages", "segments"):
        examples = tokenize_rows(rows, SFTData(path="a.jsonl", format=fmt, max_length=4096), tok, "a.jsonl").examples
        assert len(examples) == len(accepted)
        for e, ex in zip(accepted, examples):
            learned = tok.decode([t for t in ex["labels"] if t != IGNORE])
            assert not any(o in learned for o in user_turns(e["messages"]))
            if fmt == "segments":
                assert ex["input_ids"] == e["token_ids"]
                assert [int(t != IGNORE) for t in ex["labels"]] == e["token_mask"]
    sft = tmp_path / "sft"
    code, _, stderr = invoke_cli("sft", "configs/tiny/sft.yaml", f"output_dir={sft}", *MODEL,
                                 f"model.tokenizer={chat_tokenizer}", f"data.path={out / 'accepted.jsonl'}",
                                 "data.format=messages", "data.max_length=200", "data.eval_fraction=0",
                                 "train.max_steps=6", f"train.batch_size={len(accepted)}", "train.save_every=null",
                                 "eval.every=null", "logging.progress=false", monkeypatch=monkeypatch)
    assert code == 0, stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(sft) if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(sft) is not None


@pytest.mark.slow
def test_resume_after_a_kill_replays_the_same_episodes(data, tmp_path, monkeypatch):
    """``--resume`` of a run killed after its step-2 checkpoint: the environment holds nothing across steps, so the
    resumed steps run the same episodes (rows, states, rewards) and log the same metrics as a run never killed."""
    steps = ["ppo.steps=4", "train.save_every=2"]
    whole, _ = train_in_process([*ppo_overrides(tmp_path / "whole", data, tmp_path / "whole.log"), *steps],
                                monkeypatch)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    args = ["ppo", "configs/tiny/ppo.yaml", *ppo_overrides(out, data, log), *steps]
    checkpoint = out / "checkpoints" / "step-00000002"
    kill_when(args, checkpoint.exists, timeout=300, poll=0.05)
    assert checkpoint.exists() and not (out / "model.safetensors").exists()
    code, stdout, stderr = invoke_cli(*args, "--resume", monkeypatch=monkeypatch)
    assert code == 0, stderr[-3000:]
    assert "resuming at step 2" in plain(stdout)
    keys = ("step", "reward_mean", "env_reward_mean", "kl", "loss_policy", "loss_value", "tool_tokens")
    assert [{k: m[k] for k in keys} for m in read_metrics(out)] == [{k: m[k] for k in keys} for m in whole]

    def episodes(path):
        return [{k: x[k] for k in ("start", "count", "reward", "observations")} for x in read_log(path)]

    # steps 3 and 4 again, episode by episode (the killed run may have logged part of step 3 before it died)
    assert episodes(log)[-16:] == episodes(tmp_path / "whole.log")[-16:]


@pytest.mark.slow
def test_two_processes_run_their_own_episodes(data, tmp_path):
    """``accelerate launch --num_processes 2``: each process runs its own share of the step's prompts with
    environment instances of its own, one per episode; the logged reward is every process's get_reward()."""
    out, log = tmp_path / "ddp", tmp_path / "episodes.log"
    res = accelerate_launch("--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "-m", "rlcli", "ppo", "configs/tiny/ppo.yaml",
                            *ppo_overrides(out, data, log, estimator="grpo"), "ppo.micro_batch_size=4", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in plain(res.stdout)
    metrics, lines = read_metrics(out), read_log(log)
    ranks = {r: [x for x in lines if x["rank"] == r] for r in (0, 1)}
    assert len(lines) == 3 * 8 and all(len(rank) == 3 * 4 for rank in ranks.values())  # 2 prompts × 2 each
    assert len({x["pid"] for x in ranks[0]}) == len({x["pid"] for x in ranks[1]}) == 1
    assert {x["pid"] for x in ranks[0]} != {x["pid"] for x in ranks[1]}
    assert all(len({x["serial"] for x in rank}) == len(rank) for rank in ranks.values())  # an instance per episode
    for episode in lines:
        check_own_state(episode)
    for m, zero, one in zip(metrics, by_step(ranks[0], 4), by_step(ranks[1], 4)):
        starts = [sorted(x["start"] for x in rank) for rank in (zero, one)]
        assert not set(starts[0]) & set(starts[1])  # each process its own prompts
        assert all(s[0] == s[1] and s[2] == s[3] for s in starts)  # each prompt's group of 2 on one process
        assert m["episodes"] == 8 and m["env_errors"] == 0
        assert m["reward_mean"] == pytest.approx(sum(x["reward"] for x in zero + one) / 8)
        assert m["sampler_logprob_diff"] < 1e-4 and m["tool_tokens"] > 0
    assert len(metrics) == 3 and metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None and not (out / "value_head.safetensors").exists()
