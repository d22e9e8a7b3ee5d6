"""Typed containers that carry a PPO batch between rooms (rollout -> scoring -> forward passes -> losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    ``model_mask`` (= response_mask and not tool_mask) marks the tokens the policy chose: the only ones that get
    policy loss, value loss and KL penalty.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    tool_mask: torch.Tensor

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
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return input_ids, attention_mask, position_ids

    def index(self, idx: torch.Tensor | slice) -> "Rollout":
        """Select rows (for minibatches)."""
        return Rollout(
            query_ids=self.query_ids[idx],
            query_mask=self.query_mask[idx],
            response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx],
            tool_mask=self.tool_mask[idx],
        )
