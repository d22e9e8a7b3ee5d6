"""The optimisation loop of the supervised trainers (``rlcli sft``, ``rlcli rm``), inside a ``Run``.

``supervised_steps`` takes a seeded batch stream split over processes and micro-batches, a loss normalised over the
*global* batch, evaluation and logging; a trainer supplies its ``Objective`` and a ``SupervisedKind``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlcli.checkpoint import load_trainable_state
from rlcli.config.common import RecipeBase
from rlcli.config.errors import UserError
from rlcli.data.sources import train_eval_rows
from rlcli.logging import console
from rlcli.models.loading import apply_lora
from rlcli.parallel import Parallel
from rlcli.seeds import index_stream
from rlcli.trainers.run import Run, describe_model, print_notes


class Objective(Protocol):
    """What a supervised trainer adds to ``supervised_steps``: its examples and how a batch of them makes a loss."""

    examples: list

    def normaliser(self, batch: list) -> int:
        """The global batch's loss denominator (target tokens for SFT, pairs for RM)."""

    def length(self, example) -> int:
        """An example's padded width in a batch: micro-batches are formed from examples sorted by it."""

    def micro_loss(self, model, micro: list, normaliser: int, device) -> tuple[torch.Tensor, dict[str, Any]]:
        """The micro-batch's loss, already divided by ``normaliser``, and counts to sum over the step."""

    def metrics(self, loss: float, counts: dict[str, float], lr: float, epoch: float,
                seconds: float) -> dict[str, float]:
        """The step's logged numbers from the summed loss and counts (over all processes)."""

    def evaluate(self, model, par: Parallel) -> dict[str, float]:
        """Held-out metrics (``{}`` without eval data)."""


@dataclass(frozen=True)
class SupervisedKind:
    """What tells the supervised trainers apart; everything else of ``train_supervised`` they share."""

    name: str  # the command: the header line and the progress bar
    noun: str  # what the data holds: "examples", "pairs"
    task: str | None  # the model's task for ``load_model`` (None: the recipe model's own, ``model_task``)
    check: Callable  # check(rows, data, path): the rows' problems, raised
    tokenize: Callable  # tokenize(rows, data, tokenizer, path) -> a tokenized set
    items: Callable[[Any], list]  # a tokenized set's examples
    objective: Callable[..., Objective]  # objective(recipe, train_set, eval_set, tokenizer)
    shown: tuple[str, ...]  # the metrics of the progress line


@dataclass
class SupervisedRun:
    run: Run
    model: Any  # wrapped by the engine
    tokenizer: Any
    train_set: Any
    metrics: dict[str, float]  # the last step's


def supervised_preflight(recipe: RecipeBase, kind: SupervisedKind, problems: list, origin,
                         processes: int | None) -> list[str]:
    """The end of a supervised trainer's preflight: ``problems`` (its own) and the launch's, raised together as one
    ``RecipeError``; else the batch arithmetic as a note."""
    from rlcli.config.errors import RecipeError
    from rlcli.config.loader import locate
    from rlcli.launch import check_launch, launch_processes

    processes = processes or launch_processes()
    problems = problems + check_launch(kind.name, recipe, processes=processes)
    if problems:
        raise RecipeError(locate(problems, origin))
    tcfg = recipe.train
    accum = tcfg.batch_size // (tcfg.micro_batch_size * processes)
    unit = "" if kind.noun == "examples" else f" {kind.noun}"
    return [(f"global batch {tcfg.batch_size}{unit} = micro-batch {tcfg.micro_batch_size} × {processes} process(es) "
             f"× {accum} accumulation step(s)")]


def train_supervised(run: Run, kind: SupervisedKind) -> SupervisedRun:
    """Steps 2-5 of a supervised trainer in ``run`` (``Run.supervised``): its data, its model, the loop. The trainer
    saves what it trained and ends the run (``Run.end``)."""
    from rlcli.models.checks import model_task
    from rlcli.models.loading import load_model, load_tokenizer

    recipe = run.recipe
    tokenizer = load_tokenizer(recipe.model, padding_side="right")
    train_set, eval_set = supervised_data(run, tokenizer, kind.check, kind.tokenize, lambda s: len(kind.items(s)),
                                          kind.noun)
    task = kind.task or model_task(recipe.model)
    model = supervised_model(run, lambda: load_model(recipe.model, task, tokenizer), task,
                             len(kind.items(train_set)))
    run.announce(f"[bold]rlcli {kind.name}[/] {describe_model(run.par.unwrap(model))}, "
                 f"{len(kind.items(train_set))} train {kind.noun}"
                 + (f", {len(kind.items(eval_set))} eval" if eval_set else "") + f", {run.total_steps} steps")
    objective = kind.objective(recipe, train_set, eval_set, tokenizer)
    metrics = supervised_steps(run, objective, kind, has_eval=eval_set is not None)
    return SupervisedRun(run, model, tokenizer, train_set, metrics)


