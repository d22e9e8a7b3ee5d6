"""Held-out evaluation inside a PPO run: the ``eval:`` section, logged as ``eval/…`` metrics.

The held-out prompts go through what training uses (the engine, the reward, the text environment, the one scoring
function) under the evaluation's own sampling rules (greedy by default). Two properties hold by construction:

- **No effect on training.** Evaluation draws from generators of its own and never touches the optimizer, so a run
  with ``eval:`` logs the same training metrics as one without (tested).
- **The same numbers on 1 or N processes.** Prompts are cut into fixed batches (``eval.batch_size`` prompts, each
  with its k completions) dealt to processes in turn; a batch's generator is seeded by its index, so it is computed
  the same way wherever it runs. Each batch's sums travel to every process in a slot of their own (every other
  process adds an exact 0), and the batches are summed in order: no result depends on the process count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcli.config.errors import UserError
from rlcli.config.ppo import EvalConfig, GenerationConfig, PPORecipe
from rlcli.data.prompts import load_prompt_rows
from rlcli.models.engines import LocalEngine
from rlcli.ppo.rollout import TOOL_COUNTS, RolloutSetup, _lm, play_episodes, tool_rates
from rlcli.rl import SamplingRules

BEST_DIR = "best"
BEST_FILE = "best.json"
EVAL_SEED_OFFSET = 7_777_777  # keeps evaluation's generators apart from the rollouts' (seeds.rollout_generator)


def held_out_prompts(recipe: PPORecipe) -> tuple[list[dict], list[dict], str, str]:
    """(training rows, held-out rows, training prompt column, held-out prompt column) of a PPO recipe's data.

    ``data.eval_path`` / ``eval_split``: a file or split of its own; ``data.eval_fraction``: that share of the
    training prompts, drawn with the run's seed and taken out of training. No held-out prompts: an empty list."""
    data = recipe.data
    if data.reasoning_gym is not None:  # generated: training and held-out rows never share a question
        from rlcli.tasks import reasoning_gym

        rows, held = reasoning_gym.generate(data.reasoning_gym)
        rows = rows[: data.max_rows] if data.max_rows else rows
        return rows, held, "prompt", "prompt"
    rows, column = load_prompt_rows(data)
    if data.eval_path is not None or data.eval_split is not None:
        source = data.model_copy(update={"path": data.eval_path or data.path, "split": data.eval_split or "train",
                                         "max_rows": None})
        held, held_column = load_prompt_rows(source)
        return rows, held, column, held_column
    if data.eval_fraction > 0:
        n = max(1, round(len(rows) * data.eval_fraction))
        if n >= len(rows):
            raise UserError(f"data {data.path}: eval_fraction={data.eval_fraction} of {len(rows)} prompts leaves no "
                            "training prompts")
        order = list(range(len(rows)))
        random.Random(recipe.seed).shuffle(order)
        chosen = set(order[:n])
        return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen],
                column, column)
    return rows, [], column, column


def prompt_sets(recipe: PPORecipe, rows: list[dict], column: str, eval_rows: list[dict],
                eval_column: str) -> list[tuple[list[dict], str, int, bool]]:
    """The run's prompts as ``ppo.preflight.check_prompt_lengths`` takes them: (rows, column, new tokens, held out),
    the held-out ones as the ``Evaluator`` will use them."""
    sets = [(rows, column, recipe.generation.max_new_tokens, False)]
    if eval_rows:
        cfg = recipe.eval or EvalConfig()
        sets.append((eval_rows[: cfg.max_prompts] if cfg.max_prompts else eval_rows, eval_column,
                     cfg.max_new_tokens or recipe.generation.max_new_tokens, True))
    return sets


# per-batch sums, in this order (pass: prompts with a completion at or above the threshold)
_SUMS = ("episodes", "prompts", "reward", "reward_sq", "passed", "length", "stopped", *TOOL_COUNTS)


