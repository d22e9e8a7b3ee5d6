"""Reward sources behind one interface: ``source(prompts, responses, rows) -> Tensor [N] float32``.

- :class:`FunctionReward`: a user's Python function (``path/to/file.py:name`` or ``module:name``).
- :class:`ModelReward`: a sequence-classifier reward model (an ``rlcli rm`` output dir or a hub id), or a
  reward-model LoRA adapter on the policy's own base (``rlcli.rewards.adapter``).
- :class:`~rlcli.rewards.remote.HTTPReward`: an HTTP reward service (``reward.url``; ``rlcli serve-reward`` serves
  the other two that way).

A source may also keep ``last_info``: a per-response dict (or None) from its last call, which the runs log with
the responses (an HTTP service's ``info``); sources without it have none.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from rlcli.config.errors import Problem, UserError
from rlcli.launch import is_main_process
from rlcli.plugins import resolve_object

# What a reward function may ask for, by parameter name. ``answers`` is the final answer of each episode (in a
# text environment: the submitted text; otherwise the response); ``histories`` are the episodes' TextHistory
# objects (segments, tool calls; None outside a text environment).
ARGUMENTS = ("prompts", "responses", "rows", "answers", "histories")


class RewardSource(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]],
                 answers: list[str] | None = None, histories: list | None = None) -> torch.Tensor: ...


def check_reward_function(spec: str) -> Callable:
    """Resolve the function and check it takes a subset of (prompts, responses, rows); ``UserError`` otherwise."""
    fn = resolve_object(spec)
    if not callable(fn):
        raise UserError(f"reward.function {spec!r} is a {type(fn).__name__}, not a function")
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in ARGUMENTS
               and p.default is p.empty]
    if unknown or not (takes_kwargs or any(n in ARGUMENTS for n in params)):
        raise UserError(f"reward.function {spec!r} must take some of the keyword arguments {', '.join(ARGUMENTS)} "
                        f"(it takes {', '.join(params) or 'nothing'})")
    return fn


class FunctionReward:
    """Calls ``fn(prompts=..., responses=..., rows=...)`` with the arguments it declares; checks the result."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = check_reward_function(spec)
        params = inspect.signature(self.fn).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.arguments = ARGUMENTS if takes_kwargs else tuple(a for a in ARGUMENTS if a in params)

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]],
                 answers: list[str] | None = None, histories: list | None = None) -> torch.Tensor:
        available = {"prompts": prompts, "responses": responses, "rows": rows,
                     "answers": responses if answers is None else answers, "histories": histories}
        try:
            result = self.fn(**{a: available[a] for a in self.arguments})
        except Exception as exc:
            raise UserError(f"reward.function {self.spec!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            scores = torch.as_tensor(result, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"reward.function {self.spec!r} must return one float per sample; "
                            f"got {type(result).__name__}") from None
        if scores.numel() != len(responses):
            raise UserError(f"reward.function {self.spec!r} returned {scores.numel()} scores for {len(responses)} "
                            "samples")
        bad = [i for i, s in enumerate(scores.tolist()) if not math.isfinite(s)]
        if bad:
            raise UserError(f"reward.function {self.spec!r} returned non-finite scores at samples {bad[:5]}")
        return scores


class ModelReward:
    """Scores ``prompt + response`` (or the response alone) with a reward model."""

    def __init__(self, scorer, read: str = "prompt_and_response"):
        self.scorer = scorer
        self.read = read

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict[str, Any]],
                 answers: list[str] | None = None, histories: list | None = None) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses)] if self.read == "prompt_and_response" else list(responses)
        return self.scorer(texts).float().cpu()


def check_reward(recipe) -> list[Problem]:
    """Problems with a recipe's ``reward:`` section findable without loading weights."""
    cfg = recipe.reward
    if cfg.adapter is not None:
        from rlcli.rewards.adapter import check_reward_adapter

        return check_reward_adapter(recipe)
    return check_reward_source(cfg)


def check_reward_source(cfg) -> list[Problem]:
    """Problems with a ``reward:`` section's function, model or service that need no policy to find (for
    ``reward.adapter`` on a policy's base, see ``check_reward_adapter``; here an adapter dir is a model of its own)."""
    from pathlib import Path

    from rlcli.models.checks import source_kind

    problems = []
    if cfg.function is not None:
        try:
            check_reward_function(cfg.function)
        except UserError as exc:
            problems.append(Problem("reward.function", str(exc)))
    elif cfg.url is not None:
        from rlcli.rewards.remote import check_reward_url

        problems += check_reward_url(cfg)
    elif cfg.model is not None or cfg.adapter is not None:
        name = "model" if cfg.model is not None else "adapter"
        path = cfg.model or cfg.adapter
        try:
            kind = source_kind(path)
            if kind == "local" and not ((Path(path) / "config.json").exists()
                                        or (Path(path) / "adapter_config.json").exists()):
                problems.append(Problem(f"reward.{name}", f"{path} has no config.json (not a saved model directory)"))
        except UserError as exc:
            problems.append(Problem(f"reward.{name}", str(exc)))
    return problems


def build_reward(cfg, device=None, *, policy=None, tokenizer=None) -> RewardSource:
    """The reward source a ``RewardConfig`` asks for. ``policy`` (a ``ValueHeadModel`` with a peft LoRA model,
    unwrapped) and its ``tokenizer``: the base a ``reward.adapter`` is loaded onto. None when the section names no
    source (a stateful environment's ``get_reward`` is then the whole reward)."""
    if not cfg.has_source:
        return None
    if cfg.function is not None:
        return FunctionReward(cfg.function)
    if cfg.url is not None:
        from rlcli.rewards.remote import HTTPReward

        return HTTPReward(cfg)
    if cfg.adapter is not None and policy is not None:
        from rlcli.rewards.adapter import AdapterRewardModel

        if not getattr(policy, "is_peft", False):
            raise UserError("reward.adapter needs a LoRA policy (a `lora:` section)")
        scorer = AdapterRewardModel(policy.pretrained, cfg.adapter, label=cfg.label, normalize=cfg.normalize,
                                    batch_size=cfg.batch_size, device=device)
        if tokenizer is not None:
            scorer.check_tokenizer(tokenizer)
        if is_main_process():
            from rlcli.logging import console

            console.print(scorer.describe(), style="dim")
        return ModelReward(scorer, cfg.input)
    from rlcli.rewards.reward_model import RewardModelScorer

    # without a policy to share a base with (rlcli env-rollout), an adapter dir loads as a model of its own
    scorer = RewardModelScorer.from_pretrained(cfg.model or cfg.adapter, label=cfg.label, normalize=cfg.normalize,
                                               batch_size=cfg.batch_size, device=device)
    return ModelReward(scorer, cfg.input)
