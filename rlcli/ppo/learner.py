"""One PPO step on finished episodes: the Python API below ``rlcli ppo`` (and the text environment).

    learner = PPOLearner(model, ref_model=None, algo=recipe.ppo, kl=recipe.kl, rules=SamplingRules(temperature=1.0),
                         optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)  # or a rlcli Parallel
    stats = learner.step(rollout, scores)                      # a Rollout of token ids + one score per episode

Steps of ``step``: 1. forward passes without autograd (``rollout_forward``); 2. scores normalised and clipped;
3. per-token rewards (-β·KL, the score on the last model token); 4. advantages (``rlcli.rl.estimators``); 5. epochs ×
minibatches × micro-batches of the clipped loss over a ``LearnerBatch``; 6. KL controller, health checks, statistics
over every process. ``rules`` are the sampling rules the rollout was drawn with: every log-prob, entropy and KL is
taken under them, so the first ratio is 1. Each step in detail: docs/internals.md, "rlcli/ppo/learner.py".
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from rlcli.config.ppo import estimator_settings
from rlcli.models.value_head import disable_dropout
from rlcli.padding import left_pad, pad, right_pad
from rlcli.parallel import as_parallel
from rlcli.rl import (
    AdaptiveKLController,
    FixedKLController,
    KLWatch,
    Rollout,
    RolloutForward,
    RunningMoments,
    SamplingRules,
    kl_penalty,
)
from rlcli.rl.chunked import token_stats
from rlcli.rl.kl import LOG_RATIO_CLAMP
from rlcli.rl.masked import WHITEN_MIN_STD
from rlcli.rl.estimators import ESTIMATORS, AdvantageInputs
from rlcli.rl.losses import LossSettings, importance_weights, ppo_loss
from rlcli.seeds import shuffle_generator


# |ratio - 1| of a step's first minibatch (before any update) above which the run warns: the training forward and
# the rollout forward on the same weights and rows differ by ~1e-7 in float32, ~1e-3 under bf16 autocast
FIRST_RATIO_TOLERANCE = 0.01

# mean |log p| difference per model token between the sampler and the training forward above which the run warns:
# about 1e-7 in float32 on the same weights, a few 1e-3 to 1e-2 under bf16; 0.1 means another distribution
SAMPLER_DIFF_WARNING = 0.1

# a minibatch is not applied when its approx-KL to pi_old, before its optimizer step, exceeds this × the target
# (ppo.target_approx_kl): Stable-Baselines3's and Spinning Up's factor
KL_GUARD_FACTOR = 1.5


# the parts of the loss checked for finiteness one by one, so that a skipped minibatch says which one it was
LOSS_PARTS = ("loss_policy", "loss_value", "loss_kl", "loss_entropy")


class NonFiniteLossError(RuntimeError):
    pass


class ForbiddenTokenError(ValueError):
    """A rollout holds a model token that its own sampling rules forbid (it cannot have been sampled with them)."""


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
        sampler_logprobs=None if mb.sampler_logprobs is None else mb.sampler_logprobs[:, :r_width],
    )
    return trimmed, r_width


@dataclass(frozen=True)
class LearnerBatch:
    """This process's share of a PPO step's batch as the update loop reads it (steps 1-4 done): B episodes, each
    tensor ``[B, R]`` over the response positions, 0 off the model tokens."""

    rollout: Rollout  # token ids and masks (``rollout.model_mask``: the tokens the loss covers)
    old_logprobs: torch.Tensor  # pi_old; zeros where the training forward gives it (``reuses_training_pass``)
    values: torch.Tensor | None  # the critic's values at rollout time; None without a critic
    ref_logprobs: torch.Tensor  # the reference's log-probs
    advantages: torch.Tensor
    returns: torch.Tensor  # the critic's targets

    @property
    def batch_size(self) -> int:
        return self.rollout.batch_size

    def select(self, rows: torch.Tensor) -> "LearnerBatch":
        """The episodes ``rows`` (a micro-batch), every field alike, cut to their longest row (``_trim``)."""
        rollout, width = _trim(self.rollout.index(rows))
        cut = lambda t: None if t is None else t[rows, :width]  # noqa: E731
        return LearnerBatch(rollout, cut(self.old_logprobs), cut(self.values), cut(self.ref_logprobs),
                            cut(self.advantages), cut(self.returns))


@dataclass
class TrainingRecord:
    """With ``reuses_training_pass``: the policy's numbers of the rollout forward, which the training forward (on
    the same weights) records as it goes, each ``[B, R]``."""

    pi_logprobs: torch.Tensor
    entropy: torch.Tensor
    forbidden_mass: torch.Tensor

    @classmethod
    def zeros_like(cls, mask: torch.Tensor) -> "TrainingRecord":
        return cls(torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask))

    def write(self, rows: torch.Tensor, stats) -> None:
        """The training forward's ``token_stats`` of the episodes ``rows`` (a micro-batch cut to its width)."""
        for key, recorded in vars(self).items():
            value = stats.logprobs if key == "pi_logprobs" else getattr(stats, key)
            if value is not None:  # already 0 off the model tokens (token_stats)
                recorded[rows, : value.shape[1]] = value.detach().float().cpu()


