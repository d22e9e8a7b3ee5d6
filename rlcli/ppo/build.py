"""The objects of a PPO run: the policy with its value head, the reference, the reward source, the learner around
the prepared policy, the rollout engine and the text environment; and the sampling rules they share."""

from __future__ import annotations

import copy
from pathlib import Path

from rlcli import rundir
from rlcli.checkpoint import load_trainable_state
from rlcli.config.ppo import GenerationConfig, PPORecipe
from rlcli.models.engines import LocalEngine, RolloutEngine
from rlcli.models.checks import learned_positions
from rlcli.models.loading import apply_lora, load_model
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout, hidden_size
from rlcli.optim import make_optimizer
from rlcli.parallel import Parallel, as_parallel
from rlcli.ppo.learner import PPOLearner
from rlcli.ppo.rollout import RolloutSetup, _lm
from rlcli.rewards.sources import build_reward
from rlcli.rl import SamplingRules


VLLM_MODEL_DIR = "vllm-model"  # the initial policy, saved for vLLM to build its copy from


def behaviour_rules(gen: GenerationConfig, tokenizer) -> SamplingRules:
    """The sampling rules of a recipe's generation section: what the sampler draws from and the learner replays.

    The EOS ids the rules know (banned before ``min_new_tokens``, or always when ``stop_at_eos`` is false) are the
    tokenizer's EOS and its chat template's end-of-turn token when that differs (``<|im_end|>`` of a ChatML
    template over a tokenizer whose EOS is ``<|endoftext|>``): a chat-protocol turn ends at the latter."""
    eos = tokenizer.eos_token_id
    eos_ids = () if eos is None else (int(eos),)
    end_of_turn = _end_of_turn_id(tokenizer)
    if end_of_turn is not None and end_of_turn not in eos_ids:
        eos_ids += (end_of_turn,)
    return SamplingRules(temperature=gen.temperature, eos_ids=eos_ids,
                         min_new_tokens=gen.min_new_tokens, banned_ids=() if gen.stop_at_eos else eos_ids)


def _end_of_turn_id(tokenizer) -> int | None:
    from rlcli.chat_template import ChatTemplate, ChatTemplateError

    try:
        return ChatTemplate.of(tokenizer).eot_id
    except (ChatTemplateError, TypeError, ValueError):  # no template, or one whose end of turn is no single token
        return None


def build_policy(recipe: PPORecipe, tokenizer, task: str) -> tuple[ValueHeadModel, ValueHeadModel | None]:
    """The policy with its value head (or its separate critic), and the reference (None with LoRA: the adapter gets
    disabled instead)."""
    lm = load_model(recipe.model, task, tokenizer)
    disable_dropout(lm)
    critic = build_critic(recipe, lm, tokenizer, task) if recipe.critic.separate and not recipe.critic_free else None
    ref = None
    if recipe.lora is None:
        if recipe.ref_model is not None:
            ref_lm = load_model(recipe.ref_model, task, tokenizer)
        elif hasattr(next(lm.parameters()), "ds_id"):  # partitioned by ZeRO-3 as it loaded: load a second copy
            ref_lm = load_model(recipe.model, task, tokenizer)
        else:
            ref_lm = copy.deepcopy(lm)
        disable_dropout(ref_lm)
        ref_lm.eval().requires_grad_(False)
        ref = ValueHeadModel(ref_lm, None)
    else:
        lm = apply_lora(lm, recipe.lora, task)
        disable_dropout(lm)
    head = None if recipe.critic_free or critic is not None else ValueHead(hidden_size(lm.config),
                                                                            recipe.ppo.value_head_init_std)
    return ValueHeadModel(lm, head, critic=critic), ref


def build_critic(recipe: PPORecipe, lm, tokenizer, task: str) -> ValueHeadModel:
    """A separate critic: ``critic.model``'s weights, or a copy of the policy's initial ``lm`` (before any adapter),
    with a value head; with ``lora``, an adapter of its own."""
    if recipe.critic.model is not None:
        critic_lm = load_model(recipe.critic.model, task, tokenizer)
    elif hasattr(next(lm.parameters()), "ds_id"):  # partitioned by ZeRO-3 as it loaded: load a second copy
        critic_lm = load_model(recipe.model, task, tokenizer)
    else:
        critic_lm = copy.deepcopy(lm)
    disable_dropout(critic_lm)
    if recipe.lora is not None:
        critic_lm = apply_lora(critic_lm, recipe.lora, task)
        disable_dropout(critic_lm)
    return ValueHeadModel(critic_lm, ValueHead(hidden_size(critic_lm.config), recipe.ppo.value_head_init_std))


def optimizer_groups(named_parameters, critic_learning_rate: float | None) -> list[dict]:
    """The policy's trainable parameters and the critic's (the value head, or the separate critic: names under
    ``value_head.`` / ``critic.``) as two AdamW groups, the critic's at its own learning rate (None: the policy's).
    Named ``policy`` and ``critic``: the learner freezes the first during ``critic.warmup_steps``."""
    policy, critic = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (critic if name.startswith(("value_head.", "critic.")) else policy).append(param)
    groups = [{"params": policy, "name": "policy"}]
    if critic:
        groups.append({"params": critic, "name": "critic",
                       **({"lr": critic_learning_rate} if critic_learning_rate is not None else {})})
    return groups


