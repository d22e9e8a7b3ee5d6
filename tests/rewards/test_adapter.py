"""``reward.adapter``: the reward model as a LoRA adapter on the policy's own base (multi-adapter RLHF).

What is checked, on tiny GPT-2 and Llama bases built here: the adapter's scores equal those of the same reward model
loaded as a model of its own; loading and scoring leave the policy alone (its adapter active, the same weights
training, the same logits, train/eval flags as they were); the reference (every adapter off) is the bare base; no
gradient reaches the reward adapter; PPO built by ``build_learner`` holds one copy of the base weights where a
separate reward model holds two; and ``--dry-run`` refuses each broken setup naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlcli.config.common import LoraConfig, ModelConfig
from rlcli.config.errors import RecipeError, UserError
from rlcli.config.loader import load_recipe
from rlcli.config.ppo import PPORecipe
from rlcli.models.loading import apply_lora, load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout
from rlcli.rewards.adapter import REWARD_ADAPTER, AdapterRewardModel, unique_parameter_bytes
from rlcli.rewards.reward_model import RewardModelScorer, save_reward_stats
from rlcli.models.saving import save_model
from tests.helpers import float32_rounding_bound, invoke_cli as cli, plain, write_yaml

CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64},
}
# the longest float32 reduction in these models (llama's MLP down-projection sums 64 products) and their depth: the
# rounding bound of comparisons between two ways of computing the same scores or logits (tests/helpers.py)
WIDEST, LAYERS = 64, 2
TEXTS = ["how do I sort a list?\nuse sort() on the list.", "hi", "a somewhat longer text than the others", "x y"]


def _perturb(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> None:
    """Random values for every trainable weight: LoRA B starts at 0, so an untrained adapter changes nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def make_base_and_rm(root: Path, arch: str, *, lora_r: int = 4) -> tuple[Path, Path]:
    """A saved base (a causal LM, as `rlcli sft` leaves it) and a LoRA reward model on it, saved as `rlcli rm` saves
    one (adapter + score head, tokenizer, reward_stats.json)."""
    base_dir, rm_dir = root / f"{arch}-base", root / f"{arch}-rm"
    tok = load_tokenizer(ModelConfig(architecture=arch))
    torch.manual_seed(0)
    base = load_model(ModelConfig(architecture=arch, config=CONFIGS[arch]), "causal", tok)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = ModelConfig(name_or_path=str(base_dir))
    rm = apply_lora(load_model(cfg, "classifier", tok), LoraConfig(r=lora_r, target_modules="all-linear"), "classifier")
    _perturb(rm, seed=1)
    rm_dir.mkdir()
    save_model(rm, tok, rm_dir, run_dir=rm_dir, built_from_scratch=False, merge=False)
    save_reward_stats(rm_dir, mean=0.5, std=2.0, count=10, max_length=48)
    return base_dir, rm_dir


