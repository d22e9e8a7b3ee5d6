"""Multi-adapter RLHF: the reward model is a LoRA adapter on the policy's own base model, so PPO holds one copy of
the base weights for the policy, the reference and the reward model.

    reward:
      adapter: runs/rm          # an `rlcli rm` run with `lora:` on the policy's base (model.name_or_path)

The policy is the base with its own adapter, the reference the base with every adapter off, the reward the base with
only the reward adapter on plus its score head. Scoring never switches the active adapter (peft's per-batch
``adapter_names``), so the policy's ``requires_grad`` flags, mode and saved adapters stay its own. Why:
docs/internals.md, "rlcli/rewards/adapter.py".
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from rlcli.config.errors import Problem, UserError
from rlcli.rewards.reward_model import (
    REWARD_STATS_FILE,
    last_token_index,
    load_reward_stats,
    resolve_label,
    score_in_batches,
)

REWARD_ADAPTER = "reward"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# where peft saves a SEQ_CLS adapter's modules_to_save head (``score`` of decoder classifiers)
SCORE_PREFIX = "base_model.model.score."


def _same_path(a: str, b: str) -> bool:
    """Whether two model references name the same thing: one directory (however written), or one hub id."""
    pa, pb = Path(a), Path(b)
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a.strip("/") == b.strip("/")


def _score_shape(weights: Path) -> tuple[int, int] | None:
    """(outputs, hidden) of the score head saved in an adapter file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        key = SCORE_PREFIX + "weight"
        if key not in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            return None
        shape = f.get_slice(key).get_shape()
    return int(shape[0]), int(shape[1])


def check_reward_adapter(recipe) -> list[Problem]:
    """Problems with ``reward.adapter`` findable without loading weights: a LoRA policy, a LoRA reward-model adapter
    with a score head, trained on the policy's base (``model.name_or_path``) with the policy's tokenizer."""
    path, cfg, model = recipe.reward.adapter, recipe.reward, recipe.model
    key = "reward.adapter"
    problems = []
    if recipe.lora is None:
        problems.append(Problem(key, "needs a LoRA policy (a `lora:` section): the reward adapter shares the "
                                          "policy's base weights, which full fine-tuning would change under it (for a "
                                          "separate reward model use reward.model)"))
    from rlcli.launch import detect_launch

    launch = detect_launch()
    if launch.kind == "fsdp" or (launch.kind == "deepspeed" and launch.zero_stage == 3):
        problems.append(Problem(key, f"not supported under {launch.describe()}: the reward forward runs the "
                                          "policy's model outside the sharded engine, where its weights are shards "
                                          "(use DDP or DeepSpeed ZeRO-1/2, or reward.model)"))
    if getattr(model, "architecture", None) is not None:
        problems.append(Problem(key, "the policy is built from scratch (model.architecture), so it cannot share "
                                          "the base the reward adapter was trained on: set model.name_or_path to that "
                                          f"base (see {path}/{ADAPTER_CONFIG}, base_model_name_or_path)"))
        return problems
    if model.gguf_file is not None:
        problems.append(Problem(key, "not supported with model.gguf_file (use reward.model)"))
        return problems
    folder = Path(path)
    if not folder.is_dir():
        missing = f"{path} is not a directory (an `rlcli rm` output dir trained with `lora:`; run that first)"
        return [*problems, Problem(key, missing)]
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        hint = " (a fully trained reward model: use reward.model)" if (folder / "config.json").is_file() else ""
        not_lora = (f"{path} has no {ADAPTER_CONFIG}: not a LoRA adapter{hint}; train the reward model with "
                    "`rlcli rm` and a `lora:` section on the policy's base")
        return [*problems, Problem(key, not_lora)]
    try:
        adapter_cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return [*problems, Problem(key, f"{config_file} cannot be read: {exc}")]
    if adapter_cfg.get("peft_type") != "LORA" or adapter_cfg.get("task_type") != "SEQ_CLS":
        problems.append(Problem(key, f"{path} holds a {adapter_cfg.get('peft_type')} adapter for task "
                        f"{adapter_cfg.get('task_type')}; a reward adapter is a LORA adapter of a sequence classifier "
                        "(SEQ_CLS), as `rlcli rm` with `lora:` saves it"))
        return problems
    weights = folder / ADAPTER_WEIGHTS
    shape = _score_shape(weights) if weights.is_file() else None
    if shape is None:
        problems.append(Problem(key, f"{path} has no score head ({SCORE_PREFIX}weight in {ADAPTER_WEIGHTS}): only "
                                          "decoder reward models (GPT-2, Llama, Qwen2, ... classifiers) can share the "
                                          "policy's base"))
    elif cfg.label is not None:
        try:
            resolve_label(cfg.label, SimpleNamespace(num_labels=shape[0], label2id={}))
        except UserError as exc:
            problems.append(Problem("reward.label", str(exc)))
    base = adapter_cfg.get("base_model_name_or_path")
    if not base or not _same_path(base, model.name_or_path):
        problems.append(Problem(key, f"{path} was trained on base {base!r}, but the policy's model.name_or_path "
                                          f"is {model.name_or_path!r}: the reward adapter only means something on the "
                                          "base it was trained on (point both at the same model)"))
    elif (adapter_cfg.get("revision") or None) != (model.revision or None):
        problems.append(Problem(key, f"{path} was trained on revision {adapter_cfg.get('revision')!r} of {base}, "
                                          f"the policy loads model.revision={model.revision!r}"))
    problems += _tokenizer_problems(recipe, folder)
    if cfg.normalize and not (folder / REWARD_STATS_FILE).is_file():
        problems.append(Problem("reward.normalize", f"{path} has no {REWARD_STATS_FILE} (written by `rlcli rm`); set "
                        "reward.normalize to false"))
    return problems


