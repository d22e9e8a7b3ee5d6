"""``rlcli env-rollout``: run episodes of a model with tools; show some, summarise all, write them to JSONL.

Steps:
  1. check the recipe (tools resolve, files exist); load tokenizer, model and prompts
  2. run the episodes in batches through the text environment (optionally scoring them with the reward)
  3. render a few histories (prompt / model / tool in their own colours), print a summary table
  4. write ``episodes.jsonl`` (one TextHistory per line: text, segments with token ids, the token ids with their
     model / tool masks, tool calls, reward; chat episodes also their ``messages`` and ``tools``) and
     ``summary.json`` into output_dir; with ``accept_min_reward``, ``accepted.jsonl`` (the episodes that reached it)

With ``env.protocol: chat`` the chat template is probed right after the tokenizer loads, before the model: a
template that cannot render episodes exactly stops the run before any weights load.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch
from rich.table import Table

from rlcli.rl.sampling import SamplingRules
from rlcli.config.env import EnvRolloutRecipe
from rlcli.config.reward import RewardConfig
from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.config.loader import Origin, locate
from rlcli.data.prompts import load_prompt_rows
from rlcli.data.sources import check_data_source
from rlcli.env.build import build_environment, build_protocol, check_env
from rlcli.env.environment import histories_to_rollout
from rlcli.env.history import source_legend
from rlcli.launch import check_launch
from rlcli.logging import console
from rlcli.models.checks import check_model_config
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.models.value_head import disable_dropout
from rlcli.rewards.remote import check_reward_url
from rlcli.rewards.scoring import score_episodes
from rlcli.rewards.sources import build_reward, check_reward_function
from rlcli.rundir import RunDir

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"
ACCEPTED_FILE = "accepted.jsonl"


def preflight(recipe: EnvRolloutRecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    problems = check_model_config(recipe.model, "causal") + check_env(recipe.env)
    from rlcli.config.common import DataSource

    if recipe.data.reasoning_gym is not None:
        from rlcli.tasks.reasoning_gym import check_source

        problems += check_source(recipe.data.reasoning_gym)
    else:
        problems += check_data_source(DataSource(path=recipe.data.path, split=recipe.data.split))
    if recipe.reward is not None and recipe.reward.function is not None:
        try:
            check_reward_function(recipe.reward.function)
        except UserError as exc:
            problems.append(Problem("reward.function", str(exc)))
    if recipe.reward is not None and recipe.reward.url is not None:
        problems += check_reward_url(recipe.reward)
    problems += check_launch("env-rollout", recipe, processes=processes)
    if recipe.reward is not None and not problems:
        from rlcli.ppo.preflight import reward_source_problems

        problems += reward_source_problems(recipe.reward, recipe.env)
    if recipe.accept_min_reward is not None and scoring(recipe) is None:
        problems.append(Problem("accept_min_reward", "needs a reward section (or an environment with get_reward) to "
                                                     "score the episodes"))
    if problems:
        raise RecipeError(locate(problems, origin))
    specs = recipe.env.environment_specs()
    what = ([f"tools: {', '.join(recipe.env.tools)}"] if recipe.env.tools else []) + \
        ([f"environment: {', '.join(s.spec for s in specs.values())}"] if specs else [])
    from rlcli.env.build import prompt_notes

    return [f"{'; '.join(what)}; protocol {recipe.env.protocol}; up to {recipe.env.max_turns} turns",
            *prompt_notes(recipe.env)]


def scoring(recipe: EnvRolloutRecipe) -> RewardConfig | None:
    """How episodes are scored: the reward section, or (without one) a stateful environment's own reward."""
    if recipe.reward is not None:
        return recipe.reward
    if recipe.env.environment_specs():
        from rlcli.env.build import env_owns_reward

        if env_owns_reward(recipe.env):
            return RewardConfig()
    return None


def summarise(histories, seconds: float, generated: int) -> dict[str, float]:
    n = max(len(histories), 1)
    outcomes = Counter(c.status for h in histories for c in h.tool_calls)
    calls = sum(outcomes.values())
    rewards = [h.reward for h in histories if h.reward is not None]
    summary = {
        "episodes": len(histories),
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "tool_use_rate": sum(1 for h in histories if h.tool_calls) / n,
        "turns_per_episode": sum(h.num_turns for h in histories) / n,
        "tool_calls_per_episode": calls / n,
        "tool_error_rate": (calls - outcomes.get("ok", 0) - outcomes.get("truncated", 0)) / calls if calls else 0.0,
        "tool_timeout_rate": outcomes.get("timeout", 0) / calls if calls else 0.0,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "episodes_per_s": len(histories) / seconds if seconds > 0 else 0.0,
    }
    env_rewards = [h.env_reward for h in histories if h.env_reward is not None]
    if env_rewards or any(h.env_error is not None for h in histories):
        summary["env_reward_mean"] = sum(env_rewards) / len(env_rewards) if env_rewards else None
        summary["env_errors"] = sum(h.env_error is not None for h in histories)
    summary.update({f"tool_{k}": v for k, v in sorted(outcomes.items())})
    summary.update({f"finish_{k}": v for k, v in sorted(Counter(h.finish_reason for h in histories).items())})
    return summary


