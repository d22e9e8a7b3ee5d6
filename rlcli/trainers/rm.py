"""``rlcli rm``: a scalar reward model trained on preference pairs, full or LoRA, on an Accelerate loop.

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``) on top of a causal
LM or an encoder. Its score for a text is read at the last real token (``rewards.reward_model.sequence_scores``,
right padding, positions from the attention mask: correct even when the pad token is EOS). The loss is
Bradley–Terry, ``-log σ(r_chosen - r_rejected - margin)`` (the margin column is optional), plus an optional
``center_penalty · (r_chosen + r_rejected)²`` that keeps rewards centred on zero.

Steps of ``train`` (the same skeleton as ``trainers/sft.py``):
  1. check the recipe and the output dir; set up Accelerate and seeds
  2. tokenizer, rows -> tokenized pairs (train / eval); identical pairs dropped, truncations counted
  3. model (+ LoRA, score head trainable), optimiser, LR schedule; restore a checkpoint on --resume
  4. for each optimizer step: take the step's global batch of pairs from the seeded index stream, split it across
     processes and micro-batches, score chosen and rejected texts in one forward pass, accumulate gradients of
     the loss summed over pairs / pairs in the *global* batch (1 process × 4 micro-batches == 2 × 2), clip, step
  5. log (loss, accuracy), evaluate (eval_loss, eval_accuracy, eval_margin), checkpoint on schedule
  6. save the final model in Hugging Face format and ``reward_stats.json`` (score mean / std over the training texts)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlcli.checkpoint import load_checkpoint
from rlcli.parallel import Parallel
from rlcli.config.errors import RecipeError
from rlcli.config.loader import Origin, locate
from rlcli.config.rm import RMRecipe
from rlcli.data.preferences import PairExample, PairSet, check_pair_rows, collate_pairs, tokenize_pairs
from rlcli.data.sources import check_data_source, train_eval_rows
from rlcli.launch import check_launch, launch_processes
from rlcli.logging import MetricsLog, TrainingProgress, console
from rlcli.models.loading import apply_lora, check_model_config, load_model, load_tokenizer
from rlcli.seeds import index_stream
from rlcli.rewards.reward_model import save_reward_stats, sequence_scores
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


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                  center_penalty: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss: ``-log σ(r_c - r_r - m) + center_penalty · (r_c + r_r)²``.

    chosen_rewards, rejected_rewards, margin: [B]. Returns [B] (reduce it yourself: the trainer divides the sum
    by the global batch size). ``logsigmoid`` keeps large reward gaps finite.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_penalty:
        loss = loss + center_penalty * (chosen_rewards + rejected_rewards) ** 2
    return loss


def preflight(recipe: RMRecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    """Everything checkable without loading weights; raises ``RecipeError`` listing all problems."""
    problems = check_model_config(recipe.model, "classifier") + check_data_source(recipe.data)
    processes = processes or launch_processes()
    problems += check_launch("rm", recipe, processes=processes)
    if problems:
        raise RecipeError(locate(problems, origin))
    accum = recipe.train.batch_size // (recipe.train.micro_batch_size * processes)
    return [
        f"global batch {recipe.train.batch_size} pairs = micro-batch {recipe.train.micro_batch_size} × "
        f"{processes} process(es) × {accum} accumulation step(s)"
    ]


def pair_rewards(model, pairs: list[PairExample], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Score the chosen and rejected texts of ``pairs`` in one forward pass -> (r_chosen, r_rejected, margin), [B]."""
    batch = collate_pairs(pairs, pad_id).to(device)
    rewards = sequence_scores(model, batch.input_ids, batch.attention_mask)[:, 0].float()
    return rewards[: len(pairs)], rewards[len(pairs) :], batch.margin


def evaluate(model, data: PairSet, par, batch_size: int, pad_id: int) -> dict[str, float]:
    """Bradley–Terry loss (margin included, centre penalty not), pairwise accuracy and mean r_c - r_r.

    Pairs are split across processes with the same number of forward passes on each (``Parallel.my_batches``):
    the forwards of a DDP or sharded model are collective."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=par.device)  # loss, correct, margin, pairs
    with torch.no_grad():
        for chunk, real in par.my_batches(data.pairs, batch_size):
            chosen, rejected, margin = pair_rewards(model, chunk, pad_id, par.device)
            if real:
                totals += torch.stack([pairwise_loss(chosen, rejected, margin).sum().double(),
                                       (chosen > rejected).sum().double(), (chosen - rejected).sum().double(),
                                       torch.tensor(len(chosen), dtype=torch.float64, device=chosen.device)])
    totals = par.reduce(totals, "sum")
    model.train()
    n = totals[3].clamp(min=1)
    return {"eval_loss": (totals[0] / n).item(), "eval_accuracy": (totals[1] / n).item(),
            "eval_margin": (totals[2] / n).item()}


def reward_statistics(model, data: PairSet, par, batch_size: int, pad_id: int) -> tuple[float, float, int]:
    """Mean, std and count of the scores of every training text (chosen and rejected), for normalising in PPO."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=par.device)  # sum, sum of squares, count
    with torch.no_grad():
        for chunk, real in par.my_batches(data.pairs, batch_size):
            chosen, rejected, _ = pair_rewards(model, chunk, pad_id, par.device)
            scores = torch.cat([chosen, rejected]).double()
            if real:
                totals += torch.stack([scores.sum(), (scores**2).sum(),
                                       torch.tensor(scores.numel(), dtype=torch.float64, device=scores.device)])
    totals = par.reduce(totals, "sum")
    model.train()
    count = int(totals[2].item())
    mean = totals[0].item() / count
    std = math.sqrt(max(totals[1].item() / count - mean**2, 0.0))
    return mean, std, count


