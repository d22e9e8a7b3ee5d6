"""What a run shows: the progress bar keeps its step count and ETA on an 80-column terminal."""

from __future__ import annotations

import io
import re

from rich.console import Console

from rlcli.logging import TrainingProgress

PPO_SHOWN = ("reward_mean", "kl", "kl_coef", "response_length", "tool_use_rate")
PPO_METRICS = {"reward_mean": 0.123456, "kl": 0.0123, "kl_coef": 0.05, "response_length": 31.5, "tool_use_rate": 0.25}


def _render(width: int) -> str:
    out = Console(width=width, file=io.StringIO(), color_system=None)
    progress = TrainingProgress("ppo", 60, enabled=True, start=2, shown=PPO_SHOWN, output=out)
    progress.update(3, PPO_METRICS)
    progress.update(4, PPO_METRICS)
    out.print(progress)
    return out.file.getvalue()


def test_step_count_and_eta_survive_80_columns():
    line = _render(80).rstrip("\n")
    assert "\n" not in line and len(line) <= 80
    assert re.search(r"ppo .*4/60 \d:\d\d:\d\d [-\d]:[-\d]{2}:[-\d]{2} reward_mean 0.1235", line), line
    assert line.endswith("…")  # the metrics give way, cut visibly


def test_wide_terminal_shows_every_metric():
    line = _render(200)
    for name in PPO_SHOWN:
        assert name in line
