"""The life of a training run, written once for ``rlcli sft``, ``rlcli rm`` and ``rlcli ppo``.

``Run`` owns what every trainer does around its own step: the output dir (checked and locked before anything
loads, taken over only once every input has), the parallel engine, the checkpoint a ``--resume`` starts from,
optimiser and schedule, trackers and ``metrics.jsonl``, the progress bar, checkpoints on schedule, and the final
save on every process together. The supervised loop is ``trainers/supervised.py``; PPO's step lives in
``rlcli.ppo``, its loop in ``trainers/ppo.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rlcli import peers, signals
from rlcli.checkpoint import (
    CHECKPOINTS,
    load_checkpoint,
    restore_optimizer,
    restore_rng_state,
    save_training_checkpoint,
)
from rlcli.config.common import RecipeBase
from rlcli.host import cpu_threads, host_memory_in_force
from rlcli.logging import MetricsLog, TrainingProgress, console
from rlcli.models.loading import checkpointing
from rlcli.optim import make_optimizer
from rlcli.parallel import Parallel
from rlcli.plots import write_curves
from rlcli.rundir import RunDir


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


def describe_model(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable / {total:,} parameters" + (", gradient checkpointing" if checkpointing(model) else "")


def print_notes(notes: list[str], accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
