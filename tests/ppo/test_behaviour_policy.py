"""One behaviour policy for sampling, loss and KL (docs/ppo-details.md item 4).

For every generation setting the recipe schema allows, on models and tokenizers of several kinds (GPT-2 and Llama
with the byte tokenizer, a GPT-2 saved to disk and reloaded with a BPE tokenizer whose PAD is its EOS and that has no
BOS, a T5), and for text-environment episodes with forced tool tokens:

- the sampler's log-probs equal the learner's rollout forward within 1e-5 at every model token;
- both equal an independent computation of the distribution the token was really drawn from (EOS cut before
  ``min_new_tokens``, banned EOS, top-k / top-p cut and renormalised), and every sampled token is allowed by it;
- at step 1 (policy == reference) the per-token KL is 0, and a step with learning rate ~0 has ratio 1, no clipping.
"""

from __future__ import annotations

import dataclasses

import copy

import pytest
import torch
from accelerate import Accelerator

from rlcli.config.common import ModelConfig, OptimConfig
from rlcli.config.ppo import GenerationConfig, KLConfig, PPOAlgo
from rlcli.env.environment import TextEnvironment, histories_to_rollout
from rlcli.models.engines import LocalEngine
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout, hidden_size
from rlcli.rl import SamplingRules
from rlcli.toolcalls import ToolCall
from rlcli.optim import make_optimizer
from rlcli.ppo.build import behaviour_rules
from rlcli.ppo.rollout import generate
from rlcli.ppo.learner import PPOLearner
from tests.helpers import AlwaysCalls

MAX_NEW = 12
EOS_BOOST = 4.0  # added to the EOS logit so that EOS rules matter at every position

