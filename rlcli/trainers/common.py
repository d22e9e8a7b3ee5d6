"""Functions every trainer uses: output-dir safety, the Accelerator, optimiser and schedule, final save."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from rlcli.checkpoint import latest_checkpoint
from rlcli.config.common import OptimConfig, RecipeBase
from rlcli import rundir
from rlcli.config.errors import NothingToDo, Problem, RecipeError, UserError
from rlcli.config.loader import Origin, locate, recipe_to_yaml
from rlcli.logging import console
from rlcli.rundir import RECIPE_FILE


COMMANDS = {"SFTRecipe": "sft", "RMRecipe": "rm", "PPORecipe": "ppo", "EnvRolloutRecipe": "env-rollout"}


def _command(recipe_type: str | None) -> str:
    return COMMANDS.get(recipe_type or "", "an older rlcli")


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


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
        raise UserError(f"--resume: {out} holds an `rlcli {_command(manifest.get('recipe'))}` run; "
                        f"`rlcli {_command(kind)}` cannot continue it (to train on from its model, start a new run "
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


# Settings --resume may change: they do not alter the sequence of updates (how long it runs, what is logged,
# saved or evaluated, micro-batches that only regroup the same batch).
RESUME_MAY_CHANGE = (
    "output_dir", "overwrite_output_dir", "logging", "train.max_steps", "train.epochs", "ppo.steps",
    "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_batch_size", "train.sample_every",
    "train.samples_per_log", "train.micro_batch_size", "ppo.micro_batch_size", "model.gradient_checkpointing",
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


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA; nothing changes on CPU.

    Through the ``allow_tf32`` switches rather than torch's newer per-backend ``fp32_precision`` ones: once the
    new ones are set, reading the old ones raises ("mix of legacy and new APIs"), and libraries (Accelerate
    among them) still use the old ones. Both read back consistently this way.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


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


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


def trainable_state(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: everything, or only the trainable tensors (LoRA on a hub base)."""
    if full:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


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
    if par.is_main_process:
        rundir.commit()  # the run stands: the run it replaced goes


def restore_optimizer(par, checkpoint: Path, objects: dict[str, Any], model, optimizer, scheduler) -> None:
    """The optimizer state and schedule of a checkpoint, into the prepared model's optimizer (after ``prepare``;
    the weights were loaded into the model before it, with ``load_trainable_state``)."""
    if par.optimizer_in_shards:
        par.load_shards(checkpoint, model, optimizer)
    else:
        optimizer.load_state_dict(objects["optimizer"])
    scheduler.load_state_dict(objects["scheduler"])


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"checkpoint does not match the model: unexpected weights {unexpected[:5]}")
    trainable_missing = [n for n, p in model.named_parameters() if p.requires_grad and n in missing]
    if trainable_missing:
        raise UserError(f"checkpoint does not match the model: missing trainable weights {trainable_missing[:5]}")


def save_final_model(model, tokenizer, output_dir: str | Path, *, built_from_scratch: bool, merge: bool) -> None:
    """Save the model in Hugging Face format into ``output_dir`` (weights written to a temp dir, then moved).

    A LoRA model saves its adapter (``adapter_config.json``); if its base was built from scratch, the base is
    saved beside it under ``base/`` and the adapter points at it, since no hub holds that base.
    """
    out = Path(output_dir)
    tmp = out / ".final.tmp"
    rundir.claim(out, tmp.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_final(model, tokenizer, out, tmp, built_from_scratch=built_from_scratch, merge=merge)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written model goes; checkpoints stay
        raise rundir.as_no_space(exc, tmp) from None


def _save_final(model, tokenizer, out: Path, tmp: Path, *, built_from_scratch: bool, merge: bool) -> None:
    tmp.mkdir(parents=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        if built_from_scratch:
            # peft's unload() strips the LoRA layers without merging; do it on a copy to keep the adapter.
            base = copy.deepcopy(model).unload()
            base.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = str((out / "base").resolve())
        with warnings.catch_warnings():
            # peft looks for the base's config at its final path, which is only filled after the move below
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.save_pretrained(tmp)
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    rundir.apply_umask(tmp)
    rundir.claim(out, *(item.name for item in tmp.iterdir()))
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.rename(target)
    tmp.rmdir()


def finish(accelerator: Accelerator) -> None:
    """End a run on every process together: wait for the main process's final save and close trackers.

    Not ``accelerator.end_training()``: that also destroys the process group while the trainer still holds its
    DDP model, which is how gloo's teardown deadlocks; :func:`rlcli.launch.release_distributed` destroys it once
    the model is gone (see there)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and accelerator.project_dir:
        out = Path(accelerator.project_dir)
        for name in rundir.owned(out):  # files saved by other writers (safetensors ignores the umask)
            if (out / name).is_file():
                rundir.apply_umask(out / name)
        rundir.mark_finished(out)
        rundir.release(ok=True)  # the run it replaced goes; the output dir is free
    for tracker in accelerator.trackers:
        tracker.finish()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite ``module``'s parameters and buffers, in place, with process ``src``'s (what DDP does for the
    model it wraps; for models it does not wrap, such as PPO's frozen reference)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=src)


def non_finite_loss(step: int, loss: float, out: Path) -> UserError:
    """The error that stops a run whose training loss became NaN / inf (no final model is saved)."""
    return UserError(f"the training loss at step {step} is {loss} (not a finite number), so the run stopped there "
                     f"and saved no model in {out}. Usual causes: a learning rate too high for this model "
                     "(optim.learning_rate), no gradient clipping (optim.max_grad_norm: null), or float16 overflow "
                     "(train.mixed_precision: fp16); start a new run with other settings (another output_dir, or "
                     "overwrite_output_dir=true)")


def describe_model(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable / {total:,} parameters"


def print_notes(notes: list[str], accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
