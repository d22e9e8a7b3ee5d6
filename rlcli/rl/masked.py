"""Reductions and whitening over the positions a mask selects.

Masks are 0/1 tensors of any dtype (bool, long, float) that broadcast against ``x``. Masked-out values never
reach a result, not even as ``0 * nan``: they are replaced with ``torch.where`` before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _bool_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.to(device=x.device, dtype=torch.bool)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: any shape, floating.
        mask: same shape as ``x`` (or broadcastable to it), 0/1 of any dtype.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``x``'s shape with ``dim`` removed (a 0-dim tensor when ``dim`` is None), ``x``'s dtype.
    """
    selected = torch.where(_bool_mask(mask, x), x, torch.zeros_like(x))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def _count(x: torch.Tensor, mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    m = torch.broadcast_to(_bool_mask(mask, x), x.shape).to(x.dtype)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1; 0 (not NaN) where the mask selects nothing. Arguments
    and the result's shape as :func:`masked_sum`."""
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1.

    Args:
        x: any shape, floating.
        mask: same shape as ``x`` (or broadcastable to it), 0/1 of any dtype.
        unbiased: divide by ``n - 1`` (Bessel's correction) instead of ``n``.

    Returns:
        0-dim tensor, ``x``'s dtype; 0 when fewer than two positions (one, unbiased) are selected.
    """
    mean = masked_mean(x, mask)
    n = _count(x, mask, None)
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased:
        # n / max(n - 1, 1): leaves var = 0 (not 0 * inf) when one position or none is selected.
        var = var * n / (n - 1).clamp(min=1)
    return var


# the smallest standard deviation whitening divides by (``masked_whiten``'s ``min_std``): advantages or rewards that
# hardly vary (every episode of a batch scored alike, say) carry little but noise, and dividing by their std would
# blow that noise up to unit size (by 1e4 for a std of 1e-4); in the units of the scores, which rlcli's recipes keep
# near [0, 1] (``ppo.score_scale`` / ``score_norm`` for others)
WHITEN_MIN_STD = 1e-2


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    restore_mean: bool = False,
    eps: float = 1e-8,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    min_std: float = 0.0,
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) std 1 using statistics over the masked positions only.

    Args:
        x: any shape, floating, e.g. advantages ``[batch, response_len]``.
        mask: same shape as ``x`` (or broadcastable to it), 0/1 of any dtype.
        restore_mean: add the mean back after scaling, i.e. divide by the std without re-centring
            (used for rewards, ppo-details item 9).
        eps: added to the variance before the square root.
        min_std: divide by ``max(sqrt(var + eps), min_std)``: a floor that keeps near-constant ``x`` from being
            scaled up without bound (``WHITEN_MIN_STD``).
        sum_over_processes: for data split over processes: a function that sums a 1-D float64 tensor over all of
            them (e.g. an all-reduce), so that every process uses the statistics of the whole batch. None: this
            process's ``x`` is the whole batch.

    Returns:
        ``x``'s shape and dtype; positions where ``mask`` is 0 are 0.
    """
    m = _bool_mask(mask, x)
    if sum_over_processes is None:
        mean, var = masked_mean(x, m), masked_var(x, m)
    else:
        # two passes (mean, then squared deviations) for the same accuracy as the one-process path
        total, count = sum_over_processes(torch.stack([masked_sum(x, m).double(), _count(x, m, None).double()]))
        mean = (total / count.clamp(min=1)).to(x.dtype)
        (sq,) = sum_over_processes(masked_sum((x - mean) ** 2, m).double().reshape(1))
        var = (sq / count.clamp(min=1) * count / (count - 1).clamp(min=1)).to(x.dtype)
    scale = torch.rsqrt(var + eps)
    if min_std > 0:
        scale = scale.clamp(max=1.0 / min_std)
    whitened = (x - mean) * scale
    if restore_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))
