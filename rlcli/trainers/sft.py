"""``rlcli sft``: supervised fine-tuning, full or LoRA, on an Accelerate loop.

Why an Accelerate loop and not ``transformers.Trainer``: rlcli's contracts (a ``metrics.jsonl`` line per step
with the same keys in every trainer, a global batch that is fixed whatever the number of processes, exact
resume on CPU, one checkpoint layout shared with PPO) are each a few lines here and a set of callbacks and
overrides there; PPO needs its own loop anyway, so SFT and PPO share the same pieces.

Steps of ``train``:
  1. check the recipe and the output dir; set up Accelerate and seeds
  2. tokenizer, rows -> tokenized examples (train / eval)
  3. model (+ LoRA), optimiser, LR schedule; restore a checkpoint on --resume
  4. for each optimizer step (``trainers.supervised.supervised_steps``): take the step's global batch from a seeded
     index stream, split it across processes and into micro-batches, accumulate gradients with the loss normalised by
     the number of target tokens in the *global* batch (so 1 process × 4 micro-batches == 2 processes × 2), clip,
     step
  5. log, evaluate, checkpoint on schedule (``trainers.run.Run``)
  6. save the final model in Hugging Face format
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlcli.config.errors import Problem
from rlcli.config.loader import Origin
from rlcli.config.sft import SFTRecipe
from rlcli.data.sft import IGNORE, TokenizedSet, check_rows, collate, tokenize_rows
from rlcli.data.sources import check_data_source
from rlcli.models.lm_head import capture_head_input, chunkable
from rlcli.models.checks import check_model_config, model_task
from rlcli.rl.chunked import token_stats
from rlcli.rl.sampling import SamplingRules
from rlcli.models.saving import save_model
from rlcli.trainers.run import Run
from rlcli.trainers.supervised import SupervisedKind, supervised_preflight, train_supervised


def preflight(recipe: SFTRecipe, origin: Origin | str = "recipe", processes: int | None = None) -> list[str]:
    """Everything checkable without loading weights; raises ``RecipeError`` listing all problems."""
    task = model_task(recipe.model)
    problems = check_model_config(recipe.model, task) + check_data_source(recipe.data)
    if task != "causal":
        key = "model.architecture" if recipe.model.architecture is not None else "model.name_or_path"
        problems.append(Problem(key, "rlcli sft trains decoder-only (causal) models; this is an encoder-decoder"))
    return supervised_preflight(recipe, SFT, problems, origin, processes)


def _target_tokens(example: dict) -> int:
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over a collated batch's target tokens (``labels`` != IGNORE), a scalar.

    The final hidden states go through the LM head a chunk of target positions at a time
    (``rlcli.rl.chunked.token_stats``, inside the model's forward): the ``[B, T, V]`` logits never exist, and
    prompt, padding and other non-target positions never reach the head. A model whose logits are not its head's
    output (``rlcli.models.lm_head.chunkable``) gets the same numbers from its full logits."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}

    def stats(hidden, head):
        return token_stats(hidden[:, :-1], head, labels, SamplingRules(), mask=mask).logprobs

    if chunkable(model):
        with capture_head_input(model, then=stats) as captured:
            model(**inputs)
        logprobs = captured.result
    else:
        logprobs = stats(model(**inputs).logits, lambda z: z)
    return -logprobs.sum()


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
            loss_sum = summed_loss(model, batch)
            if real:
                total_loss += loss_sum.double()
                total_tokens += n
    total_loss = par.reduce(total_loss, "sum")
    total_tokens = par.reduce(total_tokens, "sum")
    model.train()
    loss = (total_loss / total_tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


class SFTObjective:
    """Next-token cross-entropy over the target tokens, summed and divided by the global batch's target tokens."""

    def __init__(self, train_set: TokenizedSet, eval_set: TokenizedSet | None, pad_id: int, eval_batch_size: int):
        self.examples, self.eval_set, self.pad_id, self.eval_batch_size = train_set.examples, eval_set, pad_id, \
            eval_batch_size

    def normaliser(self, batch: list) -> int:
        return sum(_target_tokens(ex) for ex in batch)

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def micro_loss(self, model, micro: list, normaliser: int, device):
        inputs = {k: v.to(device) for k, v in collate(micro, self.pad_id).items()}
        loss = summed_loss(model, inputs) / max(normaliser, 1)
        return loss, {"tokens": int(inputs["attention_mask"].sum())}

    def metrics(self, loss: float, counts: dict, lr: float, epoch: float, seconds: float) -> dict[str, float]:
        return {"loss": loss, "lr": lr, "epoch": epoch, "tokens_per_s": counts["tokens"] / seconds}

    def evaluate(self, model, par) -> dict[str, float]:
        return evaluate(model, self.eval_set, par, self.eval_batch_size, self.pad_id)


SFT = SupervisedKind(
    name="sft", noun="examples", task=None, check=check_rows, tokenize=tokenize_rows, items=lambda s: s.examples,
    objective=lambda recipe, train_set, eval_set, tokenizer: SFTObjective(
        train_set, eval_set, tokenizer.pad_token_id, recipe.eval.batch_size),
    shown=("loss", "eval_loss", "lr"))


def train(recipe: SFTRecipe, *, resume: bool = False) -> Path:
    # step 1: checks; steps 2-5: the run, its data, model and loop (trainers.supervised.train_supervised)
    preflight(recipe)
    with Run.supervised(recipe, resume) as run:
        trained = train_supervised(run, SFT)
        metrics = trained.metrics

        # step 6: final model
        def save(plain) -> None:
            save_model(plain, trained.tokenizer, run.out, run_dir=run.out,
                       built_from_scratch=recipe.model.architecture is not None,
                       merge=bool(recipe.lora and recipe.lora.merge_on_save))

        def done() -> str:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "eval_loss"))
            return f"{summary}; model saved to {run.out}"

        return run.end(save, done, curves=[("loss", "eval_loss"), ("lr",)])
