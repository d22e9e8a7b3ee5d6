"""The rollout-engine contract, with a fake engine that holds its own copy of the model (as vLLM does): weights
reach it under plain Hugging Face names, once per PPO step, LoRA merged for the copy and left unmerged in the
policy; the trainer watches the engine's log-probs against its own."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlcli.models.engines import LocalEngine, plain_weights
from rlcli.models.generation import sample
from rlcli.padding import left_pad
from tests.helpers import REPO, FakeEngine, plain, read_metrics

FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=16",
        "ppo.mini_batch_size=16", "optim.learning_rate=3e-3", "logging.progress=false", "generation.max_new_tokens=12",
        "train.save_every=null"]


def _train(tmp_path, monkeypatch, *, stale=False, extra=(), recipe_path="configs/tiny/ppo.yaml", fast=FAST,
           temperature_factor=1.0):
    import rlcli.trainers.ppo as ppo
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.ppo.rollout import _lm

    engines = []

    def fake_engine(recipe, par, policy, tokenizer, out):
        engines.append(FakeEngine(_lm(policy), stale=stale, temperature_factor=temperature_factor))
        return engines[-1]

    monkeypatch.setattr(ppo, "build_engine", fake_engine)
    monkeypatch.chdir(REPO)
    recipe = load_recipe(PPORecipe, recipe_path, [f"output_dir={tmp_path / 'run'}", "ppo.steps=4", *fast, *extra])
    ppo.train(recipe)
    return engines[0], read_metrics(tmp_path / "run")


def test_one_sync_per_step_under_plain_names_and_the_same_numbers(tmp_path, monkeypatch):
    engine, m = _train(tmp_path, monkeypatch)
    assert len(engine.synced_names) == 4  # once before each step's rollouts
    expected = sorted(k for k in AutoModelForCausalLM.from_config(engine.model.config).state_dict())
    assert engine.synced_names[0] == expected
    # the engine sampled with the policy's weights of that step: its log-probs are the trainer's
    assert all(x["sampler_logprob_diff"] < 1e-4 and x["sampler_kl"] < 1e-6 for x in m)


def test_lora_weights_are_merged_for_the_engine_and_the_policy_stays_adapted(tmp_path, monkeypatch):
    engine, m = _train(tmp_path, monkeypatch, extra=["lora.r=8"])
    assert not any("lora_" in n or "base_layer" in n for n in engine.synced_names[-1])
    assert all(x["sampler_logprob_diff"] < 1e-4 for x in m)  # merged weights compute what the adapted policy does
    # and the policy (adapter on) moved away from its base (adapter off): still unmerged (a merged adapter would make
    # the two the same model, KL 0 to float rounding; a k1 estimate of a small KL may be either sign)
    assert abs(m[-1]["kl"]) > 1e-3 and m[-1]["entropy"] > 0


def test_plain_weights_round_trip_a_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                       bos_token_id=0, eos_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False,
                                            fan_in_fan_out=True)).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=x).logits
    weights = dict(plain_weights(model))
    copy_ = AutoModelForCausalLM.from_config(base.config).eval()
    copy_.load_state_dict(weights)
    torch.testing.assert_close(copy_(input_ids=x).logits, before, atol=1e-5, rtol=0)  # merged == adapted
    torch.testing.assert_close(model(input_ids=x).logits, before)  # the policy is unmerged again
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_a_stale_engine_is_noticed(tmp_path, monkeypatch, capsys):
    """An engine that keeps the first weights (a sync that never happens): the trainer's log-probs part from the
    engine's as the policy learns; one warning panel says so."""
    engine, m = _train(tmp_path, monkeypatch, stale=True, extra=["ppo.steps=6", "optim.learning_rate=1e-2"])
    assert m[0]["sampler_logprob_diff"] < 1e-4 and m[-1]["sampler_logprob_diff"] > 0.1
    text = plain(capsys.readouterr().out)
    assert text.count("sampler and trainer disagree") == 1 and "got this step's weights" in text


