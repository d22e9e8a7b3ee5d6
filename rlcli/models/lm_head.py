"""The final hidden states of a Hugging Face LM, taken where its LM head reads them, so that logits can be computed a
chunk of positions at a time (``rlcli.rl.chunked``) instead of all at once by the model's forward.

``capture_head_input(model)`` hooks the model's output embeddings (``get_output_embeddings()``: a plain ``Linear``,
one tied to the input embeddings, or peft's LoRA wrapper around it): the hook keeps the head's input and hands the
head an empty slice of it, so the model's forward computes zero logits. Whatever the model does before its head
(final norm, T5's ``d_model ** -0.5`` scaling, ``logits_to_keep``) is in the captured states; calling the head module
on them gives the model's own logits. A model that changes the logits *after* its head (Gemma's soft-capping,
Cohere's ``logit_scale``, Granite's ``logits_scaling``) is not chunkable: ``chunkable`` says so and callers take the
model's logits instead (the same statistics, without the memory saving).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# config fields of transformers models that transform the logits after the LM head
_POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and similar wrappers
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that turns final hidden states into logits (None when the model has none it names)."""
    model = _unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, nn.Module) else None


def chunkable(model: nn.Module) -> bool:
    """True when the logits are exactly ``output_head(model)(captured hidden states)``."""
    config = getattr(_unwrap(model), "config", None)
    if output_head(model) is None or config is None:
        return False
    for name in _POST_HEAD_FIELDS:
        value = getattr(config, name, None)
        if value is not None and value != 1 and value is not False:
            return False
    return True


class HeadInput:
    """Filled by ``capture_head_input``: ``hidden``, the head's input of the forward (``[B, T, H]``), and ``result``,
    what ``then(hidden, head)`` returned."""

    hidden: torch.Tensor | None = None
    result = None


@contextmanager
def capture_head_input(model: nn.Module, then=None):
    """Inside, a forward of ``model`` keeps its head's input in the yielded ``HeadInput`` and computes no logits
    (the head sees zero positions). ``then(hidden, head)``, if given, runs inside the model's forward, where the
    head is called (its mixed-precision autocast, its sharding engine's hooks); calls of the head it makes, and
    calls after the block (a checkpointed chunk recomputed in the backward), are plain."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embeddings to take hidden states from")
    captured = HeadInput()

    def hook(module, args):
        if captured.hidden is not None or not args or not torch.is_tensor(args[0]) or args[0].dim() < 2:
            return None
        captured.hidden = args[0]
        if then is not None:
            captured.result = then(args[0], module)
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