class PPOLearner:
    """Holds the policy (with value head), the reference, the optimiser and the KL / score statistics."""

    def __init__(self, model, *, ref_model=None, algo, kl, rules: SamplingRules, optimizer, scheduler, accelerator,
                 max_grad_norm: float | None, seed: int = 0, constant_length: int | None = None, critic=None,
                 importance_sampling: str = "none", importance_sampling_cap: float = 2.0):
        if rules.temperature <= 0:
            raise ValueError("PPO needs a sampling temperature > 0 (greedy decoding has no log-probs to learn from)")
        # the estimator's defaults for keys a hand-built algo / kl section left unset (a recipe has them filled)
        self.scaling, self.aggregation, self.kl_mode, self.kl_estimator = estimator_settings(algo, kl)
        self.estimator = ESTIMATORS[algo.advantage]
        self.loss_settings = LossSettings(aggregation=self.aggregation, clip_range=algo.clip_range,
                                          clip_range_high=algo.clip_range_high, dual_clip=algo.dual_clip,
                                          clip_range_value=algo.clip_range_value, vf_coef=algo.vf_coef,
                                          kl_estimator=self.kl_estimator, entropy_coef=algo.entropy_coef)
        # everything parallel goes through rlcli.parallel (an Accelerator from elsewhere: single process or DDP)
        self.par = as_parallel(accelerator, max_grad_norm)
        self.model = model  # prepared by self.par: DDP-wrapped, FSDP2-sharded or a DeepSpeed engine
        self.ref_model = ref_model  # a ValueHeadModel without value head, or None for LoRA
        # dropout makes the training forward differ from the rollout forward (a first ratio away from 1, a biased
        # KL): off in the policy, its critic and the reference, whoever built them (ppo-details item 8)
        for m in (self.par.unwrap(model), ref_model and self.par.unwrap(ref_model)):
            if m is not None:
                disable_dropout(m)
        if self.par.sharded:
            # the chunked log-probs call the LM head after the model's forward has returned, where FSDP2 / ZeRO-3
            # leave each process only a shard of the head's weight: sharded runs take the full-logits path (the
            # same numbers; the memory saving of chunking is lost there)
            for m in (self.par.unwrap(model), ref_model and self.par.unwrap(ref_model)):
                if m is not None:
                    m.chunkable = False
        self.algo = algo
        self.kl_cfg = kl
        self.rules = rules
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.kl_ctl = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive
                       else FixedKLController(kl.coef))
        self.kl_watch = KLWatch()
        # weights pi_old / q on the policy loss of episodes whose sampler q is not pi_old (generation.importance_sampling)
        self.importance_sampling, self.importance_sampling_cap = importance_sampling, importance_sampling_cap
        # a critic worse than a constant (explained variance below 0) for 5 steps in a row is said once
        self.ev_watch = KLWatch(threshold=0.0, patience=5)
        # critic.warmup_steps: the first steps train the critic alone (the optimizer's "policy" group at lr 0)
        self.critic_warmup_steps = 0 if critic is None or not self.estimator.critic else critic.warmup_steps
        self.critic_lam = None if critic is None else critic.lam
        if self.critic_warmup_steps and not any(g.get("name") == "critic" for g in optimizer.param_groups):
            raise ValueError("critic warm-up steps need the optimizer's critic parameters in a group named 'critic' "
                             "(rlcli.ppo.build.optimizer_groups)")
        self.sampler_warned = False
        self.ratio_warned = False
        self.score_moments = RunningMoments()
        self.steps_done = 0
        self.procs = self.par.num_processes
        # the fixed length of loss_aggregation "constant" (Dr. GRPO: the generation budget)
        self.constant_length = constant_length
        self.critic_free = not ESTIMATORS[algo.advantage].critic
        # old log-probs from the training forward where one optimizer step per batch allows it
        # (reuses_training_pass); False always runs the policy's rollout forward (the tests compare the two)
        self.reuse_training_pass = True
        if self.critic_free and self.par.unwrap(model).has_values:
            raise ValueError(f"ppo.advantage={algo.advantage} trains no critic: build the policy without a value head")

    # --- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                "steps_done": self.steps_done, "kl_watch": self.kl_watch.state_dict(),
                "ev_watch": self.ev_watch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.steps_done = state["steps_done"]
        if "kl_watch" in state:
            self.kl_watch.load_state_dict(state["kl_watch"])
        if "ev_watch" in state:
            self.ev_watch.load_state_dict(state["ev_watch"])

    # --- reductions over processes ----------------------------------------------------------------------------

    def sum_over_processes(self, *values: torch.Tensor | float) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.par.device)
        if self.procs > 1:
            t = self.par.reduce(t, "sum")
        return t.tolist()

    def _sum_tensor_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.par.reduce(t.to(self.par.device), "sum").to(t.device)

    # --- step 1: forward passes without autograd --------------------------------------------------------------

    def reuses_training_pass(self, batch_size: int) -> bool:
        """Whether this step's old log-probs come from its training forward instead of a pass of their own.

        With one optimizer step per batch (critic-free, one epoch, one minibatch: GRPO as usually configured) the
        training forward runs on the very weights the rollout forward would, so pi_old is its own output, detached,
        and the ratio is 1 (TRL's GRPOTrainer does the same when num_iterations is 1): one forward pass of the
        policy over the batch is saved. Not when the KL enters the reward (the advantages need it before the update)
        or is the exact KL over the vocabulary (that takes the reference's hidden states in the same chunk).
        """
        a = self.algo
        return (self.reuse_training_pass and self.critic_free and a.epochs == 1
                and a.mini_batch_size >= a.batch_size and batch_size <= a.mini_batch_size // self.procs
                and self.kl_mode == "loss" and self.kl_estimator != "full")

    @torch.no_grad()
    def rollout_forward(self, rollout: Rollout, policy_pass: bool = True, reference_pass: bool = True
                        ) -> RolloutForward:
        """Old log-probs, values, reference log-probs, KL and entropy of a rollout, micro-batch by micro-batch.

        ``policy_pass=False``: the reference's log-probs only (the policy's numbers stay 0; the training forward
        fills them in, ``reuses_training_pass``). ``reference_pass=False``: the policy's log-probs and values only
        (the reference's numbers and the KL stay 0; the KL after an update is measured so).
        """
        policy = self.par.unwrap(self.model)
        policy.eval()
        b, r = rollout.response_ids.shape
        names = ("pi_logprobs", "values", "ref_logprobs", "kl", "entropy", "forbidden_mass")
        out = {k: torch.zeros(b, r) for k in names}
        full = self.kl_estimator == "full" and reference_pass
        # micro-batches of rows of similar length, so _trim cuts more padding (each row's numbers do not depend on
        # the rows beside it, up to float summation order)
        order = torch.argsort(rollout.query_mask.sum(dim=1) + rollout.response_mask.sum(dim=1), stable=True)
        for start in range(0, b, self.algo.micro_batch_size):
            rows = order[start : start + self.algo.micro_batch_size]
            mb, width = _trim(rollout.index(rows))
            mb = mb.to(self.par.device)
            args = (mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
            turn, model_mask = mb.turn_positions, mb.model_mask.bool()
            computed = {}
            with self.par.autocast():
                # head inputs, not logits: the statistics below take the logits a chunk of positions at a time
                hidden, values = policy(*args, hidden=True) if policy_pass else (None, None)
                ref_hidden = ref_head = ref = None
                if reference_pass:
                    if self.ref_model is None:
                        with policy.reference():
                            ref_hidden, _ = policy(*args, with_values=False, hidden=True)
                        ref_head = policy.reference_head
                    else:
                        ref_hidden, _ = self.ref_model(*args, with_values=False, hidden=True)
                        ref_head = self.ref_model.head
                    # only model tokens are computed: a pad label's log-prob may be -inf (PAD = EOS, banned there)
                    ref = token_stats(ref_hidden, ref_head, mb.response_ids, self.rules, turn_positions=turn,
                                      mask=model_mask)
                    computed["ref_logprobs"] = ref.logprobs
                if policy_pass:
                    pi = token_stats(hidden, policy.head, mb.response_ids, self.rules, turn_positions=turn,
                                     mask=model_mask, entropy=reference_pass,
                                     ref=(ref_hidden, ref_head) if full else None,
                                     forbidden=reference_pass and self.rules.restricts)
                    computed.update(pi_logprobs=pi.logprobs, values=values, entropy=pi.entropy,
                                    forbidden_mass=pi.forbidden_mass)
                    if reference_pass:
                        computed["kl"] = pi.full_kl if full else kl_penalty(pi.logprobs, ref.logprobs,
                                                                            self.kl_estimator)
            for key, value in computed.items():
                if value is not None:
                    out[key][rows, :width] = torch.where(model_mask, value.float(), 0.0).cpu()
        policy.train()
        if policy_pass:
            self._check_allowed(rollout.response_ids, rollout.model_mask, out["pi_logprobs"])
        return RolloutForward(values=out["values"] if policy.has_values else None,
                              **{k: out[k] for k in names if k != "values"})

    def _check_allowed(self, response_ids, model_mask, pi_logprobs: torch.Tensor, rows=None) -> None:
        """Raise ``ForbiddenTokenError`` on a model token of log-prob -inf (``rows``: the episodes of these rows)."""
        bad = (pi_logprobs == float("-inf")) & model_mask.bool().to(pi_logprobs.device)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            token = int(response_ids[row, col])
            row = row if rows is None else int(rows[row])
            raise ForbiddenTokenError(
                f"episode {row}, response token {col} (id {token}) is a token the sampling rules forbid there "
                f"({self.rules.description()}): it cannot have been sampled with them. Generate with the same "
                "rules the learner is given.")

    # --- the step ---------------------------------------------------------------------------------------------

    def step(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
        """One PPO step on this process's share of the batch. ``scores`` [B] float: one per episode."""
        timings = {}
        t0 = time.perf_counter()
        mask = rollout.model_mask.float()
        scores = scores.float().cpu()

        # step 1: old log-probs, values, reference log-probs, KL (the reference's alone when the training forward
        # gives the old log-probs: one optimizer step per batch)
        reuse = self.reuses_training_pass(rollout.batch_size)
        fwd = self.rollout_forward(rollout, policy_pass=not reuse)
        timings["time_forward"] = time.perf_counter() - t0

        # step 2: score normalisation / clipping
        raw_scores = scores
        if self.algo.score_norm == "running":
            gathered = self.par.gather(scores.to(self.par.device)).cpu() if self.procs > 1 else scores
            self.score_moments.update(gathered)
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-8)
        if self.algo.score_clip is not None:
            scores = scores.clamp(-self.algo.score_clip, self.algo.score_clip)

        # steps 3-4: per-token rewards and advantages (rlcli.rl.estimators: GAE with the critic, or critic-free)
        rewards, advantages, returns = self.estimator.advantages(scores, self._kl_in_reward(fwd.kl), mask,
                                                                 self._advantage_inputs(fwd))

        # step 5: epochs of minibatch updates
        t1 = time.perf_counter()
        probe = None
        if reuse and self.steps_done == 0:
            # without a pass of its own for pi_old, the run's first step still compares the training forward with
            # an eval-mode forward on the same weights (dropout or another train-mode difference shows as a first
            # ratio away from 1): one micro-batch, before the update
            rows = torch.arange(min(self.algo.micro_batch_size, rollout.batch_size))
            probe = rows, self.rollout_forward(rollout.index(rows), reference_pass=False).pi_logprobs
        # with reuse, the training forward records the policy's numbers of the rollout forward as it goes
        record = TrainingRecord.zeros_like(mask) if reuse else None
        batch = LearnerBatch(rollout, fwd.pi_logprobs, fwd.values, fwd.ref_logprobs, advantages, returns)
        train_stats = self._optimise(batch, record)
        if reuse:
            # both are 0 off the model tokens, where every estimator's KL is then 0
            kl = kl_penalty(record.pi_logprobs, fwd.ref_logprobs, self.kl_estimator)
            fwd = dataclasses.replace(fwd, kl=kl, pi_logprobs=record.pi_logprobs, entropy=record.entropy,
                                      forbidden_mass=record.forbidden_mass)
        if probe is not None:
            rows, eval_logprobs = probe
            train_stats["ratio_first"] = self._ratio(fwd.pi_logprobs[rows], eval_logprobs, mask[rows])
        if self.algo.target_approx_kl is not None:
            train_stats["approx_kl_after"] = self._approx_kl_after(rollout, fwd.pi_logprobs, mask)
        timings["time_optimize"] = time.perf_counter() - t1

        # step 6: KL controller, KL health, statistics
        stats = self._statistics(rollout, raw_scores, scores, fwd, rewards, advantages, returns, mask)
        self.kl_ctl.update(stats["kl"], n_steps=int(stats["episodes"]))
        stats["kl_warning"] = float(self.kl_watch.update(stats["kl"]))
        first = train_stats.get("ratio_first")
        off = first is not None and abs(first - 1.0) > FIRST_RATIO_TOLERANCE
        stats["ratio_warning"] = float(off and not self.ratio_warned)
        self.ratio_warned = self.ratio_warned or off
        stats["kl_negative_steps"] = float(self.kl_watch.negative_steps)
        ev = stats.get("explained_variance")
        stats["ev_warning"] = float(ev is not None and self.ev_watch.update(ev))
        self.steps_done += 1
        return {**stats, **train_stats, **timings, "kl_coef_next": self.kl_ctl.value, "estimator": self.algo.advantage}

    def _ratio(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of pi/pi_old over the model tokens of ``mask`` on every process."""
        ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))
        total, n = self.sum_over_processes((ratio * mask).sum(), mask.sum())
        return total / max(n, 1.0)

    def _approx_kl_after(self, rollout: Rollout, old_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
        """The approx-KL (mean of ½(log pi - log pi_old)² over model tokens) of the updated policy on the batch it
        was updated on: how far this step moved it, including its last optimizer step (which no check before a step
        can see). One forward pass of the policy, without the reference."""
        new_logprobs = self.rollout_forward(rollout, reference_pass=False).pi_logprobs
        d = torch.where(mask.bool(), new_logprobs - old_logprobs, 0.0)
        total, n = self.sum_over_processes(0.5 * d.square().sum(), mask.sum())
        return total / max(n, 1.0)

    def _kl_in_reward(self, kl: torch.Tensor) -> torch.Tensor:
        """The per-token KL that enters the reward: all of it in reward mode, none in loss mode."""
        return kl if self.kl_mode == "reward" else torch.zeros_like(kl)

    def _advantage_inputs(self, fwd: RolloutForward) -> AdvantageInputs:
        a = self.algo
        return AdvantageInputs(beta=self.kl_ctl.value, group_size=a.group_size, scaling=self.scaling,
                               values=fwd.values, gamma=a.gamma, lam=a.lam, whiten_rewards=a.whiten_rewards,
                               critic_lam=self.critic_lam,
                               sum_over_processes=self._sum_tensor_over_processes if self.procs > 1 else None)

    def _optimise(self, batch: LearnerBatch, record: TrainingRecord | None) -> dict[str, float]:
        """Epochs × shuffled minibatches; one optimizer step per minibatch (CleanRL's update loop). ``record``: filled
        in by the training forwards (``reuses_training_pass``), else None."""
        a, b = self.algo, batch.rollout
        local_mini = a.mini_batch_size // self.procs
        # rows sorted by length inside a minibatch, so micro-batches hold rows of similar length and _trim cuts
        # more padding; the loss is normalised by the minibatch's model tokens, so the order only changes float sums
        b_lengths = b.query_mask.sum(dim=1) + b.response_mask.sum(dim=1)
        sums, counts = defaultdict(float), defaultdict(int)
        positions = [0.0, 0.0]  # positions the training forwards computed, of which real tokens
        epochs_done, early_stopped, first_ratio, applied, kl_max = 0, 0.0, None, 0, 0.0
        # the KL guard: a minibatch whose approx-KL to pi_old, measured by its own forward before its optimizer step,
        # is over the limit is not applied, and the step's remaining minibatches and epochs are dropped (checked per
        # minibatch before stepping, as Stable-Baselines3 and Spinning Up do: an epoch's mean, checked after its
        # minibatches stepped, lets a step run far past the target)
        limit = None if a.target_approx_kl is None else KL_GUARD_FACTOR * a.target_approx_kl
        warmup = self.steps_done < self.critic_warmup_steps
        skipped: list[str] = []  # why each skipped minibatch was skipped
        for epoch in range(a.epochs):
            b_inds = torch.randperm(b.batch_size, generator=shuffle_generator(self.seed, self.steps_done, epoch))
            for start in range(0, b.batch_size, local_mini):
                mb_inds = b_inds[start : start + local_mini]
                mb_inds = mb_inds[torch.argsort(b_lengths[mb_inds], stable=True)]
                mb_stats = self._accumulate_minibatch(batch, mb_inds, record, positions)
                where = f"epoch {epoch + 1}, minibatch {start // local_mini + 1}"
                if isinstance(mb_stats, str):
                    # never step on a batch whose loss was dropped (ppo-details item 15)
                    self.par.drop_gradients(self.model, self.optimizer)
                    skipped.append(f"{mb_stats} ({where})")
                    continue
                # every process stops at the same minibatch: the KL is averaged over them
                mb_kl = self.sum_over_processes(mb_stats["approx_kl"])[0] / self.procs
                kl_max = max(kl_max, mb_kl)
                if limit is not None and mb_kl > limit:
                    self.par.drop_gradients(self.model, self.optimizer)
                    early_stopped = 1.0
                    break
                frozen = [g for g in self.optimizer.param_groups if g.get("name") != "critic"] if warmup else []
                saved, scheduled = [g["lr"] for g in frozen], self.scheduler.last_epoch
                for group in frozen:
                    # the policy's group still sees its gradients (Adam's moments of a policy that did not move), at
                    # learning rate 0; the schedule's step sets every group's rate again
                    group["lr"] = 0.0
                grad_norm = self.par.clip_and_step(self.model, self.optimizer, self.scheduler, skip_nonfinite=True)
                if self.scheduler.last_epoch == scheduled:  # a skipped step: the schedule did not move, rates go back
                    for group, lr in zip(frozen, saved):
                        group["lr"] = lr
                if grad_norm is not None and not math.isfinite(grad_norm):
                    # finite losses, non-finite gradients (an overflow inside the backward pass): dropped, not stepped
                    skipped.append(f"non-finite gradient norm {grad_norm} ({where})")
                    continue
                applied += 1
                if grad_norm is not None:
                    mb_stats["grad_norm"] = grad_norm
                if first_ratio is None:
                    first_ratio = mb_stats["ratio"]  # before any optimizer step of this PPO step: 1 up to float noise
                for key, value in mb_stats.items():
                    sums[key] += value
                    counts[key] += 1
            if early_stopped:
                break
            epochs_done += 1
        if len(skipped) == a.epochs * math.ceil(b.batch_size / local_mini):
            raise NonFiniteLossError(
                f"every minibatch of this PPO step was skipped, none stepped the optimizer: {'; '.join(skipped[:3])}"
                + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "") + ". The parts of the loss are "
                "checked separately (policy, value, kl, entropy); a non-finite policy or kl part with finite scores "
                "points at the log-probs (a token the sampling rules forbid), a value part at the reward's scale "
                "(ppo.score_clip, ppo.score_norm=running)")
        keys = sorted(sums)
        reduced = self.sum_over_processes(*[sums[k] / max(counts[k], 1) for k in keys]) if keys else []
        out = {k: v / self.procs for k, v in zip(keys, reduced)}
        if first_ratio is not None and not skipped and record is None:
            # the first minibatch's ratio π/π_old, before any update: exactly what the rollout forward computed
            # (with the training forward's own log-probs as pi_old it is 1 by construction: not reported)
            out["ratio_first"] = self.sum_over_processes(first_ratio)[0] / self.procs
        positions, real = self.sum_over_processes(*positions)
        # share of the positions the training forwards computed that were padding (micro-batches hold rows of similar
        # length, and each is cut to its longest row)
        out["train_pad_fraction"] = 1.0 - real / max(positions, 1.0)
        out.update({"ppo_epochs": float(epochs_done), "early_stopped": early_stopped, "optimizer_steps": float(applied),
                    "approx_kl_max": kl_max, **({"critic_warmup": 1.0} if warmup else {}),
                    "skipped_minibatches": float(len(skipped)), "lr": self.scheduler.get_last_lr()[0]})
        return out

    def _accumulate_minibatch(self, batch: LearnerBatch, mb_inds, record: TrainingRecord | None,
                              positions: list[float]) -> dict[str, float] | str:
        """Forward + backward over a minibatch's micro-batches, gradients accumulated (synchronised across processes
        at the last one). Returns the minibatch's statistics, or, when a part of the loss was non-finite on any
        process (then no gradient is kept), a text naming the part. Adds the positions its forwards computed, and
        the real tokens among them, to ``positions``.

        The loss is aggregated over the whole (global) minibatch as ``ppo.loss_aggregation`` says, whatever
        micro-batch or process a token is in: each micro-batch adds its share (``aggregate_loss`` with the
        minibatch's totals), × processes because DDP averages gradients over processes.
        """
        a, dev = self.algo, self.par.device
        b_tokens = batch.rollout.model_mask.sum(dim=1)
        local_tokens = float(b_tokens[mb_inds].sum())
        global_tokens, global_rows = self.sum_over_processes(local_tokens, len(mb_inds))
        totals = dict(total_tokens=global_tokens, total_sequences=global_rows, constant_length=self.constant_length)
        micro_batches = [mb_inds[i : i + a.micro_batch_size] for i in range(0, len(mb_inds), a.micro_batch_size)]
        mb_stats = defaultdict(float)
        for i, rows in enumerate(micro_batches):
            micro = batch.select(rows)
            mb = micro.rollout
            positions[0] += mb.query_ids.numel() + mb.response_ids.numel()
            positions[1] += float(mb.query_mask.sum() + mb.response_mask.sum())
            mb = mb.to(dev)
            with self.par.micro_batch(self.model, last=i == len(micro_batches) - 1):
                hidden, values = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                                            hidden=True)
                loss, parts = self._minibatch_loss(mb, micro, hidden, values, rows, record, totals)
                loss = loss * self.procs
                losses = [parts[k] for k in LOSS_PARTS if k in parts]
                finite = torch.stack([torch.isfinite(x.detach()).all() for x in losses]).float()
                if self.procs > 1:
                    finite = self.par.reduce(finite, "min")  # every process skips together
                if finite.min().item() < 1:
                    bad = [k.removeprefix("loss_") for k, ok in zip([k for k in LOSS_PARTS if k in parts],
                                                                    finite.tolist()) if ok < 1]
                    return f"non-finite {' and '.join(bad)} loss"
                self.par.backward(self.model, loss)
            # losses are this micro-batch's shares already (they add up); the ratio-type statistics are per micro-batch
            # means, weighted by its share of this process's tokens
            share = float(b_tokens[rows].sum()) / max(local_tokens, 1.0)
            for key, value in parts.items():
                weight = self.procs if key.startswith("loss_") else share
                mb_stats[key] += float(value.detach()) * weight
        return mb_stats

    def _minibatch_loss(self, mb: Rollout, micro: LearnerBatch, hidden, values, rows, record: TrainingRecord | None,
                        totals) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the minibatch loss: clipped policy loss, clipped value loss (gae), β·KL (loss
        mode), minus the entropy bonus; and its parts, for the statistics and the finiteness check. ``mb`` is
        ``micro.rollout`` on the device; ``rows``: its episodes' indices in the batch."""
        dev = self.par.device
        mb_mask = mb.model_mask.float()
        with self.par.autocast():
            stats = token_stats(hidden, self.par.unwrap(self.model).head, mb.response_ids, self.rules,
                                turn_positions=mb.turn_positions, mask=mb_mask.bool(),
                                entropy=self.algo.entropy_coef > 0 or record is not None,
                                forbidden=record is not None and self.rules.restricts)
        if record is None:
            old_logprobs = micro.old_logprobs.to(dev)
        else:
            # this forward runs on the weights the episodes' rollout forward would have: its numbers are pi_old's
            self._check_allowed(mb.response_ids, mb_mask, stats.logprobs, rows)
            old_logprobs = stats.logprobs.detach()
            record.write(rows, stats)
        critic = values is not None and micro.values is not None
        weights, weight_stats = None, {}
        if self.importance_sampling != "none" and mb.sampler_logprobs is not None:
            weights, weight_stats = importance_weights(old_logprobs, mb.sampler_logprobs.to(dev), mb_mask,
                                                       self.importance_sampling, self.importance_sampling_cap)
        loss, parts = ppo_loss(
            stats.logprobs, old_logprobs, micro.advantages.to(dev), mb_mask,
            self.loss_settings, totals,
            values=values if critic else None,
            old_values=micro.values.to(dev) if critic else None,
            returns=micro.returns.to(dev) if critic else None,
            ref_logprobs=micro.ref_logprobs.to(dev) if self.kl_mode == "loss" else None,
            kl_coef=self.kl_ctl.value,
            entropy=stats.entropy if self.algo.entropy_coef > 0 else None,
            is_weights=weights)
        return loss, {**parts, **weight_stats}

    def _statistics(self, rollout, raw_scores, scores, fwd: RolloutForward, rewards, advantages, returns,
                    mask) -> dict[str, float]:
        k1 = (fwd.pi_logprobs - fwd.ref_logprobs) * mask
        n_rows = rollout.batch_size
        lengths = rollout.response_mask.sum(dim=1).float()
        model_tokens = mask.sum()
        values = fwd.values if fwd.values is not None else torch.zeros_like(mask)
        error = (returns - values) * mask  # the critic's error on the returns it is trained towards
        drift, drift_kl = 0.0, 0.0
        if rollout.sampler_logprobs is not None:
            # log pi_trainer - log q_sampler (clamped as the loss's ratio: a statistic must not overflow either)
            log_r = ((fwd.pi_logprobs - rollout.sampler_logprobs) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            drift = log_r.abs().sum()
            # k3 estimate of KL(q_sampler || pi_trainer) on tokens the sampler drew: never negative, 0 when they agree
            drift_kl = ((torch.expm1(log_r) - log_r) * mask).sum()
        # sums over every process, each named beside what it sums
        local = {
            "episodes": n_rows, "score": raw_scores.sum(), "score_sq": (raw_scores**2).sum(),
            "score_used": scores.sum(), "k1": k1.sum(), "tokens": model_tokens, "kl_penalty": (fwd.kl * mask).sum(),
            "entropy": (fwd.entropy * mask).sum(), "length": lengths.sum(), "tool_tokens": rollout.tool_mask.sum(),
            "value": (values * mask).sum(), "return": (returns * mask).sum(), "reward": (rewards * mask).sum(),
            "return_sq": (returns.square() * mask).sum(), "error": error.sum(), "error_sq": error.square().sum(),
            "forbidden": (fwd.forbidden_mass * mask).sum(), "drift": drift, "drift_kl": drift_kl,
            "k1_sq": (k1.sum(dim=1) ** 2).sum(),
        }
        total = dict(zip(local, self.sum_over_processes(*local.values())))
        n, tok, k1_sum = total["episodes"], total["tokens"], total["k1"]
        mean = total["score"] / n
        stats = {
            "episodes": n,
            "reward_mean": mean,
            "reward_std": math.sqrt(max(total["score_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)),
            "score_used_mean": total["score_used"] / n,
            # mean over episodes of the summed per-token log-ratio: the true KL(π‖π_ref) estimate of the batch
            "kl": k1_sum / n,
            # its standard error over the batch's episodes: a mean KL below 0 by a few of these is noise, not a bug
            "kl_std_error": math.sqrt(max(total["k1_sq"] / n - (k1_sum / n) ** 2, 0.0) / max(n - 1, 1)),
            "kl_per_token": k1_sum / max(tok, 1),
            "kl_penalty_per_token": total["kl_penalty"] / max(tok, 1),
            "kl_coef": self.kl_ctl.value,
            "entropy": total["entropy"] / max(tok, 1),
            "response_length": total["length"] / n,
            "model_tokens": tok / n,
            "tool_tokens": total["tool_tokens"] / n,
            "return_mean": total["return"] / max(tok, 1),
            "token_reward_mean": total["reward"] / max(tok, 1),
        }
        if self.rules.restricts:
            stats["forbidden_mass"] = total["forbidden"] / max(tok, 1)
        if fwd.values is not None:
            t = max(tok, 1)
            stats["value_mean"] = total["value"] / t
            stats["value_error"] = math.sqrt(total["error_sq"] / t)  # root mean square of returns - values
            # 1 - Var[returns - values] / Var[returns] over the model tokens of every process: 1 a perfect critic,
            # 0 no better than a constant, below 0 worse than one. Undefined (not logged) when the returns vary by
            # less than the whitening floor: every episode scored alike leaves only noise to explain
            var_returns = max(total["return_sq"] / t - (total["return"] / t) ** 2, 0.0)
            stats["return_std"] = math.sqrt(var_returns)
            if var_returns >= WHITEN_MIN_STD**2:
                stats["explained_variance"] = 1.0 - (total["error_sq"] / t - (total["error"] / t) ** 2) / var_returns
        if rollout.sampler_logprobs is not None:
            # the sampler's log-probs against the training forward's, same weights: 0 up to float noise; large
            # means the sampler and the forward pass disagree (cache, positions, dtype, a model-specific path)
            stats["sampler_logprob_diff"] = total["drift"] / max(tok, 1)
            stats["sampler_kl"] = total["drift_kl"] / max(tok, 1)
            # a rollout engine whose numbers differ from the trainer's (another kernel, precision, a weight sync
            # that did not happen): said once; the loss is not affected (it recomputes the log-probs)
            large = stats["sampler_logprob_diff"] > SAMPLER_DIFF_WARNING
            stats["sampler_warning"] = float(large and not self.sampler_warned)
            self.sampler_warned = self.sampler_warned or large
        return stats

    # --- convenience: lists of id tensors ---------------------------------------------------------------------

    def step_from_ids(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores,
                      response_masks: list[torch.Tensor] | None = None, pad_token_id: int = 0) -> dict[str, float]:
        """One PPO step from 1-D id tensors; ``response_masks`` marks model tokens with 1 (tool output 0)."""
        q_ids, q_mask = left_pad([q.tolist() for q in queries], pad_token_id)
        r_ids, r_mask = right_pad([r.tolist() for r in responses], pad_token_id)
        tool = torch.zeros_like(r_ids)
        if response_masks is not None:
            model_mask, _ = pad([m.tolist() for m in response_masks], 0, "right", min_width=r_ids.shape[1])
            tool = (r_mask * (1 - model_mask)).long()
        rollout = Rollout(q_ids, q_mask, r_ids, r_mask, tool)
        return self.step(rollout, torch.as_tensor(scores, dtype=torch.float32))