def supervised_steps(run: Run, objective: Objective, kind: SupervisedKind, *, has_eval: bool) -> dict[str, float]:
    """Train ``run.model`` on ``objective`` for the run's steps; returns the last step's metrics.

    Each optimizer step takes its global batch from a seeded index stream (the same on every process and after a
    resume), gives each process its contiguous share, splits that into micro-batches and accumulates gradients of
    a loss normalised over the *global* batch; every engine averages gradients over processes, so each
    micro-batch's loss is scaled by the process count to get the global sum back (1 process × 4 micro-batches ==
    2 processes × 2)."""
    recipe, par, model = run.recipe, run.par, run.model
    tcfg = recipe.train
    procs, rank = par.num_processes, par.process_index
    per_proc = tcfg.batch_size // procs
    metrics: dict = {}
    with run.progress(kind.name, kind.shown) as progress:
        for step in run.steps():
            t0 = time.perf_counter()
            indices = index_stream(len(objective.examples), recipe.seed, (step - 1) * tcfg.batch_size,
                                   tcfg.batch_size)
            batch = [objective.examples[i] for i in indices]
            normaliser = objective.normaliser(batch)
            mine = batch[rank * per_proc : (rank + 1) * per_proc]
            # micro-batches of examples of similar length pad less; the loss is normalised over the global batch,
            # so how it is split changes only float summation order. With one micro-batch there is nothing to gain,
            # and the order is kept: a model with dropout draws its masks row by row, so reordering would change
            # the run (the same expectation, another sample)
            if tcfg.micro_batch_size < per_proc:
                mine = sorted(mine, key=objective.length)
            micro_batches = [mine[i : i + tcfg.micro_batch_size] for i in range(0, per_proc, tcfg.micro_batch_size)]
            loss_sum = torch.zeros((), device=par.device)
            counts: dict[str, Any] = {}
            for i, micro in enumerate(micro_batches):
                with par.micro_batch(model, last=i == len(micro_batches) - 1):
                    loss, micro_counts = objective.micro_loss(model, micro, normaliser, par.device)
                    par.backward(model, loss * procs)
                loss_sum += loss.detach()
                for key, value in micro_counts.items():
                    counts[key] = counts[key] + value if key in counts else value
            lr = run.scheduler.get_last_lr()[0]
            grad_norm = par.clip_and_step(model, run.optimizer, run.scheduler)

            step_loss = par.reduce(loss_sum, "sum").item()
            totals = {k: par.reduce(torch.as_tensor(v, device=par.device), "sum").item() for k, v in counts.items()}
            seconds = time.perf_counter() - t0
            if not math.isfinite(step_loss):
                raise non_finite_loss(step, step_loss)
            metrics = objective.metrics(step_loss, totals, lr, step * tcfg.batch_size / len(objective.examples),
                                        seconds)
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            evaluated = has_eval and ((recipe.eval.every and step % recipe.eval.every == 0)
                                      or step == run.total_steps)
            if evaluated:
                metrics.update(objective.evaluate(model, par))
            run.log(step, metrics, always=evaluated)
            progress.update(step, metrics)
            run.checkpoint(step)
    return metrics


def supervised_data(run: Run, tokenizer, check: Callable, tokenize: Callable, count: Callable[[Any], int],
                    noun: str) -> tuple[Any, Any]:
    """The supervised trainers' data: the recipe's training and eval rows, ``check``-ed (``check(rows, data, path)``)
    and tokenized (``tokenize(rows, data, tokenizer, path)``); their notes printed. ``count(set)``: its examples."""
    recipe = run.recipe
    data, batch_size = recipe.data, recipe.train.batch_size
    train_rows, eval_rows = train_eval_rows(data, recipe.seed, check=lambda rows, path: check(rows, data, path))
    train_set = tokenize(train_rows, data, tokenizer, data.path)
    eval_set = tokenize(eval_rows, data, tokenizer, data.eval_path or data.path) if eval_rows else None
    print_notes(train_set.notes + [f"eval data: {n}" for n in (eval_set.notes if eval_set else [])], run.accelerator)
    if count(train_set) < batch_size and run.par.is_main_process:
        console.print(f"[yellow]note:[/] {count(train_set)} training {noun} is fewer than one batch ({batch_size}); "
                      f"batches repeat {noun} across epochs")
    return train_set, eval_set


def supervised_model(run: Run, load: Callable[[], torch.nn.Module], task: str, examples: int):
    """The supervised trainers' model: built (``load``; from scratch under the engine's rules), LoRA when the recipe
    asks, the run's length from ``examples``, a checkpoint's weights on ``--resume``, wrapped by the engine with
    its optimiser and schedule; then the run begins (``Run.begin``). Returns the wrapped model."""
    recipe = run.recipe
    with run.par.building(from_scratch=recipe.model.architecture is not None):
        model = load()
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora, task)
    total_steps, steps_key = steps_of(recipe, examples)
    weights = run.resume_point()
    if weights is not None:
        load_trainable_state(model, weights)
    model.train()
    model, optimizer, scheduler = run.prepare(model, total_steps)
    run.begin(model, optimizer, scheduler, total_steps=total_steps, steps_key=steps_key)
    return model


def steps_of(recipe: RecipeBase, examples: int) -> tuple[int, str]:
    """A supervised run's length in optimizer steps (``train.max_steps``, or ``train.epochs`` over the examples)
    and the key that set it."""
    tcfg = recipe.train
    if tcfg.max_steps:
        return tcfg.max_steps, "train.max_steps"
    return max(1, math.ceil(tcfg.epochs * (examples / tcfg.batch_size))), "train.epochs"


def non_finite_loss(step: int, loss: float) -> UserError:
    """The error that stops a run whose training loss became NaN / inf (no final model is saved)."""
    return UserError(f"the training loss at step {step} is {loss} (not a finite number), so the run stopped there "
                     "and saved no model. Usual causes: a learning rate too high for this model "
                     "(optim.learning_rate), no gradient clipping (optim.max_grad_norm: null), or float16 overflow "
                     "(train.mixed_precision: fp16); start a new run with other settings (another output_dir, or "
                     "overwrite_output_dir=true)")
