"""Steps 4-6 of a PPO step on one process: its prompts, their rollouts (rlcli's sampler, another engine, or
episodes through a text environment) and their scores (``rlcli.rewards.scoring.score_episodes``, the one scoring
function ``rlcli env-rollout`` uses too)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlcli.config.ppo import GenerationConfig, PPORecipe
from rlcli.data.prompts import encode_prompt, sample_lengths
from rlcli.models.engines import LocalEngine, RolloutEngine
from rlcli.models.value_head import ValueHeadModel
from rlcli.padding import left_pad
from rlcli.parallel import Parallel
from rlcli.rewards.scoring import score_episodes
from rlcli.rl import Rollout, SamplingRules
from rlcli.seeds import index_stream, rollout_generator


def _lm(policy: ValueHeadModel):
    """The language model a policy samples with (a LoRA policy's base with its adapter active)."""
    return policy.pretrained.get_base_model() if policy.is_peft else policy.pretrained


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
    positions: int | None = None  # the policy's learned positions (None: no such limit): what a prompt may take

    def prompt_limit(self, max_new_tokens: int) -> int:
        """The most prompt tokens a rollout of ``max_new_tokens`` starts from (``ppo.preflight.prompt_budget``)."""
        from rlcli.ppo.preflight import prompt_budget

        return prompt_budget(self.recipe.data.max_prompt_length, self.positions, max_new_tokens)


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
                                    max_length=setup.prompt_limit(gen.max_new_tokens), length=n)
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
    # stateful environments: episodes they ended, episodes they failed, their own rewards
    env_rewards = [h.env_reward for h in histories if h.env_reward is not None]
    local += [sum(h.finish_reason == "done" for h in histories), sum(h.env_error is not None for h in histories),
              len(env_rewards), sum(env_rewards)]
    total = learner.sum_over_processes(*local)
    n = max(total[0], 1)
    out = {"tool_use_rate": total[1] / n, "tool_calls_per_episode": total[2] / n, "turns_per_episode": total[3] / n,
           "submitted_fraction": total[4] / n, "pad_fraction": total[5] / learner.procs}
    out.update({f"tool_{k}": v for k, v in zip(outcome_names, total[6:6 + len(outcome_names)])})
    done, errors, rewarded, reward_sum = total[6 + len(outcome_names):]
    if getattr(env, "environments", None) is not None:
        out.update({"env_done_fraction": done / n, "env_errors": errors})
        if rewarded:
            out["env_reward_mean"] = reward_sum / rewarded
    return out
