"""The output directory of a run: checked before anything loads, taken once every input has, and the checks of a
``--resume`` (the same command, the same settings, only forward). ``rlcli.rundir`` keeps its files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlcli import rundir
from rlcli.checkpoint import latest_checkpoint
from rlcli.commands import command_of
from rlcli.config.common import RecipeBase
from rlcli.config.errors import NothingToDo, Problem, RecipeError, UserError
from rlcli.config.loader import Origin, locate, recipe_to_yaml
from rlcli.logging import console
from rlcli.rundir import RECIPE_FILE


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_output_dir(recipe: RecipeBase, resume: bool = False) -> list[Problem]:
    """Problems with ``output_dir`` findable before anything is loaded or written (``--dry-run`` reports them):
    the working directory or one above it, a file, not writable, holding files rlcli did not write, or holding
    one of the run's own inputs."""
    out = Path(recipe.output_dir)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the working directory" if resolved == cwd else f"a parent of the working directory ({cwd})"
        return [Problem("output_dir", f"{recipe.output_dir!r} is {where}; a run needs a directory of its own (such as "
                                      "runs/NAME), since it fills it with its files and overwrite_output_dir replaces "
                                      "them")]
    if out.exists() and not out.is_dir():
        return [Problem("output_dir", f"{out} is a file, not a directory")]
    inside = inputs_inside(recipe)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return inside + [Problem("output_dir", f"{out} cannot be created: {existing} is a file")]
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        target = "" if existing == out else f" cannot be created: {existing}"
        return inside + [Problem("output_dir", f"{out}{target} {why}")]
    others = rundir.foreign(out)
    if others and not resume:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return inside + [Problem("output_dir", (
            f"{out} holds files rlcli did not write ({shown}); a run writes only into an empty directory or one "
            "holding rlcli's own files, so that replacing a run never deletes yours: choose another output_dir, or "
            "move those files away"))]
    return inside


# keys whose values are never read as input paths
_NOT_INPUTS = ("output_dir", "overwrite_output_dir", "logging.", "seed")


def _leaves(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}{i}.")
    elif isinstance(value, str):
        yield prefix[:-1], value


def inputs_inside(recipe: RecipeBase) -> list[Problem]:
    """Recipe values naming an existing file or directory inside ``output_dir`` (a model, data, a plug-in's
    ``file.py:name``): a run replaces what is there, so it would destroy its own input."""
    out = Path(recipe.output_dir).expanduser()
    if not out.is_dir():
        return []
    out = out.resolve()
    problems = []
    for key, value in _leaves(recipe.model_dump(mode="json")):
        if key.startswith(_NOT_INPUTS) or not value or "\n" in value or len(value) > 4096:
            continue
        candidates = [value] + ([value.rsplit(":", 1)[0]] if ":" in value else [])
        for candidate in candidates:
            try:
                path = Path(candidate).expanduser()
                if not path.exists():
                    continue
                path = path.resolve()
            except (OSError, ValueError):
                continue
            if path == out or out in path.parents:
                problems.append(Problem(key, (
                    f"{value} is inside output_dir {recipe.output_dir}, which this run writes into (and replaces "
                    "on overwrite or resume): the run would destroy its own input. Copy it out first (e.g. cp -r "
                    f"{recipe.output_dir} {recipe.output_dir.rstrip('/')}-input, then {key}=that copy), or choose "
                    "another output_dir")))
                break
    return problems