def test_local_engine_is_rlclis_sampler():
    from rlcli.rl import SamplingRules

    torch.manual_seed(0)
    from transformers import GPT2Config

    lm = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                                                     eos_token_id=0)).eval()
    engine = LocalEngine(lm)
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = dict(rules=SamplingRules(), eos_token_id=0, pad_token_id=63)
    a = engine.generate(prompts, 6, generator=torch.Generator().manual_seed(3), **kwargs)
    ids, mask = left_pad(prompts, 63)
    b = sample(lm, ids, mask, 6, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    engine.sync(lm)
    assert engine.syncs == 1


def test_text_environment_turns_through_an_engine_have_the_local_layout():
    """Multi-turn episodes (forced tool tokens between turns) sampled by an engine with its own copy of the model:
    the same token ids, masks and log-probs as rlcli's own sampler on the same seeds (prefilling every turn)."""
    from rlcli.config.common import ModelConfig
    from rlcli.env.environment import TextEnvironment, histories_to_rollout
    from rlcli.models.loading import load_model, load_tokenizer
    from rlcli.rl import SamplingRules
    from tests.helpers import AlwaysCalls

    cfg = ModelConfig(architecture="gpt2", config={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256})
    torch.manual_seed(0)
    tok = load_tokenizer(cfg, "left")
    lm = load_model(cfg, "causal", tok).eval()
    engine = FakeEngine(lm)
    engine.sync(lm)
    rules = SamplingRules(eos_ids=(tok.eos_token_id,), min_new_tokens=3)
    runs = []
    for kwargs in ({"kv_reuse": False}, {"engine": engine}):
        env = TextEnvironment(lm, tok, {"Echo": lambda text: text.upper()}, AlwaysCalls(), max_turns=3,
                              max_new_tokens=6, max_tool_output_tokens=8, max_length=200, rules=rules,
                              tool_isolation="inline", **kwargs)
        runs.append(env.run([f"episode {i}" for i in range(6)], generator=torch.Generator().manual_seed(1)))
    local, remote = (histories_to_rollout(h, tok.pad_token_id) for h in runs)
    assert local.tool_mask.sum() > 0
    for a, b in zip(runs[0], runs[1]):
        assert a.token_ids == b.token_ids and a.tool_mask == b.tool_mask and a.num_turns == b.num_turns
    torch.testing.assert_close(local.sampler_logprobs, remote.sampler_logprobs, atol=1e-5, rtol=0)


class _FakeLLM:
    """What VLLMEngine calls on vLLM's ``LLM``: records sleep / wake / weight reloads; holds a model of its own."""

    def __init__(self, lm):
        from types import SimpleNamespace

        self.model = AutoModelForCausalLM.from_config(copy.deepcopy(lm.config)).eval()
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
        self.calls: list[str] = []

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake")

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"
        self.calls.append("load")
        self.model.load_state_dict(dict(kwargs["weights_iterator"]), strict=False)

    def reset_prefix_cache(self):
        pass


def test_vllm_sleep_mode_frees_the_engine_once_per_step(tmp_path, monkeypatch):
    """generation.vllm.sleep_between_steps: the engine sleeps after every step's rollouts (while the optimizer runs)
    and wakes before the next step's weights go in; it never samples asleep. Release is called every step, so memory is
    freed between steps, not at most once."""
    import rlcli.trainers.ppo as ppo
    from rlcli.models.engines import VLLMEngine, VLLMSettings
    from rlcli.ppo.rollout import _lm

    class SleepyEngine(VLLMEngine):
        def __init__(self, lm):  # VLLMEngine's own state, without starting vLLM
            self.settings = VLLMSettings(sleep_between_steps=True)
            self.llm = _FakeLLM(lm)
            self.syncs, self.sleeping = 0, False

        def generate(self, prompts, max_new_tokens, **kwargs):
            assert not self.sleeping, "sampled while asleep"
            ids, mask = left_pad(prompts, kwargs["pad_token_id"])
            return sample(self.llm.model, ids, mask, max_new_tokens, **kwargs)

    engines = []
    monkeypatch.setattr(ppo, "build_engine", lambda recipe, par, policy, tokenizer, out:
                        engines.append(SleepyEngine(_lm(policy))) or engines[-1])
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    monkeypatch.chdir(REPO)
    recipe = load_recipe(PPORecipe, "configs/tiny/ppo.yaml", [f"output_dir={tmp_path / 'run'}", "ppo.steps=3", *FAST])
    ppo.train(recipe)
    assert engines[0].llm.calls == ["load", "sleep1", "wake", "load", "sleep1", "wake", "load", "sleep1"]


def test_a_sampler_that_is_not_the_learner_is_corrected_and_its_mismatch_logged(tmp_path, monkeypatch):
    """An engine sampling at 0.3 × the recipe's temperature: with generation.importance_sampling the policy loss is
    weighted by π_old / q (logged: is_weight_mean, is_capped_fraction); without it only the mismatch is logged."""
    runs = {}
    for mode in ("token_truncate", "none"):
        _, runs[mode] = _train(tmp_path / mode, monkeypatch, temperature_factor=0.3,
                               extra=["ppo.steps=2", f"generation.importance_sampling={mode}"])
    corrected, plain_run = runs["token_truncate"], runs["none"]
    assert all(x["sampler_kl"] > 0.05 for x in corrected + plain_run)  # the mismatch shows either way
    assert all(0.2 < x["is_weight_mean"] < 2.0 and 0.0 < x["is_capped_fraction"] < 0.5 for x in corrected)
    assert not any("is_weight_mean" in x for x in plain_run)


def test_the_importance_sampling_default_follows_the_engine():
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe

    local = load_recipe(PPORecipe, REPO / "configs/tiny/ppo.yaml")
    vllm = load_recipe(PPORecipe, REPO / "configs/tiny/ppo.yaml", ["generation.engine=vllm"])
    assert local.generation.importance_sampling == "none" and vllm.generation.importance_sampling == "token_truncate"


@pytest.mark.slow
def test_a_corrected_perturbed_sampler_learns_like_the_exact_one(tmp_path, monkeypatch):
    """GRPO on the sevens task, 30 steps, three ways: rlcli's own sampler; an engine sampling at 0.6 × the
    temperature, corrected (token_truncate); the same engine uncorrected. The corrected run ends where the exact one
    does; the uncorrected one's logged mismatch (sampler_kl) says its episodes came from another distribution."""
    grpo_fast = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
                 "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "ppo.group_size=4", "optim.learning_rate=1e-3",
                 "logging.progress=false", "generation.max_new_tokens=24", "train.save_every=null", "ppo.steps=30"]
    runs = {}
    for name, factor, mode in (("exact", 1.0, "none"), ("corrected", 0.6, "token_truncate"),
                               ("uncorrected", 0.6, "none")):
        _, runs[name] = _train(tmp_path / name, monkeypatch, recipe_path="configs/tiny/grpo.yaml", fast=grpo_fast,
                               temperature_factor=factor, extra=[f"generation.importance_sampling={mode}"])
    final = {k: sum(x["reward_mean"] for x in m[-5:]) / 5 for k, m in runs.items()}
    start = sum(x["reward_mean"] for x in runs["exact"][:3]) / 3
    assert final["exact"] > 3 * max(start, 0.1), final
    assert final["corrected"] > 0.75 * final["exact"], final
    # the mismatch grows as the policy sharpens (about 0.007 at step 1, 0.6-0.8 from step 15 on)
    assert max(x["sampler_kl"] for x in runs["uncorrected"]) > 0.1
    assert max(x["sampler_kl"] for x in runs["exact"]) < 1e-4
