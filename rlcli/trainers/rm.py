"""``rlcli rm``: a scalar reward model trained on preference pairs, full or LoRA, on an Accelerate loop.

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``) on top of a causal
LM or an encoder. Its score for a text is read at the last real token (``rewards.reward_model.sequence_scores``,
right padding, positions from the attention mask: correct even when the pad token is EOS). The loss is
Bradley–Terry, ``-log σ(r_chosen - r_rejected - margin)`` (the margin column is optional), plus an optional
``center_penalty · (r_chosen + r_rejected)²`` that keeps rewards centred on zero.

Steps of ``train`` (the same skeleton as ``trainers/sft.py``: ``trainers.run.Run`` and ``trainers.supervised``):
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
from pathlib import Path

import torch
import torch.nn.functional as F

from rlcli.config.loader import Origin
from rlcli.config.rm import RMRecipe
from rlcli.data.preferences import PairExample, PairSet, check_pair_rows, collate_pairs, tokenize_pairs
from rlcli.data.sources import check_data_source
from rlcli.models.checks import check_model_config
from rlcli.rewards.reward_model import save_reward_stats, sequence_scores
from rlcli.models.saving import save_model
from rlcli.trainers.run import Run
from rlcli.trainers.supervised import SupervisedKind, supervised_preflight, train_supervised


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
    return supervised_preflight(recipe, RM, problems, origin, processes)


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


class RMObjective:
    """Bradley–Terry loss summed over pairs, divided by the pairs of the global batch; pairwise accuracy."""

    def __init__(self, train_set: PairSet, eval_set: PairSet | None, pad_id: int, batch_size: int,
                 eval_batch_size: int, center_penalty: float):
        self.examples, self.eval_set, self.pad_id = train_set.pairs, eval_set, pad_id
        self.batch_size, self.eval_batch_size, self.center_penalty = batch_size, eval_batch_size, center_penalty

    def normaliser(self, batch: list) -> int:
        return self.batch_size

    def length(self, pair: PairExample) -> int:
        return max(len(pair.chosen_ids), len(pair.rejected_ids))

    def micro_loss(self, model, micro: list, normaliser: int, device):
        chosen, rejected, margin = pair_rewards(model, micro, self.pad_id, device)
        loss = pairwise_loss(chosen, rejected, margin, self.center_penalty).sum() / normaliser
        return loss, {"correct": (chosen.detach() > rejected.detach()).sum()}

    def metrics(self, loss: float, counts: dict, lr: float, epoch: float, seconds: float) -> dict[str, float]:
        return {"loss": loss, "accuracy": counts["correct"] / self.batch_size, "lr": lr, "epoch": epoch,
                "pairs_per_s": self.batch_size / seconds}

    def evaluate(self, model, par) -> dict[str, float]:
        return evaluate(model, self.eval_set, par, self.eval_batch_size, self.pad_id)


RM = SupervisedKind(
    name="rm", noun="pairs", task="classifier", check=check_pair_rows, tokenize=tokenize_pairs,
    items=lambda s: s.pairs,
    objective=lambda recipe, train_set, eval_set, tokenizer: RMObjective(
        train_set, eval_set, tokenizer.pad_token_id, recipe.train.batch_size, recipe.eval.batch_size,
        recipe.train.center_penalty),
    shown=("loss", "accuracy", "eval_accuracy"))


def train(recipe: RMRecipe, *, resume: bool = False) -> Path:
    # step 1: checks; steps 2-5: the run, its data, model and loop (trainers.supervised.train_supervised)
    preflight(recipe)
    with Run.supervised(recipe, resume) as run:
        trained = train_supervised(run, RM)
        metrics, tokenizer, tcfg = trained.metrics, trained.tokenizer, recipe.train

        # step 6: final model and reward statistics
        mean, std, count = reward_statistics(trained.model, trained.train_set, run.par, recipe.eval.batch_size,
                                             tokenizer.pad_token_id)

        def save(plain) -> None:
            save_model(plain, tokenizer, run.out, run_dir=run.out,
                       built_from_scratch=recipe.model.architecture is not None,
                       merge=bool(recipe.lora and recipe.lora.merge_on_save))
            save_reward_stats(run.out, mean, std, count, recipe.data.max_length)

        def done() -> str:
            summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "accuracy", "eval_loss", "eval_accuracy")
                                if k in metrics)
            return (f"{summary}; reward mean {mean:.4g}, std {std:.4g} over {count} training texts; model saved to "
                    f"{run.out}")

        return run.end(save, done, curves=[("loss", "eval_loss"), ("accuracy", "eval_accuracy")])