@dataclass
class Evaluator:
    """Evaluates the policy of a ``RolloutSetup`` on held-out rows (every process calls ``run`` together)."""

    setup: RolloutSetup
    rows: list[dict]
    column: str
    cfg: EvalConfig
    gen: GenerationConfig  # the recipe's generation section under eval's temperature and max_new_tokens
    rules: SamplingRules  # the sampling rules of ``gen``
    env: object = None  # the text environment under the evaluation's sampling rules

    @classmethod
    def build(cls, setup: RolloutSetup, rows: list[dict], column: str) -> "Evaluator":
        from rlcli.ppo.build import behaviour_rules, build_env

        recipe = setup.recipe
        cfg = recipe.eval or EvalConfig()
        rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
        gen = recipe.generation.model_copy(update={"temperature": cfg.temperature,
                                                   "max_new_tokens": cfg.max_new_tokens
                                                   or recipe.generation.max_new_tokens})
        rules = behaviour_rules(gen, setup.tokenizer)
        env = None if setup.env is None else build_env(recipe, setup.policy, setup.tokenizer, rules, setup.engine,
                                                   gen.max_new_tokens)
        return cls(setup, rows, column, cfg, gen, rules, env)

    def every(self, step: int, last: int) -> bool:
        return step == last or (self.cfg.every is not None and step % self.cfg.every == 0)

    def run(self) -> dict[str, float]:
        """``eval/…`` metrics of the policy as it is now."""
        setup, par, k = self.setup, self.setup.par, self.cfg.samples_per_prompt
        batches = [self.rows[i : i + self.cfg.batch_size] for i in range(0, len(self.rows), self.cfg.batch_size)]
        sums = torch.zeros(len(batches), len(_SUMS), dtype=torch.float64)
        engine = setup.engine or LocalEngine(_lm(setup.policy))
        engine.sync(setup.policy.pretrained)  # this step's weights (the rollouts' engine took the step's start)
        for index in range(par.process_index, len(batches), par.num_processes):
            sums[index] = self._batch(engine, index, [r for r in batches[index] for _ in range(k)])
        engine.release()
        sums = par.reduce(sums.to(par.device), "sum").cpu()  # one process fills each row; the others add 0
        total = dict(zip(_SUMS, sums.sum(dim=0).tolist()))
        n, prompts = max(total["episodes"], 1.0), max(total["prompts"], 1.0)
        mean = total["reward"] / n
        out = {"eval/reward_mean": mean,
               "eval/reward_std": math.sqrt(max(total["reward_sq"] / n - mean * mean, 0.0)),
               f"eval/pass@{k}": total["passed"] / prompts,
               "eval/response_length": total["length"] / n,
               "eval/stopped_fraction": total["stopped"] / n}
        if self.env is not None:
            out.update(tool_rates([total[name] for name in TOOL_COUNTS], n, prefix="eval/"))
        return out

    def _batch(self, engine, index: int, rows: list[dict]) -> torch.Tensor:
        """The sums of ``_SUMS`` over one batch of held-out episodes."""
        g = torch.Generator().manual_seed(self.setup.recipe.seed * 1_000_003 + EVAL_SEED_OFFSET + index)
        ep = play_episodes(self.setup, rows, self.column, self.gen, self.rules, self.env, engine, g)
        scores = ep.scores.double().cpu()
        k = self.cfg.samples_per_prompt
        passed = (scores.view(-1, k) >= self.cfg.pass_threshold).any(dim=1).sum()
        row = [len(rows), len(rows) // k, scores.sum(), (scores**2).sum(), passed,
               ep.rollout.response_mask.sum(), sum(ep.stopped), *ep.tool_counts()]
        return torch.tensor([float(x) for x in row], dtype=torch.float64)


class BestKeeper:
    """``eval.keep_best``: the policy of the best evaluation so far, in ``OUTPUT_DIR/best``."""

    def __init__(self, out: Path, metric: str, mode: str, state: dict | None = None):
        self.out, self.metric, self.mode = out, metric, mode
        state = state or {}
        self.value, self.step = state.get("value"), state.get("step")

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step}

    def better(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        return self.value is None or (value > self.value if self.mode == "max" else value < self.value)

    def keep(self, step: int, metrics: dict[str, float], policy, tokenizer, *, built_from_scratch: bool,
             merge: bool) -> None:
        """Record the new best and save ``policy`` (a ``ValueHeadModel``) into ``best/`` with ``best.json``, laid out
        as the final save (``rlcli.models.saving``; main process)."""
        import json

        from rlcli.models.saving import save_model

        self.value, self.step = metrics[self.metric], step
        info = json.dumps({"step": step, "metric": self.metric, "value": self.value}) + "\n"
        save_model(policy.pretrained, tokenizer, self.out / BEST_DIR, run_dir=self.out,
                   built_from_scratch=built_from_scratch, merge=merge, value_head=policy.value_head,
                   critic=policy.critic, files={BEST_FILE: info})