SETTINGS = {
    "default": {},
    "temperature 0.7": {"temperature": 0.7},
    "temperature 1.6": {"temperature": 1.6},
    "top_k 5": {"top_k": 5},
    "top_p 0.8": {"top_p": 0.8},
    "temperature, top_k, top_p": {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    "min_new_tokens 4": {"min_new_tokens": 4},
    "min_new_tokens = max_new_tokens": {"min_new_tokens": MAX_NEW},
    "min_new_tokens and top_k": {"min_new_tokens": 6, "top_k": 8, "temperature": 0.9},
    "stop_at_eos false": {"stop_at_eos": False},
    "stop strings": {"stop_strings": ["e", "t"]},
}


def _bpe_tokenizer(tmp_path):
    """A BPE tokenizer trained here: PAD is EOS (as GPT-2's), no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["the quick brown fox jumps over the lazy dog", "seven sevens make forty-nine", "hello world"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "bpe")
    return tok


def _boost_eos(lm, eos_id: int) -> None:
    """Make EOS likely (a forward hook on the output layer: the sampler and the training forward both see it)."""
    bias = torch.zeros(lm.get_output_embeddings().weight.shape[0])
    bias[eos_id] = EOS_BOOST
    lm.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias.to(out))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (policy ValueHeadModel, tokenizer)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tmp = tmp_path_factory.mktemp("models")
    out = {}
    for name, cfg in {
        "gpt2 (byte tokenizer)": ModelConfig(architecture="gpt2", config={"n_layer": 2, "n_embd": 32, "n_head": 2,
                                                                          "n_positions": 256}),
        "llama (byte tokenizer)": ModelConfig(architecture="llama", config={
            "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 256}),
        "t5 (seq2seq)": ModelConfig(architecture="t5", config={"num_layers": 2, "d_model": 32, "d_ff": 64,
                                                                "num_heads": 2, "d_kv": 16}),
    }.items():
        torch.manual_seed(0)
        tok = load_tokenizer(cfg, "left")
        task = "seq2seq" if name.startswith("t5") else "causal"
        out[name] = (load_model(cfg, task, tok), tok)
    # saved by another program, loaded by rlcli from disk: a BPE tokenizer with PAD = EOS and no BOS
    bpe = _bpe_tokenizer(tmp)
    torch.manual_seed(0)
    foreign = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256,
                                                          vocab_size=len(bpe), eos_token_id=bpe.eos_token_id,
                                                          bos_token_id=bpe.eos_token_id))
    foreign.save_pretrained(tmp / "bpe")
    cfg = ModelConfig(name_or_path=str(tmp / "bpe"))
    bpe_tok = load_tokenizer(cfg, "left")
    assert bpe_tok.pad_token_id == bpe_tok.eos_token_id and bpe_tok.bos_token is None
    out["gpt2 from disk (BPE, PAD = EOS, no BOS)"] = (load_model(cfg, "causal", bpe_tok), bpe_tok)
    for lm, tok in out.values():
        disable_dropout(lm)
        _boost_eos(lm, tok.eos_token_id)
    return out


def _learner(lm, rules: SamplingRules) -> PPOLearner:
    policy = ValueHeadModel(lm, ValueHead(hidden_size(lm.config)))
    ref = ValueHeadModel(copy.deepcopy(lm).eval().requires_grad_(False), None)
    opt, sched = make_optimizer(policy.parameters(), OptimConfig(learning_rate=1e-12), 10)
    return PPOLearner(policy, ref_model=ref, algo=PPOAlgo(batch_size=8, mini_batch_size=4, micro_batch_size=2,
                                                          epochs=1),
                      kl=KLConfig(coef=0.1), rules=rules, optimizer=opt, scheduler=sched,
                      accelerator=Accelerator(cpu=True), max_grad_norm=None)


def _reference_logprobs(logits: torch.Tensor, tokens: torch.Tensor, turn_pos: torch.Tensor, rules: SamplingRules,
                        eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent, float64, one-position-at-a-time account of the behaviour distribution: ([n] log-probs of
    ``tokens``, [n] whether each token was allowed). ``logits`` [n, V]."""
    out, allowed = [], []
    for z, token, pos in zip(logits.double(), tokens.tolist(), turn_pos.tolist()):
        z = z / rules.temperature
        ok = torch.ones_like(z, dtype=torch.bool)
        if eos_id in rules.banned_ids or (pos < rules.min_new_tokens and eos_id in rules.eos_ids):
            ok[eos_id] = False
        zs, oks = z.tolist(), ok.tolist()  # Python floats: the sort below is plain Python, one number at a time
        order = sorted((i for i in range(len(zs)) if oks[i]), key=lambda i: -zs[i])
        if rules.top_k:
            order = order[: rules.top_k]
        if rules.top_p < 1.0:
            p = torch.softmax(z[order], dim=0)
            keep, mass = [], 0.0
            for i, pi in zip(order, p.tolist()):
                if mass >= rules.top_p:
                    break
                keep.append(i)
                mass += pi
            order = keep
        logp = torch.log_softmax(z[order], dim=0)
        allowed.append(token in order)
        out.append(float(logp[order.index(token)]) if token in order else float("-inf"))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(allowed)


def _raw_logits(lm, rollout) -> torch.Tensor:
    """[B, R, V] the policy's raw logits at each response position (the ValueHeadModel forward)."""
    with torch.no_grad():
        logits, _ = ValueHeadModel(lm, None)(rollout.query_ids, rollout.query_mask, rollout.response_ids,
                                             rollout.response_mask, with_values=False)
    return logits


def _check(lm, tok, rollout, rules: SamplingRules):
    learner = _learner(lm, rules)
    model = rollout.model_mask.bool()
    assert model.sum() > 0
    fwd = learner.rollout_forward(rollout)
    # 1. the sampler's log-probs are the learner's
    torch.testing.assert_close(fwd.pi_logprobs[model], rollout.sampler_logprobs[model], atol=1e-5, rtol=0)
    # 2. ... and those of the distribution the tokens were drawn from; the training forward (train mode) computes
    # the same logits as the sampler (eval mode): every dropout is off
    lm.eval()
    raw = _raw_logits(lm, rollout)
    lm.train()
    torch.testing.assert_close(_raw_logits(lm, rollout), raw, atol=1e-5, rtol=0)
    expected, allowed = _reference_logprobs(raw[model], rollout.response_ids[model],
                                            rollout.turn_positions[model], rules, tok.eos_token_id)
    assert allowed.all(), "a sampled token is one the rules forbid"
    torch.testing.assert_close(fwd.pi_logprobs[model].double(), expected, atol=1e-5, rtol=0)
    # 3. policy == reference: KL 0 everywhere; a step without learning has ratio 1
    assert fwd.kl.abs().max() < 1e-6
    stats = learner.step(rollout, torch.randn(rollout.batch_size))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["policy_clipfrac"] == 0.0
    return fwd


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model_name", ["gpt2 (byte tokenizer)", "llama (byte tokenizer)", "t5 (seq2seq)",
                                        "gpt2 from disk (BPE, PAD = EOS, no BOS)"])
