"""A toy reward for the tiny PPO recipes: the model is paid for writing the digit 7.

``score`` counts the 7s in the response (capped, so the policy cannot win by writing forever) and is a reward
a randomly initialised byte-level model can learn within a few dozen PPO steps: at the start a response of 32
random bytes holds about 0.12 sevens on average.
"""

from __future__ import annotations


def score(responses: list[str], cap: int = 16) -> list[float]:
    return [float(min(r.count("7"), cap)) for r in responses]