def train(recipe: RMRecipe, *, resume: bool = False) -> Path:
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
                                            check=lambda rows, path: check_pair_rows(rows, recipe.data, path))
    train_set = tokenize_pairs(train_rows, recipe.data, tokenizer, recipe.data.path)
    eval_set = tokenize_pairs(eval_rows, recipe.data, tokenizer, recipe.data.eval_path or recipe.data.path) \
        if eval_rows else None
    print_notes(train_set.notes + [f"eval data: {n}" for n in (eval_set.notes if eval_set else [])], accelerator)
    if len(train_set.pairs) < tcfg.batch_size:
        console.print(f"[yellow]note:[/] {len(train_set.pairs)} training pairs is fewer than one batch "
                      f"({tcfg.batch_size}); batches repeat pairs across epochs")

    # step 3: model, optimiser, schedule, resume
    with par.building(from_scratch=recipe.model.architecture is not None):
        model = load_model(recipe.model, "classifier", tokenizer)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora, "classifier", gradient_checkpointing=recipe.model.gradient_checkpointing)
    full_state = recipe.lora is None or recipe.model.architecture is not None
    steps_per_epoch = len(train_set.pairs) / tcfg.batch_size
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
    log = MetricsLog(out, is_main=par.is_main_process,
                     tracker=accelerator if recipe.logging.report_to else None,
                     resume_step=start_step if resume_from else None)
    if par.is_main_process:
        proc_note = f", {par.describe()}" if par.num_processes > 1 else ""
        console.print(f"[bold]rlcli rm[/] {describe_model(par.unwrap(model))}, {len(train_set.pairs)} train pairs"
                      + (f", {len(eval_set.pairs)} eval" if eval_set else "") + f", {total_steps} steps" + proc_note
                      + (f", resuming at step {start_step}" if start_step else ""))

    # step 4: the loop
    procs, rank = par.num_processes, par.process_index
    per_proc = tcfg.batch_size // procs
    pad_id = tokenizer.pad_token_id
    metrics: dict = {}
    with TrainingProgress("rm", total_steps, enabled=par.is_main_process and recipe.logging.progress,
                          start=start_step, shown=("loss", "accuracy", "eval_accuracy")) as progress:
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            indices = index_stream(len(train_set.pairs), recipe.seed, (step - 1) * tcfg.batch_size, tcfg.batch_size)
            batch = [train_set.pairs[i] for i in indices]
            mine = batch[rank * per_proc : (rank + 1) * per_proc]
            micro_batches = [mine[i : i + tcfg.micro_batch_size] for i in range(0, per_proc, tcfg.micro_batch_size)]
            loss_sum = torch.zeros((), device=par.device)
            correct = torch.zeros((), device=par.device)
            for i, micro in enumerate(micro_batches):
                with par.micro_batch(model, last=i == len(micro_batches) - 1):
                    chosen, rejected, margin = pair_rewards(model, micro, pad_id, par.device)
                    # sum over pairs / pairs in the global batch; every engine averages gradients over processes,
                    # so scale by the process count to get the global mean back.
                    loss = pairwise_loss(chosen, rejected, margin, tcfg.center_penalty).sum() / tcfg.batch_size
                    par.backward(model, loss * procs)
                loss_sum += loss.detach()
                correct += (chosen.detach() > rejected.detach()).sum()
            lr = scheduler.get_last_lr()[0]
            grad_norm = par.clip_and_step(model, optimizer, scheduler)

            # step 5: log, evaluate, checkpoint
            step_loss = par.reduce(loss_sum, "sum").item()
            accuracy = par.reduce(correct, "sum").item() / tcfg.batch_size
            seconds = time.perf_counter() - t0
            if not math.isfinite(step_loss):
                raise non_finite_loss(step, step_loss, out)
            metrics = {"loss": step_loss, "accuracy": accuracy, "lr": lr,
                       "epoch": step * tcfg.batch_size / len(train_set.pairs), "pairs_per_s": tcfg.batch_size / seconds}
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

    # step 6: final model and reward statistics
    mean, std, count = reward_statistics(model, train_set, par, tcfg.eval_batch_size, pad_id)
    plain = par.materialise(model)  # every process: gathers a sharded model's weights
    if par.is_main_process:
        save_final_model(plain, tokenizer, out, built_from_scratch=recipe.model.architecture is not None,
                         merge=bool(recipe.lora and recipe.lora.merge_on_save))
        save_reward_stats(out, mean, std, count, recipe.data.max_length)
        summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "accuracy", "eval_loss", "eval_accuracy")
                            if k in metrics)
        console.print(f"[green]done[/]: {summary}; reward mean {mean:.4g}, std {std:.4g} over {count} training texts; "
                      f"model saved to {out}")
    finish(accelerator)
    return out
