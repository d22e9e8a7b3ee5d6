"""``rlcli sft``: supervised fine-tuning, full or LoRA, on an Accelerate loop.

Why an Accelerate loop and not ``transformers.Trainer``: rlcli's contracts (a ``metrics.jsonl`` line per step
with the same keys in every trainer, a global batch that is fixed whatever the number of processes, exact
resume on CPU, one checkpoint layout shared with PPO) are each a few lines here and a set of callbacks and
overrides there; PPO needs its own loop anyway, so SFT and PPO share the same pieces.

Steps of ``train``:
  1. check the recipe and the output dir; set up Accelerate and seeds
  2. tokenizer, rows -> tokenized examples (train / eval)
  3. model (+ LoRA), optimiser, LR schedule; restore a checkpoint on --resume
  4. for each optimizer step: take the step's global batch from a seeded index stream, split it across
     processes and into micro-batches, accumulate gradients with the loss normalised by the number of target
     tokens in the *global* batch (so 1 process × 4 micro-batches == 2 processes × 2), clip, step
  5. log, evaluate, checkpoint on schedule
  6. save the final model in Hugging Face format
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rlcli.checkpoint import load_checkpoint
from rlcli.parallel import Parallel
from rlcli.config.errors import Problem, RecipeError
from rlcli.config.loader import Origin, locate
from rlcli.config.sft import SFTRecipe
from rlcli.data.sft import IGNORE, TokenizedSet, check_rows, collate, tokenize_rows
from rlcli.data.sources import check_data_source, train_eval_rows
from rlcli.launch import check_launch, launch_processes
from rlcli.logging import MetricsLog, TrainingProgress, console
from rlcli.models.loading import apply_lora, check_model_config, load_model, load_tokenizer, model_task
from rlcli.seeds import index_stream
from rlcli.trainers.common import (
    finish,
    describe_model,
    non_finite_loss,
    load_trainable_state,
    restore_optimizer,
    save_training_checkpoint,
    make_optimizer,
    prepare_output_dir,
    print_notes,
    save_final_model,
    start_trackers,
    take_over,
)


def preflight(recipe: SFTRecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    """Everything checkable without loading weights; raises ``RecipeError`` listing all problems."""
    task = model_task(recipe.model)
    problems = check_model_config(recipe.model, task) + check_data_source(recipe.data)
    if task != "causal":
        key = "model.architecture" if recipe.model.architecture is not None else "model.name_or_path"
        problems.append(Problem(key, "rlcli sft trains decoder-only (causal) models; this is an encoder-decoder"))
    processes = processes or launch_processes()
    problems += check_launch("sft", recipe, processes=processes)
    if problems:
        raise RecipeError(locate(problems, origin))
    accum = recipe.train.batch_size // (recipe.train.micro_batch_size * processes)
    return [
        f"global batch {recipe.train.batch_size} = micro-batch {recipe.train.micro_batch_size} × "
        f"{processes} process(es) × {accum} accumulation step(s)"
    ]


def _target_tokens(example: dict) -> int:
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def evaluate(model, data: TokenizedSet, par, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean per-token loss over the eval set (split across processes, summed back; ``Parallel.my_batches`` gives
    every process the same number of forward passes, as a sharded model needs)."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=par.device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=par.device)
    with torch.no_grad():
        for chunk, real in par.my_batches(data.examples, batch_size):
            n = sum(_target_tokens(ex) for ex in chunk)
            batch = {k: v.to(par.device) for k, v in collate(chunk, pad_id).items()}
            out = model(**batch, num_items_in_batch=max(n, 1))
            if real:
                total_loss += out.loss.double() * n
                total_tokens += n
    total_loss = par.reduce(total_loss, "sum")
    total_tokens = par.reduce(total_tokens, "sum")
    model.train()
    loss = (total_loss / total_tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def train(recipe: SFTRecipe, *, resume: bool = False) -> Path:
    # step 1: checks, output dir, the parallel engine
    preflight(recipe)
    resume_from = prepare_output_dir(recipe, resume)
    tcfg = recipe.train
    par = Parallel(recipe, mixed_precision=tcfg.mixed_precision, tf32=tcfg.tf32,
                   batch_size=tcfg.batch_size,
                   micro_batch_size=tcfg.micro_batch_size, max_grad_norm=recipe.optim.max_grad_norm)
    accelerator = par.accelerator
    out = Path(recipe.output_dir)  # nothing of an earlier run is touched until every input has loaded (take_over)

    # step 2: data
    tokenizer = load_tokenizer(recipe.model, padding_side="right")
    train_rows, eval_rows = train_eval_rows(recipe.data, recipe.seed,
                                            check=lambda rows, path: check_rows(rows, recipe.data, path))
    train_set = tokenize_rows(train_rows, recipe.data, tokenizer, recipe.data.path)
    eval_path = recipe.data.eval_path or recipe.data.path
    eval_set = tokenize_rows(eval_rows, recipe.data, tokenizer, eval_path) if eval_rows else None
    print_notes(train_set.notes, accelerator)
    if len(train_set.examples) < tcfg.batch_size:
        console.print(f"[yellow]note:[/] {len(train_set.examples)} training examples is fewer than one batch "
                      f"({tcfg.batch_size}); batches repeat examples across epochs")

    # step 3: model, optimiser, schedule, resume
    task = model_task(recipe.model)  # causal (preflight refuses the others)
    with par.building(from_scratch=recipe.model.architecture is not None):
        model = load_model(recipe.model, task, tokenizer)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora, task, gradient_checkpointing=recipe.model.gradient_checkpointing)
    full_state = recipe.lora is None or recipe.model.architecture is not None
    steps_per_epoch = len(train_set.examples) / tcfg.batch_size
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    start_step, objects = 0, {}
    if resume_from is not None:
        state, objects = load_checkpoint(resume_from, process_index=par.process_index)
        load_trainable_state(model, objects["model"])
        start_step = state["step"]
    model.train()
    model, optimizer, scheduler = par.prepare(model, lambda params: make_optimizer(params, recipe.optim, total_steps))
    if resume_from is not None:
        restore_optimizer(par, resume_from, objects, model, optimizer, scheduler)
    take_over(recipe, accelerator, total_steps=total_steps, start_step=start_step if resume_from else None,
              steps_key="train.max_steps" if tcfg.max_steps else "train.epochs")
    start_trackers(accelerator, recipe)
    log = MetricsLog(out, is_main=par.is_main_process, tracker=accelerator if recipe.logging.report_to else None,
                     resume_step=start_step if resume_from else None)
    if par.is_main_process:
        console.print(f"[bold]rlcli sft[/] {describe_model(par.unwrap(model))}, {len(train_set.examples)} train "
                      "examples" + (f", {len(eval_set.examples)} eval" if eval_set else "") + f", {total_steps} steps"
                      + (f", {par.describe()}" if par.num_processes > 1 else "")
                      + (f", resuming at step {start_step}" if start_step else ""))

    # step 4: the loop
    procs, rank = par.num_processes, par.process_index
    per_proc = tcfg.batch_size // procs
    pad_id = tokenizer.pad_token_id
    metrics: dict = {}
    with TrainingProgress("sft", total_steps, enabled=par.is_main_process and recipe.logging.progress,
                          start=start_step, shown=("loss", "eval_loss", "lr")) as progress:
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            indices = index_stream(len(train_set.examples), recipe.seed, (step - 1) * tcfg.batch_size, tcfg.batch_size)
            batch = [train_set.examples[i] for i in indices]
            global_tokens = sum(_target_tokens(ex) for ex in batch)
            mine = batch[rank * per_proc : (rank + 1) * per_proc]
            micro_batches = [mine[i : i + tcfg.micro_batch_size] for i in range(0, per_proc, tcfg.micro_batch_size)]
            loss_sum = torch.zeros((), device=par.device)
            seen_tokens = 0
            for i, micro in enumerate(micro_batches):
                inputs = {k: v.to(par.device) for k, v in collate(micro, pad_id).items()}
                seen_tokens += int(inputs["attention_mask"].sum())
                with par.micro_batch(model, last=i == len(micro_batches) - 1):
                    # loss = sum of token losses / target tokens of the global batch; every engine averages
                    # gradients over processes, so scale by the process count to get the global sum back.
                    loss = model(**inputs, num_items_in_batch=global_tokens).loss
                    par.backward(model, loss * procs)
                loss_sum += loss.detach()
            lr = scheduler.get_last_lr()[0]
            grad_norm = par.clip_and_step(model, optimizer, scheduler)

            # step 5: log, evaluate, checkpoint
            step_loss = par.reduce(loss_sum, "sum").item()
            tokens = par.reduce(torch.tensor(seen_tokens, device=par.device), "sum").item()
            seconds = time.perf_counter() - t0
            if not math.isfinite(step_loss):
                raise non_finite_loss(step, step_loss, out)
            metrics = {"loss": step_loss, "lr": lr, "epoch": step * tcfg.batch_size / len(train_set.examples),
                       "tokens_per_s": tokens / seconds}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if eval_set is not None and ((tcfg.eval_every and step % tcfg.eval_every == 0) or step == total_steps):
                metrics.update(evaluate(model, eval_set, par, tcfg.eval_batch_size, pad_id))
            if step % recipe.logging.log_every == 0 or step == total_steps or "eval_loss" in metrics:
                log.log(step, metrics)
            progress.update(step, metrics)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < total_steps:
                save_training_checkpoint(par, out, step, model, optimizer, scheduler, full=full_state,
                                         keep=tcfg.keep_checkpoints, state={})

    # step 6: final model
    plain = par.materialise(model)  # every process: gathers a sharded model's weights
    if par.is_main_process:
        save_final_model(plain, tokenizer, out, built_from_scratch=recipe.model.architecture is not None,
                         merge=bool(recipe.lora and recipe.lora.merge_on_save))
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "eval_loss"))
        console.print(f"[green]done[/]: {summary}; model saved to {out}")
    finish(accelerator)
    return out
