"""Score texts with a sequence-classifier reward model: the API PPO uses, and the score reading rlcli rm trains.

    scorer = RewardModelScorer.from_pretrained("runs/rm", normalize=True)      # an rlcli rm output dir, or a hub id
    scores = scorer(["a text", "another text"])                                # Tensor [2] float32, on CPU

``sequence_scores`` reads the score at the last position whose attention mask is 1 (not the last non-pad token, which
is wrong when PAD = EOS); texts longer than ``max_length`` lose their start; ``normalize=True`` uses the mean and std
of ``reward_stats.json``. In detail: docs/internals.md, "rlcli/rewards/reward_model.py".
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from rlcli import padding, rundir
from rlcli.config.errors import UserError

REWARD_STATS_FILE = "reward_stats.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row: ``attention_mask`` [B, T] (0/1) -> [B] long.

    Works for left and right padding; a row without any real token gets 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / peft wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DistributedDataParallel
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Classifier outputs read at the last real token of each row.

    input_ids, attention_mask: [B, T] (left or right padding). Returns [B, num_labels] in the model's dtype,
    differentiable (call it under ``torch.no_grad()`` to score). ``model`` may be wrapped by peft or DDP.
    """
    inner = _inner_model(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):  # encoders: the model pools its first token itself
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    kwargs: dict[str, Any] = {}
    if "position_ids" in inspect.signature(inner.forward).parameters:
        # positions count real tokens only, so a left-padded text reads exactly like a right-padded one
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    per_token = captured[-1] if captured else None
    if per_token is None or per_token.dim() != 3:  # a head applied after pooling: trust the model's own reading
        return out.logits
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_token_index(attention_mask).to(per_token.device)]


def save_reward_stats(output_dir: str | Path, mean: float, std: float, count: int, max_length: int) -> Path:
    """Write ``reward_stats.json``: score statistics over the training texts, and the truncation length used."""
    path = Path(output_dir) / REWARD_STATS_FILE
    rundir.claim(output_dir, REWARD_STATS_FILE)
    path.write_text(json.dumps({"mean": mean, "std": std, "count": count, "max_length": max_length}, indent=2) + "\n")
    return path


def load_reward_stats(name_or_path: str, revision: str | None = None) -> dict[str, Any] | None:
    """The ``reward_stats.json`` of a local dir or hub repo, or None when it has none."""
    local = Path(name_or_path)
    if local.exists():
        path = local / REWARD_STATS_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, REWARD_STATS_FILE, revision=revision)).read_text())
    except Exception:  # not on the hub repo, or offline: the caller decides whether that matters
        return None


def resolve_label(label: str | int | None, config) -> int:
    """Output column for ``label``: an index, a ``config.label2id`` name, or None (the only / first output)."""
    n = int(getattr(config, "num_labels", 1))
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if label is None:
        if n > 1:
            warnings.warn(f"the reward model has {n} outputs ({', '.join(names) or 'unnamed'}); using output 0. "
                          "Pass label= to choose one.", stacklevel=3)
        return 0
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, int):
        if not 0 <= label < n:
            raise UserError(f"reward model label {label} is out of range: the model has {n} output(s)")
        return label
    by_name = names.get(label)
    if by_name is None:
        by_name = next((v for k, v in names.items() if k.lower() == label.lower()), None)
    if by_name is None:
        raise UserError(f"reward model has no label {label!r}; its labels are {', '.join(names) or 'unnamed'} "
                        f"(or pass an index 0..{n - 1})")
    return by_name


def _load(name_or_path: str, revision: str | None):
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per from_pretrained; a scorer is a building block, and whoever
    # uses it (a PPO run, a script) shows its own progress
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_quietly(name_or_path, revision)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_quietly(name_or_path: str, revision: str | None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = Path(name_or_path)
    try:
        if (local / "adapter_config.json").is_file():
            # rlcli LoRA reward models: a one-output classifier base, the adapter and its score head on top.
            from peft import PeftModel

            base_name = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=1)
            model = PeftModel.from_pretrained(base, local).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as exc:
        from rlcli.models.loading import load_error

        raise load_error("reward model", name_or_path, exc) from None
    return model, tokenizer


class RewardModelScorer:
    """Batched, gradient-free scoring of texts with a sequence classifier (eval mode, right padding).

    ``scorer(texts)`` -> Tensor [len(texts)] float32 on CPU: the chosen output read at each text's last real token,
    normalised with the run's ``reward_stats.json`` when ``normalize`` is set.
    """

    def __init__(self, model, tokenizer, *, label: str | int | None = None, stats: dict[str, Any] | None = None,
                 normalize: bool = False, batch_size: int = 32, device=None, max_length: int | None = None):
        if batch_size < 1:
            raise UserError(f"reward model batch_size must be positive, got {batch_size}")
        if normalize and not stats:
            raise UserError("normalize=True needs the reward statistics (reward_stats.json) that `rlcli rm` writes "
                            "into its output dir; this reward model has none")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # else HF refuses batches > 1
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        self.label = resolve_label(label, model.config)
        self.stats = stats
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_length = max_length or (stats or {}).get("max_length") or _position_limit(model.config, tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, label: str | int | None = None, normalize: bool = False,
                        batch_size: int = 32, device=None, max_length: int | None = None,
                        revision: str | None = None) -> RewardModelScorer:
        """Load an ``rlcli rm`` output dir (full model or LoRA adapter) or a hub sequence classifier."""
        model, tokenizer = _load(name_or_path, revision)
        stats = load_reward_stats(name_or_path, revision)
        if normalize and stats is None:
            raise UserError(f"reward model {name_or_path!r} has no {REWARD_STATS_FILE}: normalize=True needs the "
                            "mean/std that `rlcli rm` writes into its output dir (or set normalize to false)")
        return cls(model, tokenizer, label=label, stats=stats, normalize=normalize, batch_size=batch_size,
                   device=device, max_length=max_length)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        truncate = self.max_length is not None
        encoded = self.tokenizer(list(texts), truncation=truncate, max_length=self.max_length if truncate else None)
        tok = self.tokenizer
        fallback = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        return [ids if ids else [fallback] for ids in encoded["input_ids"]]  # an empty text still gets a score

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("RewardModelScorer takes a list of texts, not one string")
        def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return sequence_scores(self.model, input_ids.to(self.device), attention_mask.to(self.device))[:, self.label]

        scores = score_in_batches(self._encode(texts), self.batch_size, self.tokenizer.pad_token_id, score)
        if self.normalize:
            scores = (scores - self.stats["mean"]) / max(float(self.stats["std"]), 1e-8)
        return scores


def score_in_batches(encoded: list[list[int]], batch_size: int, pad_id: int, score) -> torch.Tensor:
    """[N] float scores of the token lists ``encoded``, ``batch_size`` at a time, similar lengths together (less
    padding): ``score(input_ids, attention_mask)`` gives the [n] scores of a right-padded batch."""
    scores = torch.empty(len(encoded), dtype=torch.float32)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        scores[idx] = score(*padding.pad([encoded[i] for i in idx], pad_id, "right")).float().cpu()
    return scores


def _position_limit(config, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


__all__ = ["REWARD_STATS_FILE", "RewardModelScorer", "last_token_index", "load_reward_stats", "resolve_label",
           "save_reward_stats", "sequence_scores"]
