"""What a run shows and records: a rich progress bar, ``metrics.jsonl`` (always), TensorBoard / W&B (on request)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlcli import rundir

console = Console(highlight=False)
METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


class MetricsLog:
    """Append one JSON object per logged step to ``OUTPUT_DIR/metrics.jsonl`` and forward to trackers.

    Only the main process writes. On resume the file is cut back to the checkpoint's step first, so a resumed
    run's file reads exactly like an uninterrupted one.
    """

    def __init__(self, output_dir: str | Path, *, is_main: bool, tracker=None, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main = is_main
        self.tracker = tracker  # an Accelerator with trackers initialised, or None
        if is_main:
            rundir.claim(self.path.parent, METRICS_FILE)
            if resume_step is None:
                self.path.write_text("")
            else:
                self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.tracker.log(numeric, step=step)


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainingProgress:
    """A rich progress bar with the few metrics that matter; silent on non-main processes or when disabled."""

    def __init__(self, description: str, total: int, *, enabled: bool, start: int = 0, shown: tuple[str, ...] = ()):
        self.shown = shown
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, metrics="")

    def __enter__(self) -> "TrainingProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        text = ""
        if metrics:
            text = "  ".join(f"{k} {_fmt(metrics[k])}" for k in self.shown if k in metrics)
        self._progress.update(self._task, completed=step, metrics=text)


def _fmt(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