def check_trackers(recipe: RecipeBase) -> list[Problem]:
    """``logging.report_to`` trackers whose package is missing (Accelerate would skip them without a word)."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    problems = []
    for i, name in enumerate(recipe.logging.report_to):
        if not any(importlib.util.find_spec(p) for p in packages[name]):
            problems.append(Problem(f"logging.report_to.{i}", f"{name} is not installed in this environment; install "
                                                              f"it (pip install {name}, or pip install "
                                                              f"'rlcli[{name}]') or remove it from report_to"))
    return problems


def check_model_fits_recipe(recipe: RecipeBase) -> list[Problem]:
    """``models.loading.check_model_fits`` for a recipe of any command: its model(s), LoRA and the longest inputs
    it gives them (all read from the recipe; the model is built on the meta device, no weights)."""
    from rlcli.models.loading import check_model_fits, model_task

    kind = type(recipe).__name__
    task = "classifier" if kind == "RMRecipe" else model_task(recipe.model)
    lengths: tuple = ()
    data, gen, env = getattr(recipe, "data", None), getattr(recipe, "generation", None), getattr(recipe, "env", None)
    if kind in ("SFTRecipe", "RMRecipe"):
        lengths = (("data.max_length", data.max_length, "a training text"),)
    elif env is not None and task == "causal":
        lengths = (("env.max_length", env.max_length, "an episode"),)
    elif gen is not None and task == "causal":
        # the prompt's length depends on the data; the response alone must fit, beside at least one prompt token
        lengths = (("generation.max_new_tokens", gen.max_new_tokens + 1, "a response and its prompt's last token",
                    1),)
    problems = check_model_fits(recipe.model, task, lora=getattr(recipe, "lora", None), lengths=lengths)
    ref = getattr(recipe, "ref_model", None)
    if ref is not None:
        problems += check_model_fits(ref, task, key="ref_model", lengths=lengths)
    return problems


def check_run_setup(recipe: RecipeBase, resume: bool = False, origin: Origin | str = "recipe") -> None:
    """Raise one ``RecipeError`` for the output dir's and the trackers' problems (see ``check_output_dir``)."""
    problems = check_output_dir(recipe, resume) + check_trackers(recipe)
    if problems:
        raise RecipeError(locate(problems, origin))


def lock_output_dir(out: Path) -> None:
    """Take the output dir for this run (main process): an OS lock held for the run's life (``rundir.lock``); a
    second run into it is refused at once, however close together the two started."""
    if not _is_main():
        return
    try:
        rundir.lock(out)
    except rundir.InUse:
        pid = rundir.holder(out)
        who = f"rlcli process {pid}" if pid is not None else "another rlcli process"
        raise UserError(f"output_dir {out} is in use: {who} is running there; wait for it to end (or stop it), "
                        "or choose another output_dir") from None
    for old in rundir.leftover_trash(out):
        console.print(f"[yellow]note:[/] {old} holds the files of a run that a later run into {out} replaced and "
                      "that run was killed before it had a checkpoint; move them back into place, or delete it")


def check_resume_kind(recipe: RecipeBase) -> None:
    """``--resume`` of a run another command wrote (an sft run under ``rlcli ppo``): said before anything else."""
    out = Path(recipe.output_dir)
    manifest = rundir.read_manifest(out)
    kind = type(recipe).__name__
    if manifest is not None and manifest.get("recipe") not in (None, kind):
        raise UserError(f"--resume: {out} holds an `rlcli {command_of(manifest.get('recipe'))}` run; "
                        f"`rlcli {command_of(kind)}` cannot continue it (to train on from its model, start a new run "
                        f"in another output_dir with model.name_or_path={out})")


def prepare_output_dir(recipe: RecipeBase, resume: bool) -> Path | None:
    """Check the output dir can be used and take it (the lock); return the checkpoint to resume from (or None).

    Nothing is removed here: an earlier run is moved aside by :func:`take_over`, once every input has loaded.
    A fresh run refuses a directory that already holds a run unless ``overwrite_output_dir`` is set, so a typo
    never silently destroys results; it reuses, without asking, one whose run stopped before its first
    checkpoint (nothing there can be resumed). ``--resume`` needs a checkpoint and the recipe the checkpoint was
    trained with, apart from the settings listed in ``RESUME_MAY_CHANGE``.
    """
    check_run_setup(recipe, resume)
    out = Path(recipe.output_dir)
    lock_output_dir(out)
    manifest = rundir.read_manifest(out)
    has_run = rundir.has_run(out)
    finished = manifest is not None and manifest.get("state") == "finished"
    if resume:
        if has_run:
            check_resume_kind(recipe)
        newest = latest_checkpoint(out)
        if newest is not None and (newest / RECIPE_FILE).is_file():
            check_resume_recipe(recipe, newest)  # settings first: said without loading anything
        ckpt, notes = usable_checkpoint(out)
        if _is_main():
            for note in notes:
                console.print(f"[yellow]note:[/] {note}")
        if ckpt is None:
            if not has_run:
                raise UserError(f"--resume: {out} holds no run, so no checkpoint to resume from; run the same "
                                "command without --resume to start one")
            if notes:
                raise UserError(f"--resume: no checkpoint in {out} can be read ({'; '.join(notes)}); the run cannot "
                                "be continued: start it over (overwrite_output_dir=true) or in another output_dir")
            if finished:
                raise UserError(f"--resume: the run in {out} finished and kept no checkpoint (train.save_every was "
                                "null or above its length), so it cannot be continued; its model is in place. To "
                                f"train longer, start a new run from it (model.name_or_path={out} and another "
                                "output_dir), or start over with overwrite_output_dir=true")
            raise UserError(f"--resume: the run in {out} stopped before its first checkpoint, so there is nothing "
                            "to resume from (checkpoints are written every train.save_every steps); run the same "
                            "command without --resume to start it over: a fresh run reuses the directory of a run "
                            "that never reached a checkpoint")
        check_resume_recipe(recipe, ckpt)
        return ckpt
    if has_run:
        stopped_early = (manifest is not None and manifest.get("state") == "running"
                         and latest_checkpoint(out) is None)
        if stopped_early:
            if _is_main():
                console.print(f"[yellow]note:[/] {out} holds a run that stopped before its first checkpoint (nothing "
                              "to resume); starting over in it")
        elif not recipe.overwrite_output_dir:
            if latest_checkpoint(out) is not None:
                how = "pass --resume to continue it from its newest checkpoint, "
            else:
                how = ("it kept no checkpoint, so it cannot be continued (to train on from its model: "
                       f"model.name_or_path={out} in another output_dir); ")
            raise UserError(
                f"output_dir {out} already holds a run; {how}choose another output_dir, or set "
                "overwrite_output_dir=true to replace it (only the files rlcli wrote are replaced, and only once "
                "the new run has loaded its inputs)"
            )
    return None


def usable_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files all load, and a note for each newer one that did not (skipped)."""
    from rlcli.checkpoint import checkpoint_dirs, verify_checkpoint

    notes = []
    for ckpt in reversed(checkpoint_dirs(out)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if notes:
                notes.append(f"resuming from {ckpt.name} instead")
            return ckpt, notes
        notes.append(f"checkpoint {ckpt} cannot be read ({problem}); it is skipped")
    return None, notes


def _last_logged_step(out: Path) -> int | None:
    from rlcli.logging import read_metrics

    try:
        steps = [r.get("step") for r in read_metrics(out)]
    except (OSError, ValueError):
        return None
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def resume_length(recipe: RecipeBase) -> tuple[int, str] | None:
    """A recipe's run length in steps and its key, when the recipe alone says it (not counted from the data)."""
    ppo = getattr(recipe, "ppo", None)
    if ppo is not None and hasattr(ppo, "steps"):
        return ppo.steps, "ppo.steps"
    train = getattr(recipe, "train", None)
    if train is not None and getattr(train, "max_steps", None):
        return train.max_steps, "train.max_steps"
    return None


def check_resume_forward(out: Path, start_step: int, total_steps: int, key: str,
                         origin: Origin | str = "recipe") -> None:
    """A resumed run only goes forward: refused when its new length (``key``) ends at or before the checkpoint's
    step, or before the step a finished run reached; "nothing to do" when it ends where the finished run did. The
    finished model is never replaced by an older one."""
    manifest = rundir.read_manifest(out) or {}
    finished_at = _last_logged_step(out) if manifest.get("state") == "finished" else None
    if finished_at is not None and total_steps == finished_at:
        raise NothingToDo(f"the run in {out} already finished at step {finished_at}, the length asked for; its "
                          f"model is in place (raise {key} to train longer)")
    if finished_at is not None and total_steps < finished_at:
        raise RecipeError(locate([Problem(key, (
            f"--resume would end at step {total_steps}, but the run in {out} finished at step {finished_at}: resuming "
            f"from its checkpoint at step {start_step} would replace the finished model with a less trained one. "
            f"A resume only goes forward: set {key} above {finished_at}, or keep the finished model"))], origin))
    if total_steps <= start_step:
        raise RecipeError(locate([Problem(key, (
            f"--resume would end at step {total_steps}, but the newest checkpoint in {out} is at step {start_step}: "
            f"a resume only goes forward; set {key} above {start_step}"))], origin))


def take_over(recipe: RecipeBase, accelerator: Accelerator, *, total_steps: int | None = None,
              start_step: int | None = None, steps_key: str = "train.max_steps") -> None:
    """Begin writing into the output dir, once every input has loaded (every process calls it): a resume is checked
    to go forward (``start_step``: the checkpoint's step), a replaced run is moved aside (``rundir.take_over``;
    deleted at this run's first checkpoint or end, put back if it fails first), the recipe is written."""
    out = Path(recipe.output_dir)
    if start_step is not None and total_steps is not None:
        check_resume_forward(out, start_step, total_steps, steps_key)
    if accelerator.is_main_process and start_step is None:
        rundir.take_over(out)
    write_recipe(recipe, accelerator)


def write_recipe(recipe: RecipeBase, accelerator: Accelerator) -> None:
    """Write the resolved recipe and mark the output dir as holding this (running) run."""
    if accelerator.is_main_process:
        out = Path(recipe.output_dir)
        rundir.adopt_legacy(out)
        rundir.start(out, type(recipe).__name__)
        rundir.claim(out, RECIPE_FILE)
        if "tensorboard" in recipe.logging.report_to:
            rundir.claim(out, recipe.logging.project)  # Accelerate's TensorBoard tracker writes into OUT/PROJECT
        (out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))


