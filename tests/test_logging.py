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


def test_a_plain_line_every_few_seconds_when_the_output_is_not_a_terminal(monkeypatch):
    """A SLURM job's log: no bar (it cannot redraw itself there), a plain line per interval and at the last step."""
    import rlcli.logging as logging

    clock = iter([0.0, 10.0, 20.0, 31.0, 40.0, 65.0])
    monkeypatch.setattr(logging.time, "monotonic", lambda: next(clock))
    out = Console(width=80, file=io.StringIO(), color_system=None)
    assert not out.is_terminal
    progress = TrainingProgress("ppo", 5, enabled=True, start=0, shown=PPO_SHOWN, output=out, every_s=30)
    with progress:
        for step in range(1, 6):  # at 10, 20, 31, 40 and 65 s
            progress.update(step, PPO_METRICS)
    lines = out.file.getvalue().splitlines()
    assert lines == [
        "ppo 3/5 (60%), 0:00:31 elapsed, 0:00:21 left: reward_mean 0.1235  kl 0.0123  kl_coef 0.05  "
        "response_length 31.5  tool_use_rate 0.25",
        "ppo 5/5 (100%), 0:01:05 elapsed, 0:00:00 left: reward_mean 0.1235  kl 0.0123  kl_coef 0.05  "
        "response_length 31.5  tool_use_rate 0.25",
    ], lines
