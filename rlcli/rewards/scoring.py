"""How a finished episode becomes a score: the one function ``rlcli ppo`` and ``rlcli env-rollout`` share.

    scored = score_episodes(reward, recipe.reward, rollout, tokenizer, prompts=..., rows=..., stop_ids=...,
                            stop_strings=..., histories=...)

1. the response text: the response's tokens (model and tool tokens, not padding) decoded without special tokens,
   cut at the first stop string (kept) or ``reward.truncate_at`` string (dropped: the "EOS trick", ppo-details
   item 5); a text environment's episodes are cut at ``truncate_at`` only (its turns end by its protocol);
2. whether it stopped by itself: it ended with one of ``stop_ids`` (EOS, a chat template's end of turn) or a stop
   string; in a text environment, it submitted an answer or ended at EOS;
3. the reward source's scores (``prompts`` are the rows' prompts as the data gave them) × ``reward.weight``, plus
   a stateful environment's ``get_reward()`` × ``reward.environment_weight`` (``history.env_reward``; either part
   may be missing), then ``reward.missing_eos_penalty`` in place of the score of every response that did not
   stop, and ``reward.failure_score`` in place of the score of every episode whose environment failed.

Scoring the same episode twice, in either command, gives the same number: ``accept_min_reward`` in env-rollout
filters on the reward PPO trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlcli.rl.types import Rollout

STOPPED = ("submit", "eos", "done")
"""How an episode that stopped by itself ends: the model submitted or ended it, or its environment did."""


@dataclass(frozen=True)
class ScoredEpisodes:
    """``responses`` [B] the texts the reward read; ``stopped`` [B] whether each ended by itself; ``scores`` [B]
    float32, after the missing-EOS penalty; ``info`` [B] what the source said about each response (a reward
    service's ``info`` objects), None when it said nothing."""

    responses: list[str]
    stopped: list[bool]
    scores: torch.Tensor
    info: list[dict | None] | None = None


def response_texts(rollout: Rollout, tokenizer, *, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                   truncate_at: Sequence[str] = ()) -> tuple[list[str], list[bool]]:
    """Decoded responses (cut at the first stop / truncate string) and whether each one stopped by itself."""
    texts, stopped = [], []
    stop_ids = set(stop_ids)
    cuts = [(s, True) for s in stop_strings] + [(s, False) for s in truncate_at]
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        ended = bool(ids) and ids[-1] in stop_ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        found = [(text.index(s), s, keep) for s, keep in cuts if s in text]
        if found:
            at, s, keep = min(found, key=lambda f: f[0])  # the first one in the text, whichever list it is from
            text = text[: at + len(s)] if keep else text[:at]
            ended = True
        texts.append(text)
        stopped.append(ended)
    return texts, stopped


def score_episodes(reward, reward_cfg, rollout: Rollout, tokenizer, *, prompts: list, rows: list[dict],
                   stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                   histories: list | None = None) -> ScoredEpisodes:
    """Steps 1-3 of the module docstring for a batch of episodes (``histories``: a text environment's)."""
    if histories is not None:
        responses, _ = response_texts(rollout, tokenizer, truncate_at=reward_cfg.truncate_at)
        stopped = [h.finish_reason in STOPPED for h in histories]
        answers = [h.answer or "" for h in histories]
    else:
        responses, stopped = response_texts(rollout, tokenizer, stop_ids=stop_ids, stop_strings=stop_strings,
                                            truncate_at=reward_cfg.truncate_at)
        answers = None
    if reward is not None:
        scores = reward(prompts, responses, rows, answers=answers, histories=histories)
        if reward_cfg.weight != 1.0:
            scores = scores * reward_cfg.weight
    else:  # a stateful environment owns the whole reward
        scores = torch.zeros(len(responses))
    env_rewards = [getattr(h, "env_reward", None) for h in histories or ()]
    if any(r is not None for r in env_rewards):
        scores = scores + reward_cfg.environment_weight * torch.tensor([r or 0.0 for r in env_rewards])
    if reward_cfg.missing_eos_penalty is not None:
        scores = torch.where(torch.tensor(stopped), scores, torch.tensor(reward_cfg.missing_eos_penalty))
    failed = [getattr(h, "env_error", None) is not None for h in histories or ()]
    if any(failed):
        scores = torch.where(torch.tensor(failed), torch.tensor(reward_cfg.failure_score), scores)
    return ScoredEpisodes(responses, stopped, scores.float(), getattr(reward, "last_info", None))