def test_sampler_loss_and_kl_share_one_distribution(models, model_name, setting):
    lm, tok = models[model_name]
    if setting == "stop strings" and model_name.startswith("t5"):
        pass  # the shared sampler handles stop strings for seq2seq too
    settings = dict(SETTINGS[setting])
    cut = {k: settings.pop(k) for k in ("top_k", "top_p") if k in settings}  # env-rollout's cuts, not ppo's keys
    gen = GenerationConfig(max_new_tokens=MAX_NEW, **settings)
    rules = dataclasses.replace(behaviour_rules(gen, tok), **cut)
    prompts = ["the quick brown fox", "seven", "hello world, the lazy dog jumps", "a", "dog", "fox jumps over",
               "the", "world"]
    prompt_ids = [tok(p)["input_ids"] or [tok.eos_token_id] for p in prompts]
    rollout = generate(LocalEngine(lm), tok, prompt_ids, gen, rules, torch.Generator().manual_seed(0))
    lengths = rollout.response_mask.sum(1)
    if gen.min_new_tokens == MAX_NEW or not gen.stop_at_eos:
        assert (lengths == MAX_NEW).all()  # EOS (boosted to be likely) never ended a response early
        assert not (rollout.response_ids[rollout.response_mask.bool()] == tok.eos_token_id).any()
    if setting == "default":
        assert (lengths < MAX_NEW).any()  # without a rule, the boosted EOS does end some responses
    _check(lm, tok, rollout, rules)


@pytest.mark.parametrize("rule_kwargs", [{}, {"min_new_tokens": 3}, {"min_new_tokens": 5, "temperature": 0.8},
                                         {"top_k": 40, "min_new_tokens": 6}])
def test_text_environment_turns_replay_the_rules(models, rule_kwargs):
    """Multi-turn episodes: forced tool tokens between model turns; each turn's positions count from 0 again."""
    lm, tok = models["gpt2 (byte tokenizer)"]
    rules = SamplingRules(eos_ids=(tok.eos_token_id,), **rule_kwargs)
    env = TextEnvironment(lm, tok, {"Echo": lambda text: text.upper()}, AlwaysCalls(), max_turns=3,
                          max_new_tokens=6, max_tool_output_tokens=8, max_length=200, rules=rules,
                          tool_isolation="inline")
    histories = env.run([f"episode {i}" for i in range(8)], generator=torch.Generator().manual_seed(1))
    rollout = histories_to_rollout(histories, tok.pad_token_id)
    assert rollout.tool_mask.sum() > 0 and max(h.num_turns for h in histories) >= 2
    if rules.min_new_tokens:
        for h in histories:  # no model turn ended with EOS before min_new_tokens
            for s in h.segments:
                if s.source == "model" and s.token_ids[-1] == tok.eos_token_id:
                    assert len(s.token_ids) > rules.min_new_tokens
    _check(lm, tok, rollout, rules)
