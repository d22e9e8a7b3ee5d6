"""Functions every trainer uses: output-dir safety, the Accelerator, optimiser and schedule, final save."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from rlcli.checkpoint import CHECKPOINTS, latest_checkpoint
from rlcli.config.common import OptimConfig, RecipeBase
from rlcli.config.errors import UserError
from rlcli.config.loader import recipe_to_yaml
from rlcli.logging import METRICS_FILE, console

RECIPE_FILE = "recipe.yaml"


def prepare_output_dir(recipe: RecipeBase, resume: bool) -> Path | None:
    """Check the output dir can be used; return the checkpoint to resume from (or None).

    A fresh run refuses a directory that already holds a run unless ``overwrite_output_dir`` is set, so a typo
    never silently destroys results; ``--resume`` needs a checkpoint.
    """
    out = Path(recipe.output_dir)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume to start fresh")
        return ckpt
    has_run = (out / METRICS_FILE).exists() or (out / CHECKPOINTS).exists() or (out / RECIPE_FILE).exists()
    if has_run and not recipe.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} already holds a run; pass --resume to continue it, choose another output_dir, "
            "or set overwrite_output_dir=true to replace it"
        )
    return None


def clear_output_dir(out: Path) -> None:
    """Remove a previous run's files (only called with overwrite_output_dir and a dir that holds a run)."""
    if (out / RECIPE_FILE).exists() or (out / METRICS_FILE).exists():
        shutil.rmtree(out)


def make_accelerator(recipe: RecipeBase, mixed_precision: str, *, tf32: bool = True) -> Accelerator:
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or 'no' on CPU")
    set_tf32(tf32)
    log_with = list(recipe.logging.report_to) or None
    # Without CUDA, say cpu=True: Accelerate then treats a multi-process launch (torchrun, or
    # `accelerate launch --multi_gpu`) as MULTI_CPU with gloo instead of silently running N independent copies.
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=recipe.output_dir,
                              cpu=not torch.cuda.is_available())
    # Each process derives its own seed (seed + process index; ppo-details item 16). Initial weights still agree:
    # DDP broadcasts rank 0's parameters when the model is prepared.
    set_seed(recipe.seed, device_specific=True)
    return accelerator


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
    if accelerator.is_main_process:
        out = Path(recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def trainable_state(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: everything, or only the trainable tensors (LoRA on a hub base)."""
    if full:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


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
    shutil.rmtree(tmp, ignore_errors=True)
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


def describe_model(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable / {total:,} parameters"


def print_notes(notes: list[str], accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
