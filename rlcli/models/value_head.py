"""Policies with a scalar value per token, for PPO: a causal or seq2seq LM (optionally a peft LoRA model) plus a
linear value head on its last hidden state.

One forward pass gives both the logits and the values (no extra pass for the critic). The
value head is saved beside the model's weights (``value_head.safetensors`` + ``value_head.json``), so an output
dir loads with ``from_pretrained`` as a plain LM and with :func:`load_value_head_model` as a PPO policy.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlcli.models.lm_head import capture_head_input, chunkable, output_head
from rlcli.padding import left_to_right, position_ids

VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: ``nn.Dropout`` modules, config fields, and the float rates that attention modules keep
    as attributes (T5's ``self.dropout``, Llama's ``self.attention_dropout``, passed to the attention function while
    training). Dropout makes the first-epoch ratio differ from 1 (ppo-details item 8): T5 with only the modules and
    the config zeroed still gave train-mode logits 1.6 away from eval-mode ones."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(config.to_dict().items()):
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
                setattr(config, name, 0.0)


def hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}")


class ValueHead(nn.Module):
    """hidden [B, T, H] -> values [B, T] (float32), no dropout."""

    def __init__(self, hidden: int, init_std: float = 0.0):
        super().__init__()
        self.summary = nn.Linear(hidden, 1, dtype=torch.float32)
        nn.init.normal_(self.summary.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class ValueHeadModel(nn.Module):
    """An LM (``pretrained``: a transformers model or a peft model around one) with a value head.

    ``forward`` takes a query+response batch and returns logits and values for the R response positions only:
    for causal LMs the logits that predict response token t sit at index Q-1+t of the full sequence, and only
    the last R+1 positions' logits are computed (``logits_to_keep``); for seq2seq the decoder reads
    ``[start] + response[:-1]``.

    With ``hidden=True`` it returns the LM head's *input* at those positions instead of the logits (the model
    computes none), and ``head`` turns any chunk of them into logits: ``rlcli.rl.chunked.token_stats`` then never
    holds more than one chunk's logits. For a model whose logits are not ``head(hidden)`` (soft-capping, a logit
    scale: ``rlcli.models.lm_head.chunkable``) ``hidden=True`` returns the logits themselves and ``head`` is the
    identity, so callers need not care.
    """

    def __init__(self, pretrained: nn.Module, value_head: ValueHead | None, critic: "ValueHeadModel | None" = None):
        super().__init__()
        if value_head is not None and critic is not None:
            raise ValueError("a policy takes its values from its own value head or from a separate critic, not both")
        self.pretrained = pretrained
        self.value_head = value_head
        # a separate critic: a model of its own with its value head (``critic.separate``), a submodule so that one
        # optimizer, one wrapper (DDP, FSDP2, DeepSpeed) and one checkpoint hold both, as TRL's policy-and-value
        # wrapper does
        self.critic = critic
        self.config = pretrained.config
        self.is_encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))
        self.is_peft = hasattr(pretrained, "peft_config")
        self.pad_token_id = int(getattr(self.config, "pad_token_id", None) or 0)
        self.chunkable = chunkable(pretrained)

    @property
    def has_values(self) -> bool:
        """Whether ``forward`` gives values: a value head on this model's trunk, or a separate critic."""
        return self.value_head is not None or self.critic is not None

    def critic_parameters(self) -> list[nn.Parameter]:
        """The parameters that learn the values only: the value head, or the whole separate critic."""
        module = self.critic if self.critic is not None else self.value_head
        return [] if module is None else list(module.parameters())

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` head inputs from ``forward(..., hidden=True)`` -> ``[..., V]`` logits (LoRA on the head and
        tied embeddings included: it is the model's own output-embeddings module)."""
        return output_head(self.pretrained)(hidden) if self.chunkable else hidden

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        with_values: bool = True,
        hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``logits`` [B, R, V] (predicting each response token) and ``values`` [B, R] (or None); with
        ``hidden=True`` the head's input [B, R, H] in place of the logits (see the class docstring)."""
        args = (query_ids, query_mask, response_ids, response_mask)
        if self.critic is not None:
            # the critic's own pass (its LM head computes nothing: hidden=True), then the policy's without values
            values = self.critic(*args, hidden=True)[1] if with_values else None
            out, _ = self._policy_forward(*args, hidden=hidden)
            return out, values
        return self._policy_forward(*args, hidden=hidden, with_values=with_values)

    def _policy_forward(self, query_ids, query_mask, response_ids, response_mask, *, hidden: bool,
                        with_values: bool = False):
        if hidden and self.chunkable:
            with capture_head_input(self.pretrained) as captured:
                _, values = self._forward(query_ids, query_mask, response_ids, response_mask, with_values)
            h = captured.hidden
            return (h if self.is_encoder_decoder else h[:, :-1]), values
        return self._forward(query_ids, query_mask, response_ids, response_mask, with_values)

    def _forward(self, query_ids, query_mask, response_ids, response_mask, with_values):
        r = response_ids.shape[1]
        with_values = with_values and self.value_head is not None
        if self.is_encoder_decoder:
            # the sampler encodes right-padded prompts too (see rlcli.padding.left_to_right)
            query_ids, query_mask = left_to_right(query_ids, query_mask, self.pad_token_id)
            start = torch.full_like(response_ids[:, :1], self.config.decoder_start_token_id)
            decoder_ids = torch.cat([start, response_ids[:, :-1]], dim=1)
            decoder_mask = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask[:, :-1]], dim=1)
            out = self.pretrained(input_ids=query_ids, attention_mask=query_mask, decoder_input_ids=decoder_ids,
                                  decoder_attention_mask=decoder_mask, output_hidden_states=with_values,
                                  use_cache=False)
            logits = out.logits
            hidden = out.decoder_hidden_states[-1] if with_values else None
        else:
            input_ids = torch.cat([query_ids, response_ids], dim=1)
            attention_mask = torch.cat([query_mask, response_mask], dim=1)
            out = self.pretrained(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids(attention_mask),
                                  output_hidden_states=with_values, use_cache=False, logits_to_keep=r + 1)
            logits = out.logits[:, :-1]
            hidden = out.hidden_states[-1][:, -(r + 1) : -1] if with_values else None
        values = self.value_head(hidden) if hidden is not None and self.value_head is not None else None
        return logits, values

    def reference_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``head`` of the reference: with the adapter disabled (LoRA may sit on the head too)."""
        with self.reference():
            return self.head(hidden)

    @contextmanager
    def reference(self):
        """With LoRA: the base model with the adapter really disabled, for reference log-probs."""
        if not self.is_peft:
            raise RuntimeError("reference() needs a peft policy; hold a frozen copy instead")
        with self.pretrained.disable_adapter():
            yield self

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        self.pretrained.save_pretrained(path, **kwargs)
        save_value_head(self.value_head, path)


def save_value_head(head: ValueHead, path: str | Path) -> None:
    """Write ``value_head.safetensors`` and ``value_head.json`` into ``path``."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path / VALUE_HEAD_WEIGHTS))
    (path / VALUE_HEAD_CONFIG).write_text(json.dumps({"hidden_size": head.summary.in_features}))


def load_value_head(path: str | Path) -> ValueHead:
    """The value head saved in an output dir."""
    path = Path(path)
    meta = json.loads((path / VALUE_HEAD_CONFIG).read_text())
    head = ValueHead(meta["hidden_size"])
    head.load_state_dict(load_file(str(path / VALUE_HEAD_WEIGHTS)))
    return head


CRITIC_DIR = "critic"  # a separate critic's LM and value head, inside a saved policy's directory


def load_value_head_model(path: str | Path, **from_pretrained_kwargs) -> ValueHeadModel:
    """Load a saved PPO policy: the LM (or LoRA adapter on its base) and its value head, or its separate critic
    (``critic/``, itself an LM with a value head)."""
    path = Path(path)
    if (path / CRITIC_DIR / VALUE_HEAD_CONFIG).exists():
        return ValueHeadModel(_load_lm(path, from_pretrained_kwargs), None,
                              critic=load_value_head_model(path / CRITIC_DIR, **from_pretrained_kwargs))
    return ValueHeadModel(_load_lm(path, from_pretrained_kwargs), load_value_head(path))


def _load_lm(path: Path, from_pretrained_kwargs: dict):
    """The LM saved in ``path``: a LoRA adapter on its base, or a causal / seq2seq model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

        adapter = json.loads((path / "adapter_config.json").read_text())
        cls = AutoPeftModelForSeq2SeqLM if adapter.get("task_type") == "SEQ_2_SEQ_LM" else AutoPeftModelForCausalLM
        return cls.from_pretrained(path, **from_pretrained_kwargs)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, **from_pretrained_kwargs)
