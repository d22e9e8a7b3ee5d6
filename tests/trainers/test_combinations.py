"""The combination matrix: tokenizer kinds × estimators × KL modes and estimators × length regimes ×
protocols, pairwise covered. Each feature passing on its own path says little; the bugs users hit live in
combinations (GRPO's loss-mode k3 KL over a tokenizer whose PAD is EOS can give NaN weights at step 2).

Every cell runs 3 PPO steps of a tiny GPT-2 built from scratch and asserts what holds for any correct PPO:
every logged number finite, no skipped minibatch, KL exactly 0 and the first minibatch's ratio π/π_old 1 at step 1
(policy and reference are the same weights; nothing has been updated), KL ≥ −0.1 at every step. A cell the recipe
schema refuses must be refused by the recipe check (``--dry-run``'s) with a reason, never crash later.

``python -m pytest tests/trainers/test_combinations.py --co -q`` lists the cells.
"""

from __future__ import annotations

import itertools
import math

import pytest

from tests.helpers import REPO, read_metrics
from tests.helpers import KINDS, save_tokenizer

FACTORS = {
    "tokenizer": KINDS,
    "estimator": ("gae", "grpo", "rloo", "reinforce_pp"),
    # (mode, estimator): every estimator each mode accepts (k1 and abs are refused in loss mode: tested below)
    "kl": ("reward-k1", "reward-abs", "reward-k2", "reward-k3", "reward-full", "loss-k2", "loss-k3"),
    "length": ("min=max", "min<max", "stop_strings", "no_eos"),
    "protocol": ("none", "tag", "chat"),
}


def _allowed(cell: dict) -> bool:
    # a text environment's turns end at its protocol's markers and episodes at EOS: stop_at_eos=false and
    # generation.stop_strings are refused with it (tested below)
    return not (cell.get("protocol") in ("tag", "chat") and cell.get("length") in ("no_eos", "stop_strings"))