def policy_on(base_dir: Path, *, target_modules="all-linear") -> ValueHeadModel:
    """A PPO policy as ``build_policy`` makes it: the base + a LoRA adapter (trained a little: random B) + value
    head."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    lm = load_model(ModelConfig(name_or_path=str(base_dir)), "causal", tok)
    disable_dropout(lm)
    lm = apply_lora(lm, LoraConfig(r=4, target_modules=target_modules), "causal")
    disable_dropout(lm)
    _perturb(lm, seed=2)
    return ValueHeadModel(lm, ValueHead(32))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def saved(request, tmp_path_factory):
    return make_base_and_rm(tmp_path_factory.mktemp(request.param), request.param)


def _logits(lm, texts, tok):
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm(**ids).logits


def test_scores_equal_the_reward_model_loaded_on_its_own(saved):
    base_dir, rm_dir = saved
    policy = policy_on(base_dir)
    scorer = AdapterRewardModel(policy.pretrained, str(rm_dir), batch_size=3)
    separate = RewardModelScorer.from_pretrained(str(rm_dir), batch_size=3)
    got, want = scorer(TEXTS), separate(TEXTS)
    assert got.shape == (4,) and got.dtype == torch.float32
    # one computation two ways (the reward adapter on the policy's base vs the reward model alone): rounding only
    tol = float32_rounding_bound(want, width=WIDEST, layers=LAYERS)
    assert torch.allclose(got, want, rtol=0, atol=tol), (got, want, tol)
    assert want.std() > 100 * tol  # a reward model that tells the texts apart, so the comparison means something
    normalised = AdapterRewardModel(policy_on(base_dir).pretrained, str(rm_dir), normalize=True)
    assert torch.allclose(normalised(TEXTS), (want - 0.5) / 2.0, rtol=0, atol=tol)


def test_policy_untouched_by_loading_and_scoring(saved):
    base_dir, rm_dir = saved
    policy = policy_on(base_dir)
    lm = policy.pretrained
    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    before = _logits(lm, TEXTS, tok)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    lm.train()
    lm.base_model.model.lm_head.eval()  # a mixed train/eval state must come back as it was
    modes = {n: m.training for n, m in lm.named_modules()}

    scorer = AdapterRewardModel(lm, str(rm_dir))
    scorer(TEXTS)

    assert lm.active_adapter == "default" and list(lm.peft_config) == ["default"]
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == trainable
    assert all(not p.requires_grad for p in scorer.reward_parameters) and scorer.reward_parameters
    assert not any(p.requires_grad for p in scorer.head.parameters())
    assert {n: m.training for n, m in lm.named_modules() if n in modes} == modes
    assert torch.equal(_logits(lm, TEXTS, tok), before)  # the policy computes exactly what it did before


def test_reference_has_every_adapter_off(saved):
    base_dir, rm_dir = saved
    policy = policy_on(base_dir)
    AdapterRewardModel(policy.pretrained, str(rm_dir))
    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    bare = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with policy.reference():
        ref = _logits(policy.pretrained, TEXTS, tok)
    bare_logits = _logits(bare, TEXTS, tok)
    assert torch.allclose(ref, bare_logits, rtol=0, atol=float32_rounding_bound(bare_logits, width=WIDEST, layers=LAYERS))
    assert not torch.allclose(_logits(policy.pretrained, TEXTS, tok), ref, atol=1e-3)  # the policy's adapter does act


def test_no_gradient_reaches_the_reward_adapter(saved):
    base_dir, rm_dir = saved
    policy = policy_on(base_dir)
    scorer = AdapterRewardModel(policy.pretrained, str(rm_dir))
    scores = scorer(TEXTS)
    assert not scores.requires_grad
    q = torch.tensor([[5, 6, 7]])
    logits, values = policy(q, torch.ones_like(q), q, torch.ones_like(q))
    (logits.logsumexp(-1).sum() + values.sum()).backward()
    assert all(p.grad is None for p in scorer.reward_parameters)
    policy_grads = [p.grad for n, p in policy.named_parameters() if ".default." in n]
    assert policy_grads and all(g is not None for g in policy_grads)


def test_reward_adapter_on_other_modules_than_the_policy(saved):
    """The policy's adapter on attention only, the reward's on every linear layer: the reward layers the policy has
    no adapter in still count, and the policy still computes what it did."""
    base_dir, rm_dir = saved
    attention = ["c_attn"] if "gpt2" in base_dir.name else ["q_proj", "v_proj"]
    policy = policy_on(base_dir, target_modules=attention)
    scorer = AdapterRewardModel(policy.pretrained, str(rm_dir))
    want = RewardModelScorer.from_pretrained(str(rm_dir))(TEXTS)
    assert torch.allclose(scorer(TEXTS), want, rtol=0, atol=float32_rounding_bound(want, width=WIDEST, layers=LAYERS))


def test_policy_save_holds_only_its_own_adapter(saved, tmp_path):
    base_dir, rm_dir = saved
    policy = policy_on(base_dir)
    AdapterRewardModel(policy.pretrained, str(rm_dir))
    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    save_model(policy.pretrained, tok, tmp_path, run_dir=tmp_path, built_from_scratch=False, merge=True)
    assert not (tmp_path / REWARD_ADAPTER).exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path).eval()
    want = _logits(policy.pretrained, TEXTS, tok)
    tol = float32_rounding_bound(want, width=WIDEST, layers=LAYERS)
    assert torch.allclose(_logits(reloaded, TEXTS, tok), want, rtol=0, atol=tol)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # merged: the policy adapter only
    assert torch.allclose(_logits(merged, TEXTS, tok), want, rtol=0, atol=tol)


# --- through build_learner: one copy of the base ------------------------------------------------------------------


def _recipe(tmp_path: Path, base_dir: Path, reward: dict, lora: dict | None = {"r": 4}) -> PPORecipe:  # noqa: B006
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    path = write_yaml(tmp_path / "recipe.yaml", {
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(base_dir)},
        "lora": lora, "data": {"path": str(data)}, "reward": reward,
        # the value head on the policy's own trunk: a separate critic would hold a copy of the base of its own
        "critic": {"separate": False},
        "ppo": {"steps": 1, "batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 4},
        "logging": {"progress": False}})
    return load_recipe(PPORecipe, str(path), [])


def test_build_learner_holds_one_copy_of_the_base(tmp_path):
    from accelerate import Accelerator

    from rlcli.ppo.build import build_learner
    from rlcli.ppo.preflight import preflight

    base_dir, rm_dir = make_base_and_rm(tmp_path, "llama")
    tok = load_tokenizer(ModelConfig(name_or_path=str(base_dir)), padding_side="left")
    held = {}
    for mode, reward in (("adapter", {"adapter": str(rm_dir)}), ("separate", {"model": str(rm_dir)})):
        recipe = _recipe(tmp_path, base_dir, reward)
        preflight(recipe)
        policy, ref, source, learner = build_learner(recipe, Accelerator(cpu=True), tok, "causal", optimizer_steps=1)
        scorer = source.scorer
        models = [policy, ref, getattr(scorer, "model", None), getattr(scorer, "head", None)]
        held[mode] = unique_parameter_bytes(*models)
        if mode == "adapter":
            # the reward model is the policy's own model (its LoRA weights live in the policy's layers) plus a head;
            # the reference is the policy with its adapters off
            assert scorer.model is policy.pretrained and ref is None
            assert held[mode] == unique_parameter_bytes(policy) + unique_parameter_bytes(scorer.head)
            small = sum(p.numel() * p.element_size() for n, p in policy.named_parameters()
                        if "lora_" in n or "value_head" in n) + unique_parameter_bytes(scorer.head)
            extra = held[mode] - small
            reward_lora = sum(p.numel() * p.element_size() for p in scorer.reward_parameters)
            optimised = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
            assert not optimised & {id(p) for p in scorer.reward_parameters}
            # the scores PPO gets: the same as the reward model on its own
            want = RewardModelScorer.from_pretrained(str(rm_dir))(["ab", "cde"])
            tol = float32_rounding_bound(want, width=WIDEST, layers=LAYERS)
            assert torch.allclose(source(["a", "c"], ["b", "de"], [{}, {}]), want, rtol=0, atol=tol)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    # adapter: exactly one base besides the adapters and heads; separate: a second trunk (the reward model's own,
    # its adapter merged in) instead of the reward adapter
    assert extra == unique_parameter_bytes(lm), (held, extra)
    assert held["separate"] == held["adapter"] - reward_lora + unique_parameter_bytes(lm.base_model), held


# --- --dry-run: each broken setup named -----------------------------------------------------------------------------


def _problems(recipe: PPORecipe) -> str:
    from rlcli.ppo.preflight import preflight

    with pytest.raises(RecipeError) as info:
        preflight(recipe)
    return plain(str(info.value))


def test_dry_run_refuses_what_cannot_share_a_base(tmp_path):
    base_dir, rm_dir = make_base_and_rm(tmp_path, "gpt2")
    other_base, _ = make_base_and_rm(tmp_path, "llama")
    adapter = {"adapter": str(rm_dir)}

    text = _problems(_recipe(tmp_path, base_dir, adapter, lora=None))
    assert "reward.adapter: needs a LoRA policy" in text
    text = _problems(_recipe(tmp_path, other_base, adapter))
    assert "reward.adapter:" in text and "was trained on base" in text and str(other_base) in text
    text = _problems(_recipe(tmp_path, base_dir, {"adapter": str(base_dir)}))
    assert "has no adapter_config.json: not a LoRA adapter (a fully trained reward model: use reward.model)" in text
    text = _problems(_recipe(tmp_path, base_dir, {"adapter": str(tmp_path / "nope")}))
    assert "is not a directory" in text
    text = _problems(_recipe(tmp_path, base_dir, {"adapter": str(rm_dir), "label": 3}))
    assert "reward.label:" in text and "out of range" in text

    # the same base directory, written another way, is the same base
    from rlcli.ppo.preflight import preflight

    preflight(_recipe(tmp_path, Path(str(base_dir) + "/."), adapter))

    # a base with another tokenizer under the same name: the vocabularies are compared
    (base_dir / "tokenizer.json").rename(base_dir / "tokenizer.json.bak")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (other_base / name).exists():
            (base_dir / name).write_bytes((other_base / name).read_bytes())
    swapped = json.loads((base_dir / "tokenizer.json").read_text())
    vocab = swapped["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (base_dir / "tokenizer.json").write_text(json.dumps(swapped))
    text = _problems(_recipe(tmp_path, base_dir, adapter))
    assert "was trained with another tokenizer than the policy's" in text


def test_dry_run_names_the_key_without_a_traceback(tmp_path, monkeypatch):
    rm_dir = make_base_and_rm(tmp_path, "gpt2")[1]
    code, _, err = cli("ppo", "configs/tiny/ppo.yaml", f"output_dir={tmp_path / 'o'}", "reward.function=null",
                       f"reward.adapter={rm_dir}", "--dry-run", monkeypatch=monkeypatch)
    text = plain(err)
    assert code == 2 and "Traceback" not in err, err
    assert "reward.adapter: needs a LoRA policy" in text
    assert "the policy is built from scratch (model.architecture)" in text
    code, _, err = cli("ppo", "configs/tiny/ppo.yaml", "reward.model=runs/x", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "give exactly one of 'function', 'model', 'adapter' or 'url'" in plain(err)


def test_explain_documents_the_key(monkeypatch):
    code, out, _ = cli("explain", "ppo.reward.adapter", monkeypatch=monkeypatch)
    assert code == 0 and "one copy of the base" in plain(out)


def test_env_rollout_loads_an_adapter_as_a_model_of_its_own(saved):
    from rlcli.config.reward import RewardConfig
    from rlcli.rewards.sources import build_reward

    rm_dir = saved[1]
    source = build_reward(RewardConfig(adapter=str(rm_dir)))
    want = RewardModelScorer.from_pretrained(str(rm_dir))(["ab"])
    assert torch.allclose(source(["a"], ["b"], [{}]), want)
    assert isinstance(source.scorer.model, torch.nn.Module) and not isinstance(source.scorer.model, PeftModel)


def test_wrong_tokenizer_at_build_time(saved):
    base_dir, rm_dir = saved
    from rlcli.config.reward import RewardConfig
    from rlcli.rewards.sources import build_reward

    other = load_tokenizer(ModelConfig(architecture="gpt2"))
    other.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="another tokenizer"):
        build_reward(RewardConfig(adapter=str(rm_dir)), policy=policy_on(base_dir), tokenizer=other)


def test_classifier_base_equals_causal_trunk(saved):
    """The premise: a sequence classifier loaded from the causal base has the same trunk weights (only the head
    differs), so the reward adapter on the policy's trunk sees what it was trained on."""
    base_dir = saved[0]
    clf = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    trunk_c = dict(clf.base_model.named_parameters())
    trunk_l = dict(lm.base_model.named_parameters())
    assert trunk_c.keys() == trunk_l.keys() and all(torch.equal(trunk_c[k], trunk_l[k]) for k in trunk_c)

