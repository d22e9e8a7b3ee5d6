"""``rlcli ppo``: KL-penalised PPO for causal and seq2seq LMs with a value head, and the critic-free estimators.

Steps of ``train`` (each PPO step is steps 4-8; the run around them is ``trainers.run.Run``):
  1. check the recipe (``rlcli.ppo.preflight``) and the output dir; the parallel engine, seeds
  2. tokenizer (left padding for generation), prompt rows
  3. policy + value head (+ LoRA), reference (LoRA: adapter disabled; else a frozen copy), reward source,
     optimiser, schedule, the ``PPOLearner`` (``rlcli.ppo.build``); restore a checkpoint on --resume
  4-6. ``rlcli.ppo.rollout.collect_episodes``: this step's prompts, their rollouts under the recipe's sampling
     rules (rlcli's KV-cache sampler, vLLM, or episodes through the text environment), their scores
  7. ``learner.step(rollout, scores)``: the PPO maths (``rlcli.ppo.learner``, ``rlcli.rl``)
  8. log metrics, samples, progress; the health warnings (negative KL, first ratio, sampler disagreement);
     checkpoint
  9. save the policy (Hugging Face format) and its value head

docs/ppo-details.md says what makes PPO for LMs work and where rlcli handles each item.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.panel import Panel

from rlcli.config.errors import UserError
from rlcli.config.ppo import PPORecipe
from rlcli.logging import console, open_jsonl
from rlcli.models.checks import learned_positions
from rlcli.models.loading import load_tokenizer
from rlcli.models.saving import save_model
from rlcli.ppo.build import build_engine, build_learner, rollout_setup
from rlcli.ppo.evaluation import BestKeeper, Evaluator, held_out_prompts, prompt_sets
from rlcli.ppo.learner import ForbiddenTokenError, NonFiniteLossError
from rlcli.ppo.preflight import check_prompt_lengths, describe_estimator, policy_task, preflight, recipe_notes
from rlcli.ppo.rollout import Episodes, collect_episodes, env_metrics
from rlcli.trainers.run import Run, describe_model


SAMPLES_FILE = "samples.jsonl"


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


EV_WARNING = (
    "The critic's explained variance has been below 0 for 5 steps in a row (now {ev:.3g}): its values predict the "
    "returns worse than a constant would, so GAE's advantages carry its errors token by token (and whitening scales "
    "them up). Options: critic.separate: true if it is off (a value head on the policy's own trunk reads features "
    "made for the next token), critic.learning_rate, critic.warmup_steps (fit the values before the policy moves), "
    "or a critic-free estimator (ppo.advantage: grpo / rloo). When nearly every episode scores alike, the statistic "
    "is mostly noise. explained_variance, value_error and return_std in metrics.jsonl follow it."
)


def train(recipe: PPORecipe, *, resume: bool = False) -> Path:
    # step 1: checks, output dir, the parallel engine
    preflight(recipe)
    p = recipe.ppo
    with Run(recipe, resume=resume, batch_size=p.mini_batch_size, micro_batch_size=p.micro_batch_size) as run:
        par = run.par

        # step 2: tokenizer and prompts
        task = policy_task(recipe)
        tokenizer = load_tokenizer(recipe.model, padding_side="left")
        rows, eval_rows, column, eval_column = held_out_prompts(recipe)

        # step 3: models, reward, optimiser, learner (a checkpoint's weights go in before the policy is sharded). The
        # RNG is restored only after the models are built: a from-scratch policy and its reference copy must be the
        # original run's (built from the seed), before the checkpoint's weights replace the policy's
        weights = run.resume_point(restore_rng=False)
        optimizer_steps = p.steps * p.epochs * (p.batch_size // p.mini_batch_size)
        policy, _, reward, learner = build_learner(recipe, par, tokenizer, task, optimizer_steps=optimizer_steps,
                                                   weights=weights)
        run.restore_rng()
        model = learner.model
        long = None if recipe.env is not None else check_prompt_lengths(
            recipe, tokenizer, learned_positions(policy.pretrained), prompt_sets(recipe, rows, column, eval_rows,
                                                                                  eval_column))
        run.begin(model, learner.optimizer, learner.scheduler, total_steps=p.steps, steps_key="ppo.steps")
        if run.resuming:
            learner.load_state_dict(run.state["learner"])
        samples_path = run.out / SAMPLES_FILE
        engine = build_engine(recipe, par, par.unwrap(model), tokenizer, run.out)
        setup = rollout_setup(recipe, par, tokenizer, rows, column, par.unwrap(model), reward, learner.rules, engine)
        evaluator = Evaluator.build(setup, eval_rows, eval_column) if eval_rows else None
        best = None
        if recipe.eval is not None and recipe.eval.keep_best is not None:
            best = BestKeeper(run.out, recipe.eval.keep_best, recipe.eval.keep_best_mode, run.state.get("best"))
        if par.is_main_process:
            # claimed in the run's manifest; empty for a fresh run, cut back to the checkpoint's step on --resume
            open_jsonl(samples_path, resume_step=run.resume_step)
        run.announce(f"[bold]rlcli ppo[/] {task} policy, {describe_model(policy)}, {len(rows)} prompts"
                     + (f" (+{len(evaluator.rows)} held out)" if evaluator else "")
                     + f", {p.steps} steps × {p.batch_size} episodes")
        if par.is_main_process:
            reuse = learner.reuses_training_pass(p.batch_size // par.num_processes)
            console.print(f"sampling: {learner.rules.description()}; advantages: {describe_estimator(recipe)}"
                          + ("; one optimizer step per batch: π_old from the training forward, no separate policy pass"
                             if reuse else ""), style="dim")
            for note in recipe_notes(recipe) + ([long] if long else []):
                console.print(f"note: {note}", style="yellow")

        from_scratch, merge = recipe.model.architecture is not None, bool(recipe.lora and recipe.lora.merge_on_save)
        shown = ("reward_mean", "kl", "kl_coef", "response_length", "tool_use_rate")
        if evaluator is not None:
            shown += ("eval/reward_mean", f"eval/pass@{evaluator.cfg.samples_per_prompt}")

        def evaluate(step: int, metrics: dict) -> None:
            """Held-out metrics into ``metrics``; the policy into best/ when they are the best so far."""
            metrics.update(evaluator.run())
            if best is not None and best.better(metrics):
                plain = par.materialise(model)  # every process: gathers a sharded model's weights
                if par.is_main_process:
                    best.keep(step, metrics, plain, tokenizer, built_from_scratch=from_scratch, merge=merge)

        if evaluator is not None and evaluator.cfg.at_start and not run.resuming:
            start = {}
            evaluate(0, start)
            run.log(0, start, always=True)
        with run.progress("ppo", shown) as progress:
            for step in run.steps():
                t0 = time.perf_counter()
                # steps 4-6: prompts, rollouts, scores
                ep = collect_episodes(setup, step)

                # step 7: PPO
                try:
                    stats = learner.step(ep.rollout, ep.scores)
                except (NonFiniteLossError, ForbiddenTokenError) as exc:
                    raise UserError(f"PPO step {step}: {exc}") from None

                # step 8: log, samples, health warnings, checkpoint
                seconds = time.perf_counter() - t0
                n_stop, gen_tokens = learner.sum_over_processes(sum(ep.stopped), ep.rollout.response_mask.sum())
                stats.update({"stopped_fraction": n_stop / stats["episodes"], "time_generate": ep.seconds_generate,
                              "time_score": ep.seconds_score, "time_step": seconds,
                              "tokens_per_s": gen_tokens / seconds})
                if ep.histories is not None:
                    stats.update(env_metrics(ep.histories, setup.env, learner))
                warn_health(stats, step, recipe.generation.engine, show=par.is_main_process)
                evaluated = evaluator is not None and evaluator.every(step, p.steps)
                if evaluated:
                    evaluate(step, stats)
                run.log(step, stats, always=evaluated)
                if par.is_main_process and (step % recipe.train.sample_every == 0 or step == 1 or step == p.steps):
                    write_samples(samples_path, step, ep, recipe.train.samples_per_log)
                progress.update(step, stats)
                run.checkpoint(step, state={"learner": learner.state_dict(),
                                            **({"best": best.state_dict()} if best is not None else {})})
                if not math.isfinite(stats["reward_mean"]):
                    raise UserError(f"PPO step {step}: non-finite mean reward")

        # step 9: final policy and value head
        def save(plain) -> None:
            save_model(plain.pretrained, tokenizer, run.out, run_dir=run.out, built_from_scratch=from_scratch,
                       merge=merge, value_head=plain.value_head, critic=plain.critic)

        curves = [("reward_mean", "eval/reward_mean"), ("kl",), ("response_length", "eval/response_length")]
        if evaluator is not None:
            curves.append((f"eval/pass@{evaluator.cfg.samples_per_prompt}",))
        if recipe.env is not None:
            curves.append(("tool_use_rate", "eval/tool_use_rate"))
        return run.end(save, lambda: f"reward {stats['reward_mean']:.4g}, kl {stats['kl']:.4g}; policy saved to "
                                     f"{run.out}", curves=curves)


def warn_health(stats: dict, step: int, engine: str, *, show: bool) -> None:
    """Take the learner's warning flags out of ``stats`` and say each raised one in a panel (when ``show``)."""
    panels = []
    if stats.pop("sampler_warning", 0.0):
        panels.append((SAMPLER_WARNING.format(diff=stats["sampler_logprob_diff"], kl=stats["sampler_kl"],
                                              engine=engine), "sampler and trainer disagree"))
    if stats.pop("ratio_warning"):
        panels.append((RATIO_WARNING.format(ratio=stats["ratio_first"]), "first ratio is not 1"))
    if stats.pop("ev_warning", 0.0):
        panels.append((EV_WARNING.format(ev=stats["explained_variance"]), "the critic is worse than a constant"))
    if stats.pop("kl_warning"):
        diff = stats.get("sampler_logprob_diff")
        panels.append((KL_WARNING.format(kl=stats["kl"], diff="n/a" if diff is None else f"{diff:.2g}"),
                       "negative KL"))
    for text, title in panels if show else ():
        console.print(Panel(text, title=f"PPO step {step}: {title}", border_style="yellow"))


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
