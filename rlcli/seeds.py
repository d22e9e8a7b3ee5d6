"""Seeded streams shared by the trainers: which examples a step uses, and each process's randomness.

One recipe ``seed`` drives everything (ppo-details item 16); every stream below is a pure function of it and of
the step (and process, epoch), never of what ran before, so a run resumed from a checkpoint draws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

import torch


def index_stream(num_examples: int, seed: int, start: int, count: int) -> list[int]:
    """Indices ``start .. start+count`` of an endless stream of seeded epoch permutations (no example dropped)."""
    out, epoch = [], start // num_examples
    offset = start % num_examples
    while len(out) < count:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(num_examples, generator=g).tolist()
        out.extend(perm[offset:])
        offset, epoch = 0, epoch + 1
    return out[:count]


def rollout_generator(seed: int, step: int, process: int) -> torch.Generator:
    """The randomness of one process's rollouts at one step (sampling, prompt lengths)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + process)


def shuffle_generator(seed: int, steps_done: int, epoch: int) -> torch.Generator:
    """The minibatch shuffle of one PPO epoch (the same on every process: each shuffles its own rows)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + steps_done * 101 + epoch)
