"""What a run shows and records: a rich progress bar, ``metrics.jsonl`` (always), TensorBoard / W&B (on request)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlcli import rundir
from rlcli.config.errors import UserError

console = Console(highlight=False)
METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Cut a run's JSONL file back to its rows with ``"step" <= last_step`` (what ``--resume`` needs before it
    appends the steps after its checkpoint again); returns the rows kept.

    A run killed mid-write leaves a torn last line: it is dropped. A line that is not JSON anywhere else means the
    file was damaged otherwise, and is a ``UserError`` naming it. Rows without a step are kept. Nothing happens
    when the file does not exist. The file is replaced atomically, so a kill during the cut loses nothing.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if number == len(lines):
                break  # torn by a kill mid-write
            raise UserError(f"{path}:{number}: not a JSON object, so the file cannot be continued: "
                            f"{line[:60].decode(errors='replace')!r}; move the file away to resume")
        step = row.get("step")
        if not isinstance(step, (int, float)) or step <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


def open_jsonl(path: str | Path, resume_step: int | None) -> Path:
    """Get a run's JSONL file ready for appending (main process only): claim it in the output dir's manifest,
    then start it empty (fresh run) or cut it back to ``resume_step`` (``--resume``)."""
    path = Path(path)
    rundir.claim(path.parent, path.name)
    if resume_step is None:
        path.write_text("")
    else:
        truncate_jsonl(path, resume_step)
    return path


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
            open_jsonl(self.path, resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.tracker.log(numeric, step=step)


def check_trackers(recipe) -> list:
    """``logging.report_to`` trackers whose package is missing (Accelerate would skip them without a word)."""
    import importlib.util

    from rlcli.config.errors import Problem

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    problems = []
    logging = getattr(recipe, "logging", None)  # env-rollout logs nothing
    for i, name in enumerate(logging.report_to if logging is not None else []):
        if not any(importlib.util.find_spec(p) for p in packages[name]):
            problems.append(Problem(f"logging.report_to.{i}", f"{name} is not installed in this environment; install "
                                                              f"it (pip install {name}, or pip install "
                                                              f"'rlcli[{name}]') or remove it from report_to"))
    return problems


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a torn last line, from a killed run, is left out)."""
    lines = [line for line in (Path(output_dir) / METRICS_FILE).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise
    return records


class TrainingProgress:
    """A rich progress bar with the few metrics that matter; silent on non-main processes or when disabled. When the
    output is not a terminal (a SLURM job's log, a file) a bar cannot redraw itself: a plain line every
    ``every_s`` seconds and at the last step says the step, the time and the metrics instead."""

    def __init__(self, description: str, total: int, *, enabled: bool, start: int = 0, shown: tuple[str, ...] = (),
                 output: Console | None = None, every_s: float = 30.0):
        self.shown = shown
        self.enabled = enabled
        self.output = output or console
        self.lines = enabled and not self.output.is_terminal
        self.description, self.total, self.start, self.every_s = description, total, start, every_s
        self._began = self._said = time.monotonic()
        # On a narrow terminal the metrics give way (cut with an ellipsis), then the bar; the step count and the
        # times never do (rich would otherwise squeeze every column, the step count and ETA first).
        self._progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[metrics]}", table_column=Column(ratio=2, no_wrap=True, overflow="ellipsis")),
            console=self.output,
            disable=not enabled or self.lines,
            expand=True,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, metrics="")

    def __enter__(self) -> "TrainingProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __rich__(self):
        return self._progress.get_renderable()

    def update(self, step: int, metrics: dict[str, Any] | None = None) -> None:
        text = ""
        if metrics:
            text = "  ".join(f"{k} {_fmt(metrics[k])}" for k in self.shown if k in metrics)
        self._progress.update(self._task, completed=step, metrics=text)
        now = time.monotonic()
        if self.lines and (step >= self.total or now - self._said >= self.every_s):
            self._said = now
            elapsed, done = now - self._began, step - self.start
            left = elapsed / done * (self.total - step) if done > 0 else 0.0
            self.output.print(f"{self.description} {step}/{self.total} ({100 * step // max(self.total, 1)}%), "
                              f"{_duration(elapsed)} elapsed, {_duration(left)} left" + (f": {text}" if text else ""),
                              soft_wrap=True, markup=False)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