def _tokenizer_problems(recipe, folder: Path) -> list[Problem]:
    """The reward adapter reads the policy's token ids with the base's embeddings: the two tokenizers must agree.
    Compared when both can be read locally (the adapter dir always; a hub tokenizer only from the local cache)."""
    from transformers import AutoTokenizer

    try:
        rm_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        return [Problem("reward.adapter", f"{folder} has no tokenizer files (`rlcli rm` saves them beside the "
                                          "adapter)")]
    try:
        from rlcli.models.loading import load_tokenizer

        policy_tok = _offline(lambda: load_tokenizer(recipe.model))
    except (UserError, OSError, ValueError):
        return []  # a hub tokenizer that is not cached: the base ids were compared above
    if policy_tok is None or tokenizer_fingerprint(policy_tok) == tokenizer_fingerprint(rm_tok):
        return []
    message = (f"{folder} was trained with another tokenizer than the policy's (model.tokenizer / "
               f"model.name_or_path: {recipe.model.tokenizer_source}): {len(rm_tok)} vs {len(policy_tok)} tokens or "
               "different ids; the reward adapter must read the policy's token ids as it was trained to")
    return [Problem("reward.adapter", message)]


def _offline(load):
    """``load()`` with the hub switched off: a dry run reads only local files."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return load()
    import os

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        return load()
    finally:
        constants.HF_HUB_OFFLINE = False
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def tokenizer_fingerprint(tokenizer) -> tuple:
    """What must agree for two tokenizers to give the same ids: the vocabulary and EOS."""
    return tuple(sorted(tokenizer.get_vocab().items())), tokenizer.eos_token_id


@contextmanager
def modes_kept(model: nn.Module, *, evaluate: bool = False):
    """Every module's own train / eval flag back as it was after the block (in eval mode when ``evaluate``)."""
    modes = [(m, m.training) for m in model.modules()]
    if evaluate:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _decoder_trunk(peft_model) -> nn.Module:
    """The transformer trunk (GPT2Model, LlamaModel, ...) under a peft causal LM: its output is the hidden state a
    sequence classifier's score head reads."""
    lm = peft_model.get_base_model()
    trunk = getattr(lm, lm.base_model_prefix, None)
    if not isinstance(trunk, nn.Module):
        raise UserError(f"reward.adapter: cannot find the transformer trunk of {type(lm).__name__}")
    return trunk