def episode_row(h) -> dict:
    """One line of episodes.jsonl: the episode's text, its token ids with the model and tool masks, and
    ``TextHistory.to_dict()`` (segments, tool calls, reward, meta, answer; chat: ``messages`` and ``tools``)."""
    return {"text": h.text, "token_ids": h.token_ids, "token_mask": h.token_mask, "tool_mask": h.tool_mask,
            **h.to_dict()}


def summary_table(summary: dict) -> Table:
    table = Table(title="env-rollout summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if value is None:
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def run(recipe: EnvRolloutRecipe, *, resume: bool = False) -> Path:
    # step 1: recipe, model, prompts
    if resume:
        raise UserError("env-rollout has nothing to resume; run it again")
    preflight(recipe)
    out = Path(recipe.output_dir)
    with RunDir.of(recipe) as owner:
        owner.open(recipe, resume=False)
        torch.manual_seed(recipe.seed)
        tokenizer = load_tokenizer(recipe.model, padding_side="left")
        chat = recipe.env.protocol == "chat"
        protocol = build_protocol(recipe.env, tokenizer) if chat else None  # the template's probe, before weights
        model = load_model(recipe.model, "causal", tokenizer)
        disable_dropout(model)
        model.eval()
        rows, column = load_prompt_rows(recipe.data, messages=chat)
        gen = recipe.generation
        rules = SamplingRules(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
        env = build_environment(recipe.env, model, tokenizer, rules=rules, max_new_tokens=gen.max_new_tokens,
                                protocol=protocol)
        reward_cfg = scoring(recipe)
        reward = build_reward(reward_cfg) if reward_cfg is not None else None
        # the previous rollout's files are moved aside now (every input has loaded), deleted once this one has
        # written its episodes, put back if it fails before (the reward raising, an interrupt): never beside the new
        # recipe
        owner.start(recipe)
        owner.claim(EPISODES_FILE, EPISODES_FILE + ".tmp", SUMMARY_FILE, ACCEPTED_FILE, ACCEPTED_FILE + ".tmp")

        # step 2: episodes in batches
        histories, infos, generated, start = [], [], 0, time.perf_counter()
        generator = torch.Generator().manual_seed(recipe.seed)
        with console.status(f"running {len(rows)} episodes") as status:
            for i in range(0, len(rows), recipe.batch_size):
                batch = rows[i : i + recipe.batch_size]
                done = env.run([r[column] for r in batch], batch, generator=generator)
                generated += env.last_stats.generated_tokens
                if reward_cfg is not None:
                    # PPO's own scoring of the same episodes (response text, truncate_at, missing_eos_penalty), so that
                    # accept_min_reward filters on the reward PPO would train on
                    scored = score_episodes(reward, reward_cfg, histories_to_rollout(done, env.pad_token_id), tokenizer,
                                            prompts=[r[column] for r in batch], rows=batch, histories=done)
                    for h, s in zip(done, scored.scores.tolist()):
                        h.reward = s
                    infos += scored.info or [None] * len(done)
                histories += done
                status.update(f"ran {len(histories)}/{len(rows)} episodes")
        seconds = time.perf_counter() - start

        # step 3: show
        shown = histories[: recipe.show]
        if shown:
            console.print(source_legend())
        for i, h in enumerate(shown, 1):
            console.rule(f"episode {i} of {len(histories)}", style="dim", align="left")
            if recipe.show_tokens:
                h.show_tokens(tokenizer, console, legend=False)
            else:
                h.show_text(console, legend=False)
        summary = summarise(histories, seconds, generated)
        console.print(summary_table(summary))

        # step 4: write (to a temp file first: a crash never leaves a half-written file that looks finished)
        lines = [json.dumps({**episode_row(h), **({"reward_info": i} if i is not None else {})}) + "\n"
                 for h, i in zip(histories, infos or [None] * len(histories))]
        tmp = out / (EPISODES_FILE + ".tmp")
        tmp.write_text("".join(lines))
        tmp.rename(out / EPISODES_FILE)
        if recipe.accept_min_reward is not None:
            accepted = [line for h, line in zip(histories, lines)
                        if h.reward is not None and h.reward >= recipe.accept_min_reward]
            tmp = out / (ACCEPTED_FILE + ".tmp")
            tmp.write_text("".join(accepted))
            tmp.rename(out / ACCEPTED_FILE)
            summary["accepted"] = len(accepted)
            console.print(f"[green]accepted[/] {len(accepted)} episodes with reward >= {recipe.accept_min_reward:g}: "
                          f"{out / ACCEPTED_FILE}")
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        owner.finish()
    console.print(f"[green]wrote[/] {len(histories)} episodes to {out / EPISODES_FILE}")
    return out
