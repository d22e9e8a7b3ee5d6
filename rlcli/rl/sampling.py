"""The behaviour policy: how a model's raw logits become the distribution that tokens are drawn from.

PPO's log-probs, entropy and KL must belong to the distribution the tokens were sampled from (docs/ppo-details.md,
item 4), so every rule that reshapes it lives in ``SamplingRules`` and one function, ``SamplingRules.apply``, turns
raw logits into the behaviour distribution's: the sampler, the rollout forward (policy and reference) and the
training forward all call it. The rules: ``temperature``, ``banned_ids``, ``min_new_tokens`` with ``eos_ids``,
``top_k`` / ``top_p``; position rules count within a model turn (``turn_positions``). Masked tokens get logit
``-inf``. In detail: docs/internals.md, "rlcli/rl/sampling.py".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingRules:
    """Everything that decides the sampling distribution at one position, given the model's logits.

    Attributes:
        temperature: > 0 divides the logits; 0 means greedy decoding (argmax; log-probs at temperature 1).
        top_k: keep the ``top_k`` most likely tokens (0 keeps all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1.0 keeps all).
        eos_ids: the ids ``min_new_tokens`` bans.
        min_new_tokens: ``eos_ids`` are banned while a model turn has fewer tokens than this.
        banned_ids: never allowed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")

    @property
    def restricts(self) -> bool:
        """True when some rule besides the temperature forbids tokens."""
        return bool(self.banned_ids or (self.min_new_tokens and self.eos_ids) or self.filters)

    @property
    def filters(self) -> bool:
        """True when top-k or top-p truncate the distribution (a rule that depends on the logits themselves)."""
        return self.top_k > 0 or self.top_p < 1.0

    def description(self) -> str:
        """The rules in words, for messages."""
        parts = [f"temperature {self.temperature:g}"]
        if self.banned_ids:
            parts.append(f"token ids {list(self.banned_ids)} never sampled")
        if self.min_new_tokens and self.eos_ids:
            parts.append(f"EOS {list(self.eos_ids)} banned for the first {self.min_new_tokens} tokens of a turn")
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1.0:
            parts.append(f"top-p {self.top_p:g}")
        return ", ".join(parts)

    def apply(self, logits: torch.Tensor, turn_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits -> the behaviour distribution's logits (float32; forbidden tokens at ``-inf``).

        Args:
            logits: ``[..., T, V]`` (one row ``[T, V]`` or a batch ``[B, T, V]``), any floating dtype.
            turn_positions: ``[..., T]`` long, each position's index inside its model turn; needed only when
                ``min_new_tokens > 0`` (None = position 0, 1, 2, ... along T).

        Returns:
            float32 (float64 stays float64) tensor of ``logits``' shape; ``log_softmax`` of it gives the log-probs
            of the distribution the sampler draws from, and it is differentiable w.r.t. ``logits``.
        """
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.temperature > 0 and self.temperature != 1.0:
            z = z / self.temperature
        ban = self._ban_mask(z, turn_positions)
        if ban is not None:
            z = z.masked_fill(ban, float("-inf"))
        if self.top_k > 0 and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            sorted_p = torch.softmax(sorted_z, dim=-1)
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            drop = mass_before >= self.top_p
            drop[..., 0] = False  # the most likely token always stays
            z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
        return z

    def _ban_mask(self, z: torch.Tensor, turn_positions: torch.Tensor | None) -> torch.Tensor | None:
        """``[..., T, V]`` bool, True where a token is forbidden; None when nothing is."""
        vocab = z.shape[-1]
        banned = [t for t in self.banned_ids if 0 <= t < vocab]
        early = [t for t in self.eos_ids if 0 <= t < vocab] if self.min_new_tokens > 0 else []
        if not banned and not early:
            return None
        mask = torch.zeros(vocab, dtype=torch.bool, device=z.device)
        mask[banned] = True
        mask = mask.expand(z.shape)
        if early:
            if turn_positions is None:
                turn_positions = torch.arange(z.shape[-2], device=z.device).expand(z.shape[:-1])
            eos = torch.zeros(vocab, dtype=torch.bool, device=z.device)
            eos[early] = True
            too_early = (turn_positions.to(z.device) < self.min_new_tokens)[..., None]
            mask = mask | (too_early & eos)
        return mask

    def logprobs(self, logits: torch.Tensor, labels: torch.Tensor,
                 turn_positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-prob of each label under the behaviour distribution. ``logits`` ``[B, T, V]``, ``labels``,
        ``turn_positions`` and ``mask`` ``[B, T]``; returns ``[B, T]`` float32. One row at a time, so at most one
        row's ``[T, V]`` float32 copy exists besides the logits (a bf16 batch is never upcast as a whole).

        ``mask`` (1 on the labels that count): elsewhere the log-prob is exactly 0, with no gradient. Padding's label
        is the PAD id, and when PAD is EOS the rules may ban it there (``min_new_tokens``, ``stop_at_eos: false``):
        its log-prob is ``-inf``, and any nonlinear term built on it (the k2 / k3 KL, a ratio) turns the ``0 · inf``
        of a later ``torch.where`` into a NaN gradient. Masked here, at the source, no later term sees it."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
        rows = []
        for i in range(logits.shape[0]):
            z = self.apply(logits[i], None if turn_positions is None else turn_positions[i])
            row = z.gather(-1, labels[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
            if mask is not None:
                row = torch.where(mask[i].to(device=row.device, dtype=torch.bool), row, torch.zeros_like(row))
            rows.append(row)
        if not rows:
            return logits.new_zeros(labels.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
        return torch.stack(rows)

    def entropy(self, logits: torch.Tensor, turn_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Entropy (nats) of the behaviour distribution at every position: ``[B, T, V]`` -> ``[B, T]``."""
        rows = []
        for i in range(logits.shape[0]):
            z = self.apply(logits[i], None if turn_positions is None else turn_positions[i])
            rows.append(_entropy(z))
        if not rows:
            return logits.new_zeros(logits.shape[:-1], dtype=torch.promote_types(logits.dtype, torch.float32))
        return torch.stack(rows)

    def full_kl(self, logits: torch.Tensor, ref_logits: torch.Tensor,
                turn_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``KL(pi || ref)`` over the vocabulary at every position, both under these rules: ``[B, T]``."""
        if logits.shape != ref_logits.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
        rows = []
        for i in range(logits.shape[0]):
            pos = None if turn_positions is None else turn_positions[i]
            logp = torch.log_softmax(self.apply(logits[i], pos), dim=-1)
            ref_logp = torch.log_softmax(self.apply(ref_logits[i], pos), dim=-1)
            p = logp.exp()
            rows.append(torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p)).sum(dim=-1))
        if not rows:
            return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
        return torch.stack(rows).clamp(min=0)

    def forbidden_mass(self, logits: torch.Tensor, turn_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Probability the *unrestricted* tempered distribution puts on tokens these rules forbid: ``[B, T]``.

        A health signal: the loss never sees those tokens, so this should not grow during training; under the old
        bug (restricted sampling, unrestricted loss) it rose from 0.004 to 0.75.
        """
        plain = SamplingRules(temperature=self.temperature if self.temperature > 0 else 1.0)
        rows = []
        for i in range(logits.shape[0]):
            pos = None if turn_positions is None else turn_positions[i]
            z_all = plain.apply(logits[i])
            z_kept = self.apply(logits[i], pos)
            kept = torch.exp(torch.logsumexp(z_kept, dim=-1) - torch.logsumexp(z_all, dim=-1))
            rows.append(1.0 - kept)
        if not rows:
            return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
        return torch.stack(rows).clamp(min=0)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    # H = logsumexp(z) - sum_v p_v z_v; forbidden tokens (z = -inf, p = 0) contribute 0. z is made finite there
    # first: p * (-inf) is NaN, and even hidden by a torch.where its gradient would be 0 · inf = NaN
    p = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return torch.logsumexp(z, dim=-1) - (p * finite_z).sum(dim=-1)


def turn_positions(model_mask: torch.Tensor) -> torch.Tensor:
    """Index of every response position inside its model turn: ``[B, R]`` 0/1 -> ``[B, R]`` long.

    Counts model tokens from 0 at the start of the response and again after every run of non-model positions
    (forced tool tokens), which is how the sampler counts the steps of each turn. Values at non-model positions
    are meaningless (they are never scored).

    Example: mask ``[1, 1, 0, 0, 1, 1, 1]`` -> ``[0, 1, _, _, 0, 1, 2]``.
    """
    r = model_mask.shape[-1]
    idx = torch.arange(r, device=model_mask.device).expand_as(model_mask)
    # index of the latest non-model position at or before each position (-1 if none)
    breaks = torch.where(model_mask.bool(), torch.full_like(idx, -1), idx)
    last_break = torch.cummax(breaks, dim=-1).values
    return (idx - last_break - 1).clamp(min=0)
