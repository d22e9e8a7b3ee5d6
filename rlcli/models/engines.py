"""Rollout engines: what generates PPO's episodes. ``local`` (rlcli's own sampler) or ``vllm`` (a serving engine).

    engine.sync(policy)                                           # once per PPO step, before its rollouts
    out = engine.generate(prompt_ids, budgets, rules=..., eos_token_id=..., pad_token_id=..., stop_strings=...,
                          tokenizer=..., generator=...)            # a SampleOutput, as rlcli.models.generation.sample

Every engine takes prompts as token ids, samples under the recipe's ``SamplingRules`` and returns its own log-prob of
every generated token, which the learner only compares with its own (``sampler_logprob_diff``). ``LocalEngine``
samples from the policy itself; ``VLLMEngine`` runs vLLM in the training process and gets the policy's weights by
``sync``. The contract in full: docs/internals.md, "rlcli/models/engines.py".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rlcli.models.generation import SampleOutput, sample
from rlcli.padding import left_pad, pad
from rlcli.rl.sampling import SamplingRules


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 rules: SamplingRules, eos_token_id, pad_token_id: int, stop_strings: Sequence[str] = (),
                 tokenizer=None, generator: torch.Generator | None = None) -> SampleOutput: ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Take the weights of ``policy`` (the policy's LM: a transformers model or a peft model around one)."""

    def release(self) -> None:
        """The step's rollouts are done: free what the engine can until the next ``sync``."""


class LocalEngine:
    """rlcli's own KV-cache sampler on the policy itself: the reference the other engines are compared with."""

    name = "local"

    def __init__(self, lm: torch.nn.Module):
        self.lm = lm
        self.syncs = 0

    def generate(self, prompts, max_new_tokens, *, rules, eos_token_id, pad_token_id, stop_strings=(),
                 tokenizer=None, generator=None) -> SampleOutput:
        ids, mask = left_pad(prompts, pad_token_id)
        device = next(self.lm.parameters()).device
        return sample(self.lm, ids.to(device), mask.to(device), max_new_tokens, rules=rules,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings,
                      tokenizer=tokenizer, generator=generator)

    def sync(self, policy) -> None:
        self.syncs += 1  # the sampler reads the policy's own weights: nothing to copy

    def release(self) -> None:
        pass  # nothing of its own to free


def plain_weights(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The LM's current weights under a plain Hugging Face model's names, for another engine to load.

    A peft LoRA model is merged for the copy and unmerged again (``merge_adapter`` / ``unmerge_adapter``), so the
    names are the base model's (no ``base_model.model.`` prefix, no ``.base_layer``, no ``lora_`` tensors) and the
    values are what the adapted model computes with."""
    is_peft = hasattr(lm, "peft_config")
    if is_peft:
        lm.merge_adapter()
    try:
        for name, tensor in lm.state_dict().items():
            if is_peft:
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                tensor = tensor.clone()  # unmerging below changes the merged weights in place
            yield name, tensor.detach()
    finally:
        if is_peft:
            lm.unmerge_adapter()


@dataclass
class VLLMSettings:
    """The ``generation.vllm`` knobs (see rlcli.config.ppo.VLLMConfig)."""

    gpu_memory_utilization: float = 0.3
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = True
    sleep_between_steps: bool = False


class VLLMEngine:
    """vLLM in the training process. Prompts go in as token ids (``TokensPrompt``); sampling follows the recipe's
    rules (temperature; ``min_tokens`` bans the stop ids until then, as rlcli's ``min_new_tokens``; a banned EOS is a
    ``logit_bias`` of -inf-like size); vLLM reports log-probs of the processed distribution
    (``logprobs_mode="processed_logprobs"``), the one it sampled from. Weights are copied in by ``sync``.
    """

    name = "vllm"

    def __init__(self, model_dir: str | Path, settings: VLLMSettings, seed: int = 0):
        import os

        # the engine core in this process (colocated): weights are then copied in by reference, not pickled to a
        # worker process, and nothing is spawned
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # rlcli shows its own progress
        from vllm import LLM

        self.settings = settings
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=settings.dtype, seed=seed,
                       gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
                       enforce_eager=settings.enforce_eager, enable_prefix_caching=True,
                       logprobs_mode="processed_logprobs", enable_sleep_mode=settings.sleep_between_steps)
        self.syncs = 0
        self.sleeping = False

    def generate(self, prompts, max_new_tokens, *, rules, eos_token_id, pad_token_id, stop_strings=(),
                 tokenizer=None, generator=None) -> SampleOutput:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if eos_token_id is None:
            eos_ids = []
        else:
            eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        # one seed per row from the caller's generator, as rlcli's sampler draws them
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params, live = [], []
        for i, budget in enumerate(budgets):
            if budget <= 0:
                continue
            bias = {int(t): -1e9 for t in rules.banned_ids}
            params.append(SamplingParams(
                n=1, temperature=rules.temperature, top_k=rules.top_k or -1, top_p=rules.top_p, max_tokens=budget,
                min_tokens=min(rules.min_new_tokens, budget), stop=list(stop_strings) or None,
                stop_token_ids=eos_ids or None, ignore_eos=not eos_ids, include_stop_str_in_output=True,
                logprobs=0, seed=seeds[i], logit_bias=bias or None, detokenize=bool(stop_strings)))
            live.append(i)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i in live], params,
                                    use_tqdm=False) if live else []
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        for i, out in zip(live, outputs):
            completion = out.outputs[0]
            tokens[i] = list(completion.token_ids)
            logprobs[i] = [entry[tok].logprob for entry, tok in zip(completion.logprobs or [], tokens[i])]
            if tokens[i] and tokens[i][-1] in eos_ids:
                reasons[i] = "eos"
            elif completion.finish_reason == "stop":
                reasons[i] = "stop_string"
        response_ids, response_mask = pad(tokens, pad_token_id, "right")
        response_logprobs, _ = pad(logprobs, 0.0, "right", dtype=torch.float32)
        n = [len(t) for t in tokens]
        return SampleOutput(response_ids=response_ids, response_mask=response_mask, logprobs=response_logprobs,
                            stop_reason=reasons, num_generated=n, generated_positions=sum(n), computed_positions=0,
                            padded_positions=0, prefill_positions=0, prefill_pad_positions=0)

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into vLLM's model (in this process)."""
        dtype = self.llm.llm_engine.model_config.dtype  # the precision vLLM runs in (auto: the checkpoint's)
        weights = [(name, tensor.to(dtype)) for name, tensor in plain_weights(policy)]
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        # vLLM's in-place reload (its workers' reload_weights: the model's own load_weights by Hugging Face names,
        # wrapped in the layerwise reload that redoes any post-load processing); in this process, by reference
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.syncs += 1

    def release(self) -> None:
        """Free the engine's memory while the optimizer runs (``sleep_between_steps``): level 1 offloads the weights
        to CPU memory and drops the KV cache; the next ``sync`` wakes it and copies the new weights in."""
        if self.settings.sleep_between_steps and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True