class AdapterRewardModel:
    """Scores texts with the reward adapter on the policy's base: ``scorer(texts)`` -> Tensor [N] float32 on CPU.

    ``peft_model`` is the policy's peft model (unwrapped); the adapter is loaded into it under the name ``reward``,
    frozen. See the module docstring for how the policy's adapter and gradients are kept safe.
    """

    def __init__(self, peft_model, adapter_dir: str, *, label: str | int | None = None, normalize: bool = False,
                 batch_size: int = 32, max_length: int | None = None, device=None):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from rlcli.models.value_head import disable_dropout

        if batch_size < 1:
            raise UserError(f"reward.batch_size must be positive, got {batch_size}")
        if REWARD_ADAPTER in peft_model.peft_config:
            raise UserError(f"the policy already has an adapter named {REWARD_ADAPTER!r}")
        self.model = peft_model
        self.policy_adapter = peft_model.active_adapter
        folder = Path(adapter_dir)
        policy_trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        with modes_kept(peft_model):  # peft puts the whole model in eval mode when it loads a frozen adapter
            peft_model.load_adapter(str(folder), adapter_name=REWARD_ADAPTER, is_trainable=False)
        # Out of peft_config, peft saves and lists only the policy's adapter; the LoRA layers keep the reward's
        # weights, which the adapter_names routing below finds by name.
        self.adapter_config = peft_model.peft_config.pop(REWARD_ADAPTER)
        disable_dropout(peft_model)  # the reward adapter's own lora_dropout, which the policy's pass did not see
        if peft_model.active_adapter != self.policy_adapter:
            raise RuntimeError("loading the reward adapter changed the policy's active adapter")
        now_trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if now_trainable != policy_trainable:
            raise RuntimeError(f"loading the reward adapter changed which weights train: "
                               f"{sorted(now_trainable ^ policy_trainable)[:4]}")
        self.reward_parameters = [p for n, p in peft_model.named_parameters() if f".{REWARD_ADAPTER}." in n]
        if not self.reward_parameters:
            raise UserError(f"reward.adapter: {adapter_dir} put no LoRA weights on the policy's base")
        self.lora_layers = sum(1 for m in peft_model.modules()
                               if isinstance(m, BaseTunerLayer) and REWARD_ADAPTER in getattr(m, "lora_A", {}))

        state = load_file(str(folder / ADAPTER_WEIGHTS))
        weight = state[SCORE_PREFIX + "weight"].float()
        bias = state.get(SCORE_PREFIX + "bias")
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias is not None:
                self.head.bias.copy_(bias.float())
        self.head.requires_grad_(False).eval()
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            self.head.to(self.device)

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.label = resolve_label(label, SimpleNamespace(num_labels=weight.shape[0], label2id={}))
        self.stats = load_reward_stats(str(folder))
        if normalize and not self.stats:
            raise UserError(f"reward.normalize: {adapter_dir} has no {REWARD_STATS_FILE} (written by `rlcli rm`)")
        self.normalize = normalize
        self.batch_size = batch_size
        limit = getattr(peft_model.config, "max_position_embeddings", None) or getattr(peft_model.config, "n_positions",
                                                                                        None)
        self.max_length = max_length or (self.stats or {}).get("max_length") or limit
        self.trunk = _decoder_trunk(peft_model)

    def check_tokenizer(self, policy_tokenizer) -> None:
        """Refuse a policy tokenizer that gives other ids than the one the reward adapter was trained with."""
        if tokenizer_fingerprint(policy_tokenizer) != tokenizer_fingerprint(self.tokenizer):
            raise UserError("reward.adapter: the reward adapter was trained with another tokenizer than the policy's "
                            "(model.tokenizer / model.name_or_path); they must give the same token ids")

    def _encode(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        fallback = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        out = []
        for ids in tok(list(texts))["input_ids"]:
            if self.max_length:
                ids = ids[-self.max_length :]  # keep the end, where the score is read (as `rlcli rm` trains)
            out.append(ids if ids else [fallback])  # an empty text still gets a score
        return out

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("AdapterRewardModel takes a list of texts, not one string")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.trunk.parameters()).device
        self.head.to(device)
        captured: list[torch.Tensor] = []

        def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            captured.clear()
            # adapter_names routes every row through the reward adapter alone (base + reward LoRA), without touching
            # the active adapter; logits_to_keep=1 skips the LM head's work over the vocabulary
            self.model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
                       adapter_names=[REWARD_ADAPTER] * len(input_ids), logits_to_keep=1, use_cache=False)
            hidden = captured[-1]
            last = hidden[torch.arange(len(input_ids), device=hidden.device), last_token_index(attention_mask)]
            return self.head(last.float())[:, self.label]

        hook = self.trunk.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
        try:
            with modes_kept(self.model, evaluate=True):
                scores = score_in_batches(self._encode(texts), self.batch_size, pad, score)
        finally:
            hook.remove()
        if self.model.active_adapter != self.policy_adapter:  # cannot happen with adapter_names; cheap to be sure
            raise RuntimeError("the policy's adapter is no longer active after reward scoring")
        if self.normalize:
            scores = (scores - self.stats["mean"]) / max(float(self.stats["std"]), 1e-8)
        return scores

    def describe(self) -> str:
        n = sum(p.numel() for p in self.reward_parameters) + sum(p.numel() for p in self.head.parameters())
        return f"reward adapter on the policy's base: {self.lora_layers} LoRA layers, {n:,} frozen parameters"


def unique_parameter_bytes(*modules: Any) -> int:
    """Bytes of all distinct parameter storages reachable from ``modules`` (None skipped): tensors that share
    memory (one base under several adapters, tied embeddings) count once."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            storage = p.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
