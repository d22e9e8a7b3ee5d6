"""``OUTPUT_DIR/curves.png``: a run's curves from its ``metrics.jsonl``, written at the end of the run when
matplotlib is installed (``pip install 'rlcli[plot]'``); without it, nothing is drawn and nothing is said."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rlcli import rundir
from rlcli.logging import read_metrics

CURVES_FILE = "curves.png"


def write_curves(out: Path, panels: list[tuple[str, ...]]) -> Path | None:
    """One panel per tuple of metric names (those the run logged), against the step; returns the file or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    rows = read_metrics(out)
    panels = [[name for name in names if any(name in r for r in rows)] for names in panels]
    panels = [names for names in panels if names]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if name.startswith("eval/") else None, markersize=3,
                        label=name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(out.name, fontsize=9)
    fig.tight_layout()
    rundir.claim(out, CURVES_FILE)
    fig.savefig(out / CURVES_FILE, dpi=90)
    plt.close(fig)
    return out / CURVES_FILE