def pairwise_cells() -> list[dict]:
    """A small set of cells that covers every allowed pair of factor values (greedy, deterministic)."""
    names = list(FACTORS)
    candidates = [dict(zip(names, values)) for values in itertools.product(*FACTORS.values())]
    candidates = [c for c in candidates if _allowed(c)]

    def pairs(cell):
        return {((a, cell[a]), (b, cell[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in candidates))
    cells = []
    while uncovered:
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        cells.append(best)
        uncovered -= pairs(best)
    return cells


CELLS = pairwise_cells()


def _overrides(cell: dict, tokenizer_dir, out) -> list[str]:
    mode, kl_estimator = cell["kl"].split("-")
    critic_free = cell["estimator"] != "gae"
    o = [f"output_dir={out}", f"model.tokenizer={tokenizer_dir}", "model.config.n_layer=2", "model.config.n_embd=64",
         "model.config.n_head=2", "ppo.steps=3", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.epochs=2",
         f"ppo.advantage={cell['estimator']}", f"ppo.group_size={4 if critic_free else 1}", f"kl.mode={mode}",
         f"kl.estimator={kl_estimator}", "kl.coef=0.1", "optim.learning_rate=3e-3", "logging.progress=false",
         "train.save_every=null", "train.sample_every=1"]
    o += {"min=max": ["generation.min_new_tokens=8"],
          "min<max": ["generation.min_new_tokens=3"],
          "stop_strings": ["generation.stop_strings=['7']", "generation.min_new_tokens=1"],
          "no_eos": ["generation.stop_at_eos=false"]}[cell["length"]]
    if cell["protocol"] == "none":
        o += ["data.path=data/tiny/prompts.jsonl", "reward.function=recipes/sevens.py:score",
              "generation.max_new_tokens=8"]
        if cell["tokenizer"] == "chat_eot":
            o.append("data.chat_template=true")  # rendered by the template: responses end at <|im_end|>
    else:
        o += ["data.path=data/calculator/prompts.jsonl", "reward.function=recipes/calculator.py:exact_match",
              "env.tools={Calculator: calculator}", "env.tool_isolation=inline", f"env.protocol={cell['protocol']}",
              "env.max_turns=2", "generation.max_new_tokens=8", "env.max_length=120"]
    return o


def _run(overrides, monkeypatch):
    import rlcli.trainers.ppo as ppo
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    monkeypatch.chdir(REPO)
    recipe = load_recipe(PPORecipe, "configs/tiny/ppo.yaml", overrides)
    ppo.train(recipe)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: save_tokenizer(kind, root / kind) for kind in KINDS}


def _cell_id(cell):
    return "-".join(cell[k] for k in FACTORS)


def test_the_cells_cover_every_pair():
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if _allowed({a: va, b: vb}):
                assert any(c[a] == va and c[b] == vb for c in CELLS), (a, va, b, vb)
    assert len(CELLS) < 45


@pytest.mark.parametrize("cell", CELLS, ids=_cell_id)
def test_cell(cell, tokenizers, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(_overrides(cell, tokenizers[cell["tokenizer"]], out), monkeypatch)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {m['step']}: non-finite {bad}"
        assert m["skipped_minibatches"] == 0, m
        # the logged KL is the batch mean of each episode's summed log-ratio (k1): unbiased, but over 16 episodes its
        # noise is comparable to the KL itself (measured: −0.28 at step 2 of one cell while the exact KL over the
        # vocabulary was +0.21). Below 0 by more than 4 standard errors (a false alarm ~3e-5 per step) is a bug.
        assert m["kl"] >= -max(0.1, 4 * m["kl_std_error"]), m
    first = metrics[0]
    # same weights, same rows: the reference's log-probs are the policy's (sums of identical float ops)
    assert first["kl"] == 0.0 and first["kl_penalty_per_token"] == 0.0
    # training forward vs rollout forward on the same weights: other micro-batch shapes, so float32 rounding only
    assert abs(first["ratio_first"] - 1.0) < 1e-5
    assert first["estimator"] == cell["estimator"]
    if cell["length"] == "min=max":
        assert all(m["stopped_fraction"] == 0.0 or cell["protocol"] != "none" for m in metrics)
    if cell["tokenizer"] == "chat_eot" and cell["protocol"] == "none" and cell["length"] != "no_eos":
        # responses stop at the template's end of turn, and count as stopped
        import json

        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert all("<|im_end|>" not in r["response"] for r in rows)


@pytest.mark.parametrize("overrides, key, reason", [
    (["kl.mode=loss", "kl.estimator=k1"], "kl.estimator", "0 in expectation"),
    (["kl.mode=loss", "kl.estimator=abs"], "kl.estimator", "not the gradient of any KL"),
    (["kl.mode=loss", "kl.estimator=full"], "kl.estimator", "only with kl.mode=reward"),
    (["env.tools={Calculator: calculator}", "generation.stop_at_eos=false"], "generation.stop_at_eos", "always ends"),
    (["env.tools={Calculator: calculator}", "generation.stop_strings=[x]"], "generation.stop_strings", "not used"),
    (["env.tools={Calculator: calculator}", "generation.max_new_tokens=8", "generation.min_new_tokens=9"],
     "generation.min_new_tokens", "no turn could end"),
])
def test_refused_cells_say_why_before_anything_runs(overrides, key, reason, monkeypatch):
    from tests.helpers import invoke_cli

    code, out, err = invoke_cli("ppo", "configs/tiny/ppo.yaml", "--dry-run", *overrides, monkeypatch=monkeypatch)
    text = " ".join((out + err).split())
    assert code == 2 and key in text and reason in text, text


def test_generation_max_new_tokens_with_env_is_each_turns_budget(monkeypatch):
    """With env, generation.max_new_tokens bounds each model turn (the recipe's 32); unset, a turn gets 64."""
    import yaml

    from tests.helpers import invoke_cli

    env = ["env.tools={Calculator: calculator}", "env.max_length=120"]
    for extra, budget in (([], 32), (["generation.max_new_tokens=null"], 64)):
        code, out, err = invoke_cli("ppo", "configs/tiny/ppo.yaml", "--dry-run", *env, *extra, monkeypatch=monkeypatch)
        assert code == 0, out + err
        shown = yaml.safe_load(out[: out.index("dry run OK")].split("\n•")[0])
        assert shown["generation"]["max_new_tokens"] == budget and "not used" not in out


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
def test_pad_is_eos_trains_with_every_estimator_and_kl_mode(estimator, kl_mode, tokenizers, tmp_path, monkeypatch):
    """A GPT-2-style tokenizer (no pad token, so PAD = EOS), responses of varying length (min_new_tokens 4 <
    max_new_tokens 32) and GRPO's defaults (k3 in the loss): the padding's label, EOS, is banned before
    min_new_tokens, so its log-prob is -inf; unless masked at the source the KL's gradient is NaN, minibatches are
    skipped and the run dies at step 2."""
    out = tmp_path / "run"
    _run([f"output_dir={out}", f"model.tokenizer={tokenizers['pad_eos']}", "model.config.n_layer=2",
          "model.config.n_embd=64", "model.config.n_head=2", "ppo.steps=6", "ppo.batch_size=32",
          "ppo.mini_batch_size=16", "ppo.epochs=2", f"ppo.advantage={estimator}",
          f"ppo.group_size={1 if estimator == 'gae' else 4}", f"kl.mode={kl_mode}", "kl.coef=0.04",
          f"kl.estimator={'k3' if kl_mode == 'loss' else 'k1'}",
          "optim.learning_rate=3e-4", "generation.min_new_tokens=4", "generation.max_new_tokens=32",
          "logging.progress=false", "train.save_every=null"], monkeypatch)
    metrics = read_metrics(out)
    assert len(metrics) == 6
    # a mean k1 KL of 32 episodes is noisy: below 0 by more than 4 of its standard errors would be a bug
    assert all(m["skipped_minibatches"] == 0 and m["kl"] >= -max(0.1, 4 * m["kl_std_error"]) for m in metrics), metrics
    assert metrics[0]["kl"] == 0.0 and abs(metrics[0]["ratio_first"] - 1) < 1e-5
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_pad_is_eos_with_one_update_per_batch(estimator, tokenizers, tmp_path, monkeypatch):
    """The same PAD = EOS tokenizer and length regime, with one optimizer step per batch: pi_old then comes from the
    training forward (no policy pass before the update), where the banned EOS labels on padding must stay out too."""
    out = tmp_path / "run"
    _run([f"output_dir={out}", f"model.tokenizer={tokenizers['pad_eos']}", "model.config.n_layer=2",
          "model.config.n_embd=64", "model.config.n_head=2", "ppo.steps=6", "ppo.batch_size=32",
          "ppo.mini_batch_size=32", "ppo.micro_batch_size=8", "ppo.epochs=1", f"ppo.advantage={estimator}",
          "ppo.group_size=4", "kl.mode=loss", "kl.coef=0.04", "kl.estimator=k3",
          "optim.learning_rate=3e-4", "generation.min_new_tokens=4", "generation.max_new_tokens=32",
          "logging.progress=false", "train.save_every=null"], monkeypatch)
    metrics = read_metrics(out)
    assert len(metrics) == 6
    assert all(m["skipped_minibatches"] == 0 and m["kl"] >= -0.1 for m in metrics), metrics
    # pi_old from the training forward: the first-ratio check runs once, on an eval-mode probe at step 1
    assert metrics[0]["kl"] == 0.0 and [m["step"] for m in metrics if "ratio_first" in m] == [1]
    assert abs(metrics[0]["ratio_first"] - 1) < 1e-5
    assert all(m["sampler_logprob_diff"] < 1e-4 and m["forbidden_mass"] >= 0 for m in metrics)
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))


