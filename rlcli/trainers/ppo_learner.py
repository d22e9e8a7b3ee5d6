"""One PPO step on finished episodes: the Python API below ``rlcli ppo`` (and the text environment).

    learner = PPOLearner(model, ref_model=None, algo=recipe.ppo, kl=recipe.kl, temperature=1.0,
                         optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
    stats = learner.step(rollout, scores)                      # a Rollout of token ids + one score per episode
    stats = learner.step_from_ids(queries, responses, scores, response_masks=None)   # lists of 1-D id tensors

Steps of ``step``:
  1. forward passes without autograd: policy log-probs and values in one pass, reference log-probs (the
     adapter disabled for LoRA, else the frozen copy), per-token KL and entropy
  2. scores: optional running normalisation, scaling, clipping
  3. per-token rewards: -β·KL_t on every model token, plus the score on the last model token
  4. optional reward whitening (no re-centring); GAE over model tokens (tool and pad tokens skipped);
     advantage whitening over model tokens, with statistics over all processes
  5. epochs × shuffled minibatches × micro-batches of clipped policy + value loss; gradient clipping;
     non-finite losses skip the optimizer step; optional early stop on an epoch's approx-KL
  6. KL controller update; statistics reduced over processes

Every process holds its own share of the batch; whitening and logged statistics use sums over all processes,
so 1 process and N processes see the same normalisation.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext

import torch

from rlcli.data.prompts import left_pad, right_pad
from rlcli.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    Rollout,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    per_token_rewards,
)


class NonFiniteLossError(RuntimeError):
    pass


def _trim(mb: Rollout) -> tuple[Rollout, int]:
    """Drop padding columns shared by every row of a micro-batch; return it and its response width."""
    q_width = int(mb.query_mask.sum(dim=1).max())
    r_width = max(1, int((mb.response_mask.cumsum(dim=1) * mb.response_mask).argmax(dim=1).max()) + 1)
    q_start = mb.query_ids.shape[1] - q_width
    trimmed = Rollout(
        query_ids=mb.query_ids[:, q_start:],
        query_mask=mb.query_mask[:, q_start:],
        response_ids=mb.response_ids[:, :r_width],
        response_mask=mb.response_mask[:, :r_width],
        tool_mask=mb.tool_mask[:, :r_width],
    )
    return trimmed, r_width


class PPOLearner:
    """Holds the policy (with value head), the reference, the optimiser and the KL / score statistics."""

    def __init__(self, model, *, ref_model=None, algo, kl, temperature: float, optimizer, scheduler, accelerator,
                 max_grad_norm: float | None, seed: int = 0):
        self.model = model  # possibly wrapped by Accelerate (DDP)
        self.ref_model = ref_model  # a ValueHeadModel without value head, or None for LoRA
        self.algo = algo
        self.kl_cfg = kl
        self.temperature = temperature
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.kl_ctl = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef))
        self.score_moments = RunningMoments()
        self.steps_done = 0
        self.procs = accelerator.num_processes

    # --- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.steps_done = state["steps_done"]

    # --- reductions over processes ----------------------------------------------------------------------------

    def sum_over_processes(self, *values: torch.Tensor | float) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        if self.procs > 1:
            t = self.accelerator.reduce(t, "sum")
        return t.tolist()

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor, recentre: bool = True) -> torch.Tensor:
        m = mask.float()
        total, sq, count = self.sum_over_processes((x * m).sum(), (x * x * m).sum(), m.sum())
        if count < 2:
            return x * m
        mean = total / count
        var = max(sq / count - mean * mean, 0.0) * count / (count - 1)
        out = (x - mean) * (1.0 / math.sqrt(var + 1e-8))
        if not recentre:
            out = out + mean
        return out * m

    # --- step 1: forward passes without autograd --------------------------------------------------------------

    @torch.no_grad()
    def _rollout_forward(self, rollout: Rollout):
        policy = self.accelerator.unwrap_model(self.model)
        policy.eval()
        b, r = rollout.response_ids.shape
        out = {k: torch.zeros(b, r) for k in ("logprobs", "values", "ref_logprobs", "kl", "entropy")}
        full_kl = self.kl_cfg.estimator == "full"
        for start in range(0, b, self.algo.micro_batch_size):
            rows = slice(start, start + self.algo.micro_batch_size)
            mb, width = _trim(rollout.index(rows))
            mb = Rollout(*(t.to(self.accelerator.device) for t in
                           (mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, mb.tool_mask)))
            args = (mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
            with self.accelerator.autocast():
                logits, values = policy(*args)
                if self.ref_model is None:
                    with policy.reference():
                        ref_logits, _ = policy(*args, with_values=False)
                else:
                    ref_logits, _ = self.ref_model(*args, with_values=False)
            lp = logprobs_from_logits(logits, mb.response_ids, self.temperature)
            ref_lp = logprobs_from_logits(ref_logits, mb.response_ids, self.temperature)
            kl = kl_penalty(lp, ref_lp, self.kl_cfg.estimator, logits if full_kl else None,
                            ref_logits if full_kl else None, **({"temperature": self.temperature} if full_kl else {}))
            for key, value in (("logprobs", lp), ("values", values), ("ref_logprobs", ref_lp), ("kl", kl),
                               ("entropy", entropy_from_logits(logits, self.temperature))):
                out[key][rows, :width] = value.float().cpu()
        policy.train()
        return out

    # --- the step ---------------------------------------------------------------------------------------------

    def step(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
        """One PPO step on this process's share of the batch. ``scores`` [B] float: one per episode."""
        timings = {}
        t0 = time.perf_counter()
        mask = rollout.model_mask.float()
        scores = scores.float().cpu()

        # step 1: old log-probs, values, reference log-probs, KL
        fwd = self._rollout_forward(rollout)
        timings["time_forward"] = time.perf_counter() - t0

        # step 2: score normalisation / scaling / clipping
        raw_scores = scores
        if self.algo.score_norm == "running":
            gathered = self.accelerator.gather(scores.to(self.accelerator.device)).cpu() if self.procs > 1 else scores
            self.score_moments.update(gathered)
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-8)
        scores = scores * self.algo.score_scale
        if self.algo.score_clip is not None:
            scores = scores.clamp(-self.algo.score_clip, self.algo.score_clip)

        # step 3: per-token rewards. The KL tensor is already the chosen estimator (the 'full' one needs the
        # logits, which only the forward pass had); passing it as log-probs against zeros with k1 adds -β·KL_t.
        rewards, _ = per_token_rewards(scores, fwd["kl"], torch.zeros_like(fwd["kl"]), mask, self.kl_ctl.value, "k1")

        # step 4: whitening and GAE
        if self.algo.whiten_rewards:
            rewards = self._global_whiten(rewards, mask, recentre=False)
        advantages, returns = gae(fwd["values"], rewards, mask, self.algo.gamma, self.algo.lam)
        if self.algo.whiten_advantages:
            advantages = self._global_whiten(advantages, mask)

        # step 5: epochs of minibatch updates
        t1 = time.perf_counter()
        train_stats = self._optimise(rollout, fwd["logprobs"], fwd["values"], advantages, returns)
        timings["time_optimize"] = time.perf_counter() - t1

        # step 6: KL controller and statistics
        stats = self._statistics(rollout, raw_scores, scores, fwd, rewards, advantages, returns, mask)
        self.kl_ctl.update(stats["kl"], n_steps=int(stats["episodes"]))
        self.steps_done += 1
        return {**stats, **train_stats, **timings, "kl_coef_next": self.kl_ctl.value}

    def _optimise(self, rollout, old_logprobs, old_values, advantages, returns) -> dict[str, float]:
        a = self.algo
        b = rollout.batch_size
        local_mini = a.mini_batch_size // self.procs
        n_micro = max(1, local_mini // a.micro_batch_size)
        sums = defaultdict(float)
        counts = defaultdict(int)
        epochs_done, skipped, early_stopped = 0, 0, 0.0
        model_tokens = rollout.model_mask.sum(dim=1)
        # rows sorted by length inside a minibatch, so micro-batches hold rows of similar length and _trim cuts
        # more padding; the loss is normalised by the minibatch's model tokens (below), so the grouping changes
        # only the order of float sums
        lengths = rollout.query_mask.sum(dim=1) + rollout.response_mask.sum(dim=1)
        for epoch in range(a.epochs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps_done * 101 + epoch)
            order = torch.randperm(b, generator=g)
            epoch_kl = []
            for m_start in range(0, b, local_mini):
                mini = order[m_start : m_start + local_mini]
                if n_micro > 1:
                    mini = mini[torch.argsort(lengths[mini], stable=True)]
                # every token of the (global) minibatch weighs the same, whatever micro-batch or process it is
                # in: micro-batch loss = its token sum / the minibatch's tokens over all processes, × processes
                # because DDP averages gradients over processes
                local_tokens = float(model_tokens[mini].sum())
                (global_tokens,) = self.sum_over_processes(local_tokens)
                finite = True
                mini_stats = defaultdict(float)
                for i in range(n_micro):
                    rows = mini[i * a.micro_batch_size : (i + 1) * a.micro_batch_size]
                    if len(rows) == 0:
                        continue
                    mb, width = _trim(rollout.index(rows))
                    dev = self.accelerator.device
                    mb = Rollout(*(t.to(dev) for t in (mb.query_ids, mb.query_mask, mb.response_ids,
                                                        mb.response_mask, mb.tool_mask)))
                    m = mb.model_mask.float()
                    tokens = float(model_tokens[rows].sum())
                    sync = nullcontext() if i == n_micro - 1 else self.accelerator.no_sync(self.model)
                    with sync:
                        logits, values = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
                        lp = logprobs_from_logits(logits, mb.response_ids, self.temperature)
                        pg_loss, pg = clipped_policy_loss(lp, old_logprobs[rows, :width].to(dev),
                                                          advantages[rows, :width].to(dev), m, a.clip_range)
                        vf_loss, vf = clipped_value_loss(values, old_values[rows, :width].to(dev),
                                                         returns[rows, :width].to(dev), m, a.clip_range_value)
                        loss = (pg_loss + a.vf_coef * vf_loss) * (tokens * self.procs / max(global_tokens, 1.0))
                        ok = torch.isfinite(loss.detach()).float()
                        if self.procs > 1:
                            ok = self.accelerator.reduce(ok, "min")  # every process skips together
                        if ok.item() < 1:
                            finite = False
                            break
                        self.accelerator.backward(loss)
                    share = tokens / max(local_tokens, 1.0)  # this process's statistics: token-weighted too
                    for key, value in (("loss_policy", pg_loss), ("loss_value", vf_loss), ("policy_clipfrac", pg["clipfrac"]),
                                       ("approx_kl", pg["approx_kl"]), ("value_clipfrac", vf["vf_clipfrac"]),
                                       ("ratio", pg["ratio_mean"])):
                        mini_stats[key] += float(value.detach()) * share
                if not finite:
                    # never step on a batch whose loss was dropped (ppo-details item 15)
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                if self.max_grad_norm is not None:
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                    mini_stats["grad_norm"] = float(norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in mini_stats.items():
                    sums[key] += value
                    counts[key] += 1
                epoch_kl.append(mini_stats["approx_kl"])
            epochs_done += 1
            if a.target_approx_kl is not None and epoch_kl:
                kl_sum, kl_n = self.sum_over_processes(sum(epoch_kl), len(epoch_kl))
                if kl_sum / kl_n > a.target_approx_kl:
                    early_stopped = 1.0
                    break
        total_minis = a.epochs * math.ceil(b / local_mini)
        if skipped == total_minis:
            raise NonFiniteLossError("every minibatch of this PPO step had a non-finite loss; lower the learning rate, "
                                     "check the reward's scale, or set ppo.score_clip")
        keys = sorted(sums)
        reduced = self.sum_over_processes(*[sums[k] / max(counts[k], 1) for k in keys]) if keys else []
        out = {k: v / self.procs for k, v in zip(keys, reduced)}
        out.update({"ppo_epochs": float(epochs_done), "early_stopped": early_stopped, "skipped_minibatches": float(skipped),
                    "lr": self.scheduler.get_last_lr()[0]})
        return out

    def _statistics(self, rollout, raw_scores, scores, fwd, rewards, advantages, returns, mask) -> dict[str, float]:
        k1 = (fwd["logprobs"] - fwd["ref_logprobs"]) * mask
        n_rows = rollout.batch_size
        lengths = rollout.response_mask.sum(dim=1).float()
        model_tokens = mask.sum()
        ev = explained_variance(fwd["values"], returns, mask)
        sums = self.sum_over_processes(
            n_rows, raw_scores.sum(), (raw_scores**2).sum(), scores.sum(), k1.sum(), model_tokens,
            (fwd["kl"] * mask).sum(), (fwd["entropy"] * mask).sum(), lengths.sum(), rollout.tool_mask.sum(),
            (fwd["values"] * mask).sum(), (returns * mask).sum(), (rewards * mask).sum(),
            0.0 if math.isnan(float(ev)) else float(ev),
        )
        (n, s_sum, s_sq, sc_sum, k1_sum, tok, kl_pen, ent, len_sum, tool_tok, v_sum, ret_sum, rew_sum, ev_sum) = sums
        mean = s_sum / n
        return {
            "episodes": n,
            "reward_mean": mean,
            "reward_std": math.sqrt(max(s_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)),
            "score_used_mean": sc_sum / n,
            # mean over episodes of the summed per-token log-ratio: the true KL(π‖π_ref) estimate of the batch
            "kl": k1_sum / n,
            "kl_per_token": k1_sum / max(tok, 1),
            "kl_penalty_per_token": kl_pen / max(tok, 1),
            "kl_coef": self.kl_ctl.value,
            "entropy": ent / max(tok, 1),
            "response_length": len_sum / n,
            "model_tokens": tok / n,
            "tool_tokens": tool_tok / n,
            "value_mean": v_sum / max(tok, 1),
            "return_mean": ret_sum / max(tok, 1),
            "token_reward_mean": rew_sum / max(tok, 1),
            "explained_variance": ev_sum / self.procs,
        }

    # --- convenience: lists of id tensors ---------------------------------------------------------------------

    def step_from_ids(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores,
                      response_masks: list[torch.Tensor] | None = None, pad_token_id: int = 0) -> dict[str, float]:
        """One PPO step from 1-D id tensors; ``response_masks`` marks model tokens with 1 (tool output 0)."""
        q_ids, q_mask = left_pad([q.tolist() for q in queries], pad_token_id)
        r_ids, r_mask = right_pad([r.tolist() for r in responses], pad_token_id)
        tool = torch.zeros_like(r_ids)
        if response_masks is not None:
            model_mask, _ = right_pad([m.tolist() for m in response_masks], 0)
            tool = (r_mask * (1 - model_mask)).long()
        rollout = Rollout(q_ids, q_mask, r_ids, r_mask, tool)
        return self.step(rollout, torch.as_tensor(scores, dtype=torch.float32))
