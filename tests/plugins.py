"""Plug-ins that the tests' recipes name by path (``file.py:name``); this file imports rlcli and the standard library
only, so that an rlcli process (or another environment's, as in tests/vllm) can load it.

``every_turn_calls`` is a tool-call parser (``env.tool_call_parser: tests/plugins.py:every_turn_calls``) that reads
every assistant turn as a call of the calculator: makes a real model that has never seen a tool call produce episodes
with tool turns.

``Tally`` is a stateful environment written to TRL's ``environment_factory`` contract, whose per-episode state shows
in every outcome (``env.environment: {spec: tests/plugins.py:Tally, options: {log: PATH}}``).

- ``reset(start=N, **row)`` sets the episode's count to the row's ``start`` and appends `` Count from N.`` to the
  prompt;
- every model turn without a call is answered (``_respond``) with the count after adding 1 + the turn's length in
  characters mod 3: `` (count 1203)``: forced text, mask 0, which an untrained model gets as well as a trained one;
  once 4 or more were added the environment ends the episode (``done``);
- ``add(n)`` is a tool (a trained model's way to move the count);
- ``get_reward()`` is (count − start) / 10: what this episode did, read from its own state only.

With ``log`` every scored episode appends one JSON line to that file: the process (``RANK``, pid), the instance's
serial, its start, count, reward and the observations it gave. An instance serves one episode: a second ``reset``
raises, which fails the episode (``env_error``), so a reused instance cannot go unnoticed.
"""

from __future__ import annotations

import itertools
import json
import os

_serials = itertools.count()


class Tally:
    def __init__(self, log: str | None = None):
        self.log = log
        self.serial = next(_serials)
        self.start = None
        self.done = False

    def reset(self, **row) -> str:
        if self.start is not None:
            raise RuntimeError("reset twice: one instance served two episodes")
        self.start = self.count = int(row["start"])
        self.observations: list[str] = []
        return f" Count from {self.start}."

    def add(self, n: str) -> str:
        """Add to the count.

        Args:
            n: how much to add.
        """
        self.count += int(n)
        return f"count {self.count}"

    def _respond(self, text: str) -> str:
        self.count += 1 + len(text) % 3
        self.done = self.count - self.start >= 4
        self.observations.append(f" (count {self.count})")
        return self.observations[-1]

    def get_reward(self) -> float:
        reward = (self.count - self.start) / 10
        if self.log:
            line = {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "serial": self.serial,
                    "start": self.start, "count": self.count, "reward": reward, "observations": self.observations}
            with open(self.log, "a") as f:
                f.write(json.dumps(line) + "\n")
        return reward


def every_turn_calls(text: str) -> list:
    """Every assistant turn is a call of the calculator (see the module docstring)."""
    from rlcli.env import ToolCall

    return [ToolCall("calculator", {"expression": "6*7"})]