def test_plain_ppo_stops_at_the_chat_templates_end_of_turn(tokenizers):
    """With a chat template whose end-of-turn token (<|im_end|>) is not EOS, plain PPO's responses stop at it (not at
    the budget), and the stopped flag (missing_eos_penalty) counts it as a stop."""
    import torch

    from rlcli.config.common import ModelConfig
    from rlcli.config.ppo import GenerationConfig
    from rlcli.config.reward import RewardConfig
    from rlcli.models.engines import LocalEngine
    from rlcli.models.loading import load_model, load_tokenizer
    from rlcli.rewards.scoring import score_episodes
    from rlcli.ppo.build import behaviour_rules
    from rlcli.ppo.rollout import generate

    cfg = ModelConfig(architecture="gpt2", tokenizer=str(tokenizers["chat_eot"]),
                      config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64})
    tok = load_tokenizer(cfg, "left")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot != tok.eos_token_id
    torch.manual_seed(0)
    lm = load_model(cfg, "causal", tok).eval()
    bias = torch.zeros(len(tok))
    bias[eot] = 4.0  # end of turn likely, not certain: some responses stop at it after a few tokens
    lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    gen = GenerationConfig(max_new_tokens=20, min_new_tokens=2)
    rules = behaviour_rules(gen, tok)
    assert eot in rules.eos_ids
    texts = [tok.apply_chat_template([{"role": "user", "content": f"q{i}"}], add_generation_prompt=True,
                                     tokenize=False) for i in range(16)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rollout = generate(LocalEngine(lm), tok, prompts, gen, rules, torch.Generator().manual_seed(0))
    lengths = rollout.response_mask.sum(dim=1).tolist()
    ends = [int(rollout.response_ids[i, n - 1]) for i, n in enumerate(lengths)]
    # every response either ended at <|im_end|> (kept, so the model learns to stop) or ran to the budget
    assert all(e == eot or n == 20 for e, n in zip(ends, lengths)), (ends, lengths)
    assert sum(e == eot for e in ends) >= 8
    # nothing is generated after the end of turn
    assert all(eot not in rollout.response_ids[i, : n - 1].tolist() for i, n in enumerate(lengths))

    scored = score_episodes(lambda p, r, rows, **kw: torch.ones(len(r)), RewardConfig(function="x:y",
                            missing_eos_penalty=-1.0), rollout, tok, prompts=["p"] * 16, rows=[{}] * 16,
                            stop_ids=rules.eos_ids)
    assert scored.stopped == [e == eot for e in ends]
    assert scored.scores.tolist() == [1.0 if e == eot else -1.0 for e in ends]


# Paths the pairwise matrix does not cross: a seq2seq policy, a LoRA policy (reference = adapter disabled), and the
# clipping / entropy options, each with a critic-free estimator and the PAD = EOS tokenizer where it applies.
OTHER_CELLS = {
    "t5-grpo-loss-k3-no_eos": ("configs/tiny/ppo_t5.yaml", ["ppo.advantage=grpo", "ppo.group_size=4",
                                                            "generation.stop_at_eos=false"]),
    "t5-gae-min<max-pad_eos": ("configs/tiny/ppo_t5.yaml", ["generation.min_new_tokens=3", "TOKENIZER=pad_eos"]),
    "lora-rloo-min<max-pad_eos": ("configs/tiny/ppo.yaml", ["lora={r: 4}", "ppo.advantage=rloo", "ppo.group_size=4",
                                                           "generation.min_new_tokens=3", "TOKENIZER=pad_eos"]),
    "lora-gae-loss-k2": ("configs/tiny/ppo.yaml", ["lora={r: 4}", "kl.mode=loss", "kl.estimator=k2"]),
    "clip-high-dual-entropy-grpo": ("configs/tiny/ppo.yaml", ["ppo.advantage=grpo", "ppo.group_size=4",
                                                             "kl.estimator=k3", "ppo.clip_range_high=0.28",
                                                             "ppo.dual_clip=3", "ppo.entropy_coef=0.01",
                                                             "generation.min_new_tokens=3", "TOKENIZER=pad_eos"]),
    "dual-entropy-gae-env-chat": ("configs/tiny/ppo.yaml", ["ppo.dual_clip=2", "ppo.entropy_coef=0.01",
                                                           "data.path=data/calculator/prompts.jsonl",
                                                           "reward.function=recipes/calculator.py:exact_match",
                                                           "env.tools={Calculator: calculator}",
                                                           "env.tool_isolation=inline", "env.protocol=chat",
                                                           "generation.max_new_tokens=8", "env.max_length=120",
                                                           "TOKENIZER=chat_eot"]),
}


@pytest.mark.parametrize("name", list(OTHER_CELLS))
def test_other_cell(name, tokenizers, tmp_path, monkeypatch):
    recipe, extra = OTHER_CELLS[name]
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "ppo.steps=3", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.epochs=2",
                 "logging.progress=false", "train.save_every=null"]
    if not any(item.startswith("env.") for item in extra):
        overrides.append("generation.max_new_tokens=8")
    for item in extra:
        key, value = item.split("=", 1)
        overrides.append(f"model.tokenizer={tokenizers[value]}" if key == "TOKENIZER" else item)
    import rlcli.trainers.ppo as ppo
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    monkeypatch.chdir(REPO)
    ppo.train(load_recipe(PPORecipe, recipe, overrides))
    metrics = read_metrics(out)
    assert len(metrics) == 3
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert m["skipped_minibatches"] == 0 and m["kl"] >= -max(0.1, 4 * m["kl_std_error"]), m
    assert metrics[0]["kl"] == 0.0 and abs(metrics[0]["ratio_first"] - 1.0) < 1e-5
