"""Atomic, resumable checkpoints: ``OUTPUT_DIR/checkpoints/step-00000042/``.

A checkpoint is written into ``step-N.tmp`` and renamed when complete, so a run killed mid-save never leaves
a checkpoint that looks finished. Every process saves its own RNG states (``rng-RANK.pt``), the main process
everything else. Works with any object that has ``state_dict()`` / ``load_state_dict()``. The end of the file
saves and restores a training run's weights and optimizer under any engine (``rlcli.parallel.Parallel``).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlcli import rundir
from rlcli.config.errors import UserError

CHECKPOINTS = "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    accelerator,
    objects: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``objects`` (name -> tensor dict or object with ``state_dict``), JSON ``state`` and RNG states.

    All processes must call it (it synchronises them). ``objects`` are written by the main process;
    ``write_shards(directory)``, when given, runs on every process into the same directory before it is published
    (sharded optimizer state: ``rlcli.parallel.Parallel.save_shards``).
    """
    final = Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        rundir.claim(output_dir, CHECKPOINTS)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if write_shards is not None:
            write_shards(tmp)
        if accelerator.is_main_process:
            for name, obj in objects.items():
                torch.save(obj.state_dict() if hasattr(obj, "state_dict") else obj, tmp / f"{name}.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            recipe = Path(output_dir) / rundir.RECIPE_FILE
            if recipe.is_file():  # what --resume compares its recipe with (the run's own copy changes on resume)
                shutil.copyfile(recipe, tmp / rundir.RECIPE_FILE)
    except (OSError, RuntimeError) as exc:
        # a full disk: the half-written checkpoint goes, the previous one (a finished rename) stays untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise rundir.as_no_space(exc, tmp) from None
    except BaseException:  # Ctrl-C, or a failure elsewhere that stops this process: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None when every one loads (``state.json`` parses with its step,
    each ``.pt`` opens, memory-mapped so that big files cost no copy)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"state.json: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    if not list(path.glob("*.pt")):
        return "it holds no .pt files"
    for file in sorted(path.glob("*.pt")):
        try:
            torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # any failure to load is a damaged file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{file.name}: {first[:200]}"
    return None


def load_checkpoint(path: Path, *, process_index: int,
                    restore_rng: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (state.json contents, {name: loaded object}) and restore this process's RNG states.

    ``restore_rng=False`` leaves the RNG alone, for a caller that still has to build things the way the original run
    built them (from its seeds) before continuing; it then calls :func:`restore_rng_state` itself.
    """
    state = json.loads((path / "state.json").read_text())
    objects = {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in path.glob("*.pt")
               if not p.stem.startswith(("rng-", "optimizer-shard-"))}
    if restore_rng:
        restore_rng_state(path, process_index=process_index)
    return state, objects


def restore_rng_state(path: Path, *, process_index: int) -> None:
    """This process's RNG states from a checkpoint. The RNG file of this process is used when present; a run resumed
    with more processes than it was saved with falls back to rank 0's (it continues, but not bit-identically)."""
    rng_file = path / f"rng-{process_index}.pt"
    if not rng_file.exists():
        rng_file = path / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))


# --- a training run's weights and optimizer, under any engine ------------------------------------------------


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's weights into ``model`` (before it is prepared): every trainable weight must be there."""
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
    weights = par.full_state_dict(model)  # collective under sharding
    if not full:
        trainable = {n for n, p in par.unwrap(model).named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in trainable}
    objects: dict[str, Any] = {"model": {k: v.clone() for k, v in weights.items()}, "scheduler": scheduler}
    if not par.optimizer_in_shards:
        objects["optimizer"] = optimizer
    save_checkpoint(out, step, accelerator=par.accelerator, keep=keep, state=state, objects=objects,
                    write_shards=lambda directory: par.save_shards(directory, model, optimizer))
