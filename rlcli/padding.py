"""Padding and position ids: the one place that decides how token lists become batches.

Every room uses these (data, generation, value head, text environments, reward models), so a prompt padded for
sampling and the same prompt padded for a training forward pass always get the same token positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(sequences: Sequence[Sequence[int]], pad_value: int, side: str, *, min_width: int = 0,
        dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of values -> ``[B, W]`` values padded on ``side`` (``"left"`` or ``"right"``) with ``pad_value``, and
    the ``[B, W]`` long mask (1 on real entries). ``W`` is the longest sequence, at least ``min_width``; an empty
    batch gives ``[0, min_width]`` tensors."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(max((len(s) for s in sequences), default=0), min_width)
    values = torch.full((len(sequences), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        values[row, cols] = torch.as_tensor(list(seq), dtype=dtype)
        mask[row, cols] = 1
    return values, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Q]`` ids left-padded with ``pad_id`` (prompts for generation) and their mask."""
    return pad(sequences, pad_id, "left")


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, R]`` ids right-padded with ``pad_id`` (responses; width at least 1) and their mask."""
    return pad(sequences, pad_id, "right", min_width=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = number of real tokens before it (0 on left padding).

    Padded and unpadded rows get the same positions for their real tokens (ppo-details item 3), which is what
    makes a left-padded prompt's log-probs equal the same prompt's alone.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_to_right(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens of a left-padded ``[B, Q]`` batch to the front (right padding).

    Encoders take no position ids, so a model with absolute positions (BART) would see a left-padded prompt at
    shifted positions, and the shift would change with the batch's longest prompt. Right padding keeps every
    prompt at positions 0..n-1 in the sampler and in training alike.
    """
    lengths = mask.sum(dim=1)
    order = torch.argsort(mask == 0, dim=1, stable=True)  # real tokens first, in their order
    new_ids = ids.gather(1, order)
    new_mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
    return new_ids.masked_fill(new_mask == 0, pad_id), new_mask
