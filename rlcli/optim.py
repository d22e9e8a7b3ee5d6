"""The optimiser of every trainer: AdamW and its learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from rlcli.config.common import OptimConfig
from rlcli.config.errors import UserError


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW and its schedule over ``params``: parameters, or AdamW parameter groups (dicts with ``params``)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler
