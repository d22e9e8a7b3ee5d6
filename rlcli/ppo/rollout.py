"""Steps 4-6 of a PPO step on one process: its prompts, their rollouts (rlcli's sampler, another engine, or
episodes through a text environment) and their scores (``rlcli.rewards.scoring.score_episodes``, the one scoring
function ``rlcli env-rollout`` uses too). ``play_episodes`` collects and scores a batch of episodes for the
rollouts and the held-out evaluation (``rlcli.ppo.evaluation``) alike; ``tool_counts`` is their tool statistics."""

from __future__ import annotations

import dataclasses
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
    """A batch of episodes, generated and scored (``play_episodes``): one process's share of a PPO step's batch, or
    one batch of an evaluation."""

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

    def tool_counts(self) -> list[int]:
        """Sums over the episodes, in the order of ``TOOL_COUNTS`` (zeros without a text environment)."""
        return [0] * len(TOOL_COUNTS) if self.histories is None else tool_counts(self.histories)


# what tool_counts sums: episodes with a tool call, tool calls, turns, episodes that submitted an answer
TOOL_COUNTS = ("tool_used", "tool_calls", "turns", "submitted")


def tool_counts(histories: list) -> list[int]:
    """The tool statistics of a batch of text-environment episodes, as sums in the order of ``TOOL_COUNTS``."""
    return [sum(1 for h in histories if h.tool_calls), sum(len(h.tool_calls) for h in histories),
            sum(h.num_turns for h in histories), sum(h.finish_reason == "submit" for h in histories)]


def tool_rates(counts: list[float], episodes: float, prefix: str = "") -> dict[str, float]:
    """``tool_counts`` summed over ``episodes`` episodes (and processes), as the logged rates per episode."""
    used, calls, turns, submitted = counts
    return {f"{prefix}tool_use_rate": used / episodes, f"{prefix}tool_calls_per_episode": calls / episodes,
            f"{prefix}turns_per_episode": turns / episodes, f"{prefix}submitted_fraction": submitted / episodes}


def collect_episodes(setup: RolloutSetup, step: int) -> Episodes:
    """Steps 4-6 of a PPO step on this process: its prompts, their rollouts and their scores."""
    recipe, par = setup.recipe, setup.par
    p = recipe.ppo
    prompts_per_step = p.batch_size // p.group_size
    rank, local_prompts = par.process_index, prompts_per_step // par.num_processes
    t0 = time.perf_counter()
    # step 4: this process takes its contiguous share of the step's prompts, each repeated group_size times
    # (consecutive rows: the layout the critic-free baselines expect)
    g = rollout_generator(recipe.seed, step, rank)
    indices = index_stream(len(setup.rows), recipe.seed, (step - 1) * prompts_per_step, prompts_per_step)
    step_rows = [setup.rows[i] for i in indices[rank * local_prompts : (rank + 1) * local_prompts]
                 for _ in range(p.group_size)]
    engine = setup.engine or LocalEngine(_lm(setup.policy))
    engine.sync(setup.policy.pretrained)  # once per step: the engine samples with the step's starting weights
    started = time.perf_counter() - t0
    # steps 5-6: rollouts under the recipe's sampling rules, then scores; the engine is released in between
    episodes = play_episodes(setup, step_rows, setup.column, recipe.generation, setup.rules, setup.env, engine, g,
                             release=True)
    return dataclasses.replace(episodes, seconds_generate=started + episodes.seconds_generate)


def play_episodes(setup: RolloutSetup, rows: list[dict], column: str, gen: GenerationConfig, rules: SamplingRules,
                  env, engine: RolloutEngine, generator: torch.Generator, *, release: bool = False) -> Episodes:
    """Generate one batch of episodes from ``rows`` (plain sampling with ``engine``, or through the text environment
    ``env``) under ``gen`` and ``rules``, and score them: the one collector of rollouts and evaluation alike.

    Under the recipe's mixed precision like the training forward (the sampler calls the unwrapped LM, which
    Accelerate's autocast wrapper does not cover), with the weights gathered under FSDP2 / ZeRO-3 (processes make
    different numbers of forward calls while sampling). ``release``: the engine frees its memory (vLLM's sleep mode)
    as soon as the episodes are generated, before scoring."""
    recipe, tokenizer, par = setup.recipe, setup.tokenizer, setup.par
    t0 = time.perf_counter()
    histories, answers = None, None
    with torch.no_grad(), par.autocast(), par.gathered(setup.policy):
        if env is not None:
            prompts = [r[column] for r in rows]
            rollout, histories = env_rollout(env, prompts, rows, generator)
            answers = [h.answer or "" for h in histories]
        else:
            lengths = sample_lengths(len(rows), recipe.data.prompt_length, generator)
            prompt_ids = [encode_prompt(r[column], tokenizer, chat_template=recipe.data.chat_template,
                                        max_length=setup.prompt_limit(gen.max_new_tokens), length=n)
                          for r, n in zip(rows, lengths)]
            rollout = generate(engine, tokenizer, prompt_ids, gen, rules, generator)
            prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
    if release:
        engine.release()
    t1 = time.perf_counter()
    scored = score_episodes(setup.reward, recipe.reward, rollout, tokenizer, prompts=prompts, rows=rows,
                            stop_ids=rules.eos_ids if gen.stop_at_eos else (), stop_strings=gen.stop_strings,
                            histories=histories)
    return Episodes(rollout, scored.scores, prompts, scored.responses, scored.stopped, histories, answers, t1 - t0,
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
    local = [len(histories), *tool_counts(histories), stats.pad_fraction] + [stats.tool_outcomes.get(k, 0)
                                                                              for k in outcome_names]
    # stateful environments: episodes they ended, episodes they failed, their own rewards
    env_rewards = [h.env_reward for h in histories if h.env_reward is not None]
    local += [sum(h.finish_reason == "done" for h in histories), sum(h.env_error is not None for h in histories),
              len(env_rewards), sum(env_rewards)]
    total = learner.sum_over_processes(*local)
    n, tools = max(total[0], 1), len(TOOL_COUNTS)
    out = {**tool_rates(total[1 : 1 + tools], n), "pad_fraction": total[1 + tools] / learner.procs}
    outcomes = total[2 + tools : 2 + tools + len(outcome_names)]
    out.update({f"tool_{k}": v for k, v in zip(outcome_names, outcomes)})
    done, errors, rewarded, reward_sum = total[2 + tools + len(outcome_names):]
    if getattr(env, "environments", None) is not None:
        out.update({"env_done_fraction": done / n, "env_errors": errors})
        if rewarded:
            out["env_reward_mean"] = reward_sum / rewarded
    return out
