"""The life of a training run, written once for ``rlcli sft``, ``rlcli rm`` and ``rlcli ppo``.

``Run`` owns what every trainer does around its own step: the output dir (checked and locked before anything
loads, taken over only once every input has), the parallel engine, the checkpoint a ``--resume`` starts from,
optimiser and schedule, trackers and ``metrics.jsonl``, the progress bar, checkpoints on schedule, and the final
save on every process together. ``supervised_steps`` is the optimisation loop of the two supervised trainers (a
seeded batch stream split over processes and micro-batches, a loss normalised over the *global* batch, evaluation,
logging); a trainer supplies its ``Objective``. PPO's step lives in ``rlcli.ppo``; its loop is ``trainers/ppo.py``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from rlcli import peers, signals
from rlcli.rundir import RunDir
from rlcli.checkpoint import CHECKPOINTS, load_checkpoint, restore_rng_state
from rlcli.config.common import OptimConfig, RecipeBase
from rlcli.config.errors import UserError
from rlcli.data.sources import train_eval_rows
from rlcli.host import cpu_threads, host_memory_in_force
from rlcli.logging import MetricsLog, TrainingProgress, console
from rlcli.models.loading import apply_lora, checkpointing
from rlcli.parallel import Parallel
from rlcli.plots import write_curves
from rlcli.seeds import index_stream


class Run:
    """One training run, from its checks to its final save (every process builds one).

    The order is the contract: ``Run(...)`` checks and locks the output dir and starts the parallel engine;
    ``resume_point()`` reads the checkpoint to resume from (if any); the trainer builds its data and model;
    ``begin(...)`` restores the optimiser, takes the output dir over (nothing of an earlier run is touched before),
    starts trackers and the metrics log; ``steps()`` / ``log`` / ``checkpoint`` run the loop; ``end`` saves.
    """

    def __init__(self, recipe: RecipeBase, *, resume: bool, batch_size: int, micro_batch_size: int):
        self.recipe = recipe
        self.dir = RunDir.of(recipe)
        self.resume_from = self.dir.open(recipe, resume=resume)
        train = recipe.train
        try:
            self.par = Parallel(recipe, mixed_precision=train.mixed_precision, tf32=train.tf32, batch_size=batch_size,
                                micro_batch_size=micro_batch_size, max_grad_norm=recipe.optim.max_grad_norm)
        except BaseException:
            self.dir.release(ok=False)
            raise
        peers.watch()  # from now on a failure of any process stops every process of the run
        self.accelerator = self.par.accelerator
        self.threads = cpu_threads(self.par.num_processes)
        self.host_memory = host_memory_in_force(train.host_memory)
        self.out = Path(recipe.output_dir)
        self.start_step = 0
        self.state: dict[str, Any] = {}  # the checkpoint's trainer state (PPO: the learner's)
        self.objects: dict[str, Any] = {}
        # what a checkpoint holds: every weight, or only the trainable ones (LoRA on a hub base)
        self.full_state = getattr(recipe, "lora", None) is None or recipe.model.architecture is not None
        self.total_steps = 0
        self.model = self.optimizer = self.scheduler = None
        self.log_file: MetricsLog | None = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # a run that ends here without end() failed or was stopped: the other processes hear of it first (before
        # anything here that could take time), then a run it replaced comes back unless it stands
        if isinstance(exc, Exception):
            peers.announce(exc)
        self.dir.__exit__(kind, exc, tb)
        peers.unwatch()

    @classmethod
    def supervised(cls, recipe: RecipeBase, resume: bool) -> "Run":
        """The run of a supervised trainer (sft, rm): its batch sizes are ``train``'s."""
        return cls(recipe, resume=resume, batch_size=recipe.train.batch_size,
                   micro_batch_size=recipe.train.micro_batch_size)

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    @property
    def resume_step(self) -> int | None:
        """The checkpoint's step on ``--resume``, None for a fresh run."""
        return self.start_step if self.resuming else None

    def resume_point(self, *, restore_rng: bool = True) -> dict | None:
        """Read the checkpoint to resume from: its step and state; returns its weights (None for a fresh run).
        ``restore_rng=False`` leaves the RNG alone until ``restore_rng()`` (a from-scratch PPO policy and its
        reference copy must be built from the seed first)."""
        if not self.resuming:
            return None
        self.state, self.objects = load_checkpoint(self.resume_from, process_index=self.par.process_index,
                                                   restore_rng=restore_rng)
        self.start_step = self.state["step"]
        return self.objects["model"]

    def restore_rng(self) -> None:
        if self.resuming:
            restore_rng_state(self.resume_from, process_index=self.par.process_index)

    def prepare(self, model, optimizer_steps: int):
        """The model wrapped by the engine, with its AdamW and LR schedule over ``optimizer_steps``."""
        return self.par.prepare(model, lambda named: make_optimizer((p for _, p in named), self.recipe.optim,
                                                                    optimizer_steps))

    def begin(self, model, optimizer, scheduler, *, total_steps: int, steps_key: str) -> None:
        """Restore the optimiser on ``--resume``, take the output dir over, start trackers and ``metrics.jsonl``."""
        self.model, self.optimizer, self.scheduler, self.total_steps = model, optimizer, scheduler, total_steps
        if self.resuming:
            restore_optimizer(self.par, self.resume_from, self.objects, model, optimizer, scheduler)
        if self.resuming:
            self.dir.check_forward(self.start_step, total_steps, steps_key)
        self.dir.take_over(replace=not self.resuming)
        self.dir.write_recipe(self.recipe)
        start_trackers(self.accelerator, self.recipe)
        self.log_file = MetricsLog(self.out, is_main=self.par.is_main_process,
                                   tracker=self.accelerator if self.recipe.logging.report_to else None,
                                   resume_step=self.resume_step)

    def announce(self, text: str) -> None:
        """The run's header line (main process): ``text``, the processes, where a resume starts."""
        if self.par.is_main_process:
            console.print(text + (f", {self.par.describe()}" if self.par.num_processes > 1 else "")
                          + f", {self.threads} CPU thread{'s' if self.threads != 1 else ''}"
                          + (f", {self.host_memory}" if self.host_memory else "")
                          + (f", resuming at step {self.start_step}" if self.start_step else ""))

    def progress(self, name: str, shown: tuple[str, ...]) -> TrainingProgress:
        enabled = self.par.is_main_process and self.recipe.logging.progress
        return TrainingProgress(name, self.total_steps, enabled=enabled, start=self.start_step, shown=shown,
                                every_s=self.recipe.logging.progress_every_s)

    def steps(self) -> range:
        """The steps left to train; from now on a stop signal waits for the end of the step in progress."""
        signals.defer_to_step_end()
        return range(self.start_step + 1, self.total_steps + 1)

    def log(self, step: int, metrics: dict[str, Any], *, always: bool = False) -> None:
        """Into ``metrics.jsonl`` (and trackers) every ``logging.log_every`` steps, at the last step, or ``always``."""
        if always or step % self.recipe.logging.log_every == 0 or step == self.total_steps:
            self.log_file.log(step, metrics)

    def checkpoint(self, step: int, state: dict[str, Any] | None = None) -> None:
        """The end of a step (every process): a checkpoint when ``train.save_every`` says so, and at the last step
        too (so that ``--resume`` with more steps goes on from there), or when a stop signal came during the step
        (``rlcli.signals``): then the run stops here (``Stopped``), to be continued with ``--resume``."""
        train = self.recipe.train
        last = step == self.total_steps
        stop = None if last else self._stop_requested()  # at the last step the run ends anyway
        due = bool(train.save_every) and (step % train.save_every == 0 or last)
        if due or stop:
            save_training_checkpoint(self.par, self.out, step, self.model, self.optimizer, self.scheduler,
                                     full=self.full_state, keep=train.keep_checkpoints, state=state or {})
            self.dir.commit()  # the run stands: the run it replaced goes
        if stop:
            raise signals.Stopped(stop, step=step, checkpoint=self.out / CHECKPOINTS / f"step-{step:08d}")

    def _stop_requested(self) -> int | None:
        """The stop signal any process received (the one of the lowest rank that got one), agreed by all."""
        mine = signals.requested() or 0
        if self.par.num_processes == 1:
            return mine or None
        got = [int(s) for s in self.par.gather(torch.tensor([mine], device=self.par.device)).tolist() if s]
        return got[0] if got else None

    def end(self, save: Callable[[Any], None], done: Callable[[], str],
            curves: list[tuple[str, ...]] = ()) -> Path:
        """Gather the trained model (collective under sharding), ``save`` it on the main process, draw ``curves``
        (panels of metric names: ``rlcli.plots``), say ``done()``, and end the run on every process together."""
        plain = self.par.materialise(self.model)
        if self.par.is_main_process:
            save(plain)
            try:
                write_curves(self.out, list(curves))
            except (OSError, ValueError, RuntimeError) as exc:  # a drawing never costs a finished run
                console.print(f"[yellow]note:[/] no curves.png ({exc})")
            console.print(f"[green]done[/]: {done()}")
        self.finish()
        return self.out

    def finish(self) -> None:
        """End the run on every process together: the others let go of the directory, then the main process marks
        it finished and releases it (the run it replaced goes); trackers close.

        Not ``accelerator.end_training()``: that also destroys the process group while the trainer still holds its
        DDP model, which is how gloo's teardown deadlocks; :func:`rlcli.launch.release_distributed` destroys it once
        the model is gone (see there)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if not self.dir.main:
            self.dir.release(ok=True)
        accelerator.wait_for_everyone()
        peers.unwatch()
        self.dir.finish()
        for tracker in accelerator.trackers:
            tracker.finish()


# --- the supervised loop (sft, rm) --------------------------------------------------------------------------------


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
    from rlcli.models.loading import load_model, load_tokenizer, model_task

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


# --- the pieces -------------------------------------------------------------------------------------------------


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW and its schedule over ``params``: parameters, or AdamW parameter groups (dicts with ``params``)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"checkpoint does not match the model: unexpected weights {unexpected[:5]}")
    trainable_missing = [n for n, p in model.named_parameters() if p.requires_grad and n in missing]
    if trainable_missing:
        raise UserError(f"checkpoint does not match the model: missing trainable weights {trainable_missing[:5]}")


def restore_optimizer(par, checkpoint: Path, objects: dict[str, Any], model, optimizer, scheduler) -> None:
    """The optimizer state and schedule of a checkpoint, into the prepared model's optimizer (after ``prepare``;
    the weights were loaded into the model before it, with ``load_trainable_state``)."""
    if par.optimizer_in_shards:
        par.load_shards(checkpoint, model, optimizer)
    else:
        optimizer.load_state_dict(objects["optimizer"])
    scheduler.load_state_dict(objects["scheduler"])


def save_training_checkpoint(par, out: Path, step: int, model, optimizer, scheduler, *, full: bool, keep: int,
                             state: dict[str, Any]) -> None:
    """A checkpoint of a training run under any engine (every process calls it): the model's weights (all, or the
    trainable ones for LoRA on a hub base) and the schedule from the main process, the optimizer state whole from
    the main process or in shards from every process (``rlcli.parallel.Parallel``), RNG states of each process."""
    from rlcli.checkpoint import save_checkpoint

    weights = par.full_state_dict(model)  # collective under sharding
    if not full:
        trainable = {n for n, p in par.unwrap(model).named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in trainable}
    objects: dict[str, Any] = {"model": {k: v.clone() for k, v in weights.items()}, "scheduler": scheduler}
    if not par.optimizer_in_shards:
        objects["optimizer"] = optimizer
    save_checkpoint(out, step, accelerator=par.accelerator, keep=keep, state=state, objects=objects,
                    write_shards=lambda directory: par.save_shards(directory, model, optimizer))


def start_trackers(accelerator: Accelerator, recipe: RecipeBase) -> None:
    if recipe.logging.report_to:
        run_name = recipe.logging.run_name or Path(recipe.output_dir).name
        init = {"wandb": {"name": run_name}} if "wandb" in recipe.logging.report_to else {}
        flat = json.loads(json.dumps(recipe.model_dump(mode="json")))
        accelerator.init_trackers(recipe.logging.project, config=_flatten(flat), init_kwargs=init)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def non_finite_loss(step: int, loss: float) -> UserError:
    """The error that stops a run whose training loss became NaN / inf (no final model is saved)."""
    return UserError(f"the training loss at step {step} is {loss} (not a finite number), so the run stopped there "
                     "and saved no model. Usual causes: a learning rate too high for this model "
                     "(optim.learning_rate), no gradient clipping (optim.max_grad_norm: null), or float16 overflow "
                     "(train.mixed_precision: fp16); start a new run with other settings (another output_dir, or "
                     "overwrite_output_dir=true)")


def describe_model(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable / {total:,} parameters" + (", gradient checkpointing" if checkpointing(model) else "")


def print_notes(notes: list[str], accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
