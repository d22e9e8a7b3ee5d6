"""Typed containers that carry a PPO batch between rooms (rollout -> scoring -> forward passes -> losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcli.padding import position_ids
from rlcli.rl.sampling import turn_positions


@dataclass(frozen=True)
class Rollout:
    """A batch of finished episodes, as token ids, ready for forward passes.

    Shapes: B = batch, Q = longest query, R = longest response.

    - ``query_ids``   [B, Q] long: prompt tokens, **left**-padded with the pad id.
    - ``query_mask``  [B, Q] long: 1 on real prompt tokens, 0 on padding.
    - ``response_ids`` [B, R] long: everything after the prompt (model tokens and, in a text environment, tool
      output tokens), **right**-padded.
    - ``response_mask`` [B, R] long: 1 on real response tokens (model or tool), 0 on padding.
    - ``tool_mask``   [B, R] long: 1 on tokens a tool wrote (forced text the model did not choose), else 0.

    - ``sampler_logprobs`` [B, R] float or None: the log-probs the sampler drew each model token with (0 elsewhere).
      Never used in the loss (the rollout forward recomputes them); compared with them as a health check.

    ``model_mask`` (= response_mask and not tool_mask) marks the tokens the policy chose: the only ones that get
    policy loss, value loss and KL penalty.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    tool_mask: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None

    @property
    def model_mask(self) -> torch.Tensor:
        """[B, R] long: 1 on tokens the policy generated."""
        return self.response_mask * (1 - self.tool_mask)

    @property
    def batch_size(self) -> int:
        return self.query_ids.shape[0]

    def full_sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate query and response for a decoder-only forward pass.

        Returns ``input_ids`` [B, Q+R], ``attention_mask`` [B, Q+R] and ``position_ids`` [B, Q+R]. Positions
        come from the attention mask's cumulative sum, so a left-padded row gets the same positions as the
        same row without padding (ppo-details.md item 3). The logits that predict response token ``t`` sit at
        index ``Q - 1 + t``.
        """
        input_ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return input_ids, attention_mask, position_ids(attention_mask)

    @property
    def turn_positions(self) -> torch.Tensor:
        """[B, R] long: each model token's index inside its model turn (``rlcli.rl.sampling.turn_positions``)."""
        return turn_positions(self.model_mask)

    def to(self, device) -> "Rollout":
        return Rollout(*(None if t is None else t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple:
        return (self.query_ids, self.query_mask, self.response_ids, self.response_mask, self.tool_mask,
                self.sampler_logprobs)

    def index(self, idx: torch.Tensor | slice) -> "Rollout":
        """Select rows (for minibatches)."""
        return Rollout(*(None if t is None else t[idx] for t in self._tensors()))


@dataclass(frozen=True)
class RolloutForward:
    """What the forward passes without autograd compute for a ``Rollout`` before any update. All ``[B, R]`` float32
    on the CPU, aligned with ``Rollout.response_ids``, 0 on padding and tool tokens (only model tokens are scored):

    - ``pi_logprobs``: log pi_old of each response token under the behaviour distribution (the PPO ratio's
      denominator);
    - ``values``: the value head's V(s_t), or None for estimators without a critic;
    - ``ref_logprobs``: log pi_ref of the same tokens, under the same sampling rules;
    - ``kl``: the recipe's per-token KL estimator (``kl.estimator``), what the reward is penalised with;
    - ``entropy``: entropy of the behaviour distribution at each position;
    - ``forbidden_mass``: probability the unrestricted policy puts on tokens the sampling rules forbid there (a
      health signal; 0 when there are no rules).
    """

    pi_logprobs: torch.Tensor
    values: torch.Tensor | None
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    forbidden_mass: torch.Tensor