def build_learner(recipe: PPORecipe, par: Parallel, tokenizer, task: str, optimizer_steps: int,
                  weights: dict | None = None):
    """Policy (unwrapped), reference, reward source and the ``PPOLearner`` around the prepared policy, built the
    way ``train`` runs them (``bench/ppo_step.py`` uses this too); ``optimizer_steps`` sizes the LR schedule;
    ``weights``: a checkpoint's, loaded before the policy is prepared (sharded). ``par`` may be an Accelerator."""
    par = as_parallel(par, recipe.optim.max_grad_norm)
    with par.building(from_scratch=recipe.model.architecture is not None):
        policy, ref = build_policy(recipe, tokenizer, task)
    if weights is not None:
        load_trainable_state(policy, weights)
    # reward.adapter: loaded onto the policy's own base (one copy of the weights), before the optimizer and the
    # Accelerate wrapping see the model; frozen, so neither trains it
    reward = build_reward(recipe.reward, device=par.device, policy=policy, tokenizer=tokenizer)
    # the reference gets rank 0's weights like the policy (a copy of a from-scratch policy was made from each
    # process's own init, or KL > 0 at step 1), and is sharded like it under FSDP2 / ZeRO-3
    if ref is not None:
        ref = par.prepare_frozen(ref)
    model, optimizer, scheduler = par.prepare(policy, lambda named: make_optimizer(
        optimizer_groups(named, recipe.critic.learning_rate), recipe.optim, optimizer_steps))
    learner = PPOLearner(model, ref_model=ref, algo=recipe.ppo, kl=recipe.kl,
                         critic=None if recipe.critic_free else recipe.critic,
                         rules=behaviour_rules(recipe.generation, tokenizer), optimizer=optimizer,
                         scheduler=scheduler, accelerator=par, max_grad_norm=recipe.optim.max_grad_norm,
                         seed=recipe.seed, constant_length=generation_budget(recipe),
                         importance_sampling=recipe.generation.importance_sampling,
                         importance_sampling_cap=recipe.generation.importance_sampling_cap)
    return policy, ref, reward, learner


def generation_budget(recipe: PPORecipe) -> int:
    """The longest a response can be: the constant of ``loss_aggregation: constant`` (Dr. GRPO)."""
    return recipe.env.max_length if recipe.env is not None else recipe.generation.max_new_tokens


def build_engine(recipe: PPORecipe, par: Parallel, policy: ValueHeadModel, tokenizer, out: Path) -> RolloutEngine:
    """The run's rollout engine (``generation.engine``), one per process (colocated)."""
    if recipe.generation.engine == "local":
        return LocalEngine(_lm(policy))
    from rlcli.models.engines import VLLMEngine, VLLMSettings, plain_weights

    # vLLM builds its copy of the model from a directory: the initial policy (adapters merged), saved once; the
    # weights are then copied in before every step's rollouts (sync)
    model_dir = out / VLLM_MODEL_DIR
    if par.is_main_process:
        rundir.claim(out, VLLM_MODEL_DIR)
        _lm(policy).save_pretrained(model_dir, state_dict=dict(plain_weights(policy.pretrained)))
        tokenizer.save_pretrained(model_dir)
    par.wait_for_everyone()
    return VLLMEngine(model_dir, VLLMSettings(**recipe.generation.vllm.model_dump()),
                      seed=recipe.seed + par.process_index)


def rollout_setup(recipe: PPORecipe, par: Parallel, tokenizer, rows, column, policy: ValueHeadModel, reward,
                  rules: SamplingRules, engine: RolloutEngine | None = None) -> RolloutSetup:
    """The ``RolloutSetup`` of a run, with its text environment when the recipe has one."""
    par = as_parallel(par)
    env = None if recipe.env is None else build_env(recipe, policy, tokenizer, rules, engine)
    return RolloutSetup(recipe, tokenizer, rows, column, policy, reward, rules, par, env, engine,
                        learned_positions(_lm(policy)))


def build_env(recipe: PPORecipe, policy: ValueHeadModel, tokenizer, rules: SamplingRules,
              engine: RolloutEngine | None, max_new_tokens: int | None = None):
    """The recipe's text environment around ``policy``, sampling under ``rules`` (the rollouts' or evaluation's),
    each model turn given ``max_new_tokens`` (None: ``generation.max_new_tokens``)."""
    from rlcli.env.build import build_environment

    # rlcli's own sampler keeps each episode's KV cache across turns; another engine samples the turns itself
    other = engine if engine is not None and not isinstance(engine, LocalEngine) else None
    return build_environment(recipe.env, _lm(policy), tokenizer, rules=rules,
                             max_new_tokens=max_new_tokens or recipe.generation.max_new_tokens, engine=other)