# Settings --resume may change: they do not alter the sequence of updates (how long it runs, what is logged,
# saved or evaluated, micro-batches that only regroup the same batch).
RESUME_MAY_CHANGE = (
    "output_dir", "overwrite_output_dir", "logging", "train.max_steps", "train.epochs", "ppo.steps",
    "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_batch_size", "train.sample_every",
    "train.samples_per_log", "train.micro_batch_size", "ppo.micro_batch_size", "model.gradient_checkpointing",
    "train.host_memory",
    "lora.merge_on_save",
    # where the reward service is and how it is reached (the scores are the service's, wherever it runs)
    "reward.url", "reward.token_env", "reward.timeout_s", "reward.max_concurrency", "reward.retries",
    "reward.retry_backoff_s", "reward.verify_tls", "reward.ca_file",
)


_MISSING = object()


def _changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if a is _MISSING or b is _MISSING:
                continue  # a key of another rlcli version: nothing to compare
            found += _changes(a, b, f"{prefix}{key}.")
        return found
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_recipe(recipe: RecipeBase, ckpt: Path, origin: Origin | str = "recipe") -> None:
    """Refuse a resumed recipe that differs from the checkpoint's in a setting that changes the updates."""
    import yaml

    saved_path = ckpt / RECIPE_FILE
    if not saved_path.is_file():
        saved_path = ckpt.parent.parent / RECIPE_FILE
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    current = recipe.model_dump(mode="json")
    changed = [(k, a, b) for k, a, b in _changes(saved, current)
               if not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)]
    if not changed:
        return
    problems = locate([Problem(k, f"{_show(a)} -> {_show(b)}") for k, a, b in changed], origin)
    raise RecipeError(
        problems,
        title=f"--resume: {len(changed)} setting(s) differ from those the checkpoint was trained with ({saved_path}):",
        hint="A resumed run continues exactly as it was trained, so these must stay as they were (drop the "
             "overrides, or restore the recipe). --resume accepts changes to: more or fewer steps (train.max_steps, "
             "train.epochs, ppo.steps), logging.*, train.save_every, train.keep_checkpoints, train.eval_every, "
             "micro_batch_size and similar, the reward service's address and connection settings (reward.url, "
             "reward.timeout_s, ...). To train on with other settings, start a new run in another output_dir "
             "from this one's model (model.name_or_path=<this output_dir>).",
    )
